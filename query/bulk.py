"""Bulk reads for the site: every neuron of a layer at once, and the similar
neurons of every neuron from one batched search over the label vectors.

:meth:`query.Atlas.neuron` costs five queries per neuron (minutes for 25,000
neurons); these functions read a whole layer in five queries and build the
same :class:`query.records.NeuronRecord` objects.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from query.atlas import Atlas, ok_labels_filter
from query.errors import AtlasError
from query.index import read_label_vectors
from query.records import (
    Candidate,
    Evidence,
    Label,
    NeuronRecord,
    candidate_from_row,
    evidence_from_row,
    label_from_row,
)

log = logging.getLogger(__name__)

Key = tuple[str, str, int]


def layer_records(atlas: Atlas, model: str, layer: str) -> list[NeuronRecord]:
    """Every neuron of ``model``/``layer`` in unit order, as full records (five queries)."""
    key = [model, layer]
    where = "WHERE model = ? AND layer = ?"
    labels: dict[int, list[Label]] = defaultdict(list)
    for r in atlas.sql(f"SELECT * FROM labels {where} ORDER BY unit, rank", key):
        labels[r["unit"]].append(label_from_row(r))
    candidates: dict[int, list[Candidate]] = defaultdict(list)
    for r in atlas.sql(f"SELECT * FROM candidates {where} ORDER BY unit, position", key):
        candidates[r["unit"]].append(candidate_from_row(r))
    evidence: dict[int, list[Evidence]] = defaultdict(list)
    for r in atlas.sql("SELECT e.*, c.text AS caption FROM evidence e "
                       "LEFT JOIN captions c ON c.caption_key = e.caption_key "
                       "WHERE e.model = ? AND e.layer = ? ORDER BY e.unit, e.rank", key):
        evidence[r["unit"]].append(evidence_from_row(r))
    calls: dict[int, dict[str, tuple[int, int]]] = defaultdict(dict)
    for r in atlas.sql(f"SELECT unit, stage, calls, cached FROM call_counts {where} ORDER BY unit, stage", key):
        calls[r["unit"]][r["stage"]] = (int(r["calls"]), int(r["cached"]))
    return [
        NeuronRecord(
            model=model, layer=layer, unit=int(n["unit"]), status=n["status"],
            reason=n["reason"], max_activation=n["max_activation"],
            interpretability=n["interpretability"], labels=labels.get(n["unit"], []),
            candidates=candidates.get(n["unit"], []), evidence=evidence.get(n["unit"], []),
            calls=calls.get(n["unit"], {}), dropped_crops=n.get("dropped_crops"))
        for n in atlas.sql(f"SELECT * FROM neurons {where} ORDER BY unit", key)
    ]


@dataclass(frozen=True)
class Neighbor:
    """A neuron similar to another one: its key, label 1 and cosine of the closest labels."""

    model: str
    layer: str
    unit: int
    label: str
    similarity: float


# Above this many label-1 vectors, neighbours come from an approximate (IVF) index:
# the exact search is quadratic (250,000 neurons: ~15 min of top-k selection on 2 cores).
EXACT_MAX = 60_000


def similar_neurons(atlas: Atlas, k: int = 6, batch: int = 2048,
                    exact_max: int = EXACT_MAX) -> dict[Key, list[Neighbor]]:
    """The ``k`` neurons whose label 1 is nearest (cosine of label embeddings) to each
    neuron's label 1, across layers and models, itself excluded; status 'ok' only.

    Up to ``exact_max`` neurons: one batched exact search over the label-1
    vectors of ``label_vectors`` (the vectors ``descriptions.faiss`` indexes),
    done as blocked matrix products (on 2 shared cores a FAISS flat search of
    25,000 queries over all 75,000 labels took ~170 s, BLAS over the 25,000
    label-1 vectors takes seconds). Above it, a FAISS IVF index (about
    ``2 * sqrt(n)`` lists, 10 probed): approximate, about a minute for 250,000.
    """
    rows = atlas.sql("SELECT l.label_id, l.model, l.layer, l.unit, l.text "
                        "FROM labels l JOIN neurons n USING (model, layer, unit) "
                        "WHERE n.status = 'ok' AND l.rank = 1", [])
    if len(rows) < 2:
        return {}
    ids, vecs = read_label_vectors(atlas.con, "n.status = 'ok' AND l.rank = 1")
    by_id = {r["label_id"]: r for r in rows}
    keep = np.fromiter((i in by_id for i in ids.tolist()), dtype=bool, count=len(ids))
    ids, vecs = ids[keep], vecs[keep]
    if len(ids) < 2:
        return {}
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = np.ascontiguousarray(vecs / np.maximum(norms, 1e-12), dtype=np.float32)
    meta = [by_id[i] for i in ids.tolist()]
    kk = min(k, len(ids) - 1)
    if len(ids) <= exact_max:
        pairs = _exact_neighbors(vecs, kk, batch)
    else:
        pairs = _ivf_neighbors(vecs, kk)
    out: dict[Key, list[Neighbor]] = {}
    for row, (cols, sims) in enumerate(pairs):
        me = meta[row]
        out[(me["model"], me["layer"], int(me["unit"]))] = [
            Neighbor(meta[j]["model"], meta[j]["layer"], int(meta[j]["unit"]),
                     meta[j]["text"], float(s))
            for j, s in zip(cols, sims)
        ]
    return out


def _exact_neighbors(vecs: np.ndarray, k: int, batch: int):
    """Yields, per row, the ``k`` other rows of highest cosine (best first) and their cosines."""
    n = len(vecs)
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        sims = vecs[start:stop] @ vecs.T
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # never itself
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        for row in range(stop - start):
            cand = top[row]
            order = cand[np.argsort(-sims[row, cand], kind="stable")]
            yield order.tolist(), sims[row, order].tolist()


def _ivf_neighbors(vecs: np.ndarray, k: int, nprobe: int = 10, seed: int = 0):
    """Like :func:`_exact_neighbors` from a FAISS inverted-file index (approximate)."""
    import faiss

    n, d = vecs.shape
    nlist = max(1, int(2 * np.sqrt(n)))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(n, size=min(n, 40 * nlist), replace=False)
    index.cp.niter = 10
    index.train(vecs[np.sort(sample)])
    index.add(vecs)
    index.nprobe = nprobe
    for start in range(0, n, 16384):
        sims, cols = index.search(vecs[start:start + 16384], k + 1)
        for row in range(len(cols)):
            me = start + row
            pairs = [(int(j), float(s)) for j, s in zip(cols[row], sims[row])
                     if j >= 0 and j != me][:k]
            yield [j for j, _ in pairs], [s for _, s in pairs]


def first_labels(atlas: Atlas) -> dict[Key, tuple[str, int]]:
    """Label 1 (text, label_id) of every neuron with status 'ok', in model,
    layer, unit order: what the evaluation protocols score."""
    rows = atlas.sql("SELECT l.model, l.layer, l.unit, l.text, l.label_id FROM labels l JOIN neurons n "
                     "ON n.model = l.model AND n.layer = l.layer AND n.unit = l.unit "
                     "WHERE l.rank = 1 AND n.status = 'ok' ORDER BY l.model, l.layer, l.unit")
    return {(r["model"], r["layer"], int(r["unit"])): (r["text"], int(r["label_id"])) for r in rows}


def label_vectors_of(atlas: Atlas, label_ids: list[int]) -> np.ndarray:
    """The stored (L2-normalized) vectors of these labels, in the order given."""
    if not label_ids:
        return np.zeros((0, 0), np.float32)
    rows = {r["label_id"]: r["vec"] for r in atlas.sql(
        "SELECT label_id, vec FROM label_vectors WHERE label_id IN (SELECT unnest(?::BIGINT[]))",
        [list(label_ids)])}
    missing = [i for i in label_ids if i not in rows]
    if missing:
        raise AtlasError(f"{len(missing)} labels have no vector; rebuild the atlas")
    return np.stack([np.asarray(rows[i], dtype=np.float32) for i in label_ids])


def labels_by_unit(atlas: Atlas, model: str, layer: str) -> dict[int, list[str]]:
    """unit -> its label texts in rank order, for one layer (any status)."""
    out: dict[int, list[str]] = {}
    for r in atlas.sql("SELECT unit, text FROM labels WHERE model = ? AND layer = ? ORDER BY unit, rank",
                       [model, layer]):
        out.setdefault(int(r["unit"]), []).append(r["text"])
    return out


def ok_labels(atlas: Atlas, model: str | None = None, layer: str | None = None) -> list[dict[str, Any]]:
    """Every label of the 'ok' neurons (optionally of one model and layer):
    label_id, model, layer, unit, rank, text, in neuron then rank order."""
    where, params = ok_labels_filter(model, layer)
    return atlas.sql(
        "SELECT l.label_id, l.model, l.layer, l.unit, l.rank, l.text FROM labels l "
        "JOIN neurons n ON n.model = l.model AND n.layer = l.layer AND n.unit = l.unit "
        f"WHERE {where} ORDER BY l.model, l.layer, l.unit, l.rank", params)


def ok_label_vectors(atlas: Atlas, model: str | None = None, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(label_ids, vectors) of the labels of the 'ok' neurons (optionally of
    one model and layer), by label_id."""
    return read_label_vectors(atlas.con, *ok_labels_filter(model, layer))
