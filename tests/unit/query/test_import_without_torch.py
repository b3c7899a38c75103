"""`query` must import and read atlases on machines without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

from testkit.blocked_imports import blocking_preamble

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = blocking_preamble() + r"""
import sys
import query
from query.cli import main
from query import Atlas, QueryError

atlas_dir = sys.argv[1]
with Atlas.open(atlas_dir) as atlas:
    layers = atlas.layers()
    rec = atlas.neuron(None, "conv1", 0)
    s = atlas.summary()
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was importable: the blocker does not work")
rc = main(["neuron", atlas_dir, "conv1", "0", "--json"])
assert rc == 0, rc
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("RESULT", len(layers), rec.labels[0].text, s["totals"]["ok"], loaded)
"""


def test_query_works_without_torch(make_atlas):
    atlas_dir = make_atlas(
        [{"model": "m", "layer": "conv1", "unit": 0, "labels": ["red circle"]},
         {"model": "m", "layer": "conv2", "unit": 0, "labels": ["sky"]}])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(atlas_dir)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT 2 red circle 2 []"], proc.stdout
    record = json.loads(proc.stdout[: proc.stdout.index("RESULT")])
    assert record["labels"][0]["text"] == "red circle"


SEARCH_SCRIPT = blocking_preamble() + r"""
import json, sys
from query.cli import main

rc = main(["search", sys.argv[1], sys.argv[2], "-k", "3", "--json"])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("RESULT", rc, loaded, file=sys.stderr)
"""


def _search_without_torch(atlas_dir, query):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SEARCH_SCRIPT, str(atlas_dir), query],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_search_without_torch_uses_the_carried_onnx_embedder(make_atlas, minilm):
    from builder.atlas_embedder import carry_embedder
    from testkit.atlases import hits_difference, search_hits

    atlas_dir = make_atlas(
        [{"model": "m", "layer": "conv1", "unit": 0, "labels": ["red circle"]},
         {"model": "m", "layer": "conv1", "unit": 1, "labels": ["blue square", "blue"]},
         {"model": "m", "layer": "conv2", "unit": 0, "labels": ["sky"]}])
    carry_embedder(atlas_dir, "minilm")
    proc = _search_without_torch(atlas_dir, "red circle")
    assert "RESULT 0 []" in proc.stderr, proc.stderr
    hits = json.loads(proc.stdout)
    assert hits_difference([hits], search_hits(atlas_dir, ["red circle"], k=3, embedder=minilm)) is None


def test_search_without_torch_or_onnx_embedder_says_what_to_do(make_atlas):
    atlas_dir = make_atlas([{"model": "m", "layer": "conv1", "unit": 0, "labels": ["red circle"]}])
    proc = _search_without_torch(atlas_dir, "red circle")
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("RESULT")]
    assert "RESULT 2 []" in proc.stderr and len(lines) == 1, proc.stderr
    assert "has no ONNX embedder and sentence-transformers is not installed" in lines[0]
    assert f"dnd-atlas export-embedder {atlas_dir}" in lines[0] and "dnd-atlas[build]" in lines[0]
