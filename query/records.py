"""Typed records returned by :class:`query.atlas.Atlas`.

All are frozen dataclasses; ``to_dict()`` gives a JSON-serializable dict
(tuples become lists when dumped), which is what ``--json`` output and the
HTTP API return.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


class _Record:
    def to_dict(self) -> dict[str, Any]:
        """The record as plain dicts, lists and scalars (nested records included)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class ModelInfo(_Record):
    """One target model of the atlas and the probe set it was dissected on."""

    model: str
    target: str
    probe: str
    n_probe_images: int
    n_skipped_images: int
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerInfo(_Record):
    """One layer of a model with the count of its neurons per status."""

    model: str
    layer: str
    position: int
    kind: str
    n_units: int
    n_ok: int
    n_dead: int
    n_failed: int


@dataclass(frozen=True)
class Label(_Record):
    """A label of a neuron; rank 1 is the best concept."""

    rank: int
    text: str
    concept_score: float | None
    fidelity_correlation: float | None = None  # how well its presence predicts the activation (Pearson)
    fidelity_auprc: float | None = None  # how well its presence ranks the most active images


@dataclass(frozen=True)
class Candidate(_Record):
    """A candidate concept proposed for a neuron and its Dissect scores."""

    position: int
    concept: str
    topk_squared: float | None
    image_products: float | None
    score: float | None
    selected_rank: int | None
    samples: list[str] = field(default_factory=list)
    fidelity_correlation: float | None = None
    fidelity_auprc: float | None = None
    source: str | None = None  # "summarizer", or "fidelity" (a caption phrase fidelity added)


@dataclass(frozen=True)
class Evidence(_Record):
    """One top-activating probe image (or crop of it) of a neuron.

    ``box`` is ``(x0, y0, x1, y1)`` for a crop, ``None`` for the whole image;
    ``caption`` is the captioner's text for it, when one was made;
    ``source_thumbnail`` and ``source_size`` (width, height) show the whole
    source image (a reader draws the box on it), and ``heatmap`` is a
    ``data:`` URL of the unit's activation map on the source image.
    """

    rank: int
    source: str
    box: tuple[int, int, int, int] | None
    activation: float
    thumbnail: str
    caption_key: str | None
    caption: str | None
    source_thumbnail: str | None = None
    source_size: tuple[int, int] | None = None
    heatmap: str | None = None


@dataclass(frozen=True)
class NeuronRecord(_Record):
    """Everything the atlas knows about one neuron.

    ``calls`` maps a stage name to ``(calls, cached)``: expensive calls made
    for this neuron and how many of them the content cache answered.
    """

    model: str
    layer: str
    unit: int
    status: str
    reason: str | None
    max_activation: float | None
    interpretability: float | None
    labels: list[Label]
    candidates: list[Candidate]
    evidence: list[Evidence]
    calls: dict[str, tuple[int, int]]
    dropped_crops: int | None = None


@dataclass(frozen=True)
class SearchHit(_Record):
    """A neuron found by text search.

    ``labels`` are all its label texts in rank order; ``score`` is the
    concept score of label 1; ``similarity`` the best cosine between the
    query and any of its labels, reached by ``matched_label``, whose fidelity
    (correlation, AUPRC) says how far to trust it.
    """

    model: str
    layer: str
    unit: int
    labels: list[str]
    score: float | None
    similarity: float
    matched_label: str
    fidelity_correlation: float | None = None
    fidelity_auprc: float | None = None


# -- rows of the atlas tables as records (atlas.neuron and the bulk reads) --------------
# New columns are read with .get so atlases of older format versions read too.


def _samples(value: Any) -> list[str]:
    if not value:
        return []
    try:
        data = json.loads(value)
    except (TypeError, ValueError):
        return []
    return [str(s) for s in data] if isinstance(data, list) else []


def label_from_row(r: dict[str, Any]) -> Label:
    """A ``labels`` row as a :class:`Label`."""
    return Label(rank=r["rank"], text=r["text"], concept_score=r["concept_score"],
                 fidelity_correlation=r.get("fidelity_correlation"), fidelity_auprc=r.get("fidelity_auprc"))


def candidate_from_row(r: dict[str, Any]) -> Candidate:
    """A ``candidates`` row as a :class:`Candidate`."""
    return Candidate(
        position=r["position"], concept=r["concept"], topk_squared=r["topk_squared"],
        image_products=r["image_products"], score=r["score"], selected_rank=r["selected_rank"],
        samples=_samples(r["samples"]), fidelity_correlation=r.get("fidelity_correlation"),
        fidelity_auprc=r.get("fidelity_auprc"), source=r.get("source"),
    )


def evidence_from_row(r: dict[str, Any]) -> Evidence:
    """An ``evidence`` row (joined with its caption's ``text`` as ``caption``) as an :class:`Evidence`."""
    w, h = r.get("source_width"), r.get("source_height")
    return Evidence(
        rank=r["rank"], source=r["source"],
        box=None if r["x0"] is None else (r["x0"], r["y0"], r["x1"], r["y1"]),
        activation=r["activation"], thumbnail=r["thumbnail"], caption_key=r["caption_key"],
        caption=r.get("caption"), source_thumbnail=r.get("source_thumbnail"),
        source_size=(w, h) if w is not None and h is not None else None, heatmap=r.get("heatmap"),
    )
