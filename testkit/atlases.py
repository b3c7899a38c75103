"""Atlases written straight with SQL, like datasette's fixtures: what the
query, site and server tests read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_atlas(
    atlas_dir: Path,
    embedder: Any,
    neurons: list[dict[str, Any]],
    sql: list[str] | tuple[str, ...] = (),
    meta: dict[str, Any] | None = None,
    index: bool = True,
) -> Path:
    """Write an atlas of ``neurons`` into ``atlas_dir``; returns it.

    ``neurons`` are dicts with ``model``, ``layer``, ``unit``, ``labels``
    (texts, rank order) and optional ``status``, ``reason``,
    ``max_activation``, ``interpretability``, ``scores`` (concept score per
    label). Models and layers rows are derived from them; ``sql`` statements
    run afterwards for anything else (candidates, evidence, ...). Label
    vectors come from ``embedder`` (its name goes into the meta as
    ``minilm`` unless ``meta`` says otherwise); ``index=False`` skips
    writing descriptions.faiss.
    """
    import duckdb

    from query.index import build_index, insert_label_vectors
    from query.schema import DB_FILE, label_id, migrate

    (atlas_dir / "images").mkdir(parents=True)
    con = duckdb.connect(str(atlas_dir / DB_FILE))
    try:
        migrate(con)
        meta_rows = {"embedder": "minilm", "embedder_dim": embedder.dim,
                     "build_config": {"fixture": True}, **(meta or {})}
        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        [(k, json.dumps(v)) for k, v in meta_rows.items()])
        layers: dict[tuple[str, str], int] = {}
        for n in neurons:
            key = (n["model"], n["layer"])
            layers[key] = max(layers.get(key, 0), n["unit"] + 1)
        for model in sorted({m for m, _ in layers}):
            con.execute("INSERT INTO models VALUES (?, 'fixture', 'probe', 10, 0, '{}')", [model])
        for pos, ((model, layer), n_units) in enumerate(layers.items()):
            con.execute("INSERT INTO layers VALUES (?, ?, ?, 'conv', ?)",
                        [model, layer, pos, n_units])
        ids, texts = [], []
        for n in neurons:
            con.execute(
                "INSERT INTO neurons (model, layer, unit, status, reason, max_activation, interpretability) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [n["model"], n["layer"], n["unit"], n.get("status", "ok"), n.get("reason"),
                 n.get("max_activation", 1.0), n.get("interpretability", 0.5)])
            scores = n.get("scores") or [1.0 - 0.1 * r for r in range(len(n["labels"]))]
            for rank, (text, score) in enumerate(zip(n["labels"], scores), 1):
                lid = label_id(n["model"], n["layer"], n["unit"], rank)
                con.execute("INSERT INTO labels (label_id, model, layer, unit, rank, text, concept_score, interpretability) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [lid, n["model"], n["layer"], n["unit"], rank, text, score, 0.5])
                ids.append(lid)
                texts.append(text)
        if ids:
            insert_label_vectors(con, ids, embedder.embed(texts))
        for stmt in sql:
            con.execute(stmt)
        if index:
            build_index(atlas_dir, con=con)
    finally:
        con.close()
    return atlas_dir


SPEC_TABLES = ("captions", "evidence", "candidates", "call_counts")


def write_spec_atlas(atlas_dir: Path, embedder: Any, spec: dict[str, Any]) -> Path:
    """Write the atlas a JSON-able ``spec`` describes into ``atlas_dir``; returns it.

    ``spec``: ``meta`` and ``neurons`` as :func:`write_atlas` takes them, and
    rows (dicts) for the tables of :data:`SPEC_TABLES`, inserted by column
    name (a column a row leaves out is NULL, and columns a later format adds
    keep their defaults). Every image a row names (evidence thumbnails,
    candidate samples) is written as a small WebP.
    """
    import duckdb
    import pyarrow as pa
    from PIL import Image

    from query.index import build_index
    from query.schema import DB_FILE

    write_atlas(atlas_dir, embedder, spec["neurons"], meta=spec.get("meta"), index=False)
    con = duckdb.connect(str(atlas_dir / DB_FILE))
    try:
        for table in SPEC_TABLES:
            if spec.get(table):
                con.register("spec_rows", pa.Table.from_pylist(spec[table]))
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM spec_rows")
                con.unregister("spec_rows")
    finally:
        con.close()
    build_index(atlas_dir)
    images = [r["thumbnail"] for r in spec.get("evidence", [])]
    images += [s for r in spec.get("candidates", []) for s in json.loads(r.get("samples") or "[]")]
    for i, rel in enumerate(dict.fromkeys(images)):
        path = atlas_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (60 * i % 256, 120, 200)).save(path)
    return atlas_dir


def search_hits(atlas_dir: Path, queries: list[str], k: int = 10, embedder: Any = None) -> list[list[dict]]:
    """Per query, ``Atlas.search``'s hits as dicts, through the atlas's own query
    embedder (its ONNX one when it carries one) or through ``embedder``."""
    from query import Atlas

    with Atlas.open(atlas_dir) as atlas:
        if embedder is not None:
            atlas.embedder = embedder
        return [[h.to_dict() for h in atlas.search(q, k=k)] for q in queries]


def hits_difference(a: list[list[dict]], b: list[list[dict]], tol: float = 1e-5) -> str | None:
    """``None`` when two runs of :func:`search_hits` found the same hits; else the first difference.

    The same means: as many hits, in the same order, with the same neuron,
    labels, score and matched label and a similarity within ``tol``, except
    that neurons tied to within ``tol`` may come in either order. Two neurons
    with the same label text are such a tie: their label vectors, embedded in
    different batches, differ by ~1e-7, so which comes first is float noise
    in any embedder. The last tie group is compared by its similarity only,
    since ``k`` may cut it at different members.
    """
    if len(a) != len(b):
        return f"{len(a)} queries vs {len(b)}"
    for q, (ha, hb) in enumerate(zip(a, b)):
        if len(ha) != len(hb):
            return f"query {q}: {len(ha)} hits vs {len(hb)}"
        for i, (h1, h2) in enumerate(zip(ha, hb)):
            if abs(h1["similarity"] - h2["similarity"]) > tol:
                return f"query {q}, hit {i}: similarity {h1['similarity']} vs {h2['similarity']}"
        ga, gb = _tie_groups(ha, tol), _tie_groups(hb, tol)
        if [len(g) for g in ga] != [len(g) for g in gb]:
            return f"query {q}: tie groups of sizes {[len(g) for g in ga]} vs {[len(g) for g in gb]}"
        for g1, g2 in list(zip(ga, gb))[:-1]:
            if g1 != g2:
                return f"query {q}: {g1} != {g2}"
    return None


def _tie_groups(hits: list[dict], tol: float) -> list[list[tuple]]:
    """Consecutive hits whose similarities are within ``tol`` of the previous one, each
    group as its sorted (model, layer, unit, labels, score, matched label) keys."""
    groups: list[list[dict]] = []
    for h in hits:
        if groups and abs(groups[-1][-1]["similarity"] - h["similarity"]) <= tol:
            groups[-1].append(h)
        else:
            groups.append([h])
    return [sorted((h["model"], h["layer"], h["unit"], tuple(h["labels"]), round(h["score"], 9)
                    if h["score"] is not None else None, h["matched_label"]) for h in g) for g in groups]
