"""Searching many queries at once: what ``serve`` answers ``/search`` with.

:meth:`query.atlas.Atlas.search` pays, per query, one embedder call, one
FAISS search and two DuckDB queries that join ``labels`` with ``neurons``
(~35 ms of the ~55 ms a search took over 74,000 labels here). A server
answers many queries at once instead: :class:`SearchBatcher` takes every
query waiting, embeds them in one embedder call and ranks their FAISS hits
against a :class:`LabelTable`, the labels of one atlas snapshot held in
memory, without SQL. A lone query gets the hits ``Atlas.search`` returns
(same FAISS search, same per-neuron grouping and order, same errors).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from query.atlas import Atlas, _faiss_threads
from query.errors import AtlasError, QueryError
from query.index import load_index, read_label_vectors
from query.records import SearchHit
from query.schema import INDEX_FILE

log = logging.getLogger(__name__)

MAX_BATCH = 64  # queries embedded together
# FAISS ranks 20 or more queries at once with BLAS (faiss.cvar.distance_compute_blas_threshold),
# whose sums differ in the last bits from a lone query's; below that every query's scores are
# exactly those of Atlas.search, and on 2 busy cores BLAS was no faster (memory-bound scans).
FAISS_GROUP = 19


def first_fetch(k: int, total: int) -> int:
    """How many labels ``Atlas.search`` fetches first for ``k`` neurons (up to 3 labels each)."""
    return min(total, max(3 * k, 32))


class LabelTable:
    """The labels of one atlas snapshot in memory, grouped by neuron, with what
    ranking needs: each label's neuron, whether that neuron is ``ok``, its
    model and layer (as codes), its text and rank; and the names search
    accepts as filters."""

    def __init__(self, atlas: Atlas) -> None:
        t = atlas.con.sql(
            "SELECT l.label_id, l.model, l.layer, l.unit, l.rank, l.text, l.concept_score, "
            "l.fidelity_correlation, l.fidelity_auprc, "
            "coalesce(n.status = 'ok', false) AS ok FROM labels l "
            "LEFT JOIN neurons n ON n.model = l.model AND n.layer = l.layer AND n.unit = l.unit "
            "ORDER BY l.model, l.layer, l.unit, l.rank").to_arrow_table()
        ids = t.column("label_id").to_numpy().astype(np.int64, copy=False)
        models, layers = t.column("model").to_pylist(), t.column("layer").to_pylist()
        units = t.column("unit").to_pylist()
        self.texts: list[str] = t.column("text").to_pylist()
        self.scores: list[float | None] = t.column("concept_score").to_pylist()
        self.ranks = t.column("rank").to_numpy().astype(np.int32, copy=False)
        self.ok = t.column("ok").to_numpy(zero_copy_only=False).astype(bool)
        self.fid_corr: list[float | None] = t.column("fidelity_correlation").to_pylist()
        self.fid_auprc: list[float | None] = t.column("fidelity_auprc").to_pylist()
        # NaN where a label has no fidelity: no bound keeps it, as in SQL (NULL >= x is not true)
        self.fid_corr_array = np.array([np.nan if v is None else v for v in self.fid_corr], dtype=np.float64)
        self.model_names = sorted(set(models))
        self.layer_names = sorted(set(layers))
        mcode = {m: i for i, m in enumerate(self.model_names)}
        lcode = {x: i for i, x in enumerate(self.layer_names)}
        self.label_model = np.array([mcode[m] for m in models], dtype=np.int32)
        self.label_layer = np.array([lcode[x] for x in layers], dtype=np.int32)
        keys = list(zip(models, layers, units))
        new = np.array([i == 0 or keys[i] != keys[i - 1] for i in range(len(keys))], dtype=bool)
        self.neuron_of = np.cumsum(new) - 1  # label row -> neuron number
        self.starts = np.flatnonzero(new)  # neuron number -> its first label row
        self.neurons = [keys[i] for i in self.starts.tolist()]
        self.n_labels = len(ids)
        order = np.argsort(ids, kind="stable")
        self.sorted_ids, self.row_of_sorted = ids[order], order
        scope = atlas.sql("SELECT model, layer FROM layers")
        self.scope_models = {r["model"] for r in scope} | {
            r["model"] for r in atlas.sql("SELECT model FROM models")}
        self.scope_layers = {r["layer"] for r in scope}
        self.scope_pairs = {(r["model"], r["layer"]) for r in scope}

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The row of each label id, -1 for an id this snapshot does not hold."""
        if not self.n_labels:
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.sorted_ids, ids), self.n_labels - 1)
        found = (self.sorted_ids[pos] == ids) & (ids >= 0)
        return np.where(found, self.row_of_sorted[pos], -1)

    def best_per_neuron(
        self, ids: np.ndarray, sims: np.ndarray, model: str | None, layer: str | None,
        min_fidelity: float | None = None,
    ) -> dict[int, tuple[float, int]]:
        """Neuron number -> (similarity, label row) of its best label among the
        hits (in hit order), over the labels search may return: an ``ok``
        neuron's, of ``model`` and ``layer`` when given, with a fidelity
        correlation of at least ``min_fidelity`` when given."""
        rows = self.rows(ids)
        keep = rows >= 0
        keep[keep] &= self.ok[rows[keep]]
        if model is not None:
            code = self.model_names.index(model) if model in self.model_names else -1
            keep[keep] &= self.label_model[rows[keep]] == code
        if layer is not None:
            code = self.layer_names.index(layer) if layer in self.layer_names else -1
            keep[keep] &= self.label_layer[rows[keep]] == code
        if min_fidelity is not None:
            keep[keep] &= self.fid_corr_array[rows[keep]] >= float(min_fidelity)
        best: dict[int, tuple[float, int]] = {}
        for row, sim in zip(rows[keep].tolist(), sims[keep].tolist()):
            best.setdefault(int(self.neuron_of[row]), (float(sim), row))
        return best

    def hit(self, neuron: int, sim: float, row: int) -> SearchHit:
        """The search hit of neuron number ``neuron``, matched by label ``row``."""
        start = int(self.starts[neuron])
        end = int(self.starts[neuron + 1]) if neuron + 1 < len(self.starts) else self.n_labels
        model, layer, unit = self.neurons[neuron]
        return SearchHit(
            model=model, layer=layer, unit=int(unit), labels=self.texts[start:end],
            score=self.scores[start] if self.ranks[start] == 1 else None,
            similarity=sim, matched_label=self.texts[row],
            fidelity_correlation=self.fid_corr[row], fidelity_auprc=self.fid_auprc[row],
        )

    def check_scope(self, atlas: Atlas, model: str | None, layer: str | None) -> None:
        """Raise what ``Atlas.search`` raises for an unknown model or layer
        (asking the atlas itself, so the messages are the same)."""
        if model is not None and layer is not None:
            if (model, layer) not in self.scope_pairs:
                atlas._resolve_layer(model, layer)
        elif model is not None:
            if model not in self.scope_models:
                atlas._check_model(model)
        elif layer is not None and layer not in self.scope_layers:
            atlas._resolve_layer(None, layer)


