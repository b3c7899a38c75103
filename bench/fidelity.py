"""What label fidelity costs, and which presence ranks images best.

- ``fidelity_overhead_ratio``: wall time of the demo build (the demo's
  ``PROBE_IMAGES`` probe images, every demo model) with fidelity on, over the
  same build with ``fidelity.enabled = false``; both in this run, after a
  small warm-up build (so neither pays for loading libraries and models),
  each with its own empty content cache. ``fidelity_stage_share``: the ``fidelity`` and
  ``fidelity_captioner`` stage seconds of the first build over its wall time.
- ``fidelity_presence_<mode>_true_<metric>``: the ``eval --protocol
  fidelity`` score of the *true* concepts of the demo's ground-truth layers
  (what a perfect labeler would say) with each caption-based presence mode,
  on a held-out sample; the mode that scores true concepts highest ranks
  images best. ``_gap_`` is true minus shuffled labels (how far a true label
  stands from chance). ``bench/worlds.py`` prints the same for the marks world.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

PROBE_IMAGES = 5000  # the demo's default
WARM_UP_IMAGES = 60
MODES = ("words", "embedding", "words+embedding")


def presence_figures(atlas_dir: Path, prefix: str, sample_size: int = 300) -> dict[str, float]:
    """True-concept fidelity (and its gap over shuffled labels) per presence
    mode on a held-out sample of a synthetic-world atlas."""
    from builder.evaluation.fidelity import FidelityOptions, evaluate_fidelity
    from builder.evaluation.view import read_atlas

    view = read_atlas(atlas_dir)
    out: dict[str, float] = {}
    for mode in MODES:
        cfg = dict(view.meta["build_config"])
        cfg["fidelity"] = {**cfg.get("fidelity", {}), "presence": mode}
        moded = dataclasses.replace(view, meta={**view.meta, "build_config": cfg})
        res, _ = evaluate_fidelity(moded, FidelityOptions(sample_size=sample_size))
        name = mode.replace("+", "_")
        for metric in ("correlation", "auprc"):
            out[f"{prefix}_{name}_true_{metric}"] = round(res[f"true_{metric}"], 3)
            out[f"{prefix}_{name}_gap_{metric}"] = round(res[f"true_{metric}"] - res[f"shuffled_{metric}"], 3)
    return out


def _build(root: Path, name: str, probe: Path, overrides: list[str]) -> tuple[float, dict[str, float]]:
    from bench.pipeline import atlas_calls
    from builder.config import BuildConfig, apply_override
    from builder.demo import demo_config_dict
    from builder.pipeline.run import build

    data = demo_config_dict(root / name, probe)
    data["cache_dir"] = str(root / name / "cache")
    for item in overrides:
        apply_override(data, item)
    t0 = time.perf_counter()
    build(BuildConfig.from_dict(data))
    wall = time.perf_counter() - t0
    _, secs, _ = atlas_calls(Path(data["out"]))
    return wall, secs


def run() -> dict[str, Any]:
    from builder.synthetic.probe import write_probe_set

    os.environ.setdefault("DND_ATLAS_PROGRESS", "0")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        probe = write_probe_set(root / "probe", n=PROBE_IMAGES, seed=0, progress=False)
        _build(root, "warm-up", write_probe_set(root / "warm-up-probe", n=WARM_UP_IMAGES, seed=1, progress=False),
               [])
        wall_off, _ = _build(root, "off", probe, ["fidelity.enabled=false"])
        wall_on, secs = _build(root, "on", probe, [])
        fid_s = sum(v for k, v in secs.items() if k.startswith("fidelity"))
        out: dict[str, Any] = {
            "fidelity_overhead_ratio": round(wall_on / wall_off, 3),
            "fidelity_stage_share": round(fid_s / wall_on, 3),
            "fidelity_build_s_on": round(wall_on, 1),
            "fidelity_build_s_off": round(wall_off, 1),
        }
        out.update(presence_figures(root / "on" / "atlas", "fidelity_presence"))
    return out
