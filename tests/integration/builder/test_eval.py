"""``dnd-atlas eval`` on a small synthetic-world atlas (planted detectors and
the demo CNN's output layer): every protocol, the evaluations table, the
``--json`` contract of the default synthetic output, ``--compare`` and the
site's home page showing the stored metrics."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest

from builder.commands.eval import add_eval_arguments, run_eval
from builder.synthetic.planted import PLANTED_CONCEPTS
from builder.synthetic.probe import write_probe_set
from builder.synthetic.world import COLORS, render, sample_scene
from query.errors import AtlasError
from query.evaluations import read_evaluations
from testkit.tiny_models import make_tiny_clip

SYNTHETIC_KEYS = {
    "final_layer": {"units", "match_rate", "exact_rate", "minilm_cos", "mpnet_cos"},
    "planted": {"single_units", "single_match_rate", "double_units", "double_match_rate"},
}
COLOR_UNITS = [PLANTED_CONCEPTS.index((c,)) for c in COLORS]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A pristine atlas (planted detectors + demo-cnn fc, 150 probe images);
    tests copy it when they write."""
    from builder.config import BuildConfig
    from builder.pipeline.run import build

    root = tmp_path_factory.mktemp("eval")
    probe = write_probe_set(root / "probe", n=150, seed=3, progress=False)
    cfg = BuildConfig.from_dict({
        "out": str(root / "atlas"),
        "chunk_size": 8,
        "models": [
            {"name": "planted", "target": "planted", "probe": str(probe), "layers": ["detectors"]},
            {"name": "cnn", "target": "demo-cnn", "probe": str(probe), "layers": ["fc"]},
        ],
        "dissect": {"similarity_options": {"target": "demo-cnn"}},
        "fidelity": {"sample_size": 80},  # leaves 70 probe images for the held-out sample of eval
    })
    build(cfg)
    return root / "atlas"


@pytest.fixture()
def atlas(built, tmp_path) -> Path:
    out = tmp_path / "atlas"
    shutil.copytree(built, out)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _run(capsys, *argv: str) -> str:
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    assert run_eval(p.parse_args(list(argv))) == 0
    return capsys.readouterr().out


def _rows(atlas: Path, protocol: str) -> dict[tuple[str, str, str], float | None]:
    return {(r["model"], r["layer"], r["metric"]): r["value"] for r in read_evaluations(atlas, protocol)}


def test_default_synthetic_json_keeps_its_keys_and_stores_rows(atlas, capsys):
    out = json.loads(_run(capsys, str(atlas), "--json", "--no-mpnet"))
    assert set(out) == {"final_layer", "planted", "protocols", "layers"}
    by_layer = {(la["model"], la["layer"]): la for la in out["layers"]}
    assert by_layer[("planted", "detectors")]["units"] == 18 and by_layer[("cnn", "fc")]["units"] == 18
    assert 0.5 < by_layer[("planted", "detectors")]["minilm_cos"] <= 1.0 + 1e-6
    for part, keys in SYNTHETIC_KEYS.items():
        assert set(out[part]) == keys
    assert out["protocols"] == ["synthetic"]
    assert out["final_layer"]["units"] == 18 and out["planted"]["single_units"] == 11
    assert out["planted"]["single_match_rate"] == 1.0
    rows = _rows(atlas, "synthetic")
    assert rows[("", "", "final_layer.match_rate")] == pytest.approx(out["final_layer"]["match_rate"])
    assert rows[("", "", "planted.single_match_rate")] == 1.0
    assert ("planted", "detectors", "match_rate") in rows and ("cnn", "fc", "match_rate") in rows
    assert rows[("planted", "detectors", "minilm_cos")] == pytest.approx(by_layer[("planted", "detectors")]["minilm_cos"])
    # --units adds the per-unit list; a rerun replaces the protocol's rows instead of adding
    again = json.loads(_run(capsys, str(atlas), "--json", "--no-mpnet", "--units"))
    assert len(again["units"]) == 36 and {"model", "layer", "unit", "labels", "match"} <= set(again["units"][0])
    assert _rows(atlas, "synthetic") == rows
    text = _run(capsys, str(atlas), "--no-mpnet")
    assert text.startswith("final layer (18 output units): match ")


