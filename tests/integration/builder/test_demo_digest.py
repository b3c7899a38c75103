"""The demo atlas is pinned: a 600-image demo build, and a CLIP-Dissect build
of the same config, must reproduce the committed digests of their content
tables (neurons, labels, candidates, evidence, captions) row for row: every
text, rank, image, box and null exactly, float columns by their mean within
``testkit.atlas_tables.FLOAT_TOLERANCE`` (another CPU rounds differently).

A change meant to alter labels updates ``tests/data/demo_600_digest.json``
on purpose (``python -m testkit.atlas_tables DEMO_DIR`` prints the new one,
with the DnD atlas in DEMO_DIR/atlas and the CLIP-Dissect one in
DEMO_DIR/clip-dissect); any other change that moves a row is a regression.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from builder.demo import run_demo
from builder.pipeline.run import build
from testkit.atlas_tables import digest_differences, table_digest
from testkit.atlases import hits_difference, search_hits
from testkit.labels import QUERIES

DIGESTS = json.loads((Path(__file__).resolve().parents[2] / "data" / "demo_600_digest.json").read_text())


def test_demo_atlas_matches_the_committed_digest(tmp_path, minilm):
    summary = run_demo(tmp_path, n_images=600, seed=0)
    assert sum(m.neurons for m in summary.models) == DIGESTS["dnd"]["neurons"]["rows"]
    assert digest_differences(table_digest(tmp_path / "atlas"), DIGESTS["dnd"]) == []
    # the ONNX embedder the demo atlas carries finds what sentence-transformers finds
    onnx = search_hits(tmp_path / "atlas", list(QUERIES), k=25)
    assert hits_difference(onnx, search_hits(tmp_path / "atlas", list(QUERIES), k=25, embedder=minilm)) is None
    from builder.config import load_config

    cfg = load_config(tmp_path / "demo.toml", [f"out={json.dumps(str(tmp_path / 'clip-dissect'))}"])
    build(dataclasses.replace(cfg, labeler="clip-dissect"))
    assert digest_differences(table_digest(tmp_path / "clip-dissect"), DIGESTS["clip-dissect"]) == []
