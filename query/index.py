"""The FAISS index over label embeddings (``descriptions.faiss``).

Vectors are L2-normalized float32, so inner products are cosines, and FAISS
ids are ``labels.label_id``. The index type follows the atlas's size
(:func:`choose_index`): an exact ``IndexIDMap2(IndexFlatIP(d))`` up to
:data:`EXACT_MAX` vectors, where one exact query costs a few milliseconds on
one core, and an ``IndexIVFFlat`` (inner product, ``nlist`` ~ 2 sqrt(n)
lists, ``nprobe`` of them searched) beyond it. The type and its parameters go
into the meta (``index_type``, ``index_params``) next to ``index_count``;
:func:`load_index` applies the search-time ones. It is derived data:
:func:`build_index` rebuilds it from the ``label_vectors`` table at any time.

Measured on 2 shared cores, one query thread (bench/search.py, 1M labels of
label-like phrases): exact search costs ~0.07 ms per 1,000 vectors (3.5 ms at
50k; 170-220 ms measured at 1M on the loaded machine); IVF-Flat with nlist
2048 / nprobe 32 answers in 2.5-3 ms (10 ms on a machine loaded 4x over)
with a neuron recall@10 of 0.98, and builds in 40-160 s (k-means on 82k
vectors, then 1M assignments). HNSW (M 32, efConstruction 40) took 11 s for
100k vectors, did not finish 1M within 27 minutes on the loaded machine, must
be rebuilt on every merge and filters poorly (it walks the graph through
filtered-out nodes), so it is not offered.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import faiss
import numpy as np
import pyarrow as pa

from query.access import connect
from query.embedder import normalize
from query.errors import AtlasError, AtlasNotFound
from query.schema import DB_FILE, INDEX_FILE

log = logging.getLogger(__name__)


def insert_label_vectors(
    con: duckdb.DuckDBPyConnection, label_ids: Sequence[int], vectors: np.ndarray
) -> int:
    """Insert (or replace) label vectors in one bulk statement; returns the row count.

    Rows go through an Arrow table: ``executemany`` row by row is ~80x slower
    for FLOAT[] columns. ``vectors`` are L2-normalized here.
    """
    ids = np.asarray(label_ids, dtype=np.int64)
    vecs = normalize(np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1))
    if len(ids) == 0:
        return 0
    d = vecs.shape[1]
    offsets = pa.array(np.arange(0, len(ids) * d + 1, d, dtype=np.int32))
    table = pa.table({
        "label_id": pa.array(ids),
        "vec": pa.ListArray.from_arrays(offsets, pa.array(vecs.reshape(-1))),
    })
    name = "_dnd_label_vectors_in"
    con.register(name, table)
    try:
        con.execute(f"INSERT OR REPLACE INTO label_vectors SELECT label_id, vec FROM {name}")
    finally:
        con.unregister(name)
    return len(ids)


def read_label_vectors(
    con: duckdb.DuckDBPyConnection, where: str = "", params: Sequence[object] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """``(label_ids int64 (n,), vectors float32 (n, d))`` from ``label_vectors``, by label id.

    ``where`` is an optional SQL condition over ``label_vectors v`` joined with
    ``labels l`` and ``neurons n`` (used by the exact-search fallback to filter).
    Rows are streamed into one preallocated array, so reading n vectors holds
    about one copy of them in memory.
    """
    source = "FROM label_vectors v"
    if where:
        source += (
            " JOIN labels l USING (label_id)"
            " JOIN neurons n ON n.model = l.model AND n.layer = l.layer AND n.unit = l.unit"
            f" WHERE {where}"
        )
    count = con.execute(f"SELECT count(*) {source}", list(params)).fetchall()[0][0]
    if count == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    reader = _arrow_reader(con.sql(f"SELECT v.label_id, v.vec {source} ORDER BY v.label_id",
                                   params=list(params)))
    ids = np.empty(count, dtype=np.int64)
    vecs: np.ndarray | None = None
    at = 0
    for batch_ids, batch in _vector_batches(reader):
        if vecs is None:
            vecs = np.empty((count, batch.shape[1]), dtype=np.float32)
        elif batch.shape[1] != vecs.shape[1]:
            _several_lengths({vecs.shape[1], batch.shape[1]})
        ids[at:at + len(batch_ids)] = batch_ids
        vecs[at:at + len(batch_ids)] = batch
        at += len(batch_ids)
    return ids[:at], vecs[:at]


def _arrow_reader(rel: duckdb.DuckDBPyRelation) -> pa.RecordBatchReader:
    """A relation's rows as a stream of ``READ_BATCH``-row Arrow batches
    (``to_arrow_reader`` in DuckDB 2, ``fetch_arrow_reader`` before it)."""
    make = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader
    return make(READ_BATCH)


def _vector_batches(reader: pa.RecordBatchReader):
    """``(ids, vectors)`` numpy pairs from a stream of ``(label_id, vec)`` record batches."""
    for rb in reader:
        if rb.num_rows == 0:
            continue
        vec = rb.column(1)
        lengths = vec.value_lengths().to_numpy(zero_copy_only=False)
        d = int(lengths[0])
        if (lengths != d).any():
            _several_lengths(set(lengths.tolist()))
        values = vec.flatten().to_numpy(zero_copy_only=False)
        ids = rb.column(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        yield ids, values.reshape(rb.num_rows, d).astype(np.float32, copy=False)


def _several_lengths(lengths: set[int]) -> None:
    raise AtlasError(
        f"label_vectors holds vectors of several lengths ({sorted(lengths)}); rebuild the atlas"
    )


def _embedder_dim(con: duckdb.DuckDBPyConnection) -> int | None:
    rows = con.execute("SELECT value FROM meta WHERE key = 'embedder_dim'").fetchall()
    return int(json.loads(rows[0][0])) if rows else None


def _meta_value(con: duckdb.DuckDBPyConnection, key: str) -> object:
    rows = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchall()
    if not rows:
        return None
    try:
        return json.loads(rows[0][0])
    except ValueError:
        return rows[0][0]


# -- choosing the index --------------------------------------------------------------------

EXACT_MAX = 50_000  # exact flat search up to this many vectors (~3.5 ms per query, 1 core)
INDEX_KINDS = ("auto", "flat", "ivf")
INDEX_ENV = "DND_ATLAS_INDEX"  # forces a kind for builds that do not pass one
READ_BATCH = 65_536  # label vectors per record batch when reading or indexing
IVF_TRAIN_PER_LIST = 40  # k-means sample per list (FAISS wants >= 39)
IVF_MIN_NPROBE = 16
IVF_NITER = 10  # k-means iterations: 25 (FAISS's default) took twice as long for recall 0.970 vs 0.966


@dataclass(frozen=True)
class IndexSpec:
    """What :func:`build_index` builds: ``index_type`` ``"flat"`` (exact) or
    ``"ivf-flat"``, with ``params`` (``nlist``, ``nprobe``, ``train_size``) for IVF."""

    index_type: str
    params: dict[str, int] = field(default_factory=dict)


def choose_index(
    n: int, kind: str = "auto", exact_max: int = EXACT_MAX, params: dict[str, int] | None = None
) -> IndexSpec:
    """The index for ``n`` label vectors: exact when ``kind`` is ``"flat"``, or
    ``"auto"`` and ``n <= exact_max``; else IVF-Flat with ``nlist`` the power of
    two nearest 2 sqrt(n) (at least 39 training vectors per list), ``nprobe``
    = max(16, nlist / 64), unless ``params`` sets them, trained on 40 vectors
    per list. At 1M vectors nlist 2048 / nprobe 32 had recall@10 0.966 where
    1024 / 16 (the same share of the vectors scanned, half the build time) had
    0.943. Raises :class:`AtlasError` for an unknown kind."""
    if kind not in INDEX_KINDS:
        raise AtlasError(f"unknown index kind {kind!r}; valid kinds: {', '.join(INDEX_KINDS)}")
    if kind == "flat" or (kind == "auto" and n <= exact_max) or n == 0:
        return IndexSpec("flat")
    nlist = 2 ** max(0, round(np.log2(2 * np.sqrt(n))))
    while nlist > 1 and n < IVF_TRAIN_PER_LIST * nlist:
        nlist //= 2
    nlist = int((params or {}).get("nlist", nlist))
    nprobe = int((params or {}).get("nprobe", max(IVF_MIN_NPROBE, nlist // 64)))
    if nlist < 1 or nprobe < 1 or nlist > n:
        raise AtlasError(f"bad IVF parameters nlist={nlist}, nprobe={nprobe} for {n} vectors")
    train = min(n, IVF_TRAIN_PER_LIST * nlist)
    return IndexSpec("ivf-flat", {"nlist": nlist, "nprobe": min(nprobe, nlist), "train_size": train,
                                  "niter": IVF_NITER})


def _requested_kind(con: duckdb.DuckDBPyConnection, kind: str | None) -> str:
    """``kind``, else ``$DND_ATLAS_INDEX``, else the atlas's recorded ``index_choice``, else auto."""
    if kind is None:
        kind = os.environ.get(INDEX_ENV) or _meta_value(con, "index_choice") or "auto"
    kind = str(kind)
    if kind not in INDEX_KINDS:
        raise AtlasError(f"unknown index kind {kind!r}; valid kinds: {', '.join(INDEX_KINDS)}")
    return kind