def test_final_layer_with_ground_truth_and_a_class_names_file(atlas, clip_dir, tmp_path, capsys):
    out = json.loads(_run(capsys, str(atlas), "--protocol", "final-layer", "--clip-model", str(clip_dir),
                          "--json"))
    fl = out["final-layer"]
    (layer,) = fl["layers"]
    assert (layer["model"], layer["layer"], layer["class_names"]) == ("cnn", "fc", "ground-truth")
    assert layer["units"] == 18 and layer["labeled"] == 18
    for key in ("clip_cos", "mpnet_cos", "top1", "top5"):
        assert 0.0 < layer[key] <= 1.0 + 1e-6
    assert layer["top1"] <= layer["top5"]
    assert "per_unit" not in layer  # only with --units
    rows = _rows(atlas, "final-layer")
    assert rows[("cnn", "fc", "mpnet_cos")] == pytest.approx(layer["mpnet_cos"])
    assert rows[("", "", "top5")] == pytest.approx(fl["top5"])

    # the same class names from a file, and shuffled ones, which must score lower
    gt = [c[0] for c in json.loads(duckdb.connect(str(atlas / "atlas.duckdb"), read_only=True).execute(
        "SELECT value FROM meta WHERE key = 'ground_truth'").fetchone()[0])["cnn"]["fc"]["concepts"]]
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("\n".join(gt) + "\n")
    bad.write_text("\n".join(gt[1:] + gt[:1]) + "\n")
    same = json.loads(_run(capsys, str(atlas), "--protocol", "final-layer", "--clip-model", str(clip_dir),
                           "--class-names", str(good), "--model", "cnn", "--json", "--units"))["final-layer"]
    assert same["layers"][0]["class_names"] == "file"
    assert same["layers"][0]["clip_cos"] == pytest.approx(layer["clip_cos"], abs=1e-5)
    first = same["layers"][0]["per_unit"][0]
    assert (first["unit"], first["class_name"]) == (0, gt[0])
    worse = json.loads(_run(capsys, str(atlas), "--protocol", "final-layer", "--clip-model", str(clip_dir),
                            "--class-names", str(bad), "--model", "cnn", "--json"))["final-layer"]
    assert worse["mpnet_cos"] < layer["mpnet_cos"] - 0.2 and worse["top1"] < layer["top1"]
    # --no-clip --no-mpnet: nothing but counts, and the stored rows follow the latest run
    bare = json.loads(_run(capsys, str(atlas), "--protocol", "final-layer", "--no-clip", "--no-mpnet",
                           "--json"))["final-layer"]
    assert bare["clip_cos"] is None and bare["top1"] is None and bare["labeled"] == 18
    assert _rows(atlas, "final-layer")[("cnn", "fc", "clip_cos")] is None


def test_final_layer_errors_are_clear(atlas, tmp_path):
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\n")
    with pytest.raises(AtlasError, match="no layer has 3 units"):
        run_eval(p.parse_args([str(atlas), "--protocol", "final-layer", "--class-names", str(names),
                               "--no-clip", "--no-mpnet"]))
    with pytest.raises(AtlasError, match="has 18 units but there are 3 class names"):
        run_eval(p.parse_args([str(atlas), "--protocol", "final-layer", "--class-names", str(names),
                               "--layer", "fc", "--no-clip", "--no-mpnet"]))
    with pytest.raises(AtlasError, match="no atlas"):
        run_eval(p.parse_args([str(tmp_path / "nothing"), "--protocol", "final-layer"]))
    assert not (tmp_path / "nothing").exists()  # an error never creates an atlas


