"""Which embedder embeds an atlas's queries: the ONNX one it carries, else sentence-transformers.

The ONNX embedder comes from builder.atlas_embedder (exported once into the
user's cache, then linked into each atlas: well under a second per atlas).
Files of a carried embedder are hard links into that cache: tests replace
them, never write into them.
"""

from __future__ import annotations

import json
import logging

import pytest

from builder.atlas_embedder import carry_embedder
from query import Atlas
from query.cli import main
from query.embedder import Embedder
from query.onnx_embedder import (
    ATLAS_EMBEDDER_DIR,
    MANIFEST_FILE,
    EmbedderError,
    OnnxEmbedder,
    query_embedder,
)
from testkit.atlases import hits_difference, search_hits

NEURONS = [
    {"model": "m", "layer": "conv1", "unit": 0, "labels": ["red circle", "red"]},
    {"model": "m", "layer": "conv1", "unit": 1, "labels": ["striped pattern"]},
    {"model": "m", "layer": "conv2", "unit": 0, "labels": ["blue sky", "clouds"]},
    {"model": "m", "layer": "conv2", "unit": 1, "labels": ["dog face", "fur"]},
    {"model": "m", "layer": "conv2", "unit": 2, "labels": ["checkered board"]},
]
QUERIES = ["red circle", "a dog", "stripes", "sky with clouds", "chess", "wood"]


@pytest.fixture
def carrying(make_atlas):
    atlas = make_atlas(NEURONS)
    carry_embedder(atlas, "minilm")
    return atlas


def test_an_atlas_carrying_an_onnx_embedder_searches_with_it(carrying, minilm):
    with Atlas.open(carrying) as atlas:
        assert isinstance(atlas.embedder, OnnxEmbedder)
        assert atlas.embedder.path == (carrying / ATLAS_EMBEDDER_DIR).resolve()
    onnx, st = search_hits(carrying, QUERIES, k=5), search_hits(carrying, QUERIES, k=5, embedder=minilm)
    assert hits_difference(onnx, st) is None
    assert onnx[0][0]["matched_label"] == "red circle"


def test_an_atlas_without_one_is_searched_with_sentence_transformers(make_atlas):
    atlas_dir = make_atlas(NEURONS)
    with Atlas.open(atlas_dir) as atlas:
        assert isinstance(atlas.embedder, Embedder) and atlas.embedder.name == "minilm"
        assert atlas.search("red circle", k=1)[0].unit == 0


def test_an_onnx_embedder_of_another_model_is_ignored(carrying, caplog):
    manifest = carrying / ATLAS_EMBEDDER_DIR / MANIFEST_FILE
    data = json.loads(manifest.read_text())
    manifest.unlink()  # a new file, not a write into the cache's hard link
    manifest.write_text(json.dumps({**data, "name": "mpnet"}))
    with caplog.at_level(logging.WARNING, logger="query.onnx_embedder"):
        emb = query_embedder(carrying, "minilm")
    assert isinstance(emb, Embedder)
    assert "exported from embedder 'mpnet'" in caplog.text


def test_a_damaged_onnx_embedder_is_a_one_line_error(carrying, capsys):
    model = carrying / ATLAS_EMBEDDER_DIR / "model.onnx"
    model.unlink()
    model.write_bytes(b"not a model")
    with pytest.raises(EmbedderError, match="model.onnx has 11 bytes"):
        query_embedder(carrying, "minilm")
    assert main(["search", str(carrying), "red circle"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.onnx has 11 bytes" in err


def test_the_server_searches_with_the_carried_embedder(carrying):
    from query.server import _Readers

    readers = _Readers(carrying)
    try:
        assert isinstance(readers.embedder(), OnnxEmbedder)
        assert readers.main.search("dog", k=1)[0].matched_label == "dog face"
    finally:
        readers.close()
        readers.main.close()


def test_hits_difference_allows_reordered_ties_only():
    def hit(unit, sim, label="red"):
        return {"model": "m", "layer": "l", "unit": unit, "labels": [label], "score": 1.0,
                "similarity": sim, "matched_label": label}

    a = [[hit(0, 0.9), hit(1, 0.8), hit(2, 0.8 + 1e-7), hit(3, 0.5, "sky")]]
    tied = [[hit(0, 0.9), hit(2, 0.8 + 1e-7), hit(1, 0.8), hit(3, 0.5, "sky")]]
    assert hits_difference(a, tied) is None
    swapped = [[hit(1, 0.9), hit(0, 0.8), hit(2, 0.8), hit(3, 0.5, "sky")]]
    assert "query 0" in hits_difference(a, swapped)
    assert "similarity" in hits_difference(a, [[hit(0, 0.9), hit(1, 0.8), hit(2, 0.8), hit(3, 0.4, "sky")]])
    assert "hits" in hits_difference(a, [a[0][:3]])
