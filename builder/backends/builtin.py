"""The table of built-in backends: registry name -> ``module:callable``.

Nothing is imported until a build asks for a backend by name, so choosing
the offline ``extractive`` summarizer never loads the openai client and the
synthetic world's captioner never loads transformers. Add a backend here
with one line; anyone else's backend is named by its ``module:callable``
path in the config, or registered with ``Registry.register``.
"""

from __future__ import annotations

BUILTIN_BACKENDS: dict[str, dict[str, str]] = {
    "target": {
        "demo-cnn": "builder.synthetic.demo_cnn:demo_cnn",
        "planted": "builder.synthetic.planted:planted_model",
        "planted-marks": "builder.synthetic.planted_marks:planted_marks_model",
        "marks-cnn": "builder.synthetic.marks_cnn:marks_cnn",
        "planted-mixed": "builder.synthetic.planted_dictionary:planted_mixed_model",
    },
    "captioner": {
        "oracle": "builder.synthetic.oracle:OracleCaptioner",
        "precomputed": "builder.backends.precomputed:PrecomputedCaptioner",
        "blip": "builder.backends.hf:BlipCaptioner",
        "blip2": "builder.backends.hf:Blip2Captioner",
        "openai-vision": "builder.backends.openai_api:OpenAIVisionCaptioner",
    },
    "summarizer": {
        "extractive": "builder.backends.extractive:ExtractiveSummarizer",
        "captions": "builder.backends.extractive:CaptionsAsCandidates",
        "openai": "builder.backends.openai_api:OpenAISummarizer",
    },
    "generator": {
        "procedural": "builder.synthetic.generator:ProceduralGenerator",
        "diffusers": "builder.backends.diffusion:DiffusersGenerator",
    },
    "similarity": {
        "target-features": "builder.backends.target_features:TargetFeatureSimilarity",
        "clip": "builder.backends.clip:ClipSimilarity",
        "sentence": "builder.backends.clip:SentenceSimilarity",
    },
}

# Dictionaries a config may name that are made on first use, exactly, from their
# definition (no weights in the repository): name -> the ``module:callable``
# taking the name, returning the folder. Trained ones ship in data/sae/.
GENERATED_DICTIONARIES: dict[str, str] = {
    "planted-mixed": "builder.synthetic.dictionaries:generated_dictionary",
}
