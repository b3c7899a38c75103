"""The built-in backends, by registry name.

Light backends register themselves when their module is imported (below);
heavy ones (transformers, diffusers, the openai client) are registered
lazily by ``module:callable`` path, so they import only when a build uses
them. Add a backend here with one line.
"""

from __future__ import annotations

from builder import captioners as _captioners  # noqa: F401  (precomputed)
from builder import similarity as _similarity  # noqa: F401  (target-features)
from builder import summarize as _summarize  # noqa: F401  (extractive, captions)
from builder import synthetic as _synthetic  # noqa: F401  (oracle, procedural, demo-cnn, planted)
from builder.registry import captioners, generators, similarities, summarizers, targets  # noqa: F401

# Lazily imported backends: registry.register_lazy(name, "module:callable").
# (heavy backends are added here)
summarizers.register_lazy("openai", "builder.llm:OpenAISummarizer")
captioners.register_lazy("openai-vision", "builder.llm:OpenAIVisionCaptioner")
captioners.register_lazy("blip", "builder.captioners_hf:BlipCaptioner")
captioners.register_lazy("blip2", "builder.captioners_hf:Blip2Captioner")
generators.register_lazy("diffusers", "builder.generate_diffusers:DiffusersGenerator")
similarities.register_lazy("clip", "builder.similarity_clip:ClipSimilarity")
similarities.register_lazy("sentence", "builder.similarity_clip:SentenceSimilarity")