def test_cosy_planted_color_detectors_score_high(atlas, capsys):
    out = json.loads(_run(capsys, str(atlas), "--protocol", "cosy", "--json", "--units",
                          "--model", "planted"))["cosy"]
    (layer,) = out["layers"]
    assert (layer["model"], layer["layer"]) == ("planted", "detectors")
    auc = {pu["unit"]: pu["auc"] for pu in layer["per_unit"]}
    assert set(COLOR_UNITS) <= set(auc)
    assert all(auc[u] > 0.9 for u in COLOR_UNITS), {u: auc[u] for u in COLOR_UNITS}
    assert layer["auc_q1"] <= layer["auc_median"] <= layer["auc_q3"]
    assert len(layer["controls"]) == 10 and all(pu["n_controls"] >= 1 for pu in layer["per_unit"])
    # the build generated and recorded these labels' images already: the cache answers
    assert out["images_generated"] == 0 and out["images_recorded"] == 0
    rows = _rows(atlas, "cosy")
    assert rows[("planted", "detectors", "auc_mean")] == pytest.approx(layer["auc_mean"])
    assert rows[("", "", "units")] == 18
    stored = next(r for r in read_evaluations(atlas, "cosy") if r["metric"] == "auc_mean" and r["model"])
    assert len(stored["details"]["per_unit"]) == 18


def test_cosy_samples_units_and_generates_new_sizes(atlas, capsys):
    text = _run(capsys, str(atlas), "--protocol", "cosy", "--max-units", "3", "--images-per-label", "12",
                "--control-labels", "4")
    assert "cosy cnn/fc: 3 units" in text and "cosy planted/detectors: 3 units" in text
    assert "cosy overall: 6 units" in text and "12 images per label" in text
    assert " 0 images generated" not in text  # images 10 and 11 of each label are new
    rows = _rows(atlas, "cosy")
    assert rows[("", "", "units")] == 6
    assert 0.5 < rows[("", "", "auc_mean")] <= 1.0


def test_several_protocols_in_one_run(atlas, clip_dir, capsys):
    out = json.loads(_run(capsys, str(atlas), "--protocol", "synthetic", "--protocol", "final-layer",
                          "--no-mpnet", "--clip-model", str(clip_dir), "--json"))
    assert out["protocols"] == ["synthetic", "final-layer"]
    assert set(SYNTHETIC_KEYS) <= set(out) and out["final-layer"]["clip_cos"] is not None
    assert {r["protocol"] for r in read_evaluations(atlas)} == {"synthetic", "final-layer"}


def test_compare_two_atlases(atlas, built, tmp_path, capsys):
    # B: one planted color unit gets a wrong label 1
    b = tmp_path / "b"
    shutil.copytree(built, b)
    con = duckdb.connect(str(b / "atlas.duckdb"))
    con.execute("UPDATE labels SET text = 'triangle' WHERE model = 'planted' AND unit = ? AND rank = 1",
                [COLOR_UNITS[0]])
    con.close()
    out = json.loads(_run(capsys, "--compare", str(atlas), str(b), "--no-mpnet", "--json"))
    assert set(out) == {"a", "b", "metrics"}
    assert set(SYNTHETIC_KEYS) <= set(out["a"]) and set(SYNTHETIC_KEYS) <= set(out["b"])
    metrics = {name: (va, vb) for name, va, vb in out["metrics"]}
    va, vb = metrics["synthetic.planted.single_match_rate"]
    assert va == 1.0 and vb == pytest.approx(10 / 11)
    assert metrics["synthetic.final_layer.match_rate"][0] == metrics["synthetic.final_layer.match_rate"][1]
    text = _run(capsys, "--compare", str(atlas), str(b), "--no-mpnet")
    lines = text.splitlines()
    assert lines[0] == f"A = {atlas}" and lines[1] == f"B = {b}"
    row = next(line for line in lines if line.startswith("synthetic.planted.single_match_rate"))
    assert row.split()[1:] == ["1.000", "0.909", "-0.091"]
    assert lines[3].split() == ["metric", "A", "B", "B", "-", "A"]
    assert len({len(line) for line in lines[3:]}) == 1  # aligned: every row ends at the same column


