"""The CLIP-Dissect baseline labeler: SoftWPMI goldens, a build of the
planted model with the caption stand-in for CLIP, a build through a tiny
random CLIP on the real-CLIP path, and resume."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pytest

from builder.config import BuildConfig, ClipDissectConfig
from builder.errors import BuildError
from builder.evaluation.synthetic import evaluate_synthetic
from builder.pipeline.clip_dissect import (
    concept_probabilities,
    load_concepts,
    soft_membership,
    soft_wpmi,
    top_images,
)
from builder.pipeline.run import build
from builder.synthetic.probe import write_probe_set
from query import Atlas

N_PROBE = 200


# -- SoftWPMI goldens --------------------------------------------------------------


def test_soft_membership_is_linear_from_p_start():
    assert soft_membership(4, 0.998, 0.97).tolist() == pytest.approx([0.998, 0.991, 0.984, 0.977])
    assert soft_membership(100)[0] == 0.998 and soft_membership(100)[-1] == pytest.approx(0.97028)


def test_top_images_breaks_ties_by_image_index():
    acts = np.array([[1.0, 0.0], [3.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
    assert top_images(acts, 3).tolist() == [[1, 2, 3], [0, 1, 2]]


def test_soft_wpmi_golden():
    # 3 images x 2 concepts, 2 units; top_k 2 so membership is (0.9, 0.8)
    p = np.log(np.array([[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]]))  # softmax(1 * p) gives these rows back
    acts = np.array([[3.0, 0.0], [2.0, 1.0], [1.0, 2.0]])  # unit 0: images 0, 1; unit 1: images 2, 1
    params = ClipDissectConfig(top_k=2, a=1.0, lam=1.0, p_start=0.9, p_end=0.7, eps=0.0)
    assert concept_probabilities(p, 1.0) == pytest.approx(np.array([[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]]))
    got = soft_wpmi(p, acts, params)
    # log p(t|D) = sum_j log(1 + m_j (p(t|x_j) - 1)), m = (0.9, 0.8)
    c0 = [math.log(1 + 0.9 * (0.8 - 1)) + math.log(1 + 0.8 * (0.5 - 1)),
          math.log(1 + 0.9 * (0.2 - 1)) + math.log(1 + 0.8 * (0.5 - 1))]
    c1 = [math.log(1 + 0.9 * (0.1 - 1)) + math.log(1 + 0.8 * (0.5 - 1)),
          math.log(1 + 0.9 * (0.9 - 1)) + math.log(1 + 0.8 * (0.5 - 1))]
    prior = [math.log((math.exp(c0[t]) + math.exp(c1[t])) / 2) for t in range(2)]
    want = np.array([[c0[t] - prior[t] for t in range(2)], [c1[t] - prior[t] for t in range(2)]])
    assert got == pytest.approx(want, abs=1e-12)
    # the same numbers, written out: 0.82 * 0.6 = 0.492, 0.28 * 0.6 = 0.168, 0.19 * 0.6 = 0.114,
    # 0.91 * 0.6 = 0.546; priors (0.492 + 0.114) / 2 = 0.303 and (0.168 + 0.546) / 2 = 0.357
    assert got[0, 0] == pytest.approx(math.log(0.492 / 0.303))
    assert got[0, 1] == pytest.approx(math.log(0.168 / 0.357))
    assert got[1, 1] == pytest.approx(math.log(0.546 / 0.357))
    assert got.argmax(axis=1).tolist() == [0, 1]
    # lambda scales the prior; eps floors each image's factor
    half = soft_wpmi(p, acts, ClipDissectConfig(top_k=2, a=1.0, lam=0.5, p_start=0.9, p_end=0.7, eps=0.0))
    assert half[0, 0] == pytest.approx(math.log(0.492) - 0.5 * math.log(0.303))
    floored = soft_wpmi(p, acts, ClipDissectConfig(top_k=2, a=1.0, lam=0.0, p_start=0.9, p_end=0.7, eps=0.01))
    assert floored[0, 0] == pytest.approx(math.log(0.83) + math.log(0.61))


def test_soft_wpmi_temperature_sharpens_the_concept_distribution():
    p = np.array([[0.3, 0.2], [0.3, 0.2]])
    for a, want in [(1.0, 1 / (1 + math.exp(-0.1))), (10.0, 1 / (1 + math.exp(-1.0)))]:
        assert concept_probabilities(p, a)[0, 0] == pytest.approx(want)


def test_concept_sets(tmp_path):
    shipped = load_concepts()
    assert shipped.name == "common-visual.txt" and 1000 <= len(shipped.concepts) <= 3000
    assert {"red", "striped", "dog", "brick", "circle"} <= set(shipped.concepts)
    own = tmp_path / "mine.txt"
    own.write_text("# my concepts\nDog\ndog\n\n  red   car  \n")
    mine = load_concepts(own)
    assert mine.concepts == ("Dog", "red car") and len(mine.sha256) == 64
    with pytest.raises(BuildError, match="common-visual.txt"):
        load_concepts("no-such-list")


# -- builds ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    return Path(write_probe_set(tmp_path_factory.mktemp("probe"), n=N_PROBE, seed=3, progress=False))


def _cfg(probe: Path, out: Path, **extra) -> BuildConfig:
    data = {
        "out": str(out),
        "labeler": "clip-dissect",
        "chunk_size": 5,
        "models": [{"name": "planted", "target": "planted", "probe": str(probe), "layers": ["detectors"]}],
    }
    data.update(extra)
    return BuildConfig.from_dict(data)


@pytest.fixture(scope="module")
def planted_atlas(probe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cd") / "atlas"
    summary = build(_cfg(probe, out))
    assert summary.models[0].ok == 18
    return out


def test_caption_stand_in_labels_the_color_units(planted_atlas):
    ev = evaluate_synthetic(planted_atlas, mpnet=False)
    colors = [u for u in ev["units"] if len(u["concepts"]) == 1
              and u["concepts"][0] in ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")]
    assert len(colors) == 8
    assert sum(u["match"] for u in colors) >= 6, [(u["concepts"], u["labels"]) for u in colors]
    with duckdb.connect(str(planted_atlas / "atlas.duckdb"), read_only=True) as con:
        meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta").fetchall()}
        score = con.execute("SELECT concept_score FROM labels WHERE unit = 0 AND rank = 1").fetchone()[0]
        cands = con.execute("SELECT concept, score, selected_rank FROM candidates WHERE unit = 0 "
                            "ORDER BY position").fetchall()
    assert meta["labeler"] == "clip-dissect"
    assert meta["concept_set"]["name"] == "common-visual.txt" and len(meta["concept_set"]["sha256"]) == 64
    assert "caption" in meta["similarity"] and "minilm" in meta["similarity"]
    assert meta["softwpmi"] == {"top_k": 100, "a": 10.0, "lam": 1.0, "p_start": 0.998, "p_end": 0.97,
                                "eps": 7e-4}
    assert len(cands) == 5 and cands[0][2] == 1 and cands[0][1] == pytest.approx(score)
    assert [c[1] for c in cands] == sorted((c[1] for c in cands), reverse=True)


def test_the_atlas_opens_and_searches(planted_atlas):
    with Atlas.open(planted_atlas) as atlas:
        rec = atlas.neuron("planted", "detectors", 0)
        assert rec.status == "ok" and rec.labels[0].rank == 1 and 1 <= len(rec.labels) <= 3
        assert [e.rank for e in rec.evidence] == list(range(1, 11))
        acts = [e.activation for e in rec.evidence]
        assert acts == sorted(acts, reverse=True)
        assert all((planted_atlas / e.thumbnail).is_file() and e.box is None for e in rec.evidence)
        hits = atlas.search("red", k=3)
        assert hits and hits[0].unit == 0
    import faiss

    with duckdb.connect(str(planted_atlas / "atlas.duckdb"), read_only=True) as con:
        n_labels = con.execute("SELECT count(*) FROM labels").fetchone()[0]
    assert faiss.read_index(str(planted_atlas / "descriptions.faiss")).ntotal == n_labels


def _neuron_rows(atlas: Path) -> list[tuple]:
    with duckdb.connect(str(atlas / "atlas.duckdb"), read_only=True) as con:
        return con.execute("SELECT n.unit, l.rank, l.text, round(l.concept_score, 6) FROM neurons n "
                           "JOIN labels l USING (model, layer, unit) ORDER BY n.unit, l.rank").fetchall()


def test_resume_skips_written_neurons(probe, planted_atlas, tmp_path):
    out = tmp_path / "atlas"
    cfg = _cfg(probe, out, cache_dir=str(tmp_path / "cache"))
    first = build(cfg)
    assert first.models[0].ok == 18
    # what a build killed after 15 neurons leaves: the others were never written
    with duckdb.connect(str(out / "atlas.duckdb")) as con:
        con.execute("DELETE FROM label_vectors WHERE label_id IN (SELECT label_id FROM labels WHERE unit >= 15)")
        con.execute("DELETE FROM labels WHERE unit >= 15")
        con.execute("DELETE FROM candidates WHERE unit >= 15")
        con.execute("DELETE FROM evidence WHERE unit >= 15")
        con.execute("DELETE FROM neurons WHERE unit >= 15")
    again = build(cfg)
    assert again.models[0].neurons == 3 and again.models[0].ok == 3  # only the missing ones
    assert _neuron_rows(out) == _neuron_rows(planted_atlas)
    assert build(cfg).models[0].neurons == 0
    with pytest.raises(BuildError, match=r"other settings \(clip_dissect\)"):
        build(dataclasses.replace(cfg, clip_dissect=dataclasses.replace(
            cfg.clip_dissect, concepts=str(_write(tmp_path / "c.txt", "red\nblue\n")))))


def test_resume_refuses_a_concept_file_whose_content_changed(probe, tmp_path):
    own = _write(tmp_path / "concepts.txt", "red\ngreen\nblue\nstriped\n")
    cfg = _cfg(probe, tmp_path / "atlas", clip_dissect={"concepts": str(own)})
    assert build(cfg).models[0].ok == 18
    _write(own, "red\ngreen\n")
    with pytest.raises(BuildError, match="another concept set"):
        build(cfg)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_no_joint_space_is_a_clear_error(tmp_path):
    bare = tmp_path / "probe"
    bare.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 0, 0)).save(bare / "a.png")
    with pytest.raises(BuildError, match="dissect.similarity = \"clip\""):
        build(_cfg(bare, tmp_path / "atlas"))


def test_tiny_clip_runs_the_real_clip_path(probe, tmp_path):
    from testkit.tiny_models import make_tiny_clip

    clip_dir = make_tiny_clip(tmp_path / "clip")
    own = _write(tmp_path / "concepts.txt", "red\ngreen\nblue\nstriped\ndotted\ncircle\nsquare\nsky\ngrass\n")
    out = tmp_path / "atlas"
    cfg = _cfg(probe, out, dissect={"similarity": "clip", "similarity_options": {"model": str(clip_dir)}},
               device="cpu")
    summary = build(dataclasses.replace(cfg, clip_dissect=dataclasses.replace(cfg.clip_dissect, concepts=str(own))))
    assert summary.models[0].ok == 18
    with Atlas.open(out) as atlas:
        rec = atlas.neuron("planted", "detectors", 3)
        assert rec.labels and rec.labels[0].text in own.read_text().split()
        assert atlas.search("green", k=2)
    with duckdb.connect(str(out / "atlas.duckdb"), read_only=True) as con:
        meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta").fetchall()}
    assert meta["labeler"] == "clip-dissect" and meta["concept_set"]["n"] == 9
    assert "CLIP" in meta["similarity"] and str(clip_dir) in meta["similarity"]
