"""Step 4: labels from scored candidates, and the interpretability score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from builder.backends.extractive import singular
from builder.config import LabelConfig
from builder.pipeline.scoring import CandidateScore


@dataclass(frozen=True)
class Label:
    """A label chosen for a neuron (its vector is added when it is written)."""

    rank: int
    text: str
    concept_score: float | None


@dataclass(frozen=True)
class ScoredConcept:
    """A concept and one score (what ``select_labels`` reads of a candidate)."""

    concept: str
    score: float = 0.0


def choose_labels(
    cfg: LabelConfig, cands: Sequence[str], scores: Sequence[CandidateScore] | None, text_emb: np.ndarray
) -> dict[int, int]:
    """Candidate index -> label rank (1 = best) of the candidates kept as labels.

    Without scores (the "no concept selection" ablation) the summarizer's
    order decides; labels 2-3 are then kept only when extra labels need no
    positive score."""
    if scores is not None:
        kept = select_labels(scores, text_emb, cfg.max_labels, cfg.dedup_threshold,
                             cfg.extra_labels_need_positive_score, cfg.drop_nested_labels)
    elif cfg.extra_labels_need_positive_score:
        kept = [0]
    else:
        kept = select_labels([ScoredConcept(c) for c in cands], text_emb, cfg.max_labels, cfg.dedup_threshold,
                             False, cfg.drop_nested_labels)
    return {i: r + 1 for r, i in enumerate(kept)}


def select_labels(
    scores: Sequence[CandidateScore],
    text_embeddings: np.ndarray,
    max_labels: int = 3,
    threshold: float = 0.81,
    need_positive: bool = True,
    drop_nested: bool = True,
) -> list[int]:
    """Indices of the candidates kept as labels, best first.

    Label 1 is the best-scoring candidate. Further labels (polysemantic
    multi-labels) are the next best, skipping any whose text similarity to an
    already kept label exceeds ``threshold``; with ``need_positive`` they must
    also have a positive score (some of their generated images reached the
    neuron's top-K), so a monosemantic neuron is not given filler labels; with
    ``drop_nested``, a candidate whose words all occur in a kept label, or the
    other way round ("yellow" and "yellow circle"), is the same concept at
    another specificity, not a second concept, and is skipped too.
    """
    if not scores:
        return []
    order = sorted(range(len(scores)), key=lambda i: (-_finite(scores[i].score), i))
    kept = [order[0]]
    for i in order[1:]:
        if len(kept) >= max_labels:
            break
        if need_positive and not scores[i].score > 0:
            continue
        sims = text_embeddings[kept] @ text_embeddings[i]
        if not np.all(sims <= threshold):
            continue
        if drop_nested and any(_nested(scores[i].concept, scores[k].concept) for k in kept):
            continue
        kept.append(i)
    return kept


def _nested(a: str, b: str) -> bool:
    wa = {singular(w) for w in a.lower().split()}
    wb = {singular(w) for w in b.lower().split()}
    return bool(wa) and bool(wb) and (wa <= wb or wb <= wa)


def interpretability(embeddings: np.ndarray) -> float:
    """Mean pairwise cosine similarity of the neuron's top-K image embeddings
    (diagonal excluded): how coherent the images it fires on are."""
    e = np.asarray(embeddings, dtype=np.float64)
    n = e.shape[0]
    if n < 2:
        return float("nan")
    sims = e @ e.T
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def _finite(x: float) -> float:
    return x if np.isfinite(x) else -np.inf