def test_classifier_protocol(atlas, tmp_path, capsys):
    rng = np.random.default_rng(5)
    counts = {c: 0 for c in ("red", "blue", "green")}
    while min(counts.values()) < 6:
        scene = sample_scene(rng, size=64, n_objects=1)
        color = scene.objects[0].color
        if color in counts and counts[color] < 6:
            (tmp_path / "imgs" / color).mkdir(parents=True, exist_ok=True)
            render(scene)[0].save(tmp_path / "imgs" / color / f"{counts[color]}.png")
            counts[color] += 1
    out = json.loads(_run(capsys, str(atlas), "--protocol", "classifier", "--images", str(tmp_path / "imgs"),
                          "--model", "planted", "--json"))["classifier"]
    assert out["n_classes"] == 3 and 0.5 < out["mean_oracle_auroc"] <= 1.0
    rows = _rows(atlas, "classifier")
    assert rows[("", "", "mean_protocol_auroc")] == pytest.approx(out["mean_protocol_auroc"])
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    with pytest.raises(AtlasError, match="--images DIR"):
        run_eval(p.parse_args([str(atlas), "--protocol", "classifier"]))


def test_site_home_page_shows_evaluations(atlas, tmp_path, capsys):
    from atlas_site.build import build_site

    _run(capsys, str(atlas), "--no-mpnet")
    con = duckdb.connect(str(atlas / "atlas.duckdb"))
    con.execute("INSERT INTO evaluations VALUES ('cosy', '<b>evil</b>', '', 'auc_mean', 0.875, NULL, "
                "now()::TIMESTAMP)")
    con.close()
    site = build_site(atlas, tmp_path / "site")
    home = (site / "index.html").read_text()
    assert "Evaluations" in home
    assert "planted&#46;single&#95;match&#95;rate" in home or "planted.single_match_rate" in home
    assert "0.875" in home
    assert "<b>evil</b>" not in home


def test_fidelity_true_labels_beat_shuffled_and_random_on_held_out_images(atlas, capsys):
    out = json.loads(_run(capsys, str(atlas), "--protocol", "fidelity", "--sample-size", "60", "--units", "--json"))
    fid = out["fidelity"]
    assert fid["sample_images"] == 60
    layers = {(la["model"], la["layer"]): la for la in fid["layers"]}
    assert set(layers) == {("planted", "detectors"), ("cnn", "fc")}
    for la in layers.values():  # NeuronEval's sanity checks, on every ground-truth layer
        for metric in ("correlation", "auprc"):
            assert la[f"true_{metric}"] > la[f"shuffled_{metric}"]
            assert la[f"true_{metric}"] > la[f"random_{metric}"]
            assert la[f"label_{metric}"] > la[f"shuffled_{metric}"]
        assert la["units"] == len(la["per_unit"]) == 18
    rows = _rows(atlas, "fidelity")
    assert rows[("planted", "detectors", "label_correlation")] == pytest.approx(
        layers[("planted", "detectors")]["label_correlation"])
    assert rows[("", "", "label_auprc")] == pytest.approx(fid["label_auprc"])


def test_fidelity_compare_scores_wrong_labels_lower(atlas, built, tmp_path, capsys):
    b = tmp_path / "b"
    shutil.copytree(built, b)
    con = duckdb.connect(str(b / "atlas.duckdb"))
    con.execute("UPDATE labels SET text = 'triangle' WHERE model = 'planted' AND rank = 1")
    con.close()
    out = json.loads(_run(capsys, "--compare", str(atlas), str(b), "--protocol", "fidelity",
                          "--sample-size", "40", "--model", "planted", "--json"))
    metrics = {name: (va, vb) for name, va, vb in out["metrics"]}
    va, vb = metrics["fidelity.planted/detectors.label_correlation"]
    assert va > vb + 0.2


def test_fidelity_needs_held_out_images(tmp_path, atlas):
    """All probe images in the build's sample: no held-out image is left, and eval says so."""
    con = duckdb.connect(str(atlas / "atlas.duckdb"))
    cfg = json.loads(con.execute("SELECT value FROM meta WHERE key = 'build_config'").fetchone()[0])
    cfg["fidelity"]["sample_size"] = 500
    con.execute("UPDATE meta SET value = ? WHERE key = 'build_config'", [json.dumps(cfg)])
    con.close()
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    with pytest.raises(Exception, match="held-out"):
        run_eval(p.parse_args([str(atlas), "--protocol", "fidelity", "--no-save"]))