# -- building ------------------------------------------------------------------------------

def build_index(
    atlas_dir: str | os.PathLike[str],
    con: duckdb.DuckDBPyConnection | None = None,
    *,
    kind: str | None = None,
    exact_max: int = EXACT_MAX,
    params: dict[str, int] | None = None,
) -> int:
    """Rebuild ``descriptions.faiss`` from ``label_vectors``; returns the vector count.

    The file is written atomically (temp file in the same folder, then
    rename) and the count is stored as meta ``index_count``, so readers can
    tell a stale index from a current one; ``index_type`` and
    ``index_params`` record what was built (see :func:`choose_index`).
    ``kind`` (``"auto"``, ``"flat"`` for exact search at any size, ``"ivf"``)
    defaults to ``$DND_ATLAS_INDEX``, then to the choice recorded by an earlier
    build (meta ``index_choice``, so merges and rebuilds keep it), then to
    ``"auto"``. Pass ``con`` when the caller already holds a writable
    connection to the atlas.
    """
    atlas_dir = Path(atlas_dir)
    own = con is None
    if own:
        db = atlas_dir / DB_FILE
        if not db.is_file():
            raise AtlasNotFound(f"no atlas at {atlas_dir} (missing {DB_FILE})")
        con = connect(db, read_only=False, what=f"the atlas at {atlas_dir}")
    try:
        choice = _requested_kind(con, kind)
        n = con.execute("SELECT count(*) FROM label_vectors").fetchall()[0][0]
        spec = choose_index(n, choice, exact_max, params)
        start = time.perf_counter()
        index, d = (_build_flat(con) if spec.index_type == "flat" else _build_ivf(con, n, spec))
        _write_atomic(index, atlas_dir / INDEX_FILE)
        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
            ("index_count", json.dumps(int(index.ntotal))),
            ("index_type", json.dumps(spec.index_type)),
            ("index_params", json.dumps(spec.params, sort_keys=True)),
            ("index_choice", json.dumps(choice)),
        ])
        log.info("indexed %d label vectors (%d-d, %s %s) in %s in %.1f s", index.ntotal, d,
                 spec.index_type, spec.params, atlas_dir / INDEX_FILE, time.perf_counter() - start)
        return int(index.ntotal)
    finally:
        if own:
            con.close()


