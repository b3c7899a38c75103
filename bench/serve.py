"""``dnd-atlas serve`` under load, and what letting writers in costs.

Two generated atlases (:mod:`bench.site_atlas`) whose label vectors are the
real embeddings of their label texts, each carrying the ONNX export of the
default embedder (``ATLAS/embedder``), are served by a server process like
``dnd-atlas serve`` (access log on); 20 client threads on keep-alive
connections (:mod:`testkit.http_load`) then send, for ``SECONDS`` each,
searches (distinct concept queries, k=10) and neuron records:

- ``serve_<size>_search_*`` / ``serve_<size>_neurons_*``: requests/s, p50,
  p95 (ms) and errors, ``demo`` (600 units, ~1,600 labels, the size of the
  demo atlas) and ``25k`` (25,000 units, ~74,000 labels);
- ``serve_demo_search_unbatched_*``: the same search load with one query per
  round (``max_batch = 1``), in the same run: what batching gives;
- ``duckdb_open_close_ms`` vs ``duckdb_query_ms``: opening a read-only
  connection per request against a query on a kept one (why the server keeps
  a connection to a snapshot instead of reopening the atlas);
- ``snapshot_copy_s_25k`` (``atlas_db_mb_25k``): the time the server holds
  the atlas file to copy it;
- ``writer_chunk_ms`` vs ``writer_release_ms``: writing a chunk of 64
  neurons into the 25k atlas against releasing and re-opening the file
  after it (what a build pays per chunk so that readers get in).

``DND_SERVE_BENCH_SECONDS`` (default 20) sets the load's duration and
``DND_SERVE_BENCH=demo`` skips the 25k atlas. ``serve_load_avg`` is the
1-minute load average before and after: figures need a quiet machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.site_atlas import ADJ, NOUN, PLACE, BenchAtlas, make_atlas

SHAPES = {
    "demo": BenchAtlas(n_layers=3, units=200, n_probe=600, n_concepts=300),
    "25k": BenchAtlas(n_layers=5, units=5_000, n_probe=5_000, n_concepts=3_000),
}
CLIENTS = 20
CHUNK = 64


def _seconds() -> float:
    return float(os.environ.get("DND_SERVE_BENCH_SECONDS", "20"))


def make_search_atlas(path: Path, shape: BenchAtlas, embedder_dir: Path) -> None:
    """A bench atlas of ``shape`` at ``path`` whose label vectors embed the
    label texts with the ONNX embedder at ``embedder_dir`` (copied in)."""
    import duckdb

    from query.index import build_index, insert_label_vectors
    from query.onnx_embedder import OnnxEmbedder

    path.mkdir(parents=True)
    make_atlas(path, shape)
    shutil.copytree(embedder_dir, path / "embedder")
    con = duckdb.connect(str(path / "atlas.duckdb"))
    try:
        rows = con.execute("SELECT label_id, text FROM labels ORDER BY label_id").fetchall()
        texts = sorted({t for _, t in rows})
        vec = dict(zip(texts, OnnxEmbedder(path / "embedder").embed(texts)))
        insert_label_vectors(con, [i for i, _ in rows], np.stack([vec[t] for _, t in rows]))
        build_index(path, con=con)
        con.execute("CHECKPOINT")
    finally:
        con.close()


def search_paths(n: int = 600) -> list[str]:
    """Distinct concept queries, as users would type them."""
    import urllib.parse

    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        words = [ADJ[rng.integers(len(ADJ))], NOUN[rng.integers(len(NOUN))]]
        if i % 3 == 0:
            words += ["on a", PLACE[rng.integers(len(PLACE))]]
        out.append("/search?" + urllib.parse.urlencode({"q": " ".join(words) + f" {i % 7}", "k": 10}))
    return out


def neuron_paths(shape: BenchAtlas, n: int = 600) -> list[str]:
    rng = np.random.default_rng(2)
    units = [int(u) for u in rng.integers(0, shape.units, n * 2) if u % 97][:n]
    return [f"/neurons/resnet/layer{1 + i % shape.n_layers}/{u}" for i, u in enumerate(units)]


@contextlib.contextmanager
def bench_server(atlas: Path, max_batch: int) -> Iterator[str]:
    """A server process on a free loopback port, warmed up; yields its URL, stops it on exit."""
    from testkit.http_load import load
    from testkit.served import serving

    env = {**os.environ, "DND_ATLAS_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "bench.serve", "--child", str(atlas), str(max_batch)]
    with serving(argv, env=env, stop_timeout=60) as (url, _):
        warm = load(url, search_paths(20), clients=2, seconds=30, max_requests=20)
        if warm.errors:
            raise RuntimeError(f"the bench server fails: {warm.failures[:3]}")
        yield url


def _load_lines(url: str, shape: BenchAtlas, search: str, neurons: str | None) -> dict[str, str]:
    """The search load's lines (names starting ``search``), then the neuron
    load's (``neurons``) unless it is None."""
    from testkit.http_load import load

    out = load(url, search_paths(), clients=CLIENTS, seconds=_seconds(),
               check=lambda p, body: isinstance(body, list) and len(body) > 0).lines(search)
    if neurons:
        out.update(load(url, neuron_paths(shape), clients=CLIENTS, seconds=_seconds(),
                        check=lambda p, body: bool(body.get("labels"))).lines(neurons))
    return out


