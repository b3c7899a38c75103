"""AtlasWriter's resume bookkeeping: which neurons a resume skips, and a
failed neuron's row kept until its retry replaces it."""

from __future__ import annotations

import duckdb

from query.writer import AtlasWriter, NeuronResult


def _rows(atlas) -> list[tuple]:
    con = duckdb.connect(str(atlas / "atlas.duckdb"), read_only=True)
    try:
        return con.execute("SELECT model, unit, status, reason FROM neurons ORDER BY model, unit").fetchall()
    finally:
        con.close()


def test_failed_neurons_are_not_done_and_keep_their_reason_until_replaced(tmp_path):
    with AtlasWriter(tmp_path) as w:
        w.write_neurons([
            NeuronResult("m", "l", 0, "ok", max_activation=1.0),
            NeuronResult("m", "l", 1, "dead", "constant activation over the probe set", 0.0),
            NeuronResult("m", "l", 2, "failed", "summarizer failed: HTTP 503", 2.0),
            NeuronResult("other", "l", 2, "failed", "elsewhere", 2.0),
        ])
        assert w.done_units("m") == {("l", 0), ("l", 1)}
        assert w.done_units("m", include_failed=True) == {("l", 0), ("l", 1), ("l", 2)}
        assert w.failed_units("m") == {("l", 2): "summarizer failed: HTTP 503"}

        w.write_neurons([NeuronResult("m", "l", 2, "failed", "summarizer failed: HTTP 500", 2.0)])
        assert w.failed_units("m") == {("l", 2): "summarizer failed: HTTP 500"}  # the latest reason
        w.write_neurons([NeuronResult("m", "l", 2, "ok", max_activation=2.0)])
        assert w.failed_units("m") == {} and w.done_units("m") == {("l", 0), ("l", 1), ("l", 2)}
    assert _rows(tmp_path) == [
        ("m", 0, "ok", None),
        ("m", 1, "dead", "constant activation over the probe set"),
        ("m", 2, "ok", None),
        ("other", 2, "failed", "elsewhere"),
    ]


def test_failed_units_come_in_layer_unit_order_whatever_the_write_order(tmp_path):
    with AtlasWriter(tmp_path) as w:
        for layer, unit in [("l2", 5), ("l1", 9), ("l2", 0), ("l1", 3)]:
            w.write_neurons([NeuronResult("m", layer, unit, "failed", f"r{layer}{unit}", 1.0)])
        assert list(w.failed_units("m")) == [("l1", 3), ("l1", 9), ("l2", 0), ("l2", 5)]
