"""Golden tests of the best-concept scores: fixed inputs, exact outputs."""

import numpy as np
import pytest

from builder.pipeline.labels import interpretability, select_labels
from builder.pipeline.scoring import (
    CandidateEvidence,
    CandidateScore,
    auc,
    image_products,
    rank_all,
    score_topk_squared_image_products,
    topk_squared,
)


def test_rank_all_is_one_based_descending_with_stable_ties():
    ranks = rank_all([np.array([5.0, 1.0]), np.array([5.0, 3.0])])
    assert ranks[0].tolist() == [1, 4]
    assert ranks[1].tolist() == [2, 3]


def test_topk_squared_uses_the_beta_best_ranks():
    assert topk_squared(np.array([9, 1, 3, 2]), beta=2) == pytest.approx((1 + 4) / 2)
    assert topk_squared(np.array([9, 1, 3, 2]), beta=3) == pytest.approx((1 + 4 + 9) / 3)


def test_image_products_is_minus_one_when_nothing_reaches_the_top_k():
    probe = np.eye(2, dtype=np.float32)
    cand = np.eye(2, dtype=np.float32)
    assert image_products(probe, cand, np.array([11, 12]), top_k=10) == -1.0
    # only the first image (rank 3) counts: sims with probe rows are 1 and 0
    assert image_products(probe, cand, np.array([3, 12]), top_k=10) == pytest.approx(0.5)


def test_final_score_golden():
    e = np.array([[1.0, 0.0]], dtype=np.float32)
    probe = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    cands = [
        CandidateEvidence("a", np.array([9.0, 8.0, 1.0]), np.repeat(e, 3, axis=0)),
        CandidateEvidence("b", np.array([7.0, 0.5, 0.2]), np.repeat(np.array([[0.0, 1.0]], np.float32), 3, axis=0)),
        CandidateEvidence("c", np.array([0.1, 0.0, -1.0]), np.repeat(e, 3, axis=0)),
    ]
    # ranks: a -> 1,2,5  b -> 3,6,7  c -> 8,9,4... computed below exactly
    scores = score_topk_squared_image_products(cands, probe, beta=2, top_k=3)
    # all 9 activations sorted: 9(a0)=1, 8(a1)=2, 7(b0)=3, 1(a2)=4, 0.5(b1)=5, 0.2(b2)=6, 0.1(c0)=7, 0(c1)=8, -1(c2)=9
    assert [s.topk_squared for s in scores] == [pytest.approx(2.5), pytest.approx(17.0), pytest.approx(56.5)]
    # a: images ranked 1,2 in top-3, sims with probe rows (1, 0.6) -> mean 0.8
    # b: image ranked 3, embedding (0,1): sims (0, 0.8) -> 0.4;  c: none in top-3 -> -1
    assert [s.image_products for s in scores] == [pytest.approx(0.8), pytest.approx(0.4), -1.0]
    # M=3: positions a=0, b=1, c=2 -> (3-0)*0.8, (3-1)*0.4, (3-2)*-1
    assert [s.score for s in scores] == [pytest.approx(2.4), pytest.approx(0.8), pytest.approx(-1.0)]


def test_auc_golden():
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0]), np.array([1.0])) == 0.5
    assert auc(np.array([1.0, 3.0]), np.array([2.0])) == 0.5


def test_select_labels_drops_similar_and_non_positive_labels():
    scores = [CandidateScore(c, 0, 0, s) for c, s in [("a", 3.0), ("b", 2.0), ("c", 1.0), ("d", -1.0), ("e", 0.5)]]
    emb = np.array([[1, 0, 0], [0.9, 0.43589, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]], dtype=np.float32)
    # b is 0.9 similar to a (> 0.81): dropped; c kept; e (0.5) is c again: dropped;
    # d has a negative score: kept only when scores need not be positive
    assert select_labels(scores, emb, 3, 0.81, need_positive=True) == [0, 2]
    assert select_labels(scores, emb, 3, 0.81, need_positive=False) == [0, 2, 3]
    assert select_labels(scores, emb, 1, 0.81) == [0]


def test_interpretability_is_mean_off_diagonal_similarity():
    e = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float64)
    # pairs: (0,1)=1, (0,2)=0, (1,2)=0 -> mean 1/3
    assert interpretability(e) == pytest.approx(1 / 3)


def test_nested_candidates_are_one_concept():
    scores = [CandidateScore(c, 0, 0, s) for c, s in [("yellow circle", 3.0), ("yellow", 2.0), ("circles", 1.5), ("blue", 1.0)]]
    emb = np.eye(4, dtype=np.float32)
    assert select_labels(scores, emb, 3, 0.81) == [0, 3]
    assert select_labels(scores, emb, 3, 0.81, drop_nested=False) == [0, 1, 2]
