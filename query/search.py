"""The parts of :meth:`query.atlas.Atlas.search` that must stay fast at a million labels.

Per query, search does no SQL: the FAISS index returns label ids of qualifying
labels only (an ID selector applies the status and model/layer filters inside
FAISS), and a :class:`LabelMap`, loaded from DuckDB once per open atlas with
one query, maps them to neurons and gives every hit's labels. Measured on a
1M-label atlas (bench/search.py) the SQL it replaces (a join of the hits with
``neurons``, then the hits' labels by a string key) cost 200-500 ms per query,
since DuckDB scans both tables for it; the map costs ~0.5 s and ~70 MB once.

Filtered searches over an IVF index: a filter selecting at most
``query.index.EXACT_MAX`` labels is searched exactly over those labels'
vectors, gathered from the index's lists once (~40 ms at 1M) and cached
(:data:`SUBSET_CACHE` filters); a wider one goes through the IVF index with
an ID selector, probing more lists the more selective it is
(:func:`filtered_nprobe`). Measured at 1M labels (no query embedding, one
thread, shared machine): unfiltered ~2.5-3 ms; a 1/100 filter 18-21 ms when
probing every list, ~0.9 ms exact over its gathered vectors; a 1/4 filter
~6 ms (2x the lists, recall@10 0.970 vs 0.977 unfiltered).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from query.index import EXACT_MAX

log = logging.getLogger(__name__)

FIDELITY_COLUMNS = ("fidelity_correlation", "fidelity_auprc")
FILTER_CACHE = 8  # filters whose masks and FAISS selectors are kept per open atlas
SUBSET_CACHE = 2  # selective filters whose gathered vectors are kept (<= EXACT_MAX x d floats each)

_LOAD_SQL = """
    SELECT l.label_id, l.model, l.layer, l.unit, l.rank, l.text, l.concept_score,
           {fidelity}, coalesce(n.status = 'ok', false) AS ok
    FROM labels l
    LEFT JOIN neurons n ON n.model = l.model AND n.layer = l.layer AND n.unit = l.unit
    ORDER BY l.model, l.layer, l.unit, l.rank
