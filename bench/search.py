"""Search latency over a 100,000-label atlas (``run``) and a 1M-label one (``run_large``).

The 100k atlas is written straight with SQL (like the test fixtures): 2,000 real
label texts are embedded with the default embedder and each is spread into
50 nearby vectors (small noise, renormalized), so the index holds 100,000
distinct vectors. Each timed query goes through ``Atlas.search``: embedding
the query, the FAISS search and the DuckDB lookups of the hits; once with
today's sentence-transformers embedder and once with the ONNX embedder the
atlas carries (exported into it, as a build does), taking turns.

The 1M atlas (``python -m bench --only search_1m``) is written as two 500k
shards (10,000 label-like phrases from the shipped concept vocabulary, each
spread into ~100 noisy vectors; 3 labels per neuron, 1 neuron in 50 dead, a
small second model holding 1/100 of the neurons), each carrying the ONNX
embedder as a build's shard does, merged with ``query.merge.merge_atlases``
(which keeps one copy of the embedder), re-indexed, searched, then re-indexed
exact (``kind="flat"``) to measure recall against exact search over the same
vectors. Queries are embedded by what the atlas carries (onnxruntime), as
``dnd-atlas search`` does; ``..._st_embedder`` lines time the same searches
with the sentence-transformers embedder that reads atlases built without one.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from query import Atlas
from query.embedder import get_embedder
from query.index import build_index, insert_label_vectors
from query.schema import DB_FILE, INDEX_FILE, label_id, migrate

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


# -- the 1M-label run -----------------------------------------------------------------

LARGE_LABELS = 1_000_000
WRITE_CHUNK = 100_000  # label vectors made and inserted at a time
FIDELITY_FILTER = 0.5  # the min_fidelity of the bench's fidelity-filtered run
FILTERS = (("layer", {"model": "bench", "layer": "layer2"}), ("small", {"model": "bench-small"}),
           ("fidelity", {"min_fidelity": FIDELITY_FILTER}))
LARGE_TEXTS = 10_000  # distinct phrases embedded; each is spread into ~100 noisy label vectors
FORMS = ("{a} {b}", "{a} and {b}", "{a} on {b}", "{a} with {b}", "close-up of {a}", "{a} texture",
         "{a} in {b}", "{a}")


def label_phrases(n: int, seed: int) -> list[str]:
    """``n`` distinct label-like phrases built from the shipped concept vocabulary
    (objects, scenes, materials, colors...), so that a large bench atlas is not a
    handful of tight clusters (which flatters approximate indexes)."""
    import random

    from builder.data_files import data_path

    concepts = [line.strip() for line in data_path("concepts", "common-visual.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    rnd = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        out[rnd.choice(FORMS).format(a=rnd.choice(concepts), b=rnd.choice(concepts))] = None
    return list(out)


def _large_neuron(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(model, layer, unit) of global neuron numbers ``g``: 1 in 100 belongs to the
    small model ``bench-small`` (a selective filter), the rest to 4 layers of ``bench``."""
    small = g % 100 == 99
    model = np.where(small, "bench-small", "bench")
    layer = np.where(small, "head", np.char.add("layer", (g % 4 + 1).astype(str)))
    unit = np.where(small, g // 100, g // 4)
    return model, layer, unit


def write_large_atlas(path: Path, texts: list[str], base: np.ndarray, n_labels: int,
                      neurons: range, seed: int = 0) -> int:
    """Write an atlas holding the labels of global neurons ``neurons`` (3 labels each;
    label ``i`` of the whole set is phrase ``i * 7919 % len(texts)`` plus noise; 1 neuron
    in 50 is dead but keeps its labels, so the status filter matters). A complete
    shard atlas: ``query.merge.merge_atlases`` accepts it. Returns the label count.
    Vectors are made and inserted in chunks, so memory stays far below the atlas size."""
    path.mkdir(parents=True, exist_ok=True)
    g = np.arange(neurons.start, neurons.stop)
    i = np.arange(3 * neurons.start, min(3 * neurons.stop, n_labels))
    lm, ll, lu = _large_neuron(i // 3)
    rank = i % 3 + 1
    ids = np.fromiter((label_id(m, la, int(u), int(r)) for m, la, u, r in zip(lm, ll, lu, rank)),
                      dtype=np.int64, count=len(i))
    phrase = i * 7919 % len(texts)
    con = duckdb.connect(str(path / DB_FILE))
    try:
        migrate(con)
        _write_large_meta(con, n_labels, base.shape[1])
        model, layer, unit = _large_neuron(g)
        con.register("n_in", pa.table({"model": model, "layer": layer, "unit": unit.astype(np.int32),
                                       "status": np.where(g % 50 == 7, "dead", "ok")}))
        con.execute("INSERT INTO neurons (model, layer, unit, status, reason, max_activation, interpretability) "
                    "SELECT model, layer, unit, status, NULL, 1.0, 0.5 FROM n_in")
        con.register("t_in", pa.table({"j": np.arange(len(texts)), "text": texts}))
        con.register("l_in", pa.table({"label_id": ids, "model": lm, "layer": ll, "unit": lu.astype(np.int32),
                                       "rank": rank.astype(np.int32), "j": phrase,
                                       "score": 1.0 - 0.1 * rank, "fidelity": large_fidelity(i)}))
        con.execute("INSERT INTO labels (label_id, model, layer, unit, rank, text, concept_score, interpretability, "
                    "fidelity_correlation) SELECT label_id, model, layer, unit, rank, t.text, score, 0.5, fidelity "
                    "FROM l_in JOIN t_in t USING (j)")
        for name in ("n_in", "t_in", "l_in"):
            con.unregister(name)
        rng = np.random.default_rng(seed + neurons.start)
        for s in range(0, len(ids), WRITE_CHUNK):
            vecs = base[phrase[s:s + WRITE_CHUNK]]
            vecs += rng.standard_normal(vecs.shape, dtype=np.float32) * np.float32(0.03)
            insert_label_vectors(con, ids[s:s + WRITE_CHUNK], vecs)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return len(ids)


def large_fidelity(i: np.ndarray) -> pa.Array:
    """Fidelity correlation of labels ``i``: spread over [-0.2, 1.0) by a hash of
    the label number, NULL for 1 label in 20 (labels a build could not score);
    ``min_fidelity=FIDELITY_FILTER`` keeps ~40% of them."""
    r = (i * 2654435761 % 1000) / 1000 * 1.2 - 0.2
    return pa.array(r, mask=i % 20 == 3, type=pa.float64())


def _write_large_meta(con: duckdb.DuckDBPyConnection, n_labels: int, dim: int) -> None:
    """meta, models and layers rows of a large bench atlas (the same in every shard)."""
    fingerprint = {"models": [{"name": "bench"}, {"name": "bench-small"}], "bench": "search-1m"}
    meta = {"embedder": "minilm", "embedder_dim": dim, "labeler": "bench",
            "build_fingerprint": fingerprint, "build_config": {"bench": True}}
    con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [(k, json.dumps(v)) for k, v in meta.items()])
    n_neurons = -(-n_labels // 3)
    con.execute("INSERT INTO models VALUES ('bench', 'bench', 'none', 0, 0, '{}'), "
                "('bench-small', 'bench', 'none', 0, 0, '{}')")
    for pos in range(4):
        con.execute("INSERT INTO layers VALUES ('bench', ?, ?, 'conv', ?)",
                    [f"layer{pos + 1}", pos, -(-n_neurons // 4)])
    con.execute("INSERT INTO layers VALUES ('bench-small', 'head', 0, 'linear', ?)", [-(-n_neurons // 100)])


def _rss_mb() -> float:
    """Resident memory of this process now (Linux), in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed_searches(atlas: Atlas, queries: list[str], **kw: object) -> tuple[np.ndarray, list[list[tuple]]]:
    """Milliseconds per ``atlas.search`` call and the neurons each returned."""
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = atlas.search(q, k=10, **kw)
        times.append(time.perf_counter() - t)
        found.append([(h.model, h.layer, h.unit) for h in hits])
    return np.array(times) * 1000, found


def _embed_ms(embedder: object, queries: list[str]) -> float:
    """Median milliseconds to embed one query with ``embedder``."""
    times = []
    for q in queries:
        t = time.perf_counter()
        embedder.embed([q])  # type: ignore[attr-defined]
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def _recall(approx: list[list[tuple]], exact: list[list[tuple]]) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact) if e]))


def _search_runs(atlas_dir: Path, queries: list[str], vectors: dict[str, np.ndarray]) -> dict[str, object]:
    """Latency (with and without query embedding) and results: unfiltered, one
    layer (1/4 of the labels) and the small model (1/100). Embedding is skipped
    by answering ``_embed_query`` from ``vectors``, embedded beforehand."""
    out: dict[str, object] = {}
    rss0 = _rss_mb()
    with Atlas.open(atlas_dir) as atlas:
        t = time.perf_counter()
        atlas.search(queries[0], k=10)  # loads the index and the label map
        out["first_s"] = time.perf_counter() - t
        out["rss_mb"] = _rss_mb() - rss0
        out["ms"], out["found"] = _timed_searches(atlas, queries)
        carried = out["embedder"] = atlas.embedder
        out["embed_ms"] = _embed_ms(carried, queries)
        atlas.embedder = get_embedder("minilm")  # what reads an atlas that carries no embedder
        atlas.search(queries[0], k=10)
        out["ms_st"], _ = _timed_searches(atlas, queries)
        atlas.embedder = carried
        atlas._embed_query = vectors.__getitem__  # bench: FAISS + mapping alone
        out["ms_no_embed"], _ = _timed_searches(atlas, queries)
        for name, kw in FILTERS:
            atlas.search(queries[0], k=10, **kw)  # builds and caches the filter's selector once
            out[f"ms_{name}"], out[f"found_{name}"] = _timed_searches(atlas, queries, **kw)
        out["meta"] = atlas.meta
    return out


def run_large(n_labels: int = LARGE_LABELS, n_queries: int = 100) -> dict[str, str]:
    """The 1M-label run: two 500k-label shards written, merged with
    ``query.merge.merge_atlases`` (which rebuilds the index), the index rebuilt
    once more on its own, then searches timed and compared with exact search
    (the same atlas re-indexed with ``kind="flat"``)."""
    from builder.atlas_embedder import carry_embedder
    from query.merge import merge_atlases

    embedder = get_embedder("minilm")  # loading it is not timed
    texts = label_phrases(LARGE_TEXTS, seed=0)
    t = time.perf_counter()
    base = embedder.embed(texts)
    t_embed = time.perf_counter() - t
    queries = (QUERIES + label_phrases(n_queries, seed=1))[:n_queries]
    vectors = dict(zip(queries, embedder.embed(queries)))
    n_neurons = -(-n_labels // 3)
    half = n_neurons // 2
    with tempfile.TemporaryDirectory(prefix="dnd-search-1m-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        written = sum(write_large_atlas(root / f"shard{i}", texts, base, n_labels, r)
                      for i, r in enumerate((range(half), range(half, n_neurons))))
        t_write = time.perf_counter() - t
        for i in range(2):  # as a build's shard does (a hard-linked copy of the export cache)
            carry_embedder(root / f"shard{i}", "minilm")
        peak_write = _peak_rss_mb()
        t = time.perf_counter()
        merge_atlases(root / "atlas", [root / "shard0", root / "shard1"])
        t_merge = time.perf_counter() - t
        peak_merge = _peak_rss_mb()
        for i in range(2):
            shutil.rmtree(root / f"shard{i}")
        atlas_dir = root / "atlas"
        t = time.perf_counter()
        count = build_index(atlas_dir)
        t_index = time.perf_counter() - t
        peak_index = _peak_rss_mb()
        sizes = {f.name: f.stat().st_size / 2**20 for f in atlas_dir.iterdir() if f.is_file()}
        approx = _search_runs(atlas_dir, queries, vectors)
        peak_search = _peak_rss_mb()
        t = time.perf_counter()
        build_index(atlas_dir, kind="flat")
        t_flat = time.perf_counter() - t
        exact = _search_runs(atlas_dir, queries, vectors)
    meta = approx["meta"]
    res = {
        "search_labels_1m": str(count),
        "search_index_type_1m": f"{meta.get('index_type')} {json.dumps(meta.get('index_params'), sort_keys=True)}",
        "search_p50_ms_1m": f"{np.percentile(approx['ms'], 50):.2f}",
        "search_p95_ms_1m": f"{np.percentile(approx['ms'], 95):.2f}",
        "search_p50_ms_1m_no_embed": f"{np.percentile(approx['ms_no_embed'], 50):.2f}",
        "search_p95_ms_1m_no_embed": f"{np.percentile(approx['ms_no_embed'], 95):.2f}",
        "search_embed_ms_1m": f"{approx['embed_ms']:.2f} ({type(approx['embedder']).__name__})",
        "search_p50_ms_1m_st_embedder": f"{np.percentile(approx['ms_st'], 50):.2f}",
        "search_p95_ms_1m_st_embedder": f"{np.percentile(approx['ms_st'], 95):.2f}",
        "search_recall_at_10_1m": f"{_recall(approx['found'], exact['found']):.3f}",
    }
    for name, share in (("layer", "1/4"), ("small", "1/100"), ("fidelity", f"min_fidelity {FIDELITY_FILTER}, ~2/5")):
        res[f"search_p50_ms_1m_{name}_filter"] = f"{np.percentile(approx[f'ms_{name}'], 50):.2f} ({share} of labels)"
        res[f"search_recall_at_10_1m_{name}_filter"] = f"{_recall(approx[f'found_{name}'], exact[f'found_{name}']):.3f}"
    res.update({
        "search_p50_ms_1m_exact": f"{np.percentile(exact['ms'], 50):.2f}",
        "search_p50_ms_1m_exact_no_embed": f"{np.percentile(exact['ms_no_embed'], 50):.2f}",
        "search_first_query_s_1m": f"{approx['first_s']:.2f}",
        "atlas_write_s_1m": f"{t_write:.1f}",
        "index_build_s_1m": f"{t_index:.1f}",
        "index_build_s_1m_flat": f"{t_flat:.1f}",
        "merge_s_1m": f"{t_merge:.1f}",
        "label_embed_s_1m": f"{t_embed:.1f} ({len(texts)} phrases)",
        "atlas_duckdb_mb_1m": f"{sizes.get(DB_FILE, 0):.0f}",
        "index_file_mb_1m": f"{sizes.get(INDEX_FILE, 0):.0f}",
        "search_rss_mb_1m": f"{approx['rss_mb']:.0f} (index + label map + DuckDB, opened atlas)",
        "peak_rss_mb_1m": f"write {peak_write:.0f}, merge {peak_merge:.0f}, index {peak_index:.0f}, "
                          f"search {peak_search:.0f}",
    })
    if written != count:
        raise RuntimeError(f"wrote {written} labels but indexed {count}")
    return res
