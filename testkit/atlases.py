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
