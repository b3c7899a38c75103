"""Backends: what each pipeline stage calls, behind one narrow interface per kind.

- ``interfaces``: ``Captioner``, ``Summarizer``, ``Generator``, ``Similarity``
  (batch in, batch out, ``config_key()`` for cache keys);
- ``registry``: one registry per kind, ``module:callable`` paths for anyone
  else's backend, ``create_backend``;
- ``builtin``: the table of built-in backends (importing it registers them);
- ``targets``: the models being dissected (registered, torchvision, timm,
  TorchScript, ``module:callable``);
- the backends themselves: ``extractive`` and ``precomputed`` (offline),
  ``hf`` (BLIP / BLIP-2), ``openai_api`` (any OpenAI-compatible LLM and
  vision captioner), ``diffusion`` (Stable Diffusion via diffusers),
  ``clip`` (CLIP similarity), ``target_features`` (CLIP's stand-in on the
  synthetic world).

Importing this package imports none of them: heavy libraries load only when
a build uses the backend that needs them.
"""
