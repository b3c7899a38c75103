"""The dnd-atlas CLI: output contracts and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from query.cli import all_commands, format_table, main
from query.schema import DB_FILE, FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[3]

NEURONS = [
    {"model": "cnn", "layer": "conv1", "unit": 0, "labels": ["red striped circle", "stripes"]},
    {"model": "cnn", "layer": "conv1", "unit": 1, "labels": ["blue sky"]},
    {"model": "cnn", "layer": "conv2", "unit": 0, "labels": ["dog faces"]},
    {"model": "cnn", "layer": "conv2", "unit": 1, "labels": ["brick wall"], "status": "failed",
     "reason": "timeout"},
]


@pytest.fixture
def atlas_dir(make_atlas):
    return make_atlas(NEURONS)


def _one_error_line(capsys, needle):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dnd-atlas: error: ") and needle in lines[0]
    assert out == ""


def test_search_json_contract(atlas_dir, capsys):
    assert main(["search", str(atlas_dir), "circle", "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 2
    # the contract's keys, extended with the matched label's fidelity
    assert set(hits[0]) == {"model", "layer", "unit", "labels", "score", "similarity",
                            "matched_label", "fidelity_correlation", "fidelity_auprc"}
    assert (hits[0]["model"], hits[0]["layer"], hits[0]["unit"]) == ("cnn", "conv1", 0)
    assert hits[0]["labels"] == ["red striped circle", "stripes"]
    assert isinstance(hits[0]["similarity"], float) and isinstance(hits[0]["unit"], int)


def test_search_filters_and_table(atlas_dir, capsys):
    assert main(["search", str(atlas_dir), "dog", "--layer", "conv2", "--model", "cnn"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["#", "model", "layer", "unit", "similarity", "fidelity", "score", "matched",
                              "labels"]
    assert len(out) == 3  # header, rule, the one ok neuron of conv2
    assert out[2].split()[:4] == ["1", "cnn", "conv2", "0"]


def test_neuron_json_and_text(atlas_dir, capsys):
    assert main(["neuron", str(atlas_dir), "conv1", "0", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["model"] == "cnn" and rec["labels"][0]["text"] == "red striped circle"
    assert main(["neuron", str(atlas_dir), "conv2", "1", "--model", "cnn"]) == 0
    out = capsys.readouterr().out
    assert "cnn / conv2 / unit 1" in out and "failed" in out and "timeout" in out


def test_info(atlas_dir, capsys):
    assert main(["info", str(atlas_dir), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["totals"]["failed"] == 1 and s["totals"]["ok"] == 3
    assert main(["info", str(atlas_dir)]) == 0
    out = capsys.readouterr().out
    assert "4 units: 3 ok, 0 dead, 1 failed" in out and "model cnn" in out


@pytest.mark.parametrize("argv,needle", [
    (["search", "{missing}", "dog"], "no atlas at"),
    (["neuron", "{missing}", "conv1", "0"], "no atlas at"),
    (["info", "{missing}"], "no atlas at"),
    (["search", "{atlas}", "   "], "empty search query"),
    (["search", "{atlas}", "dog", "-k", "0"], "k must be a positive integer"),
    (["neuron", "{atlas}", "conv9", "0"], "valid layers: conv1, conv2"),
    (["search", "{atlas}", "dog", "--model", "x"], "valid models: cnn"),
])
def test_errors_are_one_line(atlas_dir, tmp_path, capsys, argv, needle):
    argv = [a.format(missing=tmp_path / "missing", atlas=atlas_dir) for a in argv]
    assert main(argv) == 2
    _one_error_line(capsys, needle)


def test_newer_format_version_is_one_line(atlas_dir, capsys):
    con = duckdb.connect(str(atlas_dir / DB_FILE))
    con.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", [str(FORMAT_VERSION + 5)])
    con.close()
    assert main(["info", str(atlas_dir)]) == 2
    _one_error_line(capsys, "newer than this dnd-atlas supports")


def test_usage_error_exits_2(capsys):
    assert main(["search"]) == 2
    assert main(["frobnicate"]) == 2
    assert main([]) == 2
    capsys.readouterr()


def test_keyboard_interrupt(monkeypatch, atlas_dir, capsys):
    from query.atlas import Atlas

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Atlas, "layers", boom)
    monkeypatch.setattr(Atlas, "summary", boom)
    assert main(["info", str(atlas_dir)]) == 130
    assert capsys.readouterr().err.strip() == "dnd-atlas: interrupted"


def test_commands_registered_once():
    names = [c.name for c in all_commands()]
    assert names[:3] == ["search", "neuron", "info"] and len(names) == len(set(names))
    # the builder's and the site's commands come from entry points, not from query
    assert {"build", "demo", "eval", "classify", "merge", "site", "serve"} <= set(names)


def test_format_table_aligns():
    text = format_table(["name", "n"], [("a", 1), ("long name", 1000), ("b", None)])
    lines = text.splitlines()
    assert lines[0] == "name          n"
    assert lines[2] == "a             1"
    assert lines[3] == "long name  1000"
    assert lines[4] == "b             -"


def test_subprocess_missing_atlas(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "query.cli", "search", str(tmp_path / "nope"), "dog"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"dnd-atlas: error: no atlas at {tmp_path / 'nope'} (missing {tmp_path / 'nope' / DB_FILE})"
    ]
