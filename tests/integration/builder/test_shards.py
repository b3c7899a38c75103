"""Scale-out builds on the synthetic world: shards partition the neurons,
merged shards equal a single-process build, merging refuses mixed builds in
one line, a Ray build on a local cluster, and several models in one atlas."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import duckdb
import faiss
import pytest

from builder.config import BuildConfig
from builder.errors import BuildError
from builder.pipeline.neurons import shard_neurons
from builder.pipeline.run import build
from builder.synthetic.probe import write_probe_set
from query import Atlas
from query.cli import main as cli_main
from query.errors import MergeError
from query.merge import merge_atlases
from testkit.atlas_tables import tables

N_PROBE = 120
PLANTED = {"name": "planted", "target": "planted", "layers": ["detectors"]}
CNN = {"name": "cnn", "target": "demo-cnn", "layers": ["fc"]}


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    return Path(write_probe_set(tmp_path_factory.mktemp("probe"), n=N_PROBE, seed=5, progress=False))


def config(probe: Path, out: Path, models=(PLANTED, CNN), **extra) -> BuildConfig:
    data = {
        "out": str(out),
        "chunk_size": 4,
        "models": [{**m, "probe": str(probe)} for m in models],
        "dissect": {"similarity_options": {"target": "demo-cnn"}},
    }
    data.update(extra)
    return BuildConfig.from_dict(data)


def meta(atlas: Path) -> dict:
    con = duckdb.connect(str(atlas / "atlas.duckdb"), read_only=True)
    try:
        return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta").fetchall()}
    finally:
        con.close()


def set_meta(atlas: Path, **values) -> None:
    con = duckdb.connect(str(atlas / "atlas.duckdb"))
    try:
        for k, v in values.items():
            con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [k, json.dumps(v, sort_keys=True)])
    finally:
        con.close()


def neuron_keys(atlas: Path) -> set[tuple]:
    con = duckdb.connect(str(atlas / "atlas.duckdb"), read_only=True)
    try:
        return set(con.execute("SELECT model, layer, unit FROM neurons").fetchall())
    finally:
        con.close()


@pytest.fixture
def with_merge_command():
    """``dnd-atlas merge`` is found through its entry point (nothing to add)."""
    import query.cli

    assert "merge" in {c.name for c in query.cli.all_commands()}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli_main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def reference(probe, tmp_path_factory) -> Path:
    """A single-process build of both models."""
    out = tmp_path_factory.mktemp("ref") / "atlas"
    build(config(probe, out))
    return out


@pytest.fixture(scope="module")
def shards(probe, tmp_path_factory) -> list[Path]:
    """The same config built as 2 shards, each with its own cache."""
    base = tmp_path_factory.mktemp("shards")
    outs = [base / f"shard-{i}" for i in range(2)]
    for i, out in enumerate(outs):
        build(config(probe, out, shard=f"{i}/2"))
    return outs


@pytest.fixture(scope="module")
def merged(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "atlas"
    merge_atlases(out, shards)
    return out


# -- shards ------------------------------------------------------------------------


def test_shard_neurons_is_a_partition():
    neurons = [(lay, u) for lay in ("a", "b", "c") for u in range(7)]
    for n in (1, 2, 3, 5, 30):
        parts = [shard_neurons(neurons, f"{i}/{n}") for i in range(n)]
        assert sorted(x for p in parts for x in p) == sorted(neurons)
        assert sum(len(p) for p in parts) == len(neurons)
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    assert shard_neurons(neurons, "") == neurons


def test_shard_atlases_partition_the_neurons(reference, shards):
    a, b = neuron_keys(shards[0]), neuron_keys(shards[1])
    assert a and b and not a & b
    assert a | b == neuron_keys(reference)
    assert meta(shards[0])["shard"] == "0/2"


# -- merge -------------------------------------------------------------------------


def test_merged_shards_equal_a_single_build(reference, shards, merged):
    assert tables(merged) == tables(reference)
    m = meta(merged)
    assert m["shard"] == "" and m["merged_from"] == [str(s) for s in shards]
    assert m["build_fingerprint"] == meta(reference)["build_fingerprint"]
    assert m["build_config"]["shard"] == ""
    assert m["ground_truth"] == meta(reference)["ground_truth"]
    con = duckdb.connect(str(merged / "atlas.duckdb"), read_only=True)
    n_labels, n_vectors = con.execute("SELECT (SELECT count(*) FROM labels), (SELECT count(*) FROM label_vectors)").fetchone()
    thumbs = [r[0] for r in con.execute("SELECT thumbnail FROM evidence").fetchall()]
    stages = dict(con.execute("SELECT stage, sum(seconds) FROM stage_times GROUP BY stage").fetchall())
    con.close()
    assert n_labels == n_vectors == faiss.read_index(str(merged / "descriptions.faiss")).ntotal
    assert thumbs and all((merged / t).is_file() for t in thumbs)
    assert stages["record"] > 0
    with Atlas.open(merged) as atlas:
        hits = atlas.search("red", k=3, model="planted")
        assert hits and "red" in hits[0].labels[0]
        assert atlas.summary()["index"]["current"]


def test_clip_dissect_shards_merge_to_a_single_build(probe, tmp_path):
    """The baseline labeler shards like DnD: the same run loop picks the neurons."""
    single = tmp_path / "single"
    build(config(probe, single, models=(PLANTED,), labeler="clip-dissect"))
    parts = [tmp_path / f"s{i}" for i in range(2)]
    for i, out in enumerate(parts):
        summary = build(config(probe, out, models=(PLANTED,), labeler="clip-dissect", shard=f"{i}/2"))
        assert summary.models[0].neurons == 9
    merge_atlases(tmp_path / "merged", parts)
    assert tables(tmp_path / "merged") == tables(single)


def test_merge_cli_and_its_refusals(shards, merged, tmp_path, capsys, with_merge_command):
    rc, out, err = cli(capsys, "merge", str(tmp_path / "again"), *map(str, shards))
    assert rc == 0, err
    assert "merged 2 shards" in out and tables(tmp_path / "again") == tables(merged)
    # an existing, non-empty out
    rc, _, err = cli(capsys, "merge", str(merged), *map(str, shards))
    assert rc == 2 and err.count("\n") == 1 and "not empty" in err
    # not an atlas
    rc, _, err = cli(capsys, "merge", str(tmp_path / "x"), str(shards[0]), str(tmp_path))
    assert rc == 2 and err.count("\n") == 1 and "is not an atlas" in err


@pytest.mark.parametrize("change, words", [
    (lambda m: {"build_fingerprint": {**m["build_fingerprint"],
                                      "record": {**m["build_fingerprint"]["record"], "top_k": 5}}},
     "(record); merge only"),
    (lambda m: {"build_fingerprint": {**m["build_fingerprint"], "models": [
        {**x, "layers": ["conv1"]} if x["name"] == "cnn" else x for x in m["build_fingerprint"]["models"]]}},
     "holds model 'cnn' built with another config"),
    (lambda m: {"labeler": "clip-dissect"}, "another labeler"),
    (lambda m: {"embedder": "mpnet"}, "another embedder"),
], ids=["settings", "model-config", "labeler", "embedder"])
def test_merge_refuses_shards_of_another_config(shards, tmp_path, capsys, with_merge_command, change, words):
    other = tmp_path / "other"
    shutil.copytree(shards[1], other)
    set_meta(other, **change(meta(other)))
    rc, _, err = cli(capsys, "merge", str(tmp_path / "out"), str(shards[0]), str(other))
    assert rc == 2, err
    assert err.count("\n") == 1 and words in err and "merge only shards of one build config" in err
    assert not (tmp_path / "out").exists()


def test_merge_overlapping_neurons(shards, merged, tmp_path):
    # the same neurons twice, identical: kept once
    summary = merge_atlases(tmp_path / "dup", [*shards, _copy(shards[0], tmp_path / "copy")])
    assert summary.overlapping == len(neuron_keys(shards[0]))
    assert tables(tmp_path / "dup") == tables(merged)
    # the same neuron with another label: refused, nothing written
    bad = _copy(shards[0], tmp_path / "bad")
    con = duckdb.connect(str(bad / "atlas.duckdb"))
    model, layer, unit = con.execute(
        "SELECT model, layer, unit FROM labels ORDER BY model, layer, unit LIMIT 1").fetchone()
    con.execute("UPDATE labels SET text = 'purple elephant' WHERE model = ? AND layer = ? AND unit = ?",
                [model, layer, unit])
    con.close()
    with pytest.raises(MergeError, match=f"neuron {model}/{layer}/{unit} with other labels rows"):
        merge_atlases(tmp_path / "out", [shards[0], bad])
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.merging-*"))


def test_merge_reports_missing_neurons(shards, tmp_path):
    summary = merge_atlases(tmp_path / "half", [shards[0]])
    missing = len(neuron_keys(shards[1]))
    assert sum(summary.missing.values()) == missing
    assert "neurons are in no shard" in summary.text()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


# -- Ray -----------------------------------------------------------------------------


def test_ray_build_equals_a_single_build(probe, reference, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'dnd-atlas[ray]')")
    from builder.pipeline.shards import ray_build

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # a failing shard build: one line naming it, nothing merged, the other shard's work kept
        bad = dataclasses.replace(config(probe, tmp_path / "bad"), models=(
            config(probe, tmp_path / "bad").models[0],
            dataclasses.replace(config(probe, tmp_path / "bad").models[1], layers=("nope",)),
        ))
        with pytest.raises(BuildError, match=r"2 of 2 shard builds failed \(shard 0: .*valid layers") as exc:
            ray_build(bad, 2)
        assert "\n" not in str(exc.value) and not (tmp_path / "bad").exists()
        assert neuron_keys(tmp_path / "bad.shards" / "shard-1")  # planted was written before cnn failed
        out = tmp_path / "atlas"
        t0 = time.perf_counter()
        summary = ray_build(config(probe, out), 2)
        print(f"ray build of 2 shards: {time.perf_counter() - t0:.1f} s")
        assert ray.is_initialized(), "a Ray the caller started is left running"
    finally:
        ray.shutdown()
    assert tables(out) == tables(reference)
    assert [s["out"] for s in summary.shards] == [str(tmp_path / "atlas.shards" / f"shard-{i}") for i in range(2)]
    assert meta(out)["merged_from"] == [s["out"] for s in summary.shards]
    assert "2 Ray shard builds" in summary.text()


def test_ray_build_without_ray_names_the_extra(probe, tmp_path, monkeypatch):
    from builder.pipeline.shards import ray_build

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(BuildError, match=r"pip install 'dnd-atlas\[ray\]'"):
        ray_build(config(probe, tmp_path / "atlas"), 2)


def test_ray_build_refuses_a_sharded_config(probe, tmp_path):
    from builder.pipeline.shards import shard_configs

    with pytest.raises(BuildError, match="drop shard"):
        shard_configs(config(probe, tmp_path / "a", shard="0/2"), 2)
    cfgs = shard_configs(config(probe, tmp_path / "a", device="cuda:1"), 3, gpu=True)
    assert [c.shard for c in cfgs] == ["0/3", "1/3", "2/3"] and {c.device for c in cfgs} == {"cuda"}


# -- several models in one atlas -------------------------------------------------------


@pytest.fixture(scope="module")
def planted_only(probe, reference, tmp_path_factory) -> Path:
    """An atlas of the planted model alone, sharing the reference's cache."""
    out = tmp_path_factory.mktemp("multi") / "planted"
    build(config(probe, out, models=(PLANTED,), cache_dir=str(reference / "cache")))
    return out


