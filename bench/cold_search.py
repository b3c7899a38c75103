"""Cold start to answer: ``dnd-atlas search ATLAS "red circle"`` in a fresh process.

Two copies of one small atlas (200 labels, minilm vectors): one carrying its
ONNX embedder (what a build writes now), one without (an atlas built before:
searched with sentence-transformers, today's path). Each round runs one
fresh ``python -m query.cli search`` on each, taking turns; the median over
``ROUNDS`` of wall seconds, CPU seconds (user + system, from ``wait4`` of
that child alone) and peak RSS. The file cache is warm after the first
round, as it is for a user searching twice; the interpreter starts cold.

``DND_ATLAS_LIGHT_PYTHON=/path/to/venv/bin/python`` adds ``..._light``: the
ONNX atlas searched by that interpreter, a venv with ``pip install
dnd-atlas`` and no torch (the light-install test makes one), so the "after"
figure is measured where torch is not even installed.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUERY = "red circle"
ROUNDS = 5
PROBE = """
import json, resource, subprocess, sys, time
cmd = json.loads(sys.argv[1])
t = time.perf_counter()
p = subprocess.run(cmd, capture_output=True, text=True)
wall = time.perf_counter() - t
if p.returncode != 0 or "red circle" not in p.stdout:
    sys.exit(f"exit {p.returncode}: {p.stderr[-300:]}")
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps([wall, u.ru_utime + u.ru_stime, u.ru_maxrss / 1024]))
"""


def make_atlases(folder: Path) -> dict[str, Path]:
    """The two atlases: ``onnx`` carries its embedder, ``st`` is the same without it."""
    from builder.atlas_embedder import carry_embedder
    from query.embedder import get_embedder
    from query.onnx_embedder import ATLAS_EMBEDDER_DIR
    from testkit.atlases import write_atlas
    from testkit.labels import make_labels

    labels = [t for t in dict.fromkeys(make_labels()) if t.strip()]
    neurons = [{"model": "bench", "layer": f"layer{i % 4}", "unit": i // 4, "labels": [t]}
               for i, t in enumerate(labels)]
    onnx = write_atlas(folder / "onnx", get_embedder("minilm"), neurons)
    carry_embedder(onnx, "minilm")
    st = folder / "st"
    shutil.copytree(onnx, st, ignore=shutil.ignore_patterns(ATLAS_EMBEDDER_DIR))
    return {"onnx": onnx, "st": st}


def cold_search(atlas: Path, python: str | None = None) -> tuple[float, float, float]:
    """Wall s, CPU s and peak RSS MB of one fresh ``dnd-atlas search`` process
    (this checkout's code, or the package installed for ``python``)."""
    env = {**os.environ, "DND_ATLAS_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    if python is None:
        env["PYTHONPATH"] = str(ROOT)
    else:
        env.pop("PYTHONPATH", None)
    cmd = [python or sys.executable, "-m", "query.cli", "search", str(atlas), QUERY, "-k", "5"]
    # A small fresh interpreter starts the search and reports its rusage: a child forked
    # from this process would count this process's memory in its peak RSS.
    proc = subprocess.run([sys.executable, "-S", "-c", PROBE, json.dumps(cmd)], capture_output=True,
                          text=True, env=env, cwd=atlas.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"cold search failed: {proc.stderr[-300:]}")
    wall, cpu, rss = json.loads(proc.stdout.splitlines()[-1])
    return wall, cpu, rss


def run(rounds: int = ROUNDS) -> dict[str, str]:
    """``cold_search_{wall_s,cpu_s,rss_mb}_{onnx,st}`` and the CPU ratio, one run."""
    light = os.environ.get("DND_ATLAS_LIGHT_PYTHON")
    with tempfile.TemporaryDirectory() as tmp:
        atlases = make_atlases(Path(tmp))
        runs = {kind: (atlas, None) for kind, atlas in atlases.items()}
        if light:
            runs["light"] = (atlases["onnx"], light)
        samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in runs}
        for _ in range(rounds):
            for kind, (atlas, python) in runs.items():
                samples[kind].append(cold_search(atlas, python))
    out = {}
    for kind, rows in samples.items():
        for i, name in enumerate(("wall_s", "cpu_s", "rss_mb")):
            out[f"cold_search_{name}_{kind}"] = f"{statistics.median(r[i] for r in rows):.2f}"
    out["cold_search_cpu_ratio_st_vs_onnx"] = (
        f"{float(out['cold_search_cpu_s_st']) / float(out['cold_search_cpu_s_onnx']):.1f}")
    return out


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key}: {value}")
