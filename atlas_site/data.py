"""The site's data files: what the browser renders layer tables, neuron pages and
search results from.

Layout under ``docs/`` (every file JSON, the large ones gzip-compressed; the
browser inflates them with ``DecompressionStream``)::

    data/site.json                      models and layers: names, slugs, counts, chunk size
    data/search.json.gz                 keyword index: distinct label texts -> (layer, unit, rank)
    data/<model>/<layer>/index.json.gz  the layer table: one row per unit, columns data-driven
    data/<model>/<layer>/n/<k>.json.gz  the full records of units [k*CHUNK, (k+1)*CHUNK)

``<model>`` and ``<layer>`` are :func:`atlas_site.escape.slug` of the names.
Everything a model or a user wrote (labels, captions, concepts, names) is a
JSON string here and the browser sets it with ``textContent`` only.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from atlas_site.escape import slug
from atlas_site.images import ImageSet
from query.bulk import Neighbor
from query.records import Evidence, Label, LayerInfo, NeuronRecord

DATA_FORMAT = 1
CHUNK = 256
DATA_DIR = "data"
SITE_FILE = f"{DATA_DIR}/site.json"
SEARCH_FILE = f"{DATA_DIR}/search.json.gz"


def layer_path(model: str, layer: str) -> str:
    """``<model slug>/<layer slug>``: a layer's key in URLs and data paths."""
    return f"{slug(model)}/{slug(layer)}"


def index_file(model: str, layer: str) -> str:
    """Docs-relative path of a layer's table data."""
    return f"{DATA_DIR}/{layer_path(model, layer)}/index.json.gz"


def chunk_file(model: str, layer: str, chunk: int) -> str:
    """Docs-relative path of the chunk holding units ``[chunk*CHUNK, (chunk+1)*CHUNK)``."""
    return f"{DATA_DIR}/{layer_path(model, layer)}/n/{int(chunk)}.json.gz"


def gzip_json(obj: Any) -> bytes:
    """``obj`` as compact JSON, gzip-compressed deterministically (no timestamp)."""
    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return gzip.compress(raw.encode("utf-8"), compresslevel=6, mtime=0)


def num(value: float | None) -> float | None:
    """A number for the data files: 5 significant digits, ``None`` for NaN/inf/missing."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    v = float(value)
    if not math.isfinite(v):
        return None
    return float(f"{v:.5g}")


# -- layer tables ---------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a layer table. ``kind``: ``int``/``num`` (sortable numbers with a
    minimum filter), ``text``, ``label`` (text linking to the neuron), ``image``."""

    key: str
    title: str
    kind: str


BASE_COLUMNS = (
    Column("unit", "Unit", "int"),
    Column("thumb", "Top image", "image"),
    Column("label", "Label 1", "label"),
    Column("score", "Score", "num"),
    Column("interpretability", "Interpretability", "num"),
)
STATUS = Column("status", "Status", "text")
_LABEL_SKIP = {"rank", "text", "concept_score"}


def label_numbers(records: Iterable[NeuronRecord]) -> list[str]:
    """Numeric fields of label 1 beyond the concept score that some neuron of the layer
    has (e.g. ``fidelity_correlation``): each becomes a table column and a histogram."""
    keys: list[str] = []
    for rec in records:
        if not rec.labels:
            continue
        first = rec.labels[0]
        for f in dataclasses.fields(first):
            v = getattr(first, f.name)
            if (f.name not in _LABEL_SKIP and f.name not in keys and not isinstance(v, bool)
                    and isinstance(v, (int, float))):
                keys.append(f.name)
    return keys


def layer_columns(records: Sequence[NeuronRecord]) -> list[Column]:
    """The columns of a layer's table: the base ones, any extra label-1 numbers, status."""
    extra = [Column(k, k.replace("_", " ").capitalize(), "num") for k in label_numbers(records)]
    return [*BASE_COLUMNS, *extra, STATUS]


def _image_cell(ev: Evidence | None, images: ImageSet) -> Any:
    if ev is None:
        return None
    shown = evidence_image(ev, images)
    if shown is None:
        return None
    src, frame = shown
    return src if frame is None else {"src": src, "box": frame}


def layer_index(li: LayerInfo, records: Sequence[NeuronRecord], images: ImageSet,
                columns: Sequence[Column]) -> dict[str, Any]:
    """The table data of one layer: column descriptions and one array per column
    (``text`` holds every label of a unit, lowercased, for the word filter)."""
    values: dict[str, list[Any]] = {c.key: [] for c in columns}
    text: list[str] = []
    for rec in records:
        first: Label | None = rec.labels[0] if rec.labels else None
        row = {"unit": rec.unit, "status": rec.status, "label": first.text if first else "",
               "score": num(first.concept_score) if first else None,
               "interpretability": num(rec.interpretability),
               "thumb": _image_cell(rec.evidence[0] if rec.evidence else None, images)}
        for c in columns:
            if c.key not in row:
                row[c.key] = num(getattr(first, c.key, None)) if first else None
            values[c.key].append(row[c.key])
        text.append(" ".join(lb.text for lb in rec.labels).lower())
    return {"format": DATA_FORMAT, "model": li.model, "layer": li.layer,
            "path": layer_path(li.model, li.layer), "chunk": CHUNK,
            "columns": [dataclasses.asdict(c) for c in columns], "values": values, "text": text}


# -- neuron records -------------------------------------------------------------------


