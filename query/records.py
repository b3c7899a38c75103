"""Typed records returned by :class:`query.atlas.Atlas`.

All are frozen dataclasses; ``to_dict()`` gives a JSON-serializable dict
(tuples become lists when dumped), which is what ``--json`` output and the
HTTP API return.
"""

from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class Evidence(_Record):
    """One top-activating probe image (or crop of it) of a neuron.

    ``box`` is ``(x0, y0, x1, y1)`` for a crop, ``None`` for the whole image;
    ``caption`` is the captioner's text for it, when one was made.
    """

    rank: int
    source: str
    box: tuple[int, int, int, int] | None
    activation: float
    thumbnail: str
    caption_key: str | None
    caption: str | None


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


@dataclass(frozen=True)
class SearchHit(_Record):
    """A neuron found by text search.

    ``labels`` are all its label texts in rank order; ``score`` is the
    concept score of label 1; ``similarity`` the best cosine between the
    query and any of its labels, reached by ``matched_label``.
    """

    model: str
    layer: str
    unit: int
    labels: list[str]
    score: float | None
    similarity: float
    matched_label: str