"""


@dataclass(frozen=True)
class LabelMap:
    """Every label of an atlas in memory, rows in (model, layer, unit, rank) order.

    ``model`` and ``layer`` are codes into ``models`` / ``layers``; ``ok`` says
    whether the label's neuron has status 'ok'; ``score`` and the fidelity
    columns are NaN where the atlas holds NULL; ``neuron`` numbers the neurons
    and ``neuron_start[i]:neuron_start[i + 1]`` are neuron ``i``'s rows.
    ``sorted_ids`` / ``sorted_rows`` find the row of a label id; ``text_code``
    numbers the distinct texts and ``text_rows[text_start[c]:text_start[c + 1]]``
    are the rows of text ``c`` (every copy of a label text, for the ranking).
    """

    label_ids: np.ndarray
    model: np.ndarray
    models: tuple[str, ...]
    layer: np.ndarray
    layers: tuple[str, ...]
    unit: np.ndarray
    rank: np.ndarray
    score: np.ndarray
    fidelity_correlation: np.ndarray
    fidelity_auprc: np.ndarray
    ok: np.ndarray
    text: pa.Array
    neuron: np.ndarray
    neuron_start: np.ndarray
    sorted_ids: np.ndarray
    sorted_rows: np.ndarray
    text_code: np.ndarray
    text_rows: np.ndarray
    text_start: np.ndarray

    @classmethod
    def load(cls, con: duckdb.DuckDBPyConnection) -> LabelMap:
        """Read the labels (with their neurons' status) in one query. An atlas
        older than format v3 (opened with ``allow_older``) has no fidelity
        columns: they read as NULL."""
        cur = con.cursor()  # a result the caller left unfinished on ``con`` must not block this
        try:
            columns = {r[0] for r in cur.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'labels'").fetchall()}
            fidelity = ", ".join(f"l.{c}" if c in columns else f"NULL::DOUBLE AS {c}" for c in FIDELITY_COLUMNS)
            table = cur.sql(_LOAD_SQL.format(fidelity=fidelity)).to_arrow_table()
        finally:
            cur.close()
        model, models = _codes(table.column("model"))
        layer, layers = _codes(table.column("layer"))
        unit = table.column("unit").to_numpy().astype(np.int64)
        n = table.num_rows
        change = np.ones(n, dtype=bool)
        if n:
            change[1:] = (model[1:] != model[:-1]) | (layer[1:] != layer[:-1]) | (unit[1:] != unit[:-1])
        neuron = (np.cumsum(change) - 1).astype(np.int32)
        ids = table.column("label_id").to_numpy().astype(np.int64)
        order = np.argsort(ids, kind="stable")
        text_code, texts = _codes(table.column("text"))
        text_rows = np.argsort(text_code, kind="stable").astype(np.int64)
        text_start = np.searchsorted(text_code[text_rows], np.arange(len(texts) + 1)).astype(np.int64)

        def floats(name: str) -> np.ndarray:
            return pc.fill_null(table.column(name).cast(pa.float64()), math.nan).to_numpy()

        return cls(
            label_ids=ids, model=model, models=models, layer=layer, layers=layers, unit=unit,
            rank=table.column("rank").to_numpy().astype(np.int16),
            score=floats("concept_score"), fidelity_correlation=floats("fidelity_correlation"),
            fidelity_auprc=floats("fidelity_auprc"), ok=table.column("ok").to_numpy(zero_copy_only=False),
            text=table.column("text").combine_chunks(), neuron=neuron,
            neuron_start=np.append(np.flatnonzero(change), n).astype(np.int64),
            sorted_ids=ids[order], sorted_rows=order.astype(np.int64),
            text_code=text_code, text_rows=text_rows, text_start=text_start,
        )

    def __len__(self) -> int:
        return len(self.label_ids)

    def rows(self, label_ids: np.ndarray) -> np.ndarray:
        """The row of each label id, -1 for ids the atlas does not hold."""
        ids = np.asarray(label_ids, dtype=np.int64)
        if not len(self.sorted_ids):
            return np.full(len(ids), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self.sorted_ids, ids), len(self.sorted_ids) - 1)
        return np.where(self.sorted_ids[at] == ids, self.sorted_rows[at], -1)

    def mask(self, model: str | None, layer: str | None, min_fidelity: float | None = None) -> np.ndarray:
        """Rows of 'ok' neurons, of ``model`` and ``layer`` when given, and with a
        fidelity correlation of at least ``min_fidelity`` when given (a label
        without one never qualifies then, as ``l.fidelity_correlation >= R`` in SQL)."""
        mask = self.ok.copy()
        if min_fidelity is not None:
            with np.errstate(invalid="ignore"):
                mask &= self.fidelity_correlation >= min_fidelity
        for value, names, codes in ((model, self.models, self.model), (layer, self.layers, self.layer)):
            if value is not None:
                mask &= codes == (names.index(value) if value in names else -1)
        return mask

    def carriers(self, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The rows selected by ``mask`` whose text is the text of one of ``rows``."""
        codes = np.unique(self.text_code[np.asarray(rows, dtype=np.int64)])
        if not len(codes):
            return np.zeros(0, dtype=np.int64)
        out = np.concatenate([self.text_rows[self.text_start[c]:self.text_start[c + 1]] for c in codes.tolist()])
        return out[mask[out]]

    def keys(self, rows: np.ndarray) -> list[tuple[str, str, int]]:
        """``(model, layer, unit)`` of each of ``rows``."""
        models, layers = self.models, self.layers
        return [(models[m], layers[la], u) for m, la, u in
                zip(self.model[rows].tolist(), self.layer[rows].tolist(), self.unit[rows].tolist())]

    def key(self, row: int) -> tuple[str, str, int]:
        """``(model, layer, unit)`` of a row."""
        return self.models[self.model[row]], self.layers[self.layer[row]], int(self.unit[row])

    def neuron_rows(self, row: int) -> range:
        """The rows of the neuron that ``row`` belongs to, in rank order."""
        i = self.neuron[row]
        return range(int(self.neuron_start[i]), int(self.neuron_start[i + 1]))


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, tuple[str, ...]]:
    encoded = pc.dictionary_encode(column).combine_chunks()
    return (encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32),
            tuple(encoded.dictionary.to_pylist()))


