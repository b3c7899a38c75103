"""Index types by size (flat / IVF), their meta, search-time parameters and
filtered search over an approximate index. Thresholds are forced small, so
these run on a few hundred vectors."""

import json
import logging

import duckdb
import faiss
import numpy as np
import pytest

from query import Atlas
from query import index as index_mod
from query.errors import AtlasError
from query.index import build_index, choose_index, insert_label_vectors, load_index
from query.schema import DB_FILE, INDEX_FILE
from query.search import IndexSearcher, LabelMap, filtered_nprobe, ivf_vectors


def _atlas(tmp_path, vecs, ids=None):
    con = duckdb.connect(str(tmp_path / DB_FILE))
    from query.schema import migrate

    migrate(con)
    con.execute("INSERT INTO meta VALUES ('embedder_dim', ?)", [str(vecs.shape[1])])
    ids = np.arange(1, len(vecs) + 1) if ids is None else ids
    insert_label_vectors(con, ids, vecs)
    return con, ids


def _meta(con, key):
    row = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchall()
    return json.loads(row[0][0]) if row else None


def _clustered(n_centers=20, per=50, d=32, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_centers, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    vecs = np.repeat(centers, per, axis=0) + rng.normal(0, 0.05, (n_centers * per, d)).astype(np.float32)
    return centers, vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def test_choose_index_follows_size():
    assert choose_index(10, exact_max=100).index_type == "flat"
    assert choose_index(100, exact_max=100).index_type == "flat"
    spec = choose_index(1_000_000)
    assert spec.index_type == "ivf-flat"
    assert spec.params == {"nlist": 2048, "nprobe": 32, "train_size": 2048 * 40, "niter": 10}
    small = choose_index(300, exact_max=100)
    assert small.index_type == "ivf-flat" and 300 >= 39 * small.params["nlist"]
    assert choose_index(10**6, kind="flat").index_type == "flat"
    assert choose_index(500, kind="ivf", params={"nlist": 8, "nprobe": 2}).params["nlist"] == 8
    with pytest.raises(AtlasError, match="unknown index kind 'hnsw'"):
        choose_index(10, kind="hnsw")
    with pytest.raises(AtlasError, match="bad IVF parameters"):
        choose_index(10, kind="ivf", params={"nlist": 64})


def test_meta_records_type_and_load_applies_params(tmp_path):
    _, vecs = _clustered()
    con, _ = _atlas(tmp_path, vecs[:40])
    assert build_index(tmp_path, con=con, exact_max=50) == 40
    assert _meta(con, "index_type") == "flat" and _meta(con, "index_params") == {}
    assert isinstance(load_index(tmp_path), faiss.IndexIDMap2)
    insert_label_vectors(con, np.arange(41, 1001), vecs[40:])
    assert build_index(tmp_path, con=con, exact_max=50) == 1000
    assert _meta(con, "index_type") == "ivf-flat" and _meta(con, "index_count") == 1000
    params = _meta(con, "index_params")
    assert params["nlist"] >= 2 and params["nprobe"] >= 1
    con.close()
    index = load_index(tmp_path, params)
    loaded = faiss.extract_index_ivf(index)
    assert loaded.nlist == params["nlist"] and loaded.nprobe == min(params["nprobe"], params["nlist"])
    index = load_index(tmp_path, {"nprobe": 1})
    assert faiss.extract_index_ivf(index).nprobe == 1


def test_forced_kind_is_recorded_and_kept_by_rebuilds(tmp_path, monkeypatch):
    _, vecs = _clustered()
    con, _ = _atlas(tmp_path, vecs)
    build_index(tmp_path, con=con, kind="flat", exact_max=50)
    assert _meta(con, "index_type") == "flat" and _meta(con, "index_choice") == "flat"
    build_index(tmp_path, con=con, exact_max=50)  # a rebuild (merge, resume) keeps the choice
    assert _meta(con, "index_type") == "flat"
    monkeypatch.setenv(index_mod.INDEX_ENV, "ivf")
    build_index(tmp_path, con=con, exact_max=50)
    assert _meta(con, "index_type") == "ivf-flat" and _meta(con, "index_choice") == "ivf"
    monkeypatch.setenv(index_mod.INDEX_ENV, "annoy")
    with pytest.raises(AtlasError, match="unknown index kind 'annoy'"):
        build_index(tmp_path, con=con)
    con.close()


def test_ivf_finds_the_exact_top_hits_on_clustered_vectors(tmp_path):
    centers, vecs = _clustered()
    con, ids = _atlas(tmp_path, vecs)
    build_index(tmp_path, con=con, kind="ivf", params={"nlist": 16, "nprobe": 4})
    con.close()
    ivf = load_index(tmp_path, {"nprobe": 4})
    inner = faiss.extract_index_ivf(ivf)
    assert inner.nprobe == 4 < inner.nlist
    queries = centers + np.random.default_rng(1).normal(0, 0.05, centers.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = np.argsort(-(vecs @ queries.T), axis=0)[:10].T
    _, found = ivf.search(queries, 10)
    for q in range(len(queries)):
        assert set(found[q]) == set(ids[exact[q]])


def test_streamed_build_matches_one_batch(tmp_path, monkeypatch):
    _, vecs = _clustered(n_centers=5, per=30)
    con, ids = _atlas(tmp_path, vecs, ids=np.random.default_rng(2).permutation(10**6)[:150])
    build_index(tmp_path, con=con, kind="flat")
    whole = load_index(tmp_path).search(vecs[:5], 20)
    monkeypatch.setattr(index_mod, "READ_BATCH", 7)
    got_ids, got = index_mod.read_label_vectors(con)
    np.testing.assert_array_equal(got_ids, np.sort(ids))
    np.testing.assert_allclose(got, (vecs / np.linalg.norm(vecs, axis=1, keepdims=True))[np.argsort(ids)],
                               atol=1e-6)
    build_index(tmp_path, con=con, kind="flat")
    np.testing.assert_array_equal(load_index(tmp_path).search(vecs[:5], 20)[1], whole[1])
    build_index(tmp_path, con=con, kind="ivf", params={"nlist": 2, "nprobe": 2})
    assert load_index(tmp_path).ntotal == 150
    con.close()


def test_ivf_vectors_gathers_the_wanted_entries(tmp_path):
    _, vecs = _clustered()
    con, ids = _atlas(tmp_path, vecs, ids=np.arange(len(vecs)) * 3 + 5)
    build_index(tmp_path, con=con, kind="ivf", params={"nlist": 8, "nprobe": 2})
    con.close()
    index = load_index(tmp_path)  # owns what extract_index_ivf returns
    ivf = faiss.extract_index_ivf(index)
    want = np.sort(ids[::7])
    got_ids, got = ivf_vectors(ivf, want)
    order = np.argsort(got_ids)
    np.testing.assert_array_equal(got_ids[order], want)
    np.testing.assert_allclose(got[order], vecs[(want - 5) // 3], atol=1e-6)
    assert len(ivf_vectors(ivf, np.array([1, 2], dtype=np.int64))[0]) == 0


def test_filtered_nprobe_scales_with_selectivity():
    assert filtered_nprobe(32, 2048, 1_000_000, 1_000_000) == 32
    assert filtered_nprobe(32, 2048, 1_000_000, 250_000) == 64
    assert filtered_nprobe(32, 2048, 1_000_000, 10_000) == 320
    assert filtered_nprobe(32, 2048, 1_000_000, 200) == 2048  # every list: exact over the filtered labels
    assert filtered_nprobe(4, 16, 100, 0) == 16


# -- Atlas.search over an IVF index ---------------------------------------------------------

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
THINGS = ["circle", "dog face", "car wheel", "brick wall", "tree", "sky", "text", "water", "grass", "fur"]


def _neurons():
    out = []
    for i, (c, t) in enumerate((c, t) for c in COLORS for t in THINGS):
        layer = "small" if i % 16 == 5 else f"l{i % 3}"
        status = "dead" if i % 11 == 3 else "ok"
        out.append({"model": "m", "layer": layer, "unit": i, "labels": [f"{c} {t}", f"{t} number {i}"],
                    "status": status})
    return out


@pytest.fixture
def ivf_and_exact(make_atlas):
    neurons = _neurons()
    ivf_dir = make_atlas(neurons, name="ivf", index=False)
    build_index(ivf_dir, kind="ivf", params={"nlist": 8, "nprobe": 2})
    return ivf_dir, make_atlas(neurons, name="exact", index=False)


def _keys(hits):
    return [(h.model, h.layer, h.unit) for h in hits]


@pytest.mark.parametrize("subset_max", [0, IndexSearcher.subset_max], ids=["probe-lists", "gathered"])
def test_filtered_ivf_search_is_exact_and_skips_dead_neurons(ivf_and_exact, caplog, monkeypatch, subset_max):
    monkeypatch.setattr(IndexSearcher, "subset_max", subset_max)
    ivf_dir, exact_dir = ivf_and_exact
    with Atlas.open(ivf_dir) as a, Atlas.open(exact_dir) as b, caplog.at_level(logging.WARNING):
        assert a.meta["index_type"] == "ivf-flat"
        dead = {(n["model"], n["layer"], n["unit"]) for n in _neurons() if n["status"] == "dead"}
        # "small" holds 1/16 of the labels: gathered, or nprobe 2 * sqrt(16) = every list
        for query, kw in [("red circle", {"layer": "small"}), ("dog", {"layer": "small", "k": 3}),
                          ("wall", {"model": "m", "layer": "small"})]:
            caplog.clear()
            fast = a.search(query, **kw)
            assert not caplog.records  # the IVF index was used, not the fallback
            exact = b.search(query, **kw)
            assert _keys(fast) == _keys(exact) and fast
            assert [h.matched_label for h in fast] == [h.matched_label for h in exact]
        for query, kw in [("blue sky", {"layer": "l1", "k": 8}), ("wall", {"model": "m", "layer": "l2"}),
                          *[(q, {"layer": "small", "k": 10}) for q in ("sky", "fur")]]:
            fast = a.search(query, **kw)
            assert len(fast) == min(kw.get("k", 10), len({(n["layer"], n["unit"]) for n in _neurons()
                                                 if n["layer"] == kw["layer"] and n["status"] == "ok"}))
            assert {h.layer for h in fast} == {kw["layer"]}
            assert not dead & set(_keys(fast))
        everything = a.search("circle", k=200)
        assert len(everything) == sum(n["status"] == "ok" for n in _neurons())
        assert not dead & set(_keys(everything))


def test_unfiltered_ivf_search_probing_every_list_equals_exact(ivf_and_exact, monkeypatch):
    monkeypatch.setattr(IndexSearcher, "subset_max", 0)  # through FAISS, not the gathered vectors
    ivf_dir, exact_dir = ivf_and_exact
    con = duckdb.connect(str(ivf_dir / DB_FILE))
    con.execute("UPDATE meta SET value = '{\"nlist\": 8, \"nprobe\": 8}' WHERE key = 'index_params'")
    con.close()
    with Atlas.open(ivf_dir) as a, Atlas.open(exact_dir) as b:
        for query in ("green grass", "fur", "a car"):
            fast, exact = a.search(query, k=7), b.search(query, k=7)
            assert _keys(fast) == _keys(exact)
            assert [h.labels for h in fast] == [h.labels for h in exact]
            assert [h.similarity for h in fast] == pytest.approx([h.similarity for h in exact], abs=1e-5)


def test_old_atlas_without_index_meta_still_searches(make_atlas):
    neurons = _neurons()
    old, new = make_atlas(neurons, name="old"), make_atlas(neurons, name="new")
    con = duckdb.connect(str(old / DB_FILE))
    con.execute("DELETE FROM meta WHERE key IN ('index_type', 'index_params', 'index_choice')")
    con.close()
    assert (old / INDEX_FILE).is_file()
    with Atlas.open(old) as a, Atlas.open(new) as b:
        assert "index_type" not in a.meta
        for kw in ({}, {"layer": "small"}):
            assert _keys(a.search("yellow tree", **kw)) == _keys(b.search("yellow tree", **kw))


def test_label_map_rows_and_neurons(make_atlas):
    atlas_dir = make_atlas(_neurons()[:6])
    with Atlas.open(atlas_dir) as atlas:
        lmap = LabelMap.load(atlas.con)
        ids = [r[0] for r in atlas.con.execute(
            "SELECT label_id FROM labels WHERE unit = 4 ORDER BY rank").fetchall()]
    rows = lmap.rows(np.array([ids[1], 12345, ids[0]]))
    assert rows[1] == -1
    assert lmap.key(int(rows[0])) == ("m", "l1", 4) == lmap.key(int(rows[2]))
    own = lmap.neuron_rows(int(rows[0]))
    assert [lmap.text[r].as_py() for r in own] == ["red tree", "tree number 4"]
    assert list(lmap.rank[list(own)]) == [1, 2]
    assert lmap.mask("m", "small").sum() == 2 and lmap.mask("nope", None).sum() == 0