def _frame(ev: Evidence) -> list[float] | None:
    """The crop box as fractions of the source image, when the record says its size."""
    size = getattr(ev, "source_size", None)
    if ev.box is None or not size or len(size) != 2 or min(size) <= 0:
        return None
    w, h = float(size[0]), float(size[1])
    x0, y0, x1, y1 = ev.box
    f = [x0 / w, y0 / h, x1 / w, y1 / h]
    return [min(1.0, max(0.0, round(v, 4))) for v in f]


def evidence_image(ev: Evidence, images: ImageSet) -> tuple[str, list[float] | None] | None:
    """The image a page shows for one evidence row and the box the browser draws on it.

    The plain thumbnail of the source image (``source_thumbnail``, shared by every
    crop of that image) with the crop box as fractions when the record has it and
    the source size; else the builder's thumbnail with the box baked in.
    """
    plain = images.add(getattr(ev, "source_thumbnail", None))
    if plain is not None and (ev.box is None or _frame(ev) is not None):
        return plain, _frame(ev)
    baked = images.add(ev.thumbnail)
    return None if baked is None else (baked, None)


def _label(lb: Label) -> dict[str, Any]:
    out: dict[str, Any] = {"rank": lb.rank, "text": lb.text}
    for f in dataclasses.fields(lb):
        if f.name not in ("rank", "text"):
            v = getattr(lb, f.name)
            out[f.name] = num(v) if isinstance(v, (int, float)) or v is None else v
    return out


def _evidence(ev: Evidence, images: ImageSet) -> dict[str, Any]:
    shown = evidence_image(ev, images)
    out: dict[str, Any] = {
        "rank": ev.rank, "source": ev.source, "box": list(ev.box) if ev.box else None,
        "activation": num(ev.activation), "caption": ev.caption,
        "image": shown[0] if shown else None, "frame": shown[1] if shown else None}
    heatmap = images.add(getattr(ev, "heatmap", None))
    if heatmap is not None:
        out["heatmap"] = heatmap
    return out


def neuron_data(rec: NeuronRecord, images: ImageSet,
                similar: Sequence[Neighbor]) -> dict[str, Any]:
    """One neuron's record for its page: labels, candidates, evidence, calls, neighbours."""
    return {
        "unit": rec.unit, "status": rec.status, "reason": rec.reason,
        "max_activation": num(rec.max_activation), "interpretability": num(rec.interpretability),
        "labels": [_label(lb) for lb in rec.labels],
        "candidates": [{
            "position": c.position, "concept": c.concept, "topk_squared": num(c.topk_squared),
            "image_products": num(c.image_products), "score": num(c.score),
            "selected_rank": c.selected_rank,
            "samples": [s for s in (images.add(p) for p in c.samples) if s is not None]}
            for c in rec.candidates],
        "evidence": [_evidence(ev, images) for ev in rec.evidence],
        "calls": [[stage, int(n), int(cached)] for stage, (n, cached) in rec.calls.items()],
        "similar": [{"path": layer_path(nb.model, nb.layer), "unit": nb.unit, "label": nb.label,
                     "similarity": num(nb.similarity)} for nb in similar],
    }


def chunks(records: Sequence[NeuronRecord]) -> dict[int, list[NeuronRecord]]:
    """Records grouped by chunk number (``unit // CHUNK``)."""
    out: dict[int, list[NeuronRecord]] = {}
    for rec in records:
        out.setdefault(rec.unit // CHUNK, []).append(rec)
    return out


# -- site and search ------------------------------------------------------------------


def site_data(name: str, layers: Sequence[LayerInfo], model_names: Sequence[str],
              layer_chunks: dict[tuple[str, str], list[int]],
              semantic: dict[str, Any] | None = None) -> dict[str, Any]:
    """``data/site.json``: what every page needs to map URL slugs to names, which
    chunk files each layer has (so a page never asks for a file that is not there)
    and, when the site has semantic search, its index file and size
    (:func:`atlas_site.semantic.write_semantic`)."""
    return {
        "format": DATA_FORMAT, "name": name, "chunk": CHUNK,
        "models": [{"name": m, "slug": slug(m)} for m in model_names],
        "layers": [{"model": li.model, "layer": li.layer, "path": layer_path(li.model, li.layer),
                    "kind": li.kind, "n_units": li.n_units, "n_ok": li.n_ok,
                    "n_dead": li.n_dead, "n_failed": li.n_failed,
                    "chunks": layer_chunks.get((li.model, li.layer), [])} for li in layers],
        "semantic": semantic,
    }


class SearchIndex:
    """The keyword index, built layer by layer: distinct label texts, each with the
    flat list ``[layer, unit, rank, ...]`` of the labels that read so (``layer`` is
    the position in ``layers``)."""

    def __init__(self) -> None:
        self.layers: list[str] = []
        self._texts: dict[str, list[int]] = {}

    def add_layer(self, model: str, layer: str, records: Iterable[NeuronRecord]) -> None:
        """Index every label of one layer's neurons."""
        pos = len(self.layers)
        self.layers.append(layer_path(model, layer))
        for rec in records:
            for lb in rec.labels:
                self._texts.setdefault(lb.text, []).extend((pos, rec.unit, lb.rank))

    def to_dict(self) -> dict[str, Any]:
        """The index as written to ``data/search.json.gz``."""
        texts = sorted(self._texts)
        return {"format": DATA_FORMAT, "layers": self.layers, "texts": texts,
                "refs": [self._texts[t] for t in texts]}
