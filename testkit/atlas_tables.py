"""Comparing atlases in tests: their content tables, floats rounded, and their digests."""

from __future__ import annotations

from pathlib import Path

import duckdb


_ORDERS = [
    ("neurons", "model, layer, unit"),
    ("labels", "label_id"),
    ("candidates", "model, layer, unit, position"),
    ("evidence", "model, layer, unit, rank"),
    ("captions", "caption_key"),
    ("layers", "model, layer"),
]


def tables(atlas: Path, models: tuple[str, ...] | None = None) -> dict[str, list[tuple]]:
    """The content tables, floats rounded to 4 places (optionally of some models only)."""
    con = duckdb.connect(str(atlas / "atlas.duckdb"), read_only=True)
    try:
        out = {}
        for table, order in _ORDERS:
            where = ""
            if models is not None and table != "captions":
                where = "WHERE model IN (" + ",".join(f"'{m}'" for m in models) + ")"
            rows = con.execute(f"SELECT * FROM {table} {where} ORDER BY {order}").fetchall()
            out[table] = [tuple(round(v, 4) if isinstance(v, float) else v for v in r) for r in rows]
        return out
    finally:
        con.close()


DIGEST_TABLES = ("neurons", "labels", "candidates", "evidence", "captions")
FLOAT_TOLERANCE = 1e-3  # on a float column's mean and mean absolute value
# A data: PNG of quantized floats (an activation heatmap): whether it is there, not its bytes.
PNG_COLUMNS = {"evidence": ("heatmap",)}


def table_digest(atlas: Path) -> dict[str, dict]:
    """Per content table: its row count, the sha256 (16 hex digits) of its
    rows with every float masked (texts, ranks, sources, boxes, nulls), and
    per float column its mean and mean absolute value: a fingerprint of what
    an atlas says that does not depend on the CPU's float rounding (another
    instruction set moves the 4th decimal of a few scores and the bytes of a
    few heatmaps, never which images, labels or captions there are)."""
    import hashlib
    import json

    con = duckdb.connect(str(atlas / "atlas.duckdb"), read_only=True)
    try:
        out = {}
        for table, order in _ORDERS:
            if table not in DIGEST_TABLES:
                continue
            cur = con.execute(f"SELECT * FROM {table} ORDER BY {order}")
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
            pngs = [i for i, n in enumerate(names) if n in PNG_COLUMNS.get(table, ())]
            masked = [tuple("<float>" if isinstance(v, float) else ("<png>" if i in pngs and v else v)
                            for i, v in enumerate(r)) for r in rows]
            floats = {}
            for i, name in enumerate(names):
                col = [v for r in rows if isinstance(v := r[i], float)]
                if col:
                    floats[name] = [round(sum(col) / len(col), 6), round(sum(map(abs, col)) / len(col), 6)]
            sha = hashlib.sha256(json.dumps(masked, default=str).encode()).hexdigest()[:16]
            out[table] = {"rows": len(rows), "content": sha, "floats": floats}
        return out
    finally:
        con.close()


def digest_differences(got: dict[str, dict], want: dict[str, dict]) -> list[str]:
    """What differs between two :func:`table_digest` results, one line each;
    float columns within :data:`FLOAT_TOLERANCE` count as equal."""
    lines = []
    for table in DIGEST_TABLES:
        g, w = got[table], want[table]
        for key in ("rows", "content"):
            if g[key] != w[key]:
                lines.append(f"{table}.{key}: {g[key]} != {w[key]}")
        for name in sorted(set(g["floats"]) | set(w["floats"])):
            a, b = g["floats"].get(name), w["floats"].get(name)
            if a is None or b is None or any(abs(x - y) > FLOAT_TOLERANCE for x, y in zip(a, b)):
                lines.append(f"{table}.{name} (mean, mean |x|): {a} != {b}")
    return lines


if __name__ == "__main__":  # python -m testkit.atlas_tables DEMO_DIR: print the digests of a demo folder
    import json
    import sys

    demo = Path(sys.argv[1])
    print(json.dumps({"dnd": table_digest(demo / "atlas"), "clip-dissect": table_digest(demo / "clip-dissect")},
                     indent=1))
