"""Classifier finding on the synthetic world: a planted-model atlas, a labelled
folder of one-object scenes sorted by color, the protocol's tie averaging,
batch means, ``--json`` keys and one-line errors."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import tomli_w

from builder.commands.classify import add_classify_arguments, run_classify
from builder.evaluation.classifier import (
    TIE_EPS,
    NeuronScore,
    classify,
    classify_all,
    normalize_name,
    rank_neurons,
    summarize_scores,
)
from builder.synthetic.planted import PLANTED_CONCEPTS
from builder.synthetic.probe import write_probe_set
from builder.synthetic.world import COLORS, render, sample_scene
from query import cli
from query.errors import AtlasError

PER_CLASS = 20
RED_UNIT = PLANTED_CONCEPTS.index(("red",))
BLUE_UNIT = PLANTED_CONCEPTS.index(("blue",))


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    """A planted-model atlas built from 200 synthetic probe images."""
    from builder.config import load_config
    from builder.pipeline.run import build

    root = tmp_path_factory.mktemp("classify")
    probe = write_probe_set(root / "probe", n=200, seed=3, progress=False)
    cfg = {
        "out": str(root / "atlas"),
        "chunk_size": 4,
        "models": [{"name": "planted", "target": "planted", "probe": str(probe), "layers": ["detectors"]}],
        "dissect": {"similarity_options": {"target": "demo-cnn"}},
    }
    (root / "c.toml").write_text(tomli_w.dumps(cfg))
    build(load_config(root / "c.toml"))
    return root / "atlas"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """One sub-folder per color, each holding one-object scenes of that color,
    plus a corrupt file and an image outside every class folder."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(11)
    counts = dict.fromkeys(COLORS, 0)
    while min(counts.values()) < PER_CLASS:
        scene = sample_scene(rng, size=64, n_objects=1)
        color = scene.objects[0].color
        if counts[color] >= PER_CLASS:
            continue
        (root / color).mkdir(exist_ok=True)
        render(scene)[0].save(root / color / f"{counts[color]:03d}.png")
        counts[color] += 1
    (root / "red" / "broken.png").write_bytes(b"not a png")
    render(sample_scene(rng, size=64))[0].save(root / "loose.png")
    return root


def test_the_red_neuron_found_by_description_is_an_exact_classifier(atlas, labelled):
    res = classify(atlas, "Red", labelled, k=5)
    s = res.score
    assert s.class_name == "red"
    assert (s.n_positives, s.n_negatives) == (PER_CLASS, PER_CLASS * (len(COLORS) - 1))
    assert (res.run.n_skipped, res.run.n_unlabelled) == (1, 1)
    assert res.run.n_images == PER_CLASS * len(COLORS)
    assert len(s.candidates) >= 5
    sims = [c.similarity for c in s.candidates]
    # best first; neurons tied within TIE_EPS (equal descriptions) in unit order
    assert all(a >= b - TIE_EPS for a, b in zip(sims, sims[1:]))
    red = {c.unit: c for c in s.candidates if c.tied_top}
    assert RED_UNIT in red, "the planted red detector should share the top similarity"
    assert red[RED_UNIT].auroc > 0.99
    assert "red" in red[RED_UNIT].matched_label
    tied = [c.auroc for c in s.candidates if c.tied_top]
    assert s.n_tied == len(tied)
    assert s.protocol_auroc == pytest.approx(float(np.mean(tied)))
    assert s.protocol_auroc > 0.8
    assert s.oracle_auroc == max(c.auroc for c in s.candidates) > 0.99
    assert s.oracle_auroc >= s.protocol_auroc


