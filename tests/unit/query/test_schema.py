"""Golden test of the atlas schema: changing a table without a migration fails here."""

import duckdb
import pytest

from query.errors import FormatVersionError
from query.schema import FORMAT_VERSION, current_version, label_id, migrate

EXPECTED = {
    "call_counts": [
        ("model", "VARCHAR"), ("layer", "VARCHAR"), ("unit", "INTEGER"), ("stage", "VARCHAR"),
        ("calls", "BIGINT"), ("cached", "BIGINT"),
    ],
    "candidates": [
        ("model", "VARCHAR"), ("layer", "VARCHAR"), ("unit", "INTEGER"), ("position", "INTEGER"),
        ("concept", "VARCHAR"), ("topk_squared", "DOUBLE"), ("image_products", "DOUBLE"),
        ("score", "DOUBLE"), ("selected_rank", "INTEGER"), ("samples", "VARCHAR"),
        ("fidelity_correlation", "DOUBLE"), ("fidelity_auprc", "DOUBLE"), ("source", "VARCHAR"),
    ],
    "captions": [
        ("caption_key", "VARCHAR"), ("source", "VARCHAR"), ("x0", "INTEGER"), ("y0", "INTEGER"),
        ("x1", "INTEGER"), ("y1", "INTEGER"), ("captioner", "VARCHAR"), ("text", "VARCHAR"),
    ],
    "evidence": [
        ("model", "VARCHAR"), ("layer", "VARCHAR"), ("unit", "INTEGER"), ("rank", "INTEGER"),
        ("source", "VARCHAR"), ("x0", "INTEGER"), ("y0", "INTEGER"), ("x1", "INTEGER"),
        ("y1", "INTEGER"), ("activation", "DOUBLE"), ("thumbnail", "VARCHAR"),
        ("caption_key", "VARCHAR"), ("source_thumbnail", "VARCHAR"), ("source_width", "INTEGER"),
        ("source_height", "INTEGER"), ("heatmap", "VARCHAR"),
    ],
    "label_vectors": [("label_id", "BIGINT"), ("vec", "FLOAT[]")],
    "labels": [
        ("label_id", "BIGINT"), ("model", "VARCHAR"), ("layer", "VARCHAR"), ("unit", "INTEGER"),
        ("rank", "INTEGER"), ("text", "VARCHAR"), ("concept_score", "DOUBLE"),
        ("interpretability", "DOUBLE"), ("fidelity_correlation", "DOUBLE"), ("fidelity_auprc", "DOUBLE"),
    ],
    "layers": [
        ("model", "VARCHAR"), ("layer", "VARCHAR"), ("position", "INTEGER"), ("kind", "VARCHAR"),
        ("n_units", "INTEGER"),
    ],
    "meta": [("key", "VARCHAR"), ("value", "VARCHAR")],
    "models": [
        ("model", "VARCHAR"), ("target", "VARCHAR"), ("probe", "VARCHAR"),
        ("n_probe_images", "INTEGER"), ("n_skipped_images", "INTEGER"), ("config", "VARCHAR"),
    ],
    "neurons": [
        ("model", "VARCHAR"), ("layer", "VARCHAR"), ("unit", "INTEGER"), ("status", "VARCHAR"),
        ("reason", "VARCHAR"), ("max_activation", "DOUBLE"), ("interpretability", "DOUBLE"),
        ("dropped_crops", "INTEGER"),
    ],
    "layer_fidelity": [
        ("model", "VARCHAR"), ("layer", "VARCHAR"), ("metric", "VARCHAR"), ("value", "DOUBLE"),
    ],
    "stage_times": [("model", "VARCHAR"), ("stage", "VARCHAR"), ("seconds", "DOUBLE")],
    "evaluations": [
        ("protocol", "VARCHAR"), ("model", "VARCHAR"), ("layer", "VARCHAR"), ("metric", "VARCHAR"),
        ("value", "DOUBLE"), ("details", "VARCHAR"), ("evaluated_at", "TIMESTAMP"),
    ],
}


def _columns(con):
    rows = con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
    ).fetchall()
    out: dict[str, list[tuple[str, str]]] = {}
    for table, column, dtype in rows:
        out.setdefault(table, []).append((column, dtype))
    return out


def test_schema_golden():
    con = duckdb.connect()
    assert migrate(con) == FORMAT_VERSION == 3
    assert _columns(con) == EXPECTED
    assert current_version(con) == FORMAT_VERSION


def test_migrate_is_idempotent_and_refuses_newer():
    con = duckdb.connect()
    migrate(con)
    assert migrate(con) == FORMAT_VERSION
    con.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", [str(FORMAT_VERSION + 1)])
    with pytest.raises(FormatVersionError, match="newer"):
        migrate(con)


def test_label_id_is_stable_and_63_bit():
    assert label_id("m", "layer1", 3, 1) == label_id("m", "layer1", 3, 1)
    assert label_id("m", "layer1", 3, 1) != label_id("m", "layer1", 3, 2)
    assert 0 <= label_id("m", "layer1", 3, 1) < 2**63


def test_a_version_1_atlas_is_migrated_in_order(tmp_path):
    from query.schema import MIGRATIONS

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    for stmt in MIGRATIONS[0]:
        con.execute(stmt)
    con.execute("INSERT INTO meta VALUES ('format_version', '1')")
    con.execute("INSERT INTO models VALUES ('m', 't', 'p', 1, 0, '{}')")
    assert current_version(con) == 1
    assert migrate(con) == 3
    assert con.execute("SELECT model FROM models").fetchall() == [("m",)]  # data kept
    assert "evaluations" in _columns(con) and "layer_fidelity" in _columns(con)
    assert ("fidelity_correlation", "DOUBLE") in _columns(con)["labels"]