def test_adding_models_to_an_atlas(probe, reference, planted_only, tmp_path):
    cache = str(reference / "cache")  # the content cache: the same results, faster
    ref = tables(reference)
    alone = tables(planted_only)
    assert set(alone.pop("captions")) <= set(ref["captions"])
    assert alone == {k: v for k, v in tables(reference, ("planted",)).items() if k != "captions"}
    # A, then A and B with the same settings: A unchanged, B added
    both = _copy(planted_only, tmp_path / "both")
    before = tables(both, ("planted",))
    build(config(probe, both, cache_dir=cache))
    assert _same_model_rows(tables(both, ("planted",)), before)
    assert tables(both) == ref
    # A, then B alone: A stays
    only_b = _copy(planted_only, tmp_path / "only_b")
    build(config(probe, only_b, models=(CNN,), cache_dir=cache))
    assert _same_model_rows(tables(only_b, ("planted",)), before)
    assert tables(only_b) == ref
    for atlas_dir in (both, only_b):
        with Atlas.open(atlas_dir) as atlas:
            assert {h.model for h in atlas.search("red", k=200)} == {"planted", "cnn"}
            assert {m["model"] for m in atlas.summary()["models"]} == {"planted", "cnn"}
        n_labels = len(tables(atlas_dir)["labels"])
        assert faiss.read_index(str(atlas_dir / "descriptions.faiss")).ntotal == n_labels


def _same_model_rows(after: dict, before: dict) -> bool:
    """A model's rows are unchanged (captions are shared by models: they may only grow)."""
    drop = lambda t: {k: v for k, v in t.items() if k != "captions"}
    return drop(after) == drop(before) and set(before["captions"]) <= set(after["captions"])


def test_adding_a_model_with_other_settings_is_refused(probe, planted_only, tmp_path):
    out = _copy(planted_only, tmp_path / "atlas")
    with pytest.raises(BuildError, match="other settings"):
        build(config(probe, out, models=(CNN,), record={"top_k": 5}))
    with pytest.raises(BuildError, match="already holds model 'planted'"):
        build(config(probe, out, models=({**PLANTED, "units": [0, 1]},)))


def test_the_atlas_meta_keeps_every_model(probe, reference, planted_only, tmp_path):
    out = _copy(planted_only, tmp_path / "atlas")
    build(config(probe, out, models=(CNN,), cache_dir=str(reference / "cache")))
    m = meta(out)
    assert {x["name"] for x in m["build_fingerprint"]["models"]} == {"planted", "cnn"}
    assert {x["name"] for x in m["build_config"]["models"]} == {"planted", "cnn"}
