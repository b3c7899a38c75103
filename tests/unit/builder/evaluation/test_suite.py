"""The evaluation suite's pieces on fixed inputs: the evaluations table
(replace per protocol, v1 migration), final-layer targets and metric math
with stand-in embedders, the CoSy control pool, metric flattening and the
compare table."""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import pytest

from builder.commands.eval import _output, compare_table
from builder.errors import BuildError
from builder.evaluation import final_layer as eval_final_layer
from builder.evaluation.cosy import control_pool
from builder.evaluation.final_layer import evaluate_final_layer, find_targets, read_class_names
from builder.evaluation.suite import compare_metrics, flatten_metrics
from builder.evaluation.view import AtlasView, LayerRow
from query.errors import AtlasNotFound
from query.evaluations import EvalRow, read_evaluations, write_evaluations
from query.schema import DB_FILE, FORMAT_VERSION, MIGRATIONS


def _v1_atlas(folder: Path) -> Path:
    folder.mkdir()
    con = duckdb.connect(str(folder / DB_FILE))
    for stmt in MIGRATIONS[0]:
        con.execute(stmt)
    con.execute("INSERT INTO meta VALUES ('format_version', '1')")
    con.close()
    return folder


def test_write_migrates_a_v1_atlas_and_replaces_only_its_protocol(tmp_path):
    atlas = _v1_atlas(tmp_path / "a")
    assert read_evaluations(atlas) == []  # no table yet
    write_evaluations(atlas, "cosy", [EvalRow("m", "l", "auc_mean", 0.75, {"per_unit": [{"auc": math.nan}]}),
                                      EvalRow("", "", "units", 3)])
    write_evaluations(atlas, "synthetic", [EvalRow("", "", "planted.single_match_rate", 1.0)])
    write_evaluations(atlas, "cosy", [EvalRow("", "", "auc_mean", float("nan"))])
    rows = read_evaluations(atlas)
    assert [(r["protocol"], r["model"], r["layer"], r["metric"], r["value"]) for r in rows] == [
        ("cosy", "", "", "auc_mean", None),  # NaN is stored as NULL
        ("synthetic", "", "", "planted.single_match_rate", 1.0),
    ]
    con = duckdb.connect(str(atlas / DB_FILE), read_only=True)
    assert con.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()[0] == str(FORMAT_VERSION)
    con.close()


def test_details_are_strict_json_and_duplicates_refused(tmp_path):
    atlas = _v1_atlas(tmp_path / "a")
    write_evaluations(atlas, "cosy", [EvalRow("m", "l", "auc_mean", 0.5,
                                              {"per_unit": [{"auc": math.nan, "n": np.int64(3)}]})])
    (row,) = read_evaluations(atlas, "cosy")
    assert row["details"] == {"per_unit": [{"auc": None, "n": 3}]}
    with pytest.raises(ValueError, match="duplicate"):
        write_evaluations(atlas, "cosy", [EvalRow("m", "l", "x", 1.0), EvalRow("m", "l", "x", 2.0)])
    assert len(read_evaluations(atlas, "cosy")) == 1  # nothing half-written


def test_write_refuses_a_missing_atlas(tmp_path):
    with pytest.raises(AtlasNotFound, match="no atlas"):
        write_evaluations(tmp_path / "none", "cosy", [])
    assert not (tmp_path / "none").exists()


def _view(models=None, layers=(), labels=None, gt=None) -> AtlasView:
    labels = labels or {}
    return AtlasView(Path("/nonexistent"), {"ground_truth": gt or {}}, models or {}, tuple(layers), labels,
                     {k: i for i, k in enumerate(labels)})


def test_torchvision_weights_give_imagenet_class_names_without_download():
    view = _view(
        models={"r": {"target": "resnet18", "config": {"target": "resnet18",
                                                        "target_options": {"weights": "IMAGENET1K_V1"}}}},
        layers=[LayerRow("r", "layer4", 0, 512), LayerRow("r", "fc", 1, 1000)],
    )
    (t,) = find_targets(view)
    assert (t.model, t.layer, len(t.class_names)) == ("r", "fc", 1000)
    assert t.class_names[0] == "tench" and t.source.startswith("torchvision:")
    plain = _view(models={"r": {"target": "resnet18", "config": {"target": "resnet18"}}},
                  layers=[LayerRow("r", "fc", 0, 1000)])
    with pytest.raises(BuildError, match="--class-names FILE"):
        find_targets(plain)


