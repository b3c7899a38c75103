"""Comparing atlases in tests: their content tables, floats rounded."""

from __future__ import annotations

from pathlib import Path

import duckdb


def tables(atlas: Path, models: tuple[str, ...] | None = None) -> dict[str, list[tuple]]:
    """The content tables, floats rounded to 4 places (optionally of some models only)."""
    con = duckdb.connect(str(atlas / "atlas.duckdb"), read_only=True)
    try:
        out = {}
        for table, order in [
            ("neurons", "model, layer, unit"),
            ("labels", "label_id"),
            ("candidates", "model, layer, unit, position"),
            ("evidence", "model, layer, unit, rank"),
            ("captions", "caption_key"),
            ("layers", "model, layer"),
        ]:
            where = ""
            if models is not None and table != "captions":
                where = "WHERE model IN (" + ",".join(f"'{m}'" for m in models) + ")"
            rows = con.execute(f"SELECT * FROM {table} {where} ORDER BY {order}").fetchall()
            out[table] = [tuple(round(v, 4) if isinstance(v, float) else v for v in r) for r in rows]
        return out
    finally:
        con.close()


DIGEST_TABLES = ("neurons", "labels", "candidates", "evidence", "captions")


def table_digest(atlas: Path) -> dict[str, list]:
    """Per content table: [row count, sha256 (16 hex digits) of its rows,
    floats rounded to 4 places]: a fingerprint of what an atlas says."""
    import hashlib
    import json

    content = tables(atlas)
    return {t: [len(content[t]), hashlib.sha256(json.dumps(content[t], default=str).encode()).hexdigest()[:16]]
            for t in DIGEST_TABLES}


if __name__ == "__main__":  # python -m testkit.atlas_tables DEMO_DIR: print the digests of a demo folder
    import json
    import sys

    demo = Path(sys.argv[1])
    print(json.dumps({"dnd": table_digest(demo / "atlas"), "clip-dissect": table_digest(demo / "clip-dissect")},
                     indent=1))
