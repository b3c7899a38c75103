"""Cold start to answer: ``dnd-atlas search ATLAS "red circle"`` in a fresh process.

Two copies of one small atlas (200 labels, minilm vectors): one carrying its
ONNX embedder (what a build writes now), one without (an atlas built before:
searched with sentence-transformers, today's path). Each round runs one
fresh ``python -m query.cli search`` on each, taking turns; the median over
``ROUNDS`` of wall seconds, CPU seconds (user + system, from ``wait4`` of
that child alone) and peak RSS. The file cache is warm after the first
round, as it is for a user searching twice; the interpreter starts cold.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUERY = "red circle"
ROUNDS = 5


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


def cold_search(atlas: Path) -> tuple[float, float, float]:
    """Wall s, CPU s and peak RSS MB of one fresh ``dnd-atlas search`` process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DND_ATLAS_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "query.cli", "search", str(atlas), QUERY, "-k", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or b"red circle" not in out:
        raise RuntimeError(f"cold search failed ({proc.returncode}): {err.decode()[-300:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def run(rounds: int = ROUNDS) -> dict[str, str]:
    """``cold_search_{wall_s,cpu_s,rss_mb}_{onnx,st}`` and the CPU ratio, one run."""
    with tempfile.TemporaryDirectory() as tmp:
        atlases = make_atlases(Path(tmp))
        samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in atlases}
        for _ in range(rounds):
            for kind, atlas in atlases.items():
                samples[kind].append(cold_search(atlas))
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