def test_identical_descriptions_are_averaged(atlas, labelled, tmp_path):
    """The blue detector relabelled exactly like the red one: both tie at the
    top, and the protocol AUROC is their mean, not the lucky one's."""
    copy = tmp_path / "atlas"
    shutil.copytree(atlas, copy)
    con = duckdb.connect(str(copy / "atlas.duckdb"))
    try:
        (red_id,) = con.execute(
            "SELECT label_id FROM labels WHERE model = 'planted' AND layer = 'detectors' "
            "AND unit = ? AND rank = 1", [RED_UNIT]).fetchone()
        con.execute(
            "DELETE FROM label_vectors WHERE label_id IN (SELECT label_id FROM labels "
            "WHERE unit = ? AND rank > 1)", [BLUE_UNIT])
        con.execute("DELETE FROM labels WHERE unit = ? AND rank > 1", [BLUE_UNIT])
        con.execute(
            "UPDATE labels SET text = (SELECT text FROM labels WHERE label_id = ?) "
            "WHERE unit = ? AND rank = 1", [red_id, BLUE_UNIT])
        con.execute(
            "UPDATE label_vectors SET vec = (SELECT vec FROM label_vectors WHERE label_id = ?) "
            "WHERE label_id = (SELECT label_id FROM labels WHERE unit = ? AND rank = 1)",
            [red_id, BLUE_UNIT])
    finally:
        con.close()
    ranked = rank_neurons(copy, "red", k=1)
    assert {RED_UNIT, BLUE_UNIT} <= {r.unit for r in ranked}, "ties beyond k are kept"
    s = classify(copy, "red", labelled, k=1).score
    by_unit = {c.unit: c for c in s.candidates}
    assert by_unit[RED_UNIT].tied_top and by_unit[BLUE_UNIT].tied_top
    assert by_unit[RED_UNIT].similarity == by_unit[BLUE_UNIT].similarity
    assert by_unit[BLUE_UNIT].auroc < 0.5  # blue fires on negatives only
    tied = [c.auroc for c in s.candidates if c.tied_top]
    assert s.protocol_auroc == pytest.approx(float(np.mean(tied)))
    assert s.protocol_auroc < s.oracle_auroc == by_unit[RED_UNIT].auroc


def test_protocol_and_oracle_from_scores():
    def n(unit, sim, auc):
        return NeuronScore(unit + 1, "m", "l", unit, sim, "x", ("x",), auc, sim >= 0.9 - 1e-6)

    s = summarize_scores("c", "c", 3, 7, [n(0, 0.9, 0.8), n(1, 0.9 - 1e-7, 0.4), n(2, 0.9, math.nan),
                                          n(3, 0.5, 0.95)])
    assert s.n_tied == 3
    assert s.protocol_auroc == pytest.approx(0.6)  # undefined AUROCs are left out of the mean
    assert (s.oracle_auroc, s.oracle_neuron) == (0.95, "m/l/3")
    assert s.to_dict()["candidates"][2]["auroc"] is None


def test_batch_mode_runs_every_class_and_averages(atlas, labelled):
    batch = classify_all(atlas, labelled, k=5)
    assert [c.class_name for c in batch.classes] == sorted(COLORS)
    assert all(c.n_positives == PER_CLASS for c in batch.classes)
    assert batch.mean_protocol_auroc == pytest.approx(np.mean([c.protocol_auroc for c in batch.classes]))
    assert batch.mean_oracle_auroc == pytest.approx(np.mean([c.oracle_auroc for c in batch.classes]))
    assert all(c.oracle_auroc >= c.protocol_auroc for c in batch.classes)
    # every color has an exact planted detector, and descriptions find them far above chance
    assert batch.mean_oracle_auroc > 0.9
    assert batch.mean_protocol_auroc > 0.6
    single = classify(atlas, "red", labelled, k=5).score
    red = next(c for c in batch.classes if c.class_name == "red")
    assert red.protocol_auroc == pytest.approx(single.protocol_auroc)


def test_an_ensemble_of_identical_embedders_ranks_like_one(atlas):
    from query.embedder import model_path

    alone = rank_neurons(atlas, "red circle", k=4)
    ensemble = rank_neurons(atlas, "red circle", k=4,
                            text_embedders=["minilm", f"sentence:{model_path('minilm')}"])
    assert [r.key for r in ensemble] == [r.key for r in alone]
    assert [r.similarity for r in ensemble] == pytest.approx([r.similarity for r in alone], abs=1e-5)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_classify_arguments(p)
    return p.parse_args(list(argv))


