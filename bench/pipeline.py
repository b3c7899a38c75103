"""Per-stage throughput of the real backends (tiny models, CPU) and calls per
neuron per stage for a 50-neuron build, with the caches on and off.

The backends are the real ones (BLIP captioner, the `openai` summarizer over
HTTP to an OpenAI-compatible server on 127.0.0.1, a Stable Diffusion pipeline,
CLIP), loaded from tiny random models built from configs: compute per call is
tiny, so the figures measure the pipeline's own overhead and how many calls it
makes. "Caches off" ignores the content cache and processes one neuron at a
time, so nothing is shared between neurons: every neuron pays for its own
captions, generated images and recordings.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

STAGES = ("captioner_images", "summarizer_requests", "generated_images", "target_forward_images")
CONCEPTS = ["red", "blue circle", "striped", "grass", "star"]


def _config(root: Path, tiny: dict, base_url: str, out: str, chunk: int) -> dict:
    return {
        "out": str(root / out),
        "device": "cpu",
        "chunk_size": chunk,
        "models": [{"name": "cnn", "target": "demo-cnn", "probe": str(tiny["probe"]),
                    "layers": ["conv2", "fc"]}],  # 32 + 18 = 50 neurons
        "describe": {
            "captioner": "blip", "captioner_options": {"model": str(tiny["blip"]), "max_new_tokens": 8},
            "summarizer": "openai",
            "summarizer_options": {"model": "stub-model", "base_url": base_url, "max_retries": 0},
        },
        "dissect": {
            "generator": "diffusers",
            "generator_options": {"model": str(tiny["sd"]), "steps": 2, "scheduler": "ddim"},
            "similarity": "clip", "similarity_options": {"model": str(tiny["clip"]), "text_embedder": "minilm"},
        },
    }


def atlas_calls(atlas: Path) -> tuple[dict[str, float], dict[str, float], int]:
    """(calls per ok neuron per counted stage, seconds per stage, ok neurons)
    of a built atlas, summed over its models (``Atlas.summary``)."""
    from query import Atlas

    with Atlas.open(atlas) as a:
        s = a.summary()
    n = s["totals"]["ok"]
    calls = {st: sum(m["calls"].get(st, {}).get("calls", 0) for m in s["models"]) for st in STAGES}
    secs: dict[str, float] = {}
    for m in s["models"]:
        for st, v in m["stage_seconds"].items():
            secs[st] = secs.get(st, 0.0) + v
    return {st: c / max(1, n) for st, c in calls.items()}, secs, n


def run() -> dict[str, str]:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from builder.config import BuildConfig
    from builder.pipeline.run import build
    from builder.synthetic.probe import write_probe_set
    from testkit.openai_server import Reply, ScriptedServer
    from testkit.tiny_models import make_tiny_blip, make_tiny_clip, make_tiny_sd

    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, ScriptedServer(default=Reply(json.dumps(CONCEPTS))) as srv:
        root = Path(tmp)
        tiny = {"blip": make_tiny_blip(root / "blip"), "clip": make_tiny_clip(root / "clip"),
                "sd": make_tiny_sd(root / "sd"),
                "probe": write_probe_set(root / "probe", n=300, seed=1, progress=False)}
        results = {}
        for mode, cache, chunk in (("cached", True, 64), ("uncached", False, 1)):
            cfg = BuildConfig.from_dict(_config(root, tiny, srv.base_url, f"atlas-{mode}", chunk))
            t = time.perf_counter()
            build(cfg, cache_enabled=cache)
            wall = time.perf_counter() - t
            per, secs, n = atlas_calls(root / f"atlas-{mode}")
            results[mode] = (per, secs, n, wall)
        per, secs, n, wall = results["cached"]
        out["pipeline_neurons"] = str(n)
        out["pipeline_wall_s"] = f"{wall:.1f}"
        total = {s: per[s] * n for s in STAGES}
        rates = {
            "captioner_images_per_s": total["captioner_images"] / max(secs.get("caption", 0), 1e-9),
            "summarizer_requests_per_s": total["summarizer_requests"] / max(secs.get("summarize", 0), 1e-9),
            "generated_images_per_s": total["generated_images"] / max(secs.get("generate", 0), 1e-9),
            "generated_recordings_per_s": (total["generated_images"] / max(secs.get("gen_record", 0), 1e-9)),
        }
        for k, v in rates.items():
            out[f"tiny_{k}"] = f"{v:.1f}"
        for stage in ("record", "crops", "caption", "summarize", "generate", "gen_record", "embed", "score_write"):
            out[f"tiny_seconds_per_neuron_{stage}"] = f"{secs.get(stage, 0.0) / max(1, n):.4f}"
        for mode in ("cached", "uncached"):
            for s in STAGES:
                out[f"calls_per_neuron_{s}_{mode}"] = f"{results[mode][0][s]:.2f}"
        on = sum(results["cached"][0].values())
        off = sum(results["uncached"][0].values())
        out["calls_per_neuron_total_cached"] = f"{on:.2f}"
        out["calls_per_neuron_total_uncached"] = f"{off:.2f}"
        out["calls_ratio_uncached_vs_cached"] = f"{off / max(on, 1e-9):.2f}"
    return out