def _duckdb_costs(atlas: Path, n: int = 20) -> dict[str, str]:
    import duckdb

    db = str(atlas / "atlas.duckdb")
    sql = "SELECT text FROM labels WHERE model = 'resnet' AND layer = 'layer2' AND unit = 17"
    t0 = time.perf_counter()
    for _ in range(n):
        con = duckdb.connect(db, read_only=True)
        con.execute(sql).fetchall()
        con.close()
    per_open = (time.perf_counter() - t0) / n
    con = duckdb.connect(db, read_only=True)
    con.execute(sql).fetchall()
    t0 = time.perf_counter()
    for _ in range(n):
        con.execute(sql).fetchall()
    per_query = (time.perf_counter() - t0) / n
    con.close()
    return {"duckdb_open_close_ms": f"{per_open * 1000:.1f}", "duckdb_query_ms": f"{per_query * 1000:.2f}"}


def _snapshot_cost(atlas: Path, tmp: Path) -> dict[str, str]:
    from query.access import copy_database

    t0 = time.perf_counter()
    copy_database(atlas / "atlas.duckdb", tmp / "copy.duckdb", timeout=60)
    held = time.perf_counter() - t0
    size = (atlas / "atlas.duckdb").stat().st_size
    (tmp / "copy.duckdb").unlink()
    return {"snapshot_copy_s_25k": f"{held:.2f}", "atlas_db_mb_25k": f"{size / 2**20:.0f}"}


def _writer_costs(atlas: Path, tmp: Path, chunks: int = 3) -> dict[str, str]:
    """Chunks of 64 neurons written into a copy of ``atlas``; per chunk the
    write and the release + re-open that follows it, timed apart."""
    from query.writer import AtlasWriter, CandidateRow, EvidenceRow, LabelRow, NeuronResult

    copy = tmp / "writer"
    copy.mkdir()
    shutil.copyfile(atlas / "atlas.duckdb", copy / "atlas.duckdb")
    rng = np.random.default_rng(3)

    def neuron(u: int) -> NeuronResult:
        labels = tuple(LabelRow(r, f"bench label {u} {r}", 0.5, rng.standard_normal(384).astype(np.float32))
                       for r in (1, 2, 3))
        cands = tuple(CandidateRow(i, f"bench concept {u} {i}", 1.0, 0.5, 1.0, i + 1 if i < 3 else None,
                                   ("images/g.webp",)) for i in range(5))
        ev = tuple(EvidenceRow(i + 1, f"p/{u}_{i}.png", None, 1.0 - i / 10, f"images/e/{u}_{i}.webp",
                               f"bench{u}_{i}", f"caption {u} {i}", "bench") for i in range(10))
        return NeuronResult("bench-writer", "layer1", u, "ok", None, 2.0, 0.5, labels, cands, ev,
                            {"captioner_images": (10, 0)})

    write, release = [], []
    writer = AtlasWriter(copy)
    try:
        for c in range(chunks):
            batch = [neuron(u) for u in range(c * CHUNK, (c + 1) * CHUNK)]
            t0 = time.perf_counter()
            writer.write_neurons(batch)
            t1 = time.perf_counter()
            writer.release()
            writer.done_units("bench-writer")  # opens the file again
            write.append(t1 - t0)
            release.append(time.perf_counter() - t1)
    finally:
        writer.close()
    return {"writer_chunk_ms": f"{np.median(write) * 1000:.0f}",
            "writer_release_ms": f"{np.median(release) * 1000:.0f}"}


def run() -> dict[str, str]:
    """Every measurement once; returns ``name: value`` lines."""
    from builder.embedder_export import export_embedder

    out = {"serve_load_avg_start": f"{os.getloadavg()[0]:.1f}"}
    tmp = Path(tempfile.mkdtemp(prefix="dnd-serve-bench-"))
    try:
        export_embedder("minilm", tmp / "embedder")
        tags = ["demo"] if os.environ.get("DND_SERVE_BENCH") == "demo" else list(SHAPES)
        for tag in tags:
            atlas = tmp / f"atlas-{tag}"
            make_search_atlas(atlas, SHAPES[tag], tmp / "embedder")
            with bench_server(atlas, max_batch=64) as url:
                out.update(_load_lines(url, SHAPES[tag], f"serve_{tag}_search", f"serve_{tag}_neurons"))
            if tag == "demo":
                with bench_server(atlas, max_batch=1) as url:
                    out.update(_load_lines(url, SHAPES[tag], "serve_demo_search_unbatched", None))
            else:
                out.update(_duckdb_costs(atlas))
                out.update(_snapshot_cost(atlas, tmp))
                out.update(_writer_costs(atlas, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["serve_load_avg_end"] = f"{os.getloadavg()[0]:.1f}"
    return out


def child(atlas: str, max_batch: int) -> int:
    """The bench's server process: ``dnd-atlas serve ATLAS --port 0`` with
    ``max_batch`` queries per search round."""
    import uvicorn

    from query.server import bind, create_app

    app = create_app(atlas, preload=True)
    app.state.readers.batcher.max_batch = max_batch
    sock = bind("127.0.0.1", 0)
    print(f"serving on http://127.0.0.1:{sock.getsockname()[1]} ", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="info", access_log=True, lifespan="on")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], int(sys.argv[3])))
    for key, value in run().items():
        print(f"{key}: {value}", flush=True)
