"""Cost against the official implementation's shape, at equal quality.

The same build of synthetic-world models (532 neurons: every layer of the
demo CNN, the planted detectors, and layer3 of a random-weight ResNet-18 at
64 px for volume) runs twice:

- ``official-shaped`` (``bench.official``: a configuration and a wrapper
  summarizer): calls made the way the official implementation makes them:
  one LLM request per candidate, nothing shared between neurons (each neuron
  captions, crops, generates and records its own images), no cache;
- ``efficient`` (the default): one LLM request per neuron for all N
  candidates, captions / generated images / recordings shared across neurons.

The LLM is the ``openai`` summarizer over HTTP to an OpenAI-compatible server
on 127.0.0.1 whose answers are the phrases most captions share (a stand-in
with the behaviour of a good summarizer, so both modes see the same
concepts). Expensive calls per neuron = captioner images + LLM requests +
target forward images + generated images x their diffusion steps (a UNet
evaluation is what a generated image costs): the official implementation
runs Stable Diffusion at 50 steps, dnd-atlas at 25 (DPM-Solver++); the
procedural generator used here stands in for both. ``cost_ratio_unweighted``
counts a generated image as one call, whatever its steps.
Quality is the synthetic label match rate over the units with ground truth
(demo CNN outputs, planted detectors).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("captioner_images", "summarizer_requests", "generated_images", "target_forward_images")
STEPS = {"official-shaped": 50, "efficient": 25}


def _responder(rec):
    from builder.backends.extractive import extract_concepts
    from testkit.openai_server import Reply

    text = rec.messages[-1]["content"] if rec.messages else ""
    caps = [m.group(1) for m in re.finditer(r"^\d+\. (.+)$", text, re.M)]
    n = int(m.group(1)) if (m := re.search(r"exactly (\d+)", text)) else 5
    return Reply(json.dumps(extract_concepts(caps, n) or ["object"]))


def _config(probe: str, out: str, base_url: str, mode: str) -> dict:
    from bench.official import official_shaped

    cfg = {
        "out": out,
        "models": [
            {"name": "demo-cnn", "target": "demo-cnn", "probe": probe,
             "layers": ["conv1", "conv2", "conv3", "conv4", "fc"]},
            {"name": "planted", "target": "planted", "probe": probe, "layers": ["detectors"]},
            {"name": "resnet18", "target": "resnet18", "target_options": {"input_size": 64},
             "probe": probe, "layers": ["layer3"]},
        ],
        "describe": {"captioner": "oracle", "summarizer": "openai",
                     "summarizer_options": {"model": "stub", "base_url": base_url, "max_retries": 0}},
        "dissect": {"similarity_options": {"target": "demo-cnn"}},
    }
    return official_shaped(cfg) if mode == "official-shaped" else cfg


def _per_neuron(atlas: Path) -> tuple[dict[str, float], int]:
    from bench.pipeline import atlas_calls

    per, _, n = atlas_calls(atlas)
    return per, n


def _quality(atlas: Path) -> float:
    from builder.evaluation.synthetic import evaluate_synthetic

    units = evaluate_synthetic(atlas, mpnet=False)["units"]
    return sum(u["match"] for u in units) / max(1, len(units))


def run(probe_images: int = 300) -> dict[str, str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from builder.config import BuildConfig
    from builder.pipeline.run import build
    from builder.synthetic.probe import write_probe_set
    from testkit.openai_server import ScriptedServer

    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, ScriptedServer() as srv:
        srv.responder = _responder
        probe = str(write_probe_set(Path(tmp) / "probe", n=probe_images, seed=4, progress=False))
        res = {}
        for mode in ("official-shaped", "efficient"):
            atlas = Path(tmp) / mode
            t = time.perf_counter()
            build(BuildConfig.from_dict(_config(probe, str(atlas), srv.base_url, mode)),
                  cache_enabled=mode != "official-shaped")
            per, n = _per_neuron(atlas)
            res[mode] = (per, n, time.perf_counter() - t, _quality(atlas))
    key = {"official-shaped": "official", "efficient": "efficient"}
    cost, flat = {}, {}
    for mode, (per, n, secs, quality) in res.items():
        for s in STAGES:
            out[f"calls_per_neuron_{s}_{key[mode]}"] = f"{per[s]:.2f}"
        other = per["captioner_images"] + per["summarizer_requests"] + per["target_forward_images"]
        cost[mode] = other + per["generated_images"] * STEPS[mode]
        flat[mode] = other + per["generated_images"]
        out[f"expensive_calls_per_neuron_{key[mode]}"] = f"{cost[mode]:.2f}"
        out[f"build_s_{key[mode]}"] = f"{secs:.1f}"
        out[f"cost_neurons_{key[mode]}"] = str(n)
    out["cost_ratio_vs_official"] = f"{cost['official-shaped'] / max(cost['efficient'], 1e-9):.2f}"
    out["cost_ratio_unweighted"] = f"{flat['official-shaped'] / max(flat['efficient'], 1e-9):.2f}"
    out["quality_official_shaped"] = f"{res['official-shaped'][3]:.3f}"
    out["quality_efficient"] = f"{res['efficient'][3]:.3f}"
    return out


if __name__ == "__main__":
    for k, v in run(int(sys.argv[1]) if len(sys.argv) > 1 else 300).items():
        print(f"{k}: {v}", flush=True)
