"""`query` must import and read atlases on machines without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import sys
BLOCKED = ("torch", "sentence_transformers", "transformers")

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, Block())
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
