"""Search latency over a 100,000-label atlas.

The atlas is written straight with SQL (like the test fixtures): 2,000 real
label texts are embedded with the default embedder and each is spread into
50 nearby vectors (small noise, renormalized), so the index holds 100,000
distinct vectors. Each timed query goes through ``Atlas.search``: embedding
the query, the FAISS search and the DuckDB lookups of the hits; once with
today's sentence-transformers embedder and once with the ONNX embedder the
atlas carries (exported into it, as a build does), taking turns.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np

from query import Atlas
from query.embedder import get_embedder
from query.index import build_index, insert_label_vectors
from query.schema import DB_FILE, label_id, migrate

WORDS = {
    "color": ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"],
    "texture": ["striped", "dotted", "checkered", "furry", "wooden", "metal", "glossy", "woven", "grainy", "wavy"],
    "thing": ["circle", "dog face", "car wheel", "window", "tree", "text", "sky", "grass", "water", "face"],
}
QUERIES = ["dog", "red stripes", "wheels of a car", "blue sky", "wood texture", "text on a sign",
           "green grass", "a face", "checkerboard", "metal surface"]


def make_atlas(path: Path, n_labels: int = 100_000, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    texts = [" ".join(t) for t in itertools.product(WORDS["color"], WORDS["texture"], WORDS["thing"])]
    texts = texts[:2000] + [f"{c} {t}" for c, t in itertools.product(WORDS["color"], WORDS["thing"])]
    texts = texts[:2000]
    base = get_embedder("minilm").embed(texts)
    reps = -(-n_labels // len(base))
    vecs = np.repeat(base, reps, axis=0)[:n_labels] + rng.normal(0, 0.02, (n_labels, base.shape[1])).astype(np.float32)
    con = duckdb.connect(str(path / DB_FILE))
    migrate(con)
    n_neurons = -(-n_labels // 3)
    units = np.arange(n_labels) // 3
    ranks = np.arange(n_labels) % 3 + 1
    layer_of = lambda u: f"layer{u % 4 + 1}"  # noqa: E731
    ids = [label_id("bench", layer_of(int(u)), int(u), int(r)) for u, r in zip(units, ranks)]
    import pyarrow as pa

    con.register("n", pa.table({
        "model": ["bench"] * n_neurons, "layer": [layer_of(u) for u in range(n_neurons)],
        "unit": list(range(n_neurons)), "status": ["ok"] * n_neurons,
    }))
    con.execute("INSERT INTO neurons (model, layer, unit, status, reason, max_activation, interpretability) SELECT model, layer, unit, status, NULL, 1.0, 0.5 FROM n")
    con.register("l", pa.table({
        "label_id": ids, "layer": [layer_of(int(u)) for u in units], "unit": units.tolist(),
        "rank": ranks.tolist(), "text": [texts[i % len(texts)] for i in range(n_labels)],
    }))
    con.execute("INSERT INTO labels (label_id, model, layer, unit, rank, text, concept_score, interpretability) SELECT label_id, 'bench', layer, unit, rank, text, 1.0, 0.5 FROM l")
    con.execute("INSERT INTO models VALUES ('bench', 'bench', 'none', 0, 0, '{}')")
    for i in range(4):
        con.execute("INSERT INTO layers VALUES ('bench', ?, ?, 'conv', ?)", [f"layer{i + 1}", i, n_neurons // 4])
    con.execute("INSERT OR REPLACE INTO meta VALUES ('embedder', '\"minilm\"'), ('embedder_dim', '384')")
    insert_label_vectors(con, ids, vecs)
    con.close()
    return build_index(path)


def run(n_labels: int = 100_000, n_queries: int = 100) -> dict[str, str]:
    """Search latency through today's sentence-transformers query embedder
    (``search_p50_ms``, ``search_p95_ms``) and through the ONNX embedder the
    atlas carries (``..._onnx``), the two taking turns on each query."""
    from builder.atlas_embedder import carry_embedder

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        count = make_atlas(Path(tmp), n_labels)
        t_build = time.perf_counter() - t
        carry_embedder(tmp, "minilm")
        embedders = {"": get_embedder("minilm"), "_onnx": None}
        times: dict[str, list[float]] = {key: [] for key in embedders}
        with Atlas.open(tmp) as atlas:
            embedders["_onnx"] = atlas.embedder  # what the atlas carries
            for emb in embedders.values():
                atlas.embedder = emb
                atlas.search("warm up", k=10)
            for i in range(n_queries):
                q = QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}")
                for key, emb in embedders.items():
                    atlas.embedder = emb
                    t = time.perf_counter()
                    hits = atlas.search(q, k=10)
                    times[key].append(time.perf_counter() - t)
                    assert hits, "a search over a full atlas found nothing"
    out = {"search_labels": str(count), "search_atlas_build_s": f"{t_build:.1f}"}
    for key, ts in times.items():
        ms = np.array(ts) * 1000
        out[f"search_p50_ms{key}"] = f"{np.percentile(ms, 50):.2f}"
        out[f"search_p95_ms{key}"] = f"{np.percentile(ms, 95):.2f}"
    out["search_p50_ratio_st_vs_onnx"] = f"{np.percentile(times[''], 50) / np.percentile(times['_onnx'], 50):.2f}"
    return out
