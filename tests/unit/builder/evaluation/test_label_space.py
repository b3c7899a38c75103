"""Classifier finding ranks neurons by text alone: with the atlas's own embedder it
embeds concepts as search does, through the ONNX embedder the atlas carries."""

from __future__ import annotations

import shutil

import numpy as np

from builder.atlas_embedder import carry_embedder
from builder.evaluation.classifier import LabelSpace, rank_neurons
from query import Atlas
from query.embedder import Embedder
from query.onnx_embedder import ATLAS_EMBEDDER_DIR, OnnxEmbedder

NEURONS = [
    {"model": "m", "layer": "fc", "unit": 0, "labels": ["dog face", "fur"]},
    {"model": "m", "layer": "fc", "unit": 1, "labels": ["red circle"]},
    {"model": "m", "layer": "fc", "unit": 2, "labels": ["car wheel", "tire"]},
    {"model": "m", "layer": "fc", "unit": 3, "labels": ["dog face"]},  # tied with unit 0 for "dog"
]


def test_label_space_uses_the_carried_embedder_and_ranks_as_sentence_transformers(make_atlas, tmp_path):
    atlas = make_atlas(NEURONS)
    carry_embedder(atlas, "minilm")
    plain = tmp_path / "plain"
    shutil.copytree(atlas, plain, ignore=shutil.ignore_patterns(ATLAS_EMBEDDER_DIR))
    with Atlas.open(atlas) as a:
        assert isinstance(LabelSpace(a, None, None)._embedders[0], OnnxEmbedder)
    with Atlas.open(plain) as a:
        assert isinstance(LabelSpace(a, None, None)._embedders[0], Embedder)
    for concept in ("dog", "circle", "wheel"):
        onnx, st = rank_neurons(atlas, concept, k=2), rank_neurons(plain, concept, k=2)
        assert [(r.key, r.matched_label) for r in onnx] == [(r.key, r.matched_label) for r in st]
        assert [round(r.similarity, 4) for r in onnx] == [round(r.similarity, 4) for r in st]
    dog = rank_neurons(atlas, "dog", k=1)
    assert {r.unit for r in dog} == {0, 3}  # both tied neurons kept, as the protocol averages them


def test_similarities_a_few_ulp_apart_are_one_tie_in_index_order():
    from builder.evaluation.classifier import TIE_EPS, _tie_order

    col = np.array([0.5, 0.9 - TIE_EPS / 4, 0.2, 0.9, 0.9 - TIE_EPS / 2, 0.9 - 3 * TIE_EPS], dtype=np.float64)
    assert _tie_order(col).tolist() == [1, 3, 4, 5, 0, 2]
    assert _tie_order(np.array([0.1, 0.3, 0.3, 0.2])).tolist() == [1, 2, 3, 0]  # no ties: by value
