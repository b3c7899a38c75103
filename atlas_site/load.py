"""Bulk reads for the site: every neuron of a layer at once, and the similar
neurons of every neuron from one batched FAISS search.

:meth:`query.Atlas.neuron` costs five queries per neuron (minutes for 25,000
neurons); these functions read a whole layer in five queries and build the
same :class:`query.records.NeuronRecord` objects.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from query import Atlas
from query.errors import AtlasError
from query.index import load_index, read_label_vectors
from query.records import Candidate, Evidence, Label, NeuronRecord
from query.schema import INDEX_FILE

log = logging.getLogger(__name__)

Key = tuple[str, str, int]


def _rows(atlas: Atlas, sql: str, params: list[object]) -> list[dict[str, Any]]:
    if atlas.con is None:
        raise AtlasError("the atlas is closed")
    cur = atlas.con.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def _samples(value: str | None) -> list[str]:
    if not value:
        return []
    try:
        data = json.loads(value)
    except ValueError:
        return []
    return [str(s) for s in data] if isinstance(data, list) else []


def layer_records(atlas: Atlas, model: str, layer: str) -> list[NeuronRecord]:
    """Every neuron of ``model``/``layer`` in unit order, as full records (five queries)."""
    key = [model, layer]
    where = "WHERE model = ? AND layer = ?"
    labels: dict[int, list[Label]] = defaultdict(list)
    for r in _rows(atlas, f"SELECT unit, rank, text, concept_score FROM labels {where} "
                          "ORDER BY unit, rank", key):
        labels[r["unit"]].append(Label(rank=r["rank"], text=r["text"],
                                       concept_score=r["concept_score"]))
    candidates: dict[int, list[Candidate]] = defaultdict(list)
    for r in _rows(atlas, f"SELECT * FROM candidates {where} ORDER BY unit, position", key):
        candidates[r["unit"]].append(Candidate(
            position=r["position"], concept=r["concept"], topk_squared=r["topk_squared"],
            image_products=r["image_products"], score=r["score"],
            selected_rank=r["selected_rank"], samples=_samples(r["samples"])))
    evidence: dict[int, list[Evidence]] = defaultdict(list)
    for r in _rows(atlas, "SELECT e.*, c.text AS caption FROM evidence e "
                          "LEFT JOIN captions c ON c.caption_key = e.caption_key "
                          "WHERE e.model = ? AND e.layer = ? ORDER BY e.unit, e.rank", key):
        evidence[r["unit"]].append(Evidence(
            rank=r["rank"], source=r["source"],
            box=None if r["x0"] is None else (r["x0"], r["y0"], r["x1"], r["y1"]),
            activation=r["activation"], thumbnail=r["thumbnail"],
            caption_key=r["caption_key"], caption=r["caption"]))
    calls: dict[int, dict[str, tuple[int, int]]] = defaultdict(dict)
    for r in _rows(atlas, f"SELECT unit, stage, calls, cached FROM call_counts {where} "
                          "ORDER BY unit, stage", key):
        calls[r["unit"]][r["stage"]] = (int(r["calls"]), int(r["cached"]))
    return [
        NeuronRecord(
            model=model, layer=layer, unit=int(n["unit"]), status=n["status"],
            reason=n["reason"], max_activation=n["max_activation"],
            interpretability=n["interpretability"], labels=labels.get(n["unit"], []),
            candidates=candidates.get(n["unit"], []), evidence=evidence.get(n["unit"], []),
            calls=calls.get(n["unit"], {}))
        for n in _rows(atlas, f"SELECT * FROM neurons {where} ORDER BY unit", key)
    ]


@dataclass(frozen=True)
class Neighbor:
    """A neuron similar to another one: its key, label 1 and cosine of the closest labels."""

    model: str
    layer: str
    unit: int
    label: str
    similarity: float


def similar_neurons(atlas: Atlas, k: int = 6, batch: int = 4096) -> dict[Key, list[Neighbor]]:
    """The ``k`` neurons whose labels are nearest to each neuron's label 1, across
    layers and models, itself excluded; only neurons with status 'ok'.

    One batched FAISS search over the atlas's ``descriptions.faiss`` (exact
    search over ``label_vectors`` when the index is missing or stale): each
    neuron's label-1 vector queries every label, and hits are grouped per
    neuron, best first.
    """
    rows = _rows(atlas, "SELECT l.label_id, l.model, l.layer, l.unit, l.rank, l.text "
                        "FROM labels l JOIN neurons n USING (model, layer, unit) "
                        "WHERE n.status = 'ok'", [])
    if not rows:
        return {}
    owner = {r["label_id"]: (r["model"], r["layer"], int(r["unit"])) for r in rows}
    first = {owner[r["label_id"]]: r["text"] for r in rows if r["rank"] == 1}
    first_ids = {r["label_id"] for r in rows if r["rank"] == 1}
    ids, vecs = read_label_vectors(atlas.con)
    if len(ids) == 0:
        return {}
    import faiss

    index = None
    n_labels = _rows(atlas, "SELECT count(*) AS n FROM labels", [])[0]["n"]
    if (atlas.path / INDEX_FILE).is_file():
        candidate = load_index(atlas.path)
        if candidate.ntotal == n_labels and candidate.d == vecs.shape[1]:
            index = candidate
        else:
            log.warning("%s is stale; computing similar neurons from label_vectors", INDEX_FILE)
    if index is None:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        index.add_with_ids(vecs / np.maximum(norms, 1e-12), ids)
    query_mask = np.fromiter((i in first_ids for i in ids.tolist()), dtype=bool, count=len(ids))
    q_ids, q_vecs = ids[query_mask], vecs[query_mask]
    # Up to 3 labels per neuron plus the neuron itself: over-fetch so k distinct remain.
    fetch = int(min(index.ntotal, 3 * (k + 1) + 3))
    out: dict[Key, list[Neighbor]] = {}
    for start in range(0, len(q_ids), batch):
        sims, hits = index.search(np.ascontiguousarray(q_vecs[start:start + batch]), fetch)
        for qid, row_sims, row_hits in zip(q_ids[start:start + batch].tolist(),
                                           sims.tolist(), hits.tolist()):
            me = owner[qid]
            found: dict[Key, float] = {}
            for sim, hid in zip(row_sims, row_hits):
                key = owner.get(hid)
                if key is None or key == me or key in found:
                    continue
                found[key] = sim
                if len(found) == k:
                    break
            out[me] = [Neighbor(m, ly, u, first.get((m, ly, u), ""), s)
                       for (m, ly, u), s in found.items()]
    return out