def ivf_vectors(ivf: Any, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of the entries of an IVF-Flat index whose id is in the
    sorted array ``want`` (its lists hold the raw float32 vectors)."""
    import faiss

    inv, d = ivf.invlists, ivf.d
    out_ids, out_vecs = [], []
    for i in range(ivf.nlist):
        size = inv.list_size(i)
        if size == 0 or not len(want):
            continue
        ids = faiss.rev_swig_ptr(inv.get_ids(i), size)
        hit = want[np.minimum(np.searchsorted(want, ids), len(want) - 1)] == ids
        if hit.any():
            codes = faiss.rev_swig_ptr(inv.get_codes(i), size * inv.code_size)
            out_ids.append(ids[hit])
            out_vecs.append(codes.view(np.float32).reshape(size, d)[hit])
    if not out_ids:
        return np.zeros(0, dtype=np.int64), np.zeros((0, d), dtype=np.float32)
    return np.concatenate(out_ids), np.concatenate(out_vecs)


def filtered_nprobe(nprobe: int, nlist: int, total: int, selected: int) -> int:
    """Lists to probe when ``selected`` of ``total`` vectors qualify: ``nprobe``
    scaled by sqrt(total / selected), capped at every list. Measured on 1M
    labels, 100 label-like queries, a filter selecting 1/4 of them: recall@10
    0.970 scaled by sqrt (2x the lists; unfiltered recall 0.977), 0.977 by
    (total / selected) ** 0.75, 0.994 linearly (4x the lists, 2.2x the time
    of sqrt; it would probe 20x the lists for a 1/20 filter)."""
    if selected <= 0:
        return nlist
    return min(nlist, max(nprobe, math.ceil(nprobe * math.sqrt(total / selected))))


@dataclass(frozen=True)
class _Filter:
    key: tuple[str | None, str | None, float | None]
    mask: np.ndarray
    count: int
    selector: Any  # a FAISS IDSelector, or None when every label qualifies
    keep: tuple[Any, ...]  # FAISS objects the selector points to


class IndexSearcher:
    """Nearest qualifying labels of a loaded FAISS index (flat or IVF).

    Masks and selectors are cached per (model, layer, min_fidelity) filter: building a
    selector over 250k ids takes tens of milliseconds, the search one or two.
    Over an IVF index, filters selecting at most ``subset_max`` labels (but
    not all) are searched exactly over their gathered vectors.
    """

    subset_max = EXACT_MAX

    def __init__(self, index: Any, lmap: LabelMap) -> None:
        import faiss

        self.index = index
        self.lmap = lmap
        self.ivf = faiss.try_extract_index_ivf(index)
        self._filters: OrderedDict[tuple[str | None, str | None, float | None], _Filter] = OrderedDict()
        self._subsets: OrderedDict[tuple[str | None, str | None, float | None], Any] = OrderedDict()

    def filter(self, model: str | None, layer: str | None, min_fidelity: float | None = None) -> _Filter:
        """The cached mask and FAISS selector of the labels a search may return."""
        key = (model, layer, min_fidelity)
        if key in self._filters:
            self._filters.move_to_end(key)
            return self._filters[key]
        f = self._make_filter(key, self.lmap.mask(model, layer, min_fidelity))
        self._filters[key] = f
        if len(self._filters) > FILTER_CACHE:
            self._filters.popitem(last=False)
        return f

    def _make_filter(self, key: tuple[str | None, str | None, float | None], mask: np.ndarray) -> _Filter:
        import faiss

        count = int(mask.sum())
        if count == len(mask) and self.index.ntotal == len(mask):
            return _Filter(key, mask, count, None, ())
        if count <= len(mask) // 2:
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(self.lmap.label_ids[mask]))
            return _Filter(key, mask, count, batch, (batch,))
        # Most labels qualify: select by exclusion (a smaller id set to hash).
        batch = faiss.IDSelectorBatch(np.ascontiguousarray(self.lmap.label_ids[~mask]))
        return _Filter(key, mask, count, faiss.IDSelectorNot(batch), (batch,))

    def _subset(self, f: _Filter) -> Any:
        """An exact FAISS index over the labels ``f`` selects, gathered from the IVF
        lists. (FAISS on one thread, not numpy: a BLAS product of 10k x 384 took
        0.25 ms alone but 5-6 ms right after a FAISS search, its threads competing.)"""
        import faiss

        if f.key in self._subsets:
            self._subsets.move_to_end(f.key)
            return self._subsets[f.key]
        ids, vecs = ivf_vectors(self.ivf, np.sort(self.lmap.label_ids[f.mask]))
        order = np.argsort(ids)  # ties rank by label id, as in the exact index
        got = faiss.IndexIDMap2(faiss.IndexFlatIP(self.ivf.d))
        if len(ids):
            got.add_with_ids(np.ascontiguousarray(vecs[order]), ids[order])
        self._subsets[f.key] = got
        if len(self._subsets) > SUBSET_CACHE:
            self._subsets.popitem(last=False)
        return got

    def nearest(self, query: np.ndarray, f: _Filter, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, sims)`` of the ``n`` best qualifying labels (fewer when fewer
        qualify), best first: exact over a selective filter's gathered vectors,
        else through the index with the filter's selector. An IVF search that
        finds fewer than it should (too few qualifying vectors in the probed
        lists) probes twice as many."""
        import faiss

        n = min(n, f.count)
        if n <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        x = np.ascontiguousarray(query[None, :], dtype=np.float32)
        if self.ivf is not None and f.count <= self.subset_max and f.count < self.index.ntotal:
            sims, ids = self._subset(f).search(x, n)
        elif self.ivf is None:
            params = faiss.SearchParameters(sel=f.selector) if f.selector is not None else None
            sims, ids = self.index.search(x, n, params=params)
        else:
            nlist = self.ivf.nlist
            nprobe = filtered_nprobe(self.ivf.nprobe, nlist, self.index.ntotal, f.count)
            while True:
                params = faiss.SearchParametersIVF(sel=f.selector, nprobe=nprobe)
                sims, ids = self.index.search(x, n, params=params)
                if nprobe >= nlist or int((ids[0] >= 0).sum()) >= n:
                    break
                nprobe = min(nlist, 2 * nprobe)
        keep = ids[0] >= 0
        return self.lmap.rows(ids[0][keep]), sims[0][keep]
