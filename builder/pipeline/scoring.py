"""Best-concept selection scores (DESIGN.md section 2, step 3).

Pure functions over numbers, so golden tests pin them exactly. Ranks are
1-based: rank 1 is the generated image with the highest activation among all
images generated for the neuron's candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CandidateEvidence:
    """What scoring needs about one candidate concept of one neuron."""

    concept: str
    activations: np.ndarray  # (Q,) the neuron's activation on each generated image
    embeddings: np.ndarray  # (Q, d) L2-normalized image embeddings of those images


@dataclass(frozen=True)
class CandidateScore:
    concept: str
    topk_squared: float  # lower is better
    image_products: float  # -1 when none of its images reached the overall top-K
    score: float  # higher is better


def rank_all(activations: Sequence[np.ndarray]) -> list[np.ndarray]:
    """1-based ranks of every generated image among all candidates' images,
    highest activation first. Ties are broken by position (candidate order,
    then image index), so the ranking is deterministic."""
    flat = np.concatenate([np.asarray(a, dtype=np.float64) for a in activations])
    order = np.lexsort((np.arange(flat.size), -flat))
    ranks = np.empty(flat.size, dtype=np.int64)
    ranks[order] = np.arange(1, flat.size + 1)
    out, start = [], 0
    for a in activations:
        out.append(ranks[start : start + len(a)])
        start += len(a)
    return out


def topk_squared(ranks: np.ndarray, beta: int) -> float:
    """Mean of the squared ranks of the candidate's ``beta`` best-ranked images."""
    best = np.sort(np.asarray(ranks))[:beta]
    return float(np.mean(best.astype(np.float64) ** 2))


def image_products(
    probe_embeddings: np.ndarray, cand_embeddings: np.ndarray, cand_ranks: np.ndarray, top_k: int
) -> float:
    """Mean cosine similarity between the neuron's top-K probe images and the
    candidate's generated images that land in the overall top-K; -1 if none do."""
    keep = np.asarray(cand_ranks) <= top_k
    if not keep.any():
        return -1.0
    sims = np.asarray(probe_embeddings) @ np.asarray(cand_embeddings)[keep].T
    return float(sims.mean())


def score_topk_squared_image_products(
    cands: Sequence[CandidateEvidence], probe_embeddings: np.ndarray, beta: int, top_k: int
) -> list[CandidateScore]:
    """DnD's final score: (M - pos_c) * w_c, where pos_c is the 0-based position
    of c in ascending TopK-Squared order and w_c its Image-Products score."""
    ranks = rank_all([c.activations for c in cands])
    s = [topk_squared(r, beta) for r in ranks]
    w = [image_products(probe_embeddings, c.embeddings, r, top_k) for c, r in zip(cands, ranks)]
    m = len(cands)
    # Stable ascending order: equal TopK-Squared keeps the summarizer's order.
    order = sorted(range(m), key=lambda i: (s[i], i))
    pos = {i: p for p, i in enumerate(order)}
    return [
        CandidateScore(c.concept, s[i], w[i], float((m - pos[i]) * w[i]))
        for i, c in enumerate(cands)
    ]


def score_topk_squared(
    cands: Sequence[CandidateEvidence], probe_embeddings: np.ndarray, beta: int, top_k: int
) -> list[CandidateScore]:
    """Ablation: TopK-Squared alone (score = -s_c)."""
    ranks = rank_all([c.activations for c in cands])
    out = []
    for c, r in zip(cands, ranks):
        s = topk_squared(r, beta)
        out.append(CandidateScore(c.concept, s, float("nan"), -s))
    return out


def score_mean_activation(
    cands: Sequence[CandidateEvidence], probe_embeddings: np.ndarray, beta: int, top_k: int
) -> list[CandidateScore]:
    """Ablation: mean activation of the neuron on the candidate's images."""
    ranks = rank_all([c.activations for c in cands])
    return [
        CandidateScore(c.concept, topk_squared(r, beta), float("nan"), float(np.mean(c.activations)))
        for c, r in zip(cands, ranks)
    ]


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Area under the ROC curve of positives vs negatives (ties count half)."""
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(allv.size, dtype=np.float64)
    sorted_v = allv[order]
    # average ranks over ties
    i = 0
    while i < allv.size:
        j = i
        while j + 1 < allv.size and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    r_pos = ranks[: pos.size].sum()
    return float((r_pos - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def score_auc(
    cands: Sequence[CandidateEvidence], probe_embeddings: np.ndarray, beta: int, top_k: int
) -> list[CandidateScore]:
    """Ablation: AUC of the candidate's images against the other candidates'
    images (the generated images of the rest serve as controls)."""
    out = []
    ranks = rank_all([c.activations for c in cands])
    for i, c in enumerate(cands):
        others = [o.activations for j, o in enumerate(cands) if j != i]
        neg = np.concatenate(others) if others else np.array([])
        out.append(CandidateScore(c.concept, topk_squared(ranks[i], beta), float("nan"), auc(c.activations, neg)))
    return out


Scorer = Callable[[Sequence[CandidateEvidence], np.ndarray, int, int], list[CandidateScore]]

SCORERS: dict[str, Scorer] = {
    "topk-squared+image-products": score_topk_squared_image_products,
    "topk-squared": score_topk_squared,
    "mean-activation": score_mean_activation,
    "auc": score_auc,
}
