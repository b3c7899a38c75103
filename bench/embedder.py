"""The ONNX embedder against sentence-transformers: export, size, latency, cold start.

All in one run, so the ratios share the machine's noise:

- export seconds and folder size: fp32 (dynamo exporter; the legacy
  TorchScript exporter for comparison), int8 quantized
  from it (``dynamic``: onnxruntime's dynamic quantization; ``weights``:
  int8 weights, float compute);
- one short query ("red circle") embedded REPS times per embedder, the
  embedders taking turns, p50 / p95 in ms;
- 200 labels embedded in bulk, texts per second;
- cold processes, "import + load + embed one query": wall and CPU seconds
  and peak RSS of a fresh interpreter, ONNX fp32 vs today's
  sentence-transformers path, alternating, median of ROUNDS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

QUERY = "red circle"
REPS = 100
ROUNDS = 3

COLD = {
    "onnx": "from query.onnx_embedder import OnnxEmbedder\nOnnxEmbedder({folder!r}).embed([{query!r}])",
    "st": "from query.embedder import get_embedder\nget_embedder('minilm').embed([{query!r}])",
}


def _mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6, 1)


def _latency(embedders: dict[str, object]) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in embedders}
    for emb in embedders.values():
        emb.embed([QUERY])  # warm
    for _ in range(REPS):
        for key, emb in embedders.items():
            start = time.perf_counter()
            emb.embed([QUERY])
            times[key].append(time.perf_counter() - start)
    out = {}
    for key, ts in times.items():
        out[f"embedder_query_p50_ms_{key}"] = round(1000 * float(np.percentile(ts, 50)), 2)
        out[f"embedder_query_p95_ms_{key}"] = round(1000 * float(np.percentile(ts, 95)), 2)
    return out


def _bulk(embedders: dict[str, object]) -> dict[str, float]:
    from testkit.labels import make_labels

    LABELS = make_labels()

    out = {}
    for key, emb in embedders.items():
        start = time.perf_counter()
        emb.embed(LABELS)
        out[f"embedder_bulk_texts_per_s_{key}"] = round(len(LABELS) / (time.perf_counter() - start), 1)
    return out


def _cold(kind: str, folder: Path) -> tuple[float, float, float]:
    """Wall s, CPU s (user + sys) and peak RSS MB of one fresh process."""
    code = COLD[kind].format(folder=str(folder), query=QUERY)
    probe = ("import resource, subprocess, sys, time, json\n"
             "t = time.perf_counter()\n"
             f"p = subprocess.run([sys.executable, '-c', {code!r}], check=True)\n"
             "wall = time.perf_counter() - t\n"
             "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
             "print(json.dumps([wall, r.ru_utime + r.ru_stime, r.ru_maxrss / 1024]))\n")
    env_code = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "DND_ATLAS_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          cwd=ROOT, env={**os.environ, **env_code})
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def run() -> dict[str, float]:
    """Run every measurement once; returns ``name: value`` pairs."""
    from builder.embedder_export import export_embedder, quantize_embedder
    from query.embedder import get_embedder
    from query.onnx_embedder import OnnxEmbedder

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-embedder-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        export_embedder("minilm", root / "fp32", force=True)
        out["embedder_export_s_fp32"] = round(time.perf_counter() - start, 1)
        out["embedder_size_mb_fp32"] = _mb(root / "fp32")
        start = time.perf_counter()
        export_embedder("minilm", root / "legacy", force=True, exporter="legacy")
        out["embedder_export_s_fp32_legacy_exporter"] = round(time.perf_counter() - start, 1)
        for mode in ("dynamic", "weights"):
            start = time.perf_counter()
            quantize_embedder(root / "fp32", root / mode, mode)
            out[f"embedder_quantize_s_{mode}"] = round(time.perf_counter() - start, 1)
            out[f"embedder_size_mb_{mode}"] = _mb(root / mode)
        embedders = {"onnx_fp32": OnnxEmbedder(root / "fp32"), "onnx_dynamic": OnnxEmbedder(root / "dynamic"),
                     "onnx_weights": OnnxEmbedder(root / "weights"), "st": get_embedder("minilm")}
        out.update(_latency(embedders))
        out.update(_bulk(embedders))
        cold: dict[str, list[tuple[float, float, float]]] = {"onnx": [], "st": []}
        for _ in range(ROUNDS):
            for kind, runs in cold.items():
                runs.append(_cold(kind, root / "fp32"))
        for kind, runs in cold.items():
            wall, cpu, rss = (float(np.median([r[i] for r in runs])) for i in range(3))
            out[f"embedder_cold_wall_s_{kind}"] = round(wall, 2)
            out[f"embedder_cold_cpu_s_{kind}"] = round(cpu, 2)
            out[f"embedder_cold_rss_mb_{kind}"] = round(rss)
        out["embedder_cold_wall_ratio_st_over_onnx"] = round(
            out["embedder_cold_wall_s_st"] / out["embedder_cold_wall_s_onnx"], 1)
        out["embedder_cold_cpu_ratio_st_over_onnx"] = round(
            out["embedder_cold_cpu_s_st"] / out["embedder_cold_cpu_s_onnx"], 1)
    return out
