"""End-to-end builds on the synthetic world: the atlas, resume after kill -9
and Ctrl-C, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import tomli_w

from builder.synthetic.probe import write_probe_set
from query import Atlas
from query.onnx_embedder import ATLAS_EMBEDDER_DIR, ATLAS_META_KEY, OnnxEmbedder, carried_meta
from testkit.atlas_tables import tables
from testkit.atlases import hits_difference, search_hits

N_PROBE = 160


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    return Path(write_probe_set(tmp_path_factory.mktemp("probe"), n=N_PROBE, seed=3, progress=False))


def config(probe: Path, out: Path, **extra) -> dict:
    cfg = {
        "out": str(out),
        "chunk_size": 4,
        "models": [
            {"name": "planted", "target": "planted", "probe": str(probe), "layers": ["detectors"]},
            {"name": "cnn", "target": "demo-cnn", "probe": str(probe), "layers": ["fc"]},
        ],
        "dissect": {"similarity_options": {"target": "demo-cnn"}},
    }
    cfg.update(extra)
    return cfg


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DND_ATLAS_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "query.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.fixture(scope="module")
def reference(probe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "atlas"
    cfg = write_config(out.parent / "c.toml", config(probe, out))
    r = cli("build", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "neurons written" in r.stdout
    return out


def test_build_writes_a_complete_atlas(reference):
    with Atlas.open(reference) as atlas:
        layers = {(lay.model, lay.layer): lay for lay in atlas.layers()}
        assert set(layers) == {("planted", "detectors"), ("cnn", "fc")}
        planted = layers[("planted", "detectors")]
        assert planted.n_units == 18 and planted.n_ok + planted.n_dead + planted.n_failed == 18
        rec = atlas.neuron("planted", "detectors", 0)
        assert rec.status == "ok"
        assert 1 <= len(rec.labels) <= 3 and rec.labels[0].rank == 1
        assert len(rec.candidates) == 5
        assert len(rec.evidence) == 10
        assert [e.rank for e in rec.evidence] == list(range(1, 11))
        acts = [e.activation for e in rec.evidence]
        assert acts == sorted(acts, reverse=True)
        for e in rec.evidence:
            assert (reference / e.thumbnail).is_file()
            assert e.caption
        assert any(e.box is not None for e in rec.evidence), "crops should reach the top-K of a color unit"
        # the fidelity sample's captions are charged to the first neuron written, which may be this one
        assert set(rec.calls) - {"fidelity_captioner_images"} == {
            "captioner_images", "summarizer_requests", "generated_images", "target_forward_images"}
        # unit 0 detects red: its label names red
        assert "red" in rec.labels[0].text
        hits = atlas.search("red", k=3, model="planted")
        assert hits and all(h.model == "planted" for h in hits)
    con = duckdb.connect(str(reference / "atlas.duckdb"), read_only=True)
    n_labels = con.execute("SELECT count(*) FROM labels").fetchone()[0]
    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    con.close()
    import faiss

    assert faiss.read_index(str(reference / "descriptions.faiss")).ntotal == n_labels
    assert json.loads(meta["embedder"]) == "minilm"
    assert "target-features" in json.loads(meta["similarity"]) or "demo-cnn" in json.loads(meta["similarity"])
    assert json.loads(meta["build_config"])["record"]["top_k"] == 10


def test_a_second_run_changes_nothing(reference, tmp_path):
    before = tables(reference)
    model = reference / ATLAS_EMBEDDER_DIR / "model.onnx"
    exported = os.stat(model).st_ino, os.stat(model).st_mtime_ns
    r = cli("build", "--config", str(reference.parent / "c.toml"))
    assert r.returncode == 0, r.stderr
    assert tables(reference) == before
    assert (os.stat(model).st_ino, os.stat(model).st_mtime_ns) == exported  # exported once


SEARCHES = ["red", "red circle", "striped pattern", "blue", "dotted", "checkered", "a star", "green square",
            "circle", "yellow triangle", "purple dots", "sky", "grass background", "brick wall", "zebra"]


def test_the_atlas_carries_its_embedder_and_searches_alike_through_it(reference, minilm):
    with Atlas.open(reference) as atlas:
        assert atlas.meta[ATLAS_META_KEY] == carried_meta(reference / ATLAS_EMBEDDER_DIR)
        assert atlas.meta[ATLAS_META_KEY]["name"] == "minilm"
        assert isinstance(atlas.embedder, OnnxEmbedder)
    onnx = search_hits(reference, SEARCHES, k=20)
    assert hits_difference(onnx, search_hits(reference, SEARCHES, k=20, embedder=minilm)) is None
    assert sum(len(h) for h in onnx) == 20 * len(SEARCHES)


def _run_until_written(cfg: Path, sig: int) -> subprocess.Popen:
    env = {**os.environ, "DND_ATLAS_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "query.cli", "--log-level", "INFO", "build", "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # a shell without job control starts background jobs with SIGINT ignored,
        # and Python then installs no Ctrl-C handler: give the build the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    for line in proc.stderr:  # type: ignore[union-attr]
        if "wrote" in line and "of" in line:
            proc.send_signal(sig)
            break
        assert time.time() < deadline, "the build never wrote a chunk"
    proc.wait(timeout=120)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_build_resumes_to_the_same_atlas(reference, probe, tmp_path, sig):
    out = tmp_path / "atlas"
    cfg = write_config(tmp_path / "c.toml", config(probe, out))
    proc = _run_until_written(cfg, sig)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130
        assert "resume" in proc.stderr.read()
    partial = tables(out)["neurons"]
    assert 0 < len(partial) < len(tables(reference)["neurons"])
    r = cli("build", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert tables(out) == tables(reference)


def test_resuming_with_another_config_is_refused(reference):
    r = cli("build", "--config", str(reference.parent / "c.toml"), "--set", "record.top_k=5")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "use a new --out" in r.stderr


@pytest.mark.parametrize("change, words", [
    ({"models": [{"name": "p", "target": "planted", "probe": "/nonexistent/probe", "layers": ["detectors"]}]},
     "does not exist"),
    ({"models": [{"name": "p", "target": "planted", "probe": "PROBE", "layers": ["nope"]}]},
     "valid layers: detectors"),
    ({"models": [{"name": "p", "target": "no-such-model", "probe": "PROBE", "layers": ["x"]}]},
     "unknown target"),
    ({"recrod": {"top_k": 3}}, "unknown config key 'recrod'"),
])
def test_bad_input_gives_one_line(probe, tmp_path, change, words):
    data = config(probe, tmp_path / "atlas")
    data.update(json.loads(json.dumps(change).replace("PROBE", str(probe))))
    r = cli("build", "--config", str(write_config(tmp_path / "c.toml", data)))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert words in r.stderr


def test_corrupt_probe_files_are_skipped_and_counted(probe, tmp_path):
    bad = tmp_path / "probe"
    (bad / "images").mkdir(parents=True)
    for name in sorted(os.listdir(probe / "images"))[:40]:
        (bad / "images" / name).write_bytes((probe / "images" / name).read_bytes())
    (bad / "images" / "broken.png").write_bytes(b"not a png at all")
    (bad / "images" / "empty.jpg").write_bytes(b"")
    data = {
        "out": str(tmp_path / "atlas"),
        "models": [{"name": "p", "target": "planted", "probe": str(bad), "layers": ["detectors"]}],
        "describe": {"captioner": "precomputed"},
        "crop": {"enabled": False},
        "dissect": {"enabled": False, "similarity_options": {"target": "demo-cnn"}},
    }
    caps = [json.dumps({"file": f"images/{n}", "caption": "a red circle"}) for n in os.listdir(bad / "images")]
    (bad / "captions.jsonl").write_text("\n".join(caps) + "\n")
    r = cli("build", "--config", str(write_config(tmp_path / "c.toml", data)))
    assert r.returncode == 0, r.stderr
    assert "2 probe images skipped" in r.stdout
    con = duckdb.connect(str(tmp_path / "atlas" / "atlas.duckdb"), read_only=True)
    assert con.execute("SELECT n_probe_images, n_skipped_images FROM models").fetchone() == (40, 2)
    con.close()


def test_missing_atlas_and_empty_query_are_one_line_errors(reference, tmp_path):
    r = cli("search", str(tmp_path / "nothing"), "red")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = cli("search", str(reference), "   ")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    r = cli("neuron", str(reference), "nolayer", "0", "--model", "planted")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "detectors" in r.stderr