def _checked_dim(con: duckdb.DuckDBPyConnection, d: int | None) -> int:
    """The vectors' dimension ``d`` (``None`` when there are none), checked against the meta."""
    expected = _embedder_dim(con)
    if d is None:
        if expected is None:
            raise AtlasError("cannot build an empty index: meta has no embedder_dim")
        return expected
    if expected is not None and expected != d:
        raise AtlasError(
            f"label vectors have {d} dimensions but meta.embedder_dim is {expected}; "
            "rebuild the atlas"
        )
    return d


def _build_flat(con: duckdb.DuckDBPyConnection) -> tuple[faiss.Index, int]:
    """Exact index, vectors added in label-id order (ties rank by label id)."""
    ids, vecs = read_label_vectors(con)
    d = _checked_dim(con, vecs.shape[1] if len(ids) else None)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if len(ids):
        index.add_with_ids(_normalize_inplace(vecs), ids)
    return index, d


def _build_ivf(con: duckdb.DuckDBPyConnection, n: int, spec: IndexSpec) -> tuple[faiss.Index, int]:
    """IVF-Flat: k-means on a seeded sample (the same for the same labels, however
    they were written or merged), then every vector streamed in by batches."""
    all_ids = con.sql("SELECT label_id FROM label_vectors ORDER BY label_id").fetchnumpy()["label_id"]
    rng = np.random.default_rng(0)
    sample = np.sort(all_ids[rng.choice(n, spec.params["train_size"], replace=False)])
    reader = _arrow_reader(con.sql(
        "SELECT v.label_id, v.vec FROM label_vectors v "
        "SEMI JOIN (SELECT unnest(?::BIGINT[]) AS label_id) s USING (label_id) ORDER BY v.label_id",
        params=[sample.tolist()],
    ))
    train = np.concatenate([_normalize_inplace(v.copy()) for _, v in _vector_batches(reader)])
    d = _checked_dim(con, train.shape[1])
    nlist = spec.params["nlist"]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = 1  # the sample size is ours (IVF_TRAIN_PER_LIST)
    index.cp.niter = spec.params["niter"]
    index.train(train)
    del train
    reader = _arrow_reader(con.sql("SELECT label_id, vec FROM label_vectors"))
    for ids, vecs in _vector_batches(reader):
        if vecs.shape[1] != d:
            _several_lengths({d, vecs.shape[1]})
        index.add_with_ids(_normalize_inplace(vecs.copy()), ids)
    index.nprobe = spec.params["nprobe"]
    return index, d


def _normalize_inplace(vecs: np.ndarray) -> np.ndarray:
    """Unit rows, in place (stored vectors are unit already: this guards old atlases)."""
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    np.divide(vecs, np.maximum(norms, 1e-12), out=vecs)
    return vecs


def _write_atomic(index: faiss.Index, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".descriptions-", suffix=".faiss.tmp", dir=path.parent)
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- loading -------------------------------------------------------------------------------

def load_index(atlas_dir: str | os.PathLike[str], params: dict[str, object] | None = None) -> faiss.Index:
    """Read ``descriptions.faiss`` and apply search-time ``params`` (the atlas's meta
    ``index_params``: ``nprobe`` for IVF; absent in atlases written before index
    types existed, which hold exact indexes). Raises :class:`AtlasNotFound` when
    the file is missing."""
    path = Path(atlas_dir) / INDEX_FILE
    if not path.is_file():
        raise AtlasNotFound(f"no index at {path}; run build_index() on the atlas")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise AtlasError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and params and params.get("nprobe"):
        ivf.nprobe = min(int(params["nprobe"]), ivf.nlist)
    return index
