"""Label quality on both synthetic worlds, with the same protocol.

For each world, a probe set of ``PROBE_IMAGES`` images (seed 0) and three
builds with the oracle captioner, the extractive summarizer and the
procedural generator of that world:

- ``dnd``: Describe-and-Dissect as configured (attention crops on);
- ``dnd_nocrop``: the same with ``crop.enabled = false``;
- ``clip_dissect``: the CLIP-Dissect baseline (its image-text space is the
  probe set's captions.jsonl embedded by the atlas embedder).

World ``shapes`` builds the demo's config (``demo-cnn`` conv3, conv4, fc and
``planted`` detectors); world ``marks`` builds ``bench/marks_world.toml``
(``planted-marks`` detectors and ``marks-cnn`` conv1-conv4, fc). Each atlas
is scored by ``dnd-atlas eval``'s synthetic protocol (MPNet cosine included).
Keys: ``worlds_<world>_<build>_<metric>``, and per world
``worlds_<world>_presence_<mode>_{true,gap}_<metric>`` (the true concepts'
held-out fidelity with each presence mode, on the ``dnd`` atlas). Set ``DND_ATLAS_BENCH_DIR`` to
keep the atlases (and ``units.json``, every unit's concepts and labels)
there instead of in a temporary folder.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROBE_IMAGES = 2000
MARKS_CONFIG = Path(__file__).with_name("marks_world.toml")
BUILDS: dict[str, list[str]] = {
    "dnd": [],
    "dnd_nocrop": ["crop.enabled=false"],
    "clip_dissect": ["labeler=clip-dissect"],
}


def world_config(world: str, root: Path) -> dict[str, Any]:
    """The build config of ``world`` with its probe set under ``root``
    (written when missing)."""
    from builder.demo import demo_config_dict
    from builder.synthetic.probe import write_probe_set

    probe = write_probe_set(
        root / f"{world}-probe", n=PROBE_IMAGES, seed=0, world=world, progress=False
    )
    if world == "shapes":
        return demo_config_dict(root, probe)
    data = tomllib.loads(MARKS_CONFIG.read_text())
    for m in data["models"]:
        m["probe"] = str(probe)
    return data


def _metrics(ev: dict[str, Any]) -> dict[str, Any]:
    fl, pl = ev["final_layer"], ev["planted"]
    return {
        "final_match_rate": fl["match_rate"],
        "final_exact_rate": fl["exact_rate"],
        "final_mpnet_cos": fl["mpnet_cos"],
        "final_units": fl["units"],
        "planted_single_match_rate": pl["single_match_rate"],
        "planted_single_units": pl["single_units"],
        "planted_double_match_rate": pl["double_match_rate"],
        "planted_double_units": pl["double_units"],
    }


def presence_figures(atlas: Path, prefix: str) -> dict[str, float]:
    """Which caption-based presence ranks the world's images best (``bench/fidelity.py``)."""
    from bench.fidelity import presence_figures as figures

    return figures(atlas, prefix)


def build_and_eval(world: str, build: str, root: Path) -> tuple[dict[str, Any], list[dict]]:
    """Build ``world``'s atlas variant ``build`` under ``root`` and score it."""
    from builder.config import BuildConfig, apply_override
    from builder.evaluation.synthetic import evaluate_synthetic
    from builder.pipeline.run import build as run_build

    data = world_config(world, root)
    data["out"] = str(root / f"{world}-{build}")
    for item in BUILDS[build]:
        apply_override(data, item)
    t0 = time.perf_counter()
    run_build(BuildConfig.from_dict(data))
    seconds = time.perf_counter() - t0
    ev = evaluate_synthetic(data["out"])
    return {**_metrics(ev), "build_s": round(seconds, 1)}, ev["units"]


def run() -> dict[str, Any]:
    """Every figure for both worlds (see the module docstring)."""
    os.environ.setdefault("DND_ATLAS_PROGRESS", "0")
    keep = os.environ.get("DND_ATLAS_BENCH_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        out: dict[str, Any] = {}
        units: dict[str, list[dict]] = {}
        for world in ("shapes", "marks"):
            for build in BUILDS:
                metrics, per_unit = build_and_eval(world, build, root)
                units[f"{world}-{build}"] = per_unit
                for key, value in metrics.items():
                    out[f"worlds_{world}_{build}_{key}"] = _round(value)
            out.update(presence_figures(root / f"{world}-dnd", f"worlds_{world}_presence"))
        if keep:
            (root / "units.json").write_text(json.dumps(units, indent=1))
    return out


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value
