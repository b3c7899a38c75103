"""Readable while written: ``serve`` answers a bounded load of searches while a
build resumes into the atlas it serves and an ``eval`` writes it; ``search``,
``neuron`` and ``info`` from the command line work meanwhile. No request
fails, no process meets a lock error, and the atlas ends equal to one built
without readers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import tomli_w

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from builder.synthetic.probe import write_probe_set
from testkit.atlas_tables import tables
from testkit.http_load import load
from testkit.served import serving

REPO = Path(__file__).resolve().parents[3]
ENV = {"DND_ATLAS_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
LOCK_WORDS = re.compile(r"conflicting lock|could not set lock|AtlasBusy|is held by another process", re.I)
QUERIES = ["red circle", "blue square", "striped", "green triangle", "yellow star", "dots"]


def _config(probe: Path, out: Path) -> dict:
    return {"out": str(out), "chunk_size": 4,
            "models": [{"name": "planted", "target": "planted", "probe": str(probe), "layers": ["detectors"]}]}


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "query.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ENV}, cwd=REPO)


def _build_partly(cfg: Path) -> None:
    """Start the build and kill -9 it once it wrote its first chunk."""
    proc = subprocess.Popen([sys.executable, "-m", "query.cli", "--log-level", "INFO", "build", "--config",
                             str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV}, cwd=REPO)
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # type: ignore[union-attr]
        if "wrote" in line and "of" in line:
            proc.kill()
            break
        assert time.monotonic() < deadline, "the build never wrote a chunk"
    proc.wait(timeout=120)
    proc.stderr.close()  # type: ignore[union-attr]


def _get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@contextlib.contextmanager
def _serve(atlas: Path, snapshots: Path):
    argv = [sys.executable, "-m", "query.cli", "serve", str(atlas), "--port", "0", "--refresh", "0.5",
            "--snapshot-dir", str(snapshots)]
    with serving(argv, env={**os.environ, **ENV}, cwd=REPO) as (url, log):
        deadline = time.monotonic() + 300
        while _get(url + "/models")[0] != 200:
            assert time.monotonic() < deadline, "".join(log)
            time.sleep(0.05)
        yield url, log


def test_serve_search_and_writers_share_the_atlas(tmp_path):
    probe = Path(write_probe_set(tmp_path / "probe", n=120, seed=3, progress=False))
    reference, out = tmp_path / "ref" / "atlas", tmp_path / "live" / "atlas"
    ref_cfg = tmp_path / "ref.toml"
    ref_cfg.write_text(tomli_w.dumps(_config(probe, reference)))
    r = _cli("build", "--config", str(ref_cfg))
    assert r.returncode == 0, r.stderr  # built without readers

    cfg = tmp_path / "live.toml"
    cfg.write_text(tomli_w.dumps(_config(probe, out)))
    _build_partly(cfg)
    partial = len(tables(out)["neurons"])
    assert 0 < partial < len(tables(reference)["neurons"])

    paths = [f"/search?{urllib.parse.urlencode({'q': q, 'k': 5})}" for q in QUERIES]
    paths += ["/models", "/layers", "/layers?model=planted"]
    with _serve(out, tmp_path / "snapshots") as (url, log):
        stop = threading.Event()
        result: dict = {}
        loader = threading.Thread(target=lambda: result.update(load=load(
            url, paths, clients=4, seconds=900, max_requests=20_000, stop=stop,
            check=lambda p, body: isinstance(body, list) and (not p.startswith("/search") or len(body) > 0))))
        loader.start()
        try:
            # the writers, one after the other, under the load; the CLI readers meanwhile
            build = subprocess.Popen([sys.executable, "-m", "query.cli", "build", "--config", str(cfg)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **ENV}, cwd=REPO)
            readers = [_cli("info", str(out)), _cli("neuron", str(out), "detectors", "0", "--model", "planted"),
                       _cli("search", str(out), "red circle", "-k", "3")]
            build_out, build_err = build.communicate(timeout=900)
            total = len(tables(reference)["neurons"])
            deadline = time.monotonic() + 60
            while True:  # the server follows the build: it serves the finished atlas soon
                (layer,) = _get(url + "/layers")[1]
                if layer["n_ok"] + layer["n_dead"] + layer["n_failed"] == total:
                    break
                assert time.monotonic() < deadline, layer
                time.sleep(0.2)
            evaluation = _cli("eval", str(out), "--protocol", "synthetic", "--no-mpnet")
            assert _get(url + "/models")[0] == 200
        finally:
            stop.set()
            loader.join(timeout=120)
        served = load(url, paths[:1], clients=1, seconds=30, max_requests=1)  # the server is still up
    res = result["load"]
    print(f"\nread_while_written_requests: {res.requests}\nread_while_written_failures: {res.errors}\n"
          f"read_while_written_p95_ms: {res.percentile(95):.1f}\n"
          f"read_while_written_p50_ms: {res.percentile(50):.1f}")

    assert build.returncode == 0, build_err
    assert evaluation.returncode == 0, evaluation.stderr
    for r in readers:
        assert r.returncode == 0, r.stderr
    assert "planted" in readers[0].stdout and "detectors" in readers[1].stdout
    everything = build_err + evaluation.stderr + "".join(r.stderr for r in readers) + "".join(log)
    assert not LOCK_WORDS.search(everything), LOCK_WORDS.search(everything)
    assert res.requests >= 50, res
    assert res.errors == 0, res.failures
    assert served.errors == 0
    assert tables(out) == tables(reference)  # the readers changed nothing
    import duckdb

    con = duckdb.connect(str(out / "atlas.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM evaluations WHERE protocol = 'synthetic'").fetchone()[0] > 0
    finally:
        con.close()