def test_json_output(atlas, labelled, capsys):
    assert run_classify(_args(str(atlas), "red", "--images", str(labelled), "-k", "3", "--json")) == 0
    one = json.loads(capsys.readouterr().out)
    assert {"atlas", "images", "text_embedders", "k", "classes", "n_images", "n_skipped", "n_unlabelled",
            "record_seconds", "seconds", "seconds_per_1000_images", "concept", "class_name", "n_positives",
            "n_negatives", "top_similarity", "n_tied", "protocol_auroc", "oracle_auroc", "oracle_neuron",
            "candidates"} <= set(one)
    assert set(one["candidates"][0]) == {"rank", "model", "layer", "unit", "similarity", "matched_label",
                                         "labels", "auroc", "tied_top"}
    assert run_classify(_args(str(atlas), "--images", str(labelled), "--all-classes", "-k", "2",
                              "--json")) == 0
    batch = json.loads(capsys.readouterr().out)
    assert {"classes", "class_names", "n_classes", "mean_protocol_auroc", "mean_oracle_auroc"} <= set(batch)
    assert batch["n_classes"] == len(COLORS) == len(batch["classes"])
    assert batch["classes"][0]["candidates"]


def test_human_output(atlas, labelled, capsys):
    run_classify(_args(str(atlas), "red", "--images", str(labelled), "-k", "2"))
    out = capsys.readouterr().out
    assert "protocol AUROC" in out and "oracle AUROC" in out and "planted" in out
    run_classify(_args(str(atlas), "--images", str(labelled), "--all-classes", "-k", "2"))
    out = capsys.readouterr().out
    assert "mean protocol AUROC over 8 classes" in out


def test_class_names_ignore_case_and_separators():
    assert normalize_name("Red_Circle") == normalize_name("red-circle") == normalize_name(" red  circle ")


@pytest.mark.parametrize("argv, message", [
    (["dog"], "no class folder matches 'dog'.*classes: blue, cyan"),
    (["  "], "empty concept"),
    (["red", "--model", "nope"], "unknown model 'nope'; valid models: planted"),
    (["red", "--layer", "pooled"], "unknown layer 'pooled'; valid layers: detectors"),
    (["red", "-k", "0"], "k must be a positive integer"),
    (["red", "--all-classes"], "not both"),
    ([], "empty concept"),
])
def test_errors_are_one_line(atlas, labelled, argv, message):
    with pytest.raises(AtlasError, match=message) as exc:
        run_classify(_args(str(atlas), *argv, "--images", str(labelled)))
    assert "\n" not in str(exc.value)


def test_folder_errors(atlas, tmp_path):
    with pytest.raises(AtlasError, match="does not exist"):
        classify(atlas, "red", tmp_path / "missing")
    (tmp_path / "empty" / "red").mkdir(parents=True)
    (tmp_path / "empty" / "blue").mkdir()
    with pytest.raises(AtlasError, match="holds no image files"):
        classify(atlas, "red", tmp_path / "empty")
    flat = tmp_path / "flat" / "red"
    flat.mkdir(parents=True)
    render(sample_scene(np.random.default_rng(0)))[0].save(flat / "a.png")
    with pytest.raises(AtlasError, match="at least two classes; found 1 \\(red\\)"):
        classify(atlas, "red", flat.parent)
    broken = tmp_path / "broken"
    for c in ("red", "blue"):
        (broken / c).mkdir(parents=True)
        (broken / c / "x.png").write_bytes(b"junk")
    with pytest.raises(AtlasError, match="no readable labelled image"):
        classify(atlas, "red", broken)


def test_the_cli_prints_one_line_and_exits_2(atlas, labelled, monkeypatch, capsys):
    """Through ``dnd-atlas`` itself (``classify`` comes from its entry point)."""
    assert cli.main(["classify", str(atlas), "dog", "--images", str(labelled)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dnd-atlas: error: no class folder matches 'dog'")
    assert cli.main(["classify", str(atlas), "red", "--images", str(labelled), "-k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_name"] == "red"
