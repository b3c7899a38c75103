"""Step 4: labels from scored candidates, and the interpretability score."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    fidelity_correlation: float | None = None
    fidelity_auprc: float | None = None


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
        if drop_nested and any(nested(scores[i].concept, scores[k].concept) for k in kept):
            continue
        kept.append(i)
    return kept


def nested(a: str, b: str) -> bool:
    """Whether one phrase's words hold the other's ("yellow" and "yellow circle")."""
    wa, wb = _words(a), _words(b)
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


def choose_by_fidelity(
    cfg: LabelConfig,
    cands: Sequence[str],
    correlation: Sequence[float],
    dissect_scores: Sequence[float] | None,
    text_embeddings: np.ndarray,
    set_correlation: Callable[[list[int]], float],
    first_eligible: Sequence[bool] | None = None,
) -> dict[int, int]:
    """Candidate index -> label rank, the labels chosen by their fidelity.

    Label 1: among the candidates whose fidelity correlation is within
    ``fidelity_tolerance`` of the best, the best dissect score (generated
    images) decides; then a more general candidate (a strict subset of its
    words) replaces it unless the extra words raise fidelity by at least
    ``generality_margin``: a red detector is "red", not "red circle". Labels
    2-3: the next candidates by fidelity that pass the text-similarity and
    nesting filters and raise the label set's fidelity (an image shows the
    set where it shows any of them) by at least ``min_fidelity_gain``: a
    two-concept unit keeps both concepts, a one-concept unit one label.
    ``first_eligible`` marks the candidates that may be label 1 (a
    complement of another candidate may only be label 2-3).
    """
    n = len(cands)
    eligible = [i for i in range(n) if first_eligible is None or first_eligible[i]] or list(range(n))
    best = max(correlation[i] for i in eligible)
    near = [i for i in eligible if correlation[i] >= best - cfg.fidelity_tolerance]
    first = max(near, key=lambda i: (_finite(dissect_scores[i]) if dissect_scores else 0.0, correlation[i], -i))
    first = _most_general(cands, correlation, first, cfg.generality_margin, eligible)
    kept = [first]
    for i in sorted(range(n), key=lambda i: (-correlation[i], i)):
        if len(kept) >= cfg.max_labels:
            break
        if i in kept or not np.all(text_embeddings[kept] @ text_embeddings[i] <= cfg.dedup_threshold):
            continue
        if cfg.drop_nested_labels and any(nested(cands[i], cands[k]) for k in kept):
            continue
        if set_correlation(kept + [i]) - set_correlation(kept) >= cfg.min_fidelity_gain:
            kept.append(i)
    return {i: r + 1 for r, i in enumerate(kept)}


def _most_general(cands: Sequence[str], correlation: Sequence[float], chosen: int, margin: float,
                  eligible: Sequence[int]) -> int:
    words = _words(cands[chosen])
    general = [i for i in eligible if _words(cands[i]) and _words(cands[i]) < words
               and correlation[chosen] < correlation[i] + margin]
    return min(general, key=lambda i: (len(_words(cands[i])), -correlation[i], i)) if general else chosen


def _words(text: str) -> set[str]:
    return {singular(w) for w in text.lower().split()}