class SearchEngine:
    """Search over one snapshot: its label table and a FAISS index of its
    labels (``descriptions.faiss`` when current, else an exact one built in
    memory from ``label_vectors``, as a stale index is during a build)."""

    def __init__(self, atlas: Atlas, file_index: Callable[[], Any]) -> None:
        self.atlas = atlas
        self.table = LabelTable(atlas)
        index = None
        if (atlas.path / INDEX_FILE).is_file():
            index = file_index()
            if index.ntotal != self.table.n_labels:
                index = None
        if index is None:
            index = _memory_index(atlas)
        self.index = index

    def nearest(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, sims)`` of the ``n`` nearest labels of each query row."""
        ids = np.empty((len(queries), n), dtype=np.int64)
        sims = np.empty((len(queries), n), dtype=np.float32)
        with _faiss_threads(1):
            for start in range(0, len(queries), FAISS_GROUP):
                part = np.ascontiguousarray(queries[start:start + FAISS_GROUP], dtype=np.float32)
                s, i = self.index.search(part, n)
                sims[start:start + len(part)], ids[start:start + len(part)] = s, i
        return ids, sims

    def rank(self, query: np.ndarray, k: int, model: str | None, layer: str | None,
             fetched: tuple[np.ndarray, np.ndarray] | None = None,
             min_fidelity: float | None = None) -> list[SearchHit]:
        """The ``k`` best neurons for one embedded query, as ``Atlas.search``
        ranks them (``fetched``: its nearest labels, already searched)."""
        total = int(self.index.ntotal)
        if total == 0:
            return []
        n = first_fetch(k, total)
        while True:
            if fetched is not None and fetched[0].shape[0] >= n:
                ids, sims = fetched[0][:n], fetched[1][:n]
            else:
                found_ids, found_sims = self.nearest(query[None, :], n)
                ids, sims = found_ids[0], found_sims[0]
            best = self.table.best_per_neuron(ids, sims, model, layer, min_fidelity)
            if len(best) >= k or n >= total:
                break
            n = min(total, n * 2)
        return [self.table.hit(o, sim, row) for o, (sim, row) in list(best.items())[:k]]


def _memory_index(atlas: Atlas) -> Any:
    import faiss

    from query.embedder import normalize

    ids, vecs = read_label_vectors(atlas.con)
    d = vecs.shape[1] if len(ids) else int(atlas.meta.get("embedder_dim") or 1)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if len(ids):
        index.add_with_ids(normalize(vecs), ids)
    log.info("%s is missing or stale for this snapshot; searching %d label vectors exactly",
             INDEX_FILE, len(ids))
    return index


@dataclass(frozen=True)
class _Job:
    text: str
    k: int
    model: str | None
    layer: str | None
    min_fidelity: float | None
    future: Future


class SearchBatcher:
    """A thread answering searches in rounds: each round takes every waiting
    query (up to :data:`MAX_BATCH`), embeds them in one call and ranks each.

    ``snapshots`` is a :class:`query.snapshots.Snapshots`; ``embedder()``
    returns the embedder to use (it may raise, e.g. ``SearchUnavailable``,
    which then answers the round).
    """

    def __init__(self, snapshots: Any, embedder: Callable[[], Any], max_batch: int = MAX_BATCH) -> None:
        self.snapshots = snapshots
        self.embedder = embedder
        self.max_batch = max_batch
        self.rounds = 0
        self.queries = 0
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._file_index: tuple[tuple[int, int, int], Any] | None = None
        self._thread = threading.Thread(target=self._loop, name="dnd-atlas-search", daemon=True)
        self._thread.start()

    def submit(self, text: str, k: int = 10, model: str | None = None,
               layer: str | None = None, min_fidelity: float | None = None) -> Future:
        """Queue one search; the future's result is its ``list[SearchHit]``."""
        job = _Job(text, k, model, layer, min_fidelity, Future())
        with self._cond:
            if self._closed:
                raise AtlasError("the server is shutting down")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def search(self, text: str, k: int = 10, model: str | None = None,
               layer: str | None = None, min_fidelity: float | None = None) -> list[SearchHit]:
        """One search, waiting for its round."""
        return self.submit(text, k, model, layer, min_fidelity).result()

    def close(self) -> None:
        """Stop the thread; queued searches fail (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed:
                    jobs, self._jobs = self._jobs, []
                    for job in jobs:
                        job.future.set_exception(AtlasError("the server is shutting down"))
                    return
                batch = self._jobs[:self.max_batch]
                del self._jobs[:self.max_batch]
            self._answer(batch)

    def _answer(self, batch: Sequence[_Job]) -> None:
        self.rounds += 1
        self.queries += len(batch)
        try:
            with self.snapshots.use() as snap:
                engine = snap.cache.get("search")
                if engine is None:  # this thread's cursor: the only one searching
                    engine = snap.cache["search"] = SearchEngine(snap.thread_atlas(), self._index_file)
                embedder = self.embedder()  # before blaming a query: 501 when it cannot load
                live = [job for job in batch if _checked(engine, job)]
                if live:
                    self._rank(engine, embedder, live)
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    def _rank(self, engine: SearchEngine, embedder: Any, jobs: Sequence[_Job]) -> None:
        texts = list(dict.fromkeys(job.text.strip() for job in jobs))
        vectors = np.asarray(embedder.embed(texts), dtype=np.float32)
        if vectors.shape[1] != engine.index.d:
            raise AtlasError(
                f"{INDEX_FILE} has {engine.index.d} dimensions but embedder "
                f"{engine.atlas.meta.get('embedder')!r} gives {vectors.shape[1]}; rebuild the index")
        total = int(engine.index.ntotal)
        n = max(first_fetch(job.k, total) for job in jobs)
        ids, sims = engine.nearest(vectors, n) if total else (None, None)
        row = {t: i for i, t in enumerate(texts)}
        for job in jobs:
            i = row[job.text.strip()]
            try:
                fetched = (ids[i], sims[i]) if total else None
                job.future.set_result(engine.rank(vectors[i], job.k, job.model, job.layer, fetched,
                                                  job.min_fidelity))
            except AtlasError as exc:
                job.future.set_exception(exc)

    def _index_file(self) -> Any:
        """``descriptions.faiss``, read again only when the file was replaced."""
        path = self.snapshots.path / INDEX_FILE
        st = path.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._file_index is None or self._file_index[0] != key:
            self._file_index = (key, load_index(self.snapshots.path))
        return self._file_index[1]


def _checked(engine: SearchEngine, job: _Job) -> bool:
    """Whether ``job`` is a valid search; if not, its future gets the error."""
    try:
        if not isinstance(job.text, str) or not job.text.strip():
            raise QueryError("empty search query")
        if not isinstance(job.k, int) or job.k < 1:
            raise QueryError(f"k must be a positive integer, got {job.k!r}")
        engine.table.check_scope(engine.atlas, job.model, job.layer)
        return True
    except AtlasError as exc:
        job.future.set_exception(exc)
        return False
