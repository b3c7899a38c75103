"""build_index / load_index / insert_label_vectors."""

import duckdb
import numpy as np
import pytest

from query.errors import AtlasError, AtlasNotFound
from query.index import build_index, insert_label_vectors, load_index, read_label_vectors
from query.schema import DB_FILE, INDEX_FILE, migrate


def _atlas(tmp_path, dim=8):
    con = duckdb.connect(str(tmp_path / DB_FILE))
    migrate(con)
    con.execute("INSERT INTO meta VALUES ('embedder_dim', ?)", [str(dim)])
    return con


def test_roundtrip_and_ids(tmp_path):
    con = _atlas(tmp_path)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(50, 8)).astype(np.float32)
    ids = rng.integers(0, 2**62, size=50)
    assert insert_label_vectors(con, ids, vecs) == 50
    got_ids, got = read_label_vectors(con)
    order = np.argsort(ids)
    np.testing.assert_array_equal(got_ids, ids[order])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert build_index(tmp_path, con=con) == 50
    assert con.execute("SELECT value FROM meta WHERE key = 'index_count'").fetchone() == ("50",)
    con.close()
    index = load_index(tmp_path)
    assert index.ntotal == 50 and index.d == 8
    q = vecs[7] / np.linalg.norm(vecs[7])
    sims, found = index.search(q[None, :], 1)
    assert found[0][0] == ids[7] and sims[0][0] == pytest.approx(1.0, abs=1e-5)
    assert not list(tmp_path.glob("*.tmp"))  # temp file renamed away


def test_build_index_opens_its_own_connection_and_replaces(tmp_path):
    con = _atlas(tmp_path)
    insert_label_vectors(con, [1, 2], np.eye(2, 8, dtype=np.float32))
    con.close()
    assert build_index(tmp_path) == 2
    con = duckdb.connect(str(tmp_path / DB_FILE))
    insert_label_vectors(con, [3], np.ones((1, 8), dtype=np.float32))
    con.close()
    assert build_index(tmp_path) == 3
    assert load_index(tmp_path).ntotal == 3


def test_empty_and_mismatched(tmp_path):
    con = _atlas(tmp_path, dim=8)
    assert build_index(tmp_path, con=con) == 0
    insert_label_vectors(con, [1], np.ones((1, 4), dtype=np.float32))
    with pytest.raises(AtlasError, match="meta.embedder_dim is 8"):
        build_index(tmp_path, con=con)
    con.close()


def test_missing(tmp_path):
    with pytest.raises(AtlasNotFound):
        build_index(tmp_path)
    with pytest.raises(AtlasNotFound, match=INDEX_FILE):
        load_index(tmp_path)
