"""Atlas.search: ranking, grouping per neuron, filters, k, status and the fallback path."""

import logging
import os

import pytest

from query import Atlas, QueryError
from query.schema import INDEX_FILE

NEURONS = [
    {"model": "cnn", "layer": "conv1", "unit": 0, "labels": ["red striped circle", "round shape"]},
    {"model": "cnn", "layer": "conv1", "unit": 1, "labels": ["blue sky", "clouds"]},
    {"model": "cnn", "layer": "conv2", "unit": 0, "labels": ["dog faces", "puppy"]},
    {"model": "cnn", "layer": "conv2", "unit": 1, "labels": ["brick wall"]},
    {"model": "cnn", "layer": "conv2", "unit": 2, "labels": ["circle outline"], "status": "dead",
     "reason": "constant activation"},
    {"model": "cnn", "layer": "conv2", "unit": 3, "labels": ["circles"], "status": "failed",
     "reason": "captioner crashed"},
    {"model": "vit", "layer": "block3", "unit": 7, "labels": ["green circle", "grass"]},
    {"model": "vit", "layer": "block3", "unit": 8, "labels": ["dog", "cat"]},
]


@pytest.fixture
def atlas_dir(make_atlas):
    return make_atlas(NEURONS)


def _keys(hits):
    return [(h.model, h.layer, h.unit) for h in hits]


def test_circle_ranks_circle_neuron_first(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        hits = atlas.search("circle", k=3)
    assert hits[0].matched_label in ("red striped circle", "green circle")
    assert set(_keys(hits[:2])) == {("cnn", "conv1", 0), ("vit", "block3", 7)}
    top = hits[0]
    assert top.similarity > hits[-1].similarity
    assert 0 < top.similarity <= 1.0


def test_hit_fields(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        hit = atlas.search("brick wall", k=1)[0]
    assert (hit.model, hit.layer, hit.unit) == ("cnn", "conv2", 1)
    assert hit.labels == ["brick wall"]
    assert hit.matched_label == "brick wall"
    assert hit.similarity == pytest.approx(1.0, abs=1e-4)
    assert hit.score == pytest.approx(1.0)


def test_dead_and_failed_neurons_never_returned(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        hits = atlas.search("circles", k=100)
    keys = _keys(hits)
    assert ("cnn", "conv2", 2) not in keys and ("cnn", "conv2", 3) not in keys
    assert len(keys) == 6  # every ok neuron, once


def test_grouped_per_neuron_best_label_wins(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        hits = atlas.search("puppy", k=10)
    keys = _keys(hits)
    assert len(keys) == len(set(keys))
    assert keys[0] == ("cnn", "conv2", 0)
    assert hits[0].matched_label == "puppy"
    assert hits[0].labels == ["dog faces", "puppy"]
    assert hits[0].score == pytest.approx(1.0)  # label-1 score, not the matched label's


@pytest.mark.parametrize("k", [1, 2, 5])
def test_k_limits(atlas_dir, k):
    with Atlas.open(atlas_dir) as atlas:
        assert len(atlas.search("dog", k=k)) == k


def test_model_and_layer_filters(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        vit = atlas.search("circle", k=10, model="vit")
        conv2 = atlas.search("circle", k=10, layer="conv2")
        both = atlas.search("sky", k=10, model="cnn", layer="conv1")
    assert {h.model for h in vit} == {"vit"} and len(vit) == 2
    assert _keys(conv2) == [("cnn", "conv2", 1), ("cnn", "conv2", 0)] or set(_keys(conv2)) == {
        ("cnn", "conv2", 0), ("cnn", "conv2", 1)}
    assert _keys(both)[0] == ("cnn", "conv1", 1) and len(both) == 2


def test_filter_overfetches_past_better_matches(make_atlas):
    # 40 "circle" neurons in layer a, one weak match in layer b: k=1 in layer b
    # must still find it though 80 better labels rank before it.
    neurons = [{"model": "m", "layer": "a", "unit": i, "labels": [f"circle {i}", f"round {i}"]}
               for i in range(40)]
    neurons.append({"model": "m", "layer": "b", "unit": 0, "labels": ["brick wall"]})
    with Atlas.open(make_atlas(neurons)) as atlas:
        hits = atlas.search("circle", k=1, layer="b")
    assert _keys(hits) == [("m", "b", 0)]


def test_faiss_and_fallback_agree(make_atlas, caplog):
    with_index = make_atlas(NEURONS, name="indexed")
    without = make_atlas(NEURONS, name="plain", index=False)
    assert (with_index / INDEX_FILE).is_file() and not (without / INDEX_FILE).exists()
    for query, kw in [("circle", {}), ("dog", {"k": 3}), ("circle", {"model": "vit"}),
                      ("wall", {"layer": "conv2"})]:
        with Atlas.open(with_index) as a, Atlas.open(without) as b:
            with caplog.at_level(logging.WARNING, logger="query.atlas"):
                caplog.clear()
                fast = a.search(query, **kw)
                assert not caplog.records
                exact = b.search(query, **kw)
                assert "missing" in caplog.text
        assert _keys(fast) == _keys(exact)
        assert [h.matched_label for h in fast] == [h.matched_label for h in exact]
        assert [h.similarity for h in fast] == pytest.approx([h.similarity for h in exact], abs=1e-5)


def test_stale_index_falls_back(make_atlas, caplog):
    atlas_dir = make_atlas(NEURONS)
    stale = make_atlas(NEURONS[:2], name="small")
    os.replace(stale / INDEX_FILE, atlas_dir / INDEX_FILE)  # index of 4 labels, atlas has 14
    with Atlas.open(atlas_dir) as atlas, caplog.at_level(logging.WARNING, logger="query.atlas"):
        hits = atlas.search("brick wall", k=1)
    assert "stale" in caplog.text
    assert _keys(hits) == [("cnn", "conv2", 1)]


@pytest.mark.parametrize("text,k", [("", 5), ("   \t", 5), ("dog", 0), ("dog", -1)])
def test_bad_queries(atlas_dir, text, k):
    with Atlas.open(atlas_dir) as atlas, pytest.raises(QueryError):
        atlas.search(text, k=k)


def test_unknown_filter_lists_choices(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        with pytest.raises(QueryError, match="valid models: cnn, vit"):
            atlas.search("dog", model="resnet")
        with pytest.raises(QueryError, match="valid layers: conv1, .*block3"):
            atlas.search("dog", layer="fc")