def test_class_names_pick_the_last_layer_of_matching_size(tmp_path):
    f = tmp_path / "names.txt"
    f.write_text("  cat\n\ndog \nbird\n")
    assert read_class_names(f) == ["cat", "dog", "bird"]
    view = _view(layers=[LayerRow("m", "a", 0, 3), LayerRow("m", "b", 1, 5), LayerRow("m", "c", 2, 3),
                         LayerRow("n", "x", 0, 4)])
    assert [(t.model, t.layer) for t in find_targets(view, ["cat", "dog", "bird"])] == [("m", "c")]
    assert [t.layer for t in find_targets(view, ["cat", "dog", "bird"], layer="a")] == ["a"]
    with pytest.raises(BuildError, match="no model 'zz'"):
        find_targets(view, ["cat"], model="zz")


def test_final_layer_metrics_with_stand_in_embedders(monkeypatch):
    # 2-d "embeddings": each text an angle; the label of unit 2 is nearest to another class
    angle = {"cat": 0.0, "dog": 1.0, "bird": 2.0, "kitten": 0.1, "puppy": 1.2, "sparrow": 1.4}

    def embed(texts):
        return np.array([[math.cos(angle[t]), math.sin(angle[t])] for t in texts], dtype=np.float32)

    monkeypatch.setattr(eval_final_layer, "_clip_texts", lambda model, device: embed)
    monkeypatch.setattr(eval_final_layer, "_mpnet_texts", lambda: embed)
    view = _view(layers=[LayerRow("m", "fc", 0, 3)],
                 labels={("m", "fc", 0): "kitten", ("m", "fc", 1): "puppy", ("m", "fc", 2): "sparrow"},
                 gt={"m": {"fc": {"role": "output", "concepts": [["cat"], ["dog"], ["bird"]]}}})
    result, rows = evaluate_final_layer(view, clip_model="stand-in")
    (layer,) = result["layers"]
    cos = [math.cos(0.1), math.cos(0.2), math.cos(0.6)]
    assert layer["mpnet_cos"] == pytest.approx(np.mean(cos), abs=1e-6)
    assert layer["clip_cos"] == pytest.approx(np.mean(cos), abs=1e-6)
    assert [pu["rank"] for pu in layer["per_unit"]] == [0, 0, 1]  # sparrow is nearest to dog
    assert layer["top1"] == pytest.approx(2 / 3) and layer["top5"] == 1.0
    stored = {(r.model, r.layer, r.metric): r.value for r in rows}
    assert stored[("m", "fc", "top1")] == pytest.approx(2 / 3) and stored[("", "", "labeled")] == 3


def test_control_pool_spreads_over_text_space():
    vecs = np.array([[1, 0], [0.99, 0.14], [0, 1], [-1, 0], [0.7, 0.7]], dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    texts = list("abcde")
    picked = control_pool(texts, vecs, 3, seed=0)
    assert len(set(picked)) == 3
    # whatever the start, the two near-duplicates a and b are never both picked
    for seed in range(5):
        assert not {0, 1} <= set(control_pool(texts, vecs, 3, seed))
    assert control_pool(texts[:2], vecs[:2], 3, seed=0) == [0, 1]


def test_flatten_and_compare():
    a = {"final-layer": {"units": 3, "top1": 0.5, "mpnet": True, "clip_model": "x",
                         "layers": [{"model": "m", "layer": "fc", "top1": 0.5, "per_unit": [{"rank": 0}]}]},
         "classifier": {"mean_protocol_auroc": float("nan"), "record_seconds": 2.0}}
    assert flatten_metrics(a) == [
        ("final-layer.units", 3.0), ("final-layer.top1", 0.5), ("final-layer.m/fc.top1", 0.5),
        ("classifier.mean_protocol_auroc", None),
    ]
    b = {"final-layer": {"units": 3, "top1": 0.75, "extra": 1}}
    assert compare_metrics(a, b) == [
        ["final-layer.units", 3.0, 3.0], ["final-layer.top1", 0.5, 0.75], ["final-layer.m/fc.top1", 0.5, None],
        ["classifier.mean_protocol_auroc", None, None], ["final-layer.extra", None, 1.0],
    ]
    table = compare_table(compare_metrics(a, b), "A_DIR", "B_DIR").splitlines()
    assert table[:2] == ["A = A_DIR", "B = B_DIR"]
    assert len({len(line) for line in table[3:]}) == 1
    assert table[5].split() == ["final-layer.top1", "0.500", "0.750", "+0.250"]
    assert table[6].split() == ["final-layer.m/fc.top1", "0.500", "-", "-"]


def test_json_output_keeps_the_synthetic_keys_at_the_top():
    syn = {"final_layer": {"units": 1}, "planted": {"single_units": 0}, "units": [{"unit": 0}]}
    out = _output({"synthetic": syn, "cosy": {"auc_mean": 0.9, "layers": [{"per_unit": [1]}]}}, units=False)
    assert out == {"final_layer": {"units": 1}, "planted": {"single_units": 0},
                   "cosy": {"auc_mean": 0.9, "layers": [{}]}, "protocols": ["synthetic", "cosy"]}
    assert _output({"synthetic": syn}, units=True)["units"] == [{"unit": 0}]
