"""The FAISS index over label embeddings (``descriptions.faiss``).

The index is an ``IndexIDMap2(IndexFlatIP(d))`` over L2-normalized float32
vectors, so inner products are cosines and FAISS ids are ``labels.label_id``.
It is derived data: :func:`build_index` rebuilds it from the
``label_vectors`` table at any time.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
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
    """``(label_ids int64 (n,), vectors float32 (n, d))`` from ``label_vectors``.

    ``where`` is an optional SQL condition over ``label_vectors v`` joined with
    ``labels l`` and ``neurons n`` (used by the exact-search fallback to filter).
    """
    sql = "SELECT v.label_id, v.vec FROM label_vectors v"
    if where:
        sql += (
            " JOIN labels l USING (label_id)"
            " JOIN neurons n ON n.model = l.model AND n.layer = l.layer AND n.unit = l.unit"
            f" WHERE {where}"
        )
    sql += " ORDER BY v.label_id"
    table = con.sql(sql, params=list(params)).to_arrow_table()
    ids = table.column("label_id").to_numpy().astype(np.int64, copy=False)
    if len(ids) == 0:
        return ids, np.zeros((0, 0), dtype=np.float32)
    vec = table.column("vec").combine_chunks()
    lengths = vec.value_lengths().to_numpy(zero_copy_only=False)
    d = int(lengths[0])
    if (lengths != d).any():
        raise AtlasError(
            f"label_vectors holds vectors of several lengths ({sorted(set(lengths.tolist()))}); "
            "rebuild the atlas"
        )
    values = vec.flatten().to_numpy(zero_copy_only=False)
    return ids, np.ascontiguousarray(values.reshape(len(ids), d), dtype=np.float32)


def _embedder_dim(con: duckdb.DuckDBPyConnection) -> int | None:
    row = con.execute("SELECT value FROM meta WHERE key = 'embedder_dim'").fetchone()
    return int(json.loads(row[0])) if row else None


def build_index(atlas_dir: str | os.PathLike[str], con: duckdb.DuckDBPyConnection | None = None) -> int:
    """Rebuild ``descriptions.faiss`` from ``label_vectors``; returns the vector count.

    The file is written atomically (temp file in the same folder, then
    rename) and the count is stored as meta ``index_count``, so readers can
    tell a stale index from a current one. Pass ``con`` when the caller
    already holds a writable connection to the atlas.
    """
    atlas_dir = Path(atlas_dir)
    own = con is None
    if own:
        db = atlas_dir / DB_FILE
        if not db.is_file():
            raise AtlasNotFound(f"no atlas at {atlas_dir} (missing {DB_FILE})")
        con = connect(db, read_only=False, what=f"the atlas at {atlas_dir}")
    try:
        ids, vecs = read_label_vectors(con)
        d = vecs.shape[1] if len(ids) else _embedder_dim(con)
        if d is None:
            raise AtlasError("cannot build an empty index: meta has no embedder_dim")
        expected = _embedder_dim(con)
        if expected is not None and expected != d:
            raise AtlasError(
                f"label vectors have {d} dimensions but meta.embedder_dim is {expected}; "
                "rebuild the atlas"
            )
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if len(ids):
            index.add_with_ids(normalize(vecs), ids)
        fd, tmp = tempfile.mkstemp(prefix=".descriptions-", suffix=".faiss.tmp", dir=atlas_dir)
        os.close(fd)
        try:
            faiss.write_index(index, tmp)
            os.replace(tmp, atlas_dir / INDEX_FILE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        con.execute(
            "INSERT OR REPLACE INTO meta VALUES ('index_count', ?)", [json.dumps(len(ids))]
        )
        log.info("indexed %d label vectors (%d-d) in %s", len(ids), d, atlas_dir / INDEX_FILE)
        return len(ids)
    finally:
        if own:
            con.close()


def load_index(atlas_dir: str | os.PathLike[str]) -> faiss.Index:
    """Read ``descriptions.faiss``; raises :class:`AtlasNotFound` when it is missing."""
    path = Path(atlas_dir) / INDEX_FILE
    if not path.is_file():
        raise AtlasNotFound(f"no index at {path}; run build_index() on the atlas")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise AtlasError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
