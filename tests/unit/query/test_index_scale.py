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


# -- min_fidelity over every search path -------------------------------------------------

# rank 1: 0.0, 0.2, ... 0.8 by unit; rank 2: NULL for every 4th unit, else 0.9 down to 0.3
FIDELITY_SQL = ("UPDATE labels SET fidelity_correlation = CASE WHEN rank = 1 THEN (unit % 5) / 5.0 "
                "WHEN unit % 4 = 0 THEN NULL ELSE 0.9 - (unit % 7) / 10.0 END, "
                "fidelity_auprc = 0.5 + unit / 1000.0")


def _fidelity(unit, rank):
    if rank == 1:
        return (unit % 5) / 5
    return None if unit % 4 == 0 else 0.9 - (unit % 7) / 10


@pytest.fixture
def fidelity_atlases(make_atlas):
    """The same labels and fidelity five ways: flat index, IVF (gathered vectors
    and probing every list), and no index (the SQL filter of exact search)."""
    neurons = _neurons()
    flat = make_atlas(neurons, sql=[FIDELITY_SQL], name="flat")
    ivf = make_atlas(neurons, sql=[FIDELITY_SQL], name="ivf", index=False)
    build_index(ivf, kind="ivf", params={"nlist": 8, "nprobe": 8})
    none = make_atlas(neurons, sql=[FIDELITY_SQL], name="none", index=False)
    return flat, ivf, none


def _search_all(dirs, monkeypatch, query, **kw):
    flat, ivf, none = dirs
    out = {}
    for name, path, subset_max in (("flat", flat, IndexSearcher.subset_max), ("ivf-gathered", ivf, 10**6),
                                   ("ivf-lists", ivf, 0), ("no-index", none, IndexSearcher.subset_max)):
        monkeypatch.setattr(IndexSearcher, "subset_max", subset_max)
        with Atlas.open(path) as atlas:
            out[name] = atlas.search(query, **kw)
    return out


@pytest.mark.parametrize("kw", [{"min_fidelity": 0.5}, {"min_fidelity": 0.75, "k": 20},
                                {"min_fidelity": 0.3, "layer": "l1", "k": 6},
                                {"min_fidelity": -1.0, "k": 200}])
def test_min_fidelity_filters_alike_on_every_search_path(fidelity_atlases, monkeypatch, caplog, kw):
    text_of = {}
    for n in _neurons():
        for rank, text in enumerate(n["labels"], 1):
            text_of[(n["unit"], text)] = _fidelity(n["unit"], rank)
    for query in ("red circle", "blue sky", "number 7"):
        with caplog.at_level(logging.WARNING):
            got = _search_all(fidelity_atlases, monkeypatch, query, **kw)
        # every hit's matched label qualifies, and carries its own fidelity
        for hits in got.values():
            assert hits
            for h in hits:
                want = text_of[(h.unit, h.matched_label)]
                assert want is not None and want >= kw["min_fidelity"] - 1e-9
                assert h.fidelity_correlation == pytest.approx(want)
                assert h.fidelity_auprc == pytest.approx(0.5 + h.unit / 1000)
                assert h.layer == kw.get("layer", h.layer)
        ref = got.pop("no-index")
        for name, hits in got.items():
            assert [(h.unit, h.matched_label) for h in hits] == [(h.unit, h.matched_label) for h in ref], name
            assert [h.similarity for h in hits] == pytest.approx([h.similarity for h in ref], abs=1e-5)
    # -1 keeps every label that has a fidelity: all ok neurons, none dead
    if kw["min_fidelity"] == -1.0:
        assert len(ref) == sum(n["status"] == "ok" for n in _neurons())


def test_min_fidelity_changes_the_match_and_drops_unscored_labels(fidelity_atlases):
    flat, _, _ = fidelity_atlases
    with Atlas.open(flat) as atlas:
        everything = {h.unit: h for h in atlas.search("red circle", k=200)}
        # above every label 1 (at most 0.8): only labels 2 at 0.9 (unit % 7 == 0, unit % 4 != 0)
        strict = {h.unit: h for h in atlas.search("red circle", k=200, min_fidelity=0.85)}
        ok = {n["unit"] for n in _neurons() if n["status"] == "ok"}
        assert set(strict) == {u for u in ok if u % 7 == 0 and u % 4 != 0}
        # a neuron whose best-matching label fails the filter is found by its other label
        assert all(h.matched_label == f"{h.labels[1]}" for h in strict.values())
        assert [u for u in strict if everything[u].matched_label == everything[u].labels[0]]
        assert atlas.search("red circle", k=5, min_fidelity=1.0) == []


@pytest.mark.parametrize("bad", [1.5, -2, float("nan"), "0.5", True])
def test_bad_min_fidelity_is_one_clear_error(make_atlas, bad):
    from query.errors import QueryError

    with Atlas.open(make_atlas(_neurons()[:4])) as atlas, pytest.raises(QueryError, match="min_fidelity must be"):
        atlas.search("red", min_fidelity=bad)


def test_label_map_fidelity_mask_and_an_atlas_without_fidelity_columns(make_atlas):
    atlas_dir = make_atlas(_neurons()[:8], sql=[FIDELITY_SQL])
    with Atlas.open(atlas_dir) as atlas:
        lmap = LabelMap.load(atlas.con)
    rows = {(lmap.key(i)[2], int(lmap.rank[i])): i for i in range(len(lmap))}
    mask = lmap.mask(None, None, 0.5)
    for (unit, rank), i in rows.items():
        f = _fidelity(unit, rank)
        ok = next(n["status"] for n in _neurons() if n["unit"] == unit) == "ok"
        assert mask[i] == (ok and f is not None and f >= 0.5), (unit, rank)
    assert np.isnan(lmap.fidelity_correlation[rows[(4, 2)]])  # NULL reads as NaN
    con = duckdb.connect(str(atlas_dir / DB_FILE))
    con.execute("ALTER TABLE labels DROP COLUMN fidelity_correlation")
    con.execute("ALTER TABLE labels DROP COLUMN fidelity_auprc")
    old = LabelMap.load(con)
    con.close()
    assert len(old) == len(lmap) and np.isnan(old.fidelity_correlation).all()
    assert old.mask(None, None, -1.0).sum() == 0 and old.mask(None, None).sum() == lmap.mask(None, None).sum()
