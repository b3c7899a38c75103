"""``dnd-atlas demo``: the synthetic world end to end, offline, on a CPU.

Renders the probe set, writes the build config next to it (so the demo is
reproducible with ``dnd-atlas build --config DIR/demo.toml``), and builds an
atlas of three models: ``demo-cnn`` (a small CNN trained on the synthetic
world; its weights ship in data/, and so does a sparse autoencoder on its
``conv4`` whose latents are the layer ``sae.conv4``), ``planted`` (exact
concept detectors) and ``planted-dictionary`` (polysemantic mixtures of the
detectors, ``mixed``, and the SAE that unmixes them, ``sae.mixed``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from builder.config import BuildConfig
from builder.pipeline.records import BuildSummary
from builder.pipeline.run import build

log = logging.getLogger(__name__)

DEMO_CNN_LAYERS = ("conv3", "conv4", "fc", "sae.conv4")
PLANTED_LAYERS = ("detectors",)
PLANTED_MIXED_LAYERS = ("mixed", "sae.mixed")
# sparse autoencoders shipped in data/sae/ (builder/sae.py); their latents are layers "sae.NAME"
DEMO_CNN_DICTIONARIES = ({"layer": "conv4", "path": "demo-cnn-conv4"},)
PLANTED_MIXED_DICTIONARIES = ({"layer": "mixed", "path": "planted-mixed"},)


def demo_config_dict(out: Path, probe: Path) -> dict:
    """The demo's build config as a TOML-able dict."""
    return {
        "out": str(out / "atlas"),
        "embedder": "minilm",
        "models": [
            {"name": "demo-cnn", "target": "demo-cnn", "probe": str(probe), "layers": list(DEMO_CNN_LAYERS),
             "target_options": {"dictionaries": [dict(d) for d in DEMO_CNN_DICTIONARIES]}},
            {"name": "planted", "target": "planted", "probe": str(probe), "layers": list(PLANTED_LAYERS)},
            {"name": "planted-dictionary", "target": "planted-mixed", "probe": str(probe),
             "layers": list(PLANTED_MIXED_LAYERS),
             "target_options": {"dictionaries": [dict(d) for d in PLANTED_MIXED_DICTIONARIES]}},
        ],
        "describe": {"captioner": "oracle", "summarizer": "extractive"},
        "dissect": {
            "generator": "procedural",
            "similarity": "target-features",
            "similarity_options": {"target": "demo-cnn"},
        },
    }


def run_demo(out: str | Path, n_images: int = 5000, seed: int = 0, overrides: list[str] | None = None) -> BuildSummary:
    """Render the probe set into ``out/probe`` and build ``out/atlas``."""
    import tomli_w

    from builder.config import apply_override
    from builder.synthetic.probe import write_probe_set

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    probe = write_probe_set(out / "probe", n=n_images, seed=seed)
    data = demo_config_dict(out, Path(probe))
    for item in overrides or []:
        apply_override(data, item)
    cfg = BuildConfig.from_dict(data)
    (out / "demo.toml").write_text(tomli_w.dumps(data))
    return build(cfg)
