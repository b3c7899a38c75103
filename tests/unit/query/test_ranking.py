"""query.ranking and Atlas.search's order: copies of a label text tie, ties go to the
smaller (model, layer, unit), and ties at the edge of what was fetched are complete."""

from __future__ import annotations

import random

import duckdb
import numpy as np
import pytest

from query import Atlas
from query.index import build_index, insert_label_vectors, read_label_vectors
from query.ranking import RankedNeuron, rank_neurons, ranking_complete, text_similarities
from query.schema import DB_FILE


def test_text_similarity_is_the_best_copy():
    assert text_similarities(["a", "b", "a"], [0.5, 0.7, 0.6]) == {"a": 0.6, "b": 0.7}


def test_ties_go_to_the_smaller_key_and_copies_tie():
    sims = {"red": 0.9, "red circle": 0.8}
    carriers = [(("m", "l2", 0), 1, "red"), (("m", "l1", 5), 2, "red"), (("m", "l1", 3), 1, "red"),
                (("a", "z", 9), 1, "red circle")]
    got = rank_neurons(sims, carriers, 3)
    assert [r.key for r in got] == [("m", "l1", 3), ("m", "l1", 5), ("m", "l2", 0)]
    assert all(r.similarity == 0.9 and r.text == "red" for r in got)


def test_a_neuron_scores_its_best_label_and_equal_labels_go_to_the_lower_rank():
    sims = {"dog": 0.7, "puppy": 0.9, "cat": 0.7}
    got = rank_neurons(sims, [(("m", "l", 0), 1, "dog"), (("m", "l", 0), 2, "puppy"),
                              (("m", "l", 1), 2, "dog"), (("m", "l", 1), 1, "cat")], 5)
    assert got == [RankedNeuron(("m", "l", 0), 0.9, "puppy"), RankedNeuron(("m", "l", 1), 0.7, "cat")]


def test_ranking_complete_needs_the_kth_strictly_above_what_was_not_fetched():
    top = [RankedNeuron(("m", "l", i), s, "t") for i, s in enumerate([0.9, 0.8, 0.8])]
    assert not ranking_complete(top, 3, 0.8, exhausted=False)    # an unfetched 0.8 may win its tie
    assert ranking_complete(top, 3, 0.79, exhausted=False)
    assert ranking_complete(top, 2, 0.8, exhausted=False) is False
    assert not ranking_complete(top, 4, 0.1, exhausted=False)    # too few
    assert ranking_complete(top, 4, 0.8, exhausted=True)


N_TIED = 70  # more than the first fetch (max(3k, 32) labels)


@pytest.fixture
def tied_atlas(make_atlas):
    """70 neurons labelled "red" in shuffled order over two layers, whose stored vectors
    carry noise of 1e-7 (as copies embedded in different batches do), and a few others."""
    keys = [("cnn", layer, u) for layer in ("conv2", "conv1") for u in range(N_TIED // 2)]
    random.Random(0).shuffle(keys)
    neurons = [{"model": m, "layer": ly, "unit": u, "labels": ["red", "square"]} for m, ly, u in keys]
    neurons += [{"model": "cnn", "layer": "conv3", "unit": 0, "labels": ["red circle"]},
                {"model": "a-model", "layer": "conv9", "unit": 4, "labels": ["blue sky"]}]
    atlas = make_atlas(neurons)
    con = duckdb.connect(str(atlas / DB_FILE))
    try:
        ids, vecs = read_label_vectors(con)
        noise = np.random.default_rng(0).normal(0, 1e-7, vecs.shape).astype(np.float32)
        insert_label_vectors(con, ids, vecs + noise)
        build_index(atlas, con=con)
    finally:
        con.close()
    return atlas


def test_search_breaks_ties_by_key_across_the_fetch_boundary(tied_atlas):
    with Atlas.open(tied_atlas) as atlas:
        hits = atlas.search("red", k=5)
        page = atlas.search("red", k=N_TIED)
        deeper = atlas.search("red", k=N_TIED + 1)
        only_conv2 = atlas.search("red", k=3, layer="conv2")
    assert [(h.layer, h.unit) for h in hits] == [("conv1", u) for u in range(5)]
    assert len({h.similarity for h in page}) == 1          # copies tie exactly
    assert [(h.layer, h.unit) for h in page] == sorted((h.layer, h.unit) for h in page)
    assert deeper[-1].matched_label == "red circle" and deeper[:-1] == page
    assert [(h.layer, h.unit) for h in only_conv2] == [("conv2", 0), ("conv2", 1), ("conv2", 2)]


def test_min_fidelity_keeps_the_tie_order_and_reports_the_matched_labels_fidelity(make_atlas):
    """Ties among the labels that pass min_fidelity still go to the smaller key, and each
    hit carries the fidelity of the label that gave its similarity (not of its label 1)."""
    neurons = [{"model": "cnn", "layer": "conv1", "unit": u, "labels": ["square", "red"]} for u in range(40)]
    sql = [("UPDATE labels SET fidelity_correlation = unit / 100.0, fidelity_auprc = 0.5 "
            "WHERE text = 'red' AND unit % 2 = 1"),
           "UPDATE labels SET fidelity_correlation = 0.99 WHERE text = 'square'"]
    atlas_dir = make_atlas(neurons, sql=sql)
    with Atlas.open(atlas_dir) as atlas:
        hits = atlas.search("red", k=4, min_fidelity=0.2)
    assert [h.unit for h in hits] == [21, 23, 25, 27]      # odd units from 0.21 up, by key
    assert all(h.matched_label == "red" for h in hits)
    assert [h.fidelity_correlation for h in hits] == pytest.approx([0.21, 0.23, 0.25, 0.27])
    assert {h.fidelity_auprc for h in hits} == {0.5}
