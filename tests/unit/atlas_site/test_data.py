"""The site's data records and its --out bookkeeping, without building a site."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from atlas_site import data
from atlas_site.images import ImageSet
from atlas_site.output import (
    Manifest,
    OutputRefused,
    ProjectWriter,
    claim,
    read_manifest,
    write_manifest,
)
from query.records import Evidence, Label, LayerInfo, NeuronRecord


@dataclass(frozen=True)
class NewEvidence(Evidence):
    source_thumbnail: str | None = None
    source_size: tuple[int, int] | None = None
    heatmap: str | None = None


@dataclass(frozen=True)
class FidelityLabel(Label):
    fidelity_correlation: float | None = None
    fidelity_auprc: float | None = None


def ev(box=(10, 20, 60, 80), **extra) -> Evidence:
    base = {"rank": 1, "source": "a/b.jpg", "box": box, "activation": 2.0,
            "thumbnail": "images/ev/baked.webp", "caption_key": "k", "caption": "a dog"}
    return NewEvidence(**base, **extra) if extra else Evidence(**base)


def rec(unit: int, labels=(), evidence=()) -> NeuronRecord:
    return NeuronRecord("m", "l", unit, "ok" if labels else "dead", None, 1.0, 0.5,
                        list(labels), [], list(evidence), {})


def test_box_is_drawn_on_the_plain_thumbnail_when_the_source_size_is_known():
    images = ImageSet()
    shown = data.evidence_image(ev(source_thumbnail="images/src/p.webp", source_size=(100, 200)),
                                images)
    assert shown == ("images/src/p.webp", [0.1, 0.1, 0.6, 0.4])
    # Without the size the box cannot be placed: the baked thumbnail is shown.
    assert data.evidence_image(ev(source_thumbnail="images/src/p.webp"), images) == \
        ("images/ev/baked.webp", None)
    # A whole image needs no box; an unsafe plain path falls back too.
    assert data.evidence_image(ev(box=None, source_thumbnail="images/src/p.webp"), images) == \
        ("images/src/p.webp", None)
    assert data.evidence_image(ev(source_thumbnail="../p.webp", source_size=(9, 9)), images) == \
        ("images/ev/baked.webp", None)
    assert data.evidence_image(ev(), images) == ("images/ev/baked.webp", None)
    assert images.used == {"images/src/p.webp", "images/ev/baked.webp"}


def test_heatmap_is_published_only_when_safe():
    images = ImageSet()
    rows = data.neuron_data(rec(0, [Label(1, "dog", 1.0)], [ev(heatmap="images/heat/h.png"),
                                                             ev(heatmap="javascript:x")]), images, [])
    assert rows["evidence"][0]["heatmap"] == "images/heat/h.png"
    assert "heatmap" not in rows["evidence"][1]
    assert "images/heat/h.png" in images.used


@pytest.mark.parametrize("path", ["/etc/passwd", "images/../x.webp", "images/a b.webp",
                                  "images", "javascript:alert(1)", "images\\x.webp", "ev/x.webp"])
def test_image_set_refuses_unsafe_paths(path):
    assert ImageSet().add(path) is None


def test_extra_label_numbers_become_columns():
    plain = [rec(0, [Label(1, "dog", 1.0)])]
    assert [c.key for c in data.layer_columns(plain)] == \
        ["unit", "thumb", "label", "score", "interpretability", "status"]
    # A number no neuron of the layer has makes no column.
    assert "fidelity_auprc" not in [c.key for c in data.layer_columns(
        [rec(0, [FidelityLabel(1, "dog", 1.0, 0.5, None)])])]
    records = [rec(0, [FidelityLabel(1, "dog", 1.0, 0.61234567, None)]), rec(1),
               rec(2, [FidelityLabel(1, "cat", 1.0, None, 0.25)])]
    columns = data.layer_columns(records)
    assert [c.key for c in columns][-3:] == ["fidelity_correlation", "fidelity_auprc", "status"]
    li = LayerInfo("m", "l", 0, "conv", 3, 2, 1, 0)
    index = data.layer_index(li, records, ImageSet(), columns)
    assert index["values"]["fidelity_correlation"] == [0.61235, None, None]
    assert index["values"]["fidelity_auprc"] == [None, None, 0.25]
    assert index["columns"][-2] == {"key": "fidelity_auprc", "title": "Fidelity auprc", "kind": "num"}


def test_numbers_and_chunks():
    assert data.num(float("nan")) is None and data.num(math.inf) is None and data.num(None) is None
    assert data.num(3) == 3 and data.num(1 / 3) == 0.33333
    groups = data.chunks([rec(u) for u in (0, 255, 256, 1000)])
    assert {k: [r.unit for r in v] for k, v in groups.items()} == {0: [0, 255], 1: [256], 3: [1000]}
    assert data.chunk_file("m", "a/b", 3) == "data/m/" + data.layer_path("m", "a/b").split("/")[1] \
        + "/n/3.json.gz"


def test_writer_refuses_files_it_did_not_write_and_deletes_only_its_own(tmp_path):
    project = tmp_path / "project"
    (project / "docs").mkdir(parents=True)
    (project / "docs/user.md").write_text("mine")
    writer = ProjectWriter(project, Manifest())
    with pytest.raises(OutputRefused, match="user.md"):
        writer.text("docs/user.md", "x")
    writer.text("docs/a/old.md", "old")
    write_manifest(project, Manifest(frozenset(writer.written)))
    old = read_manifest(project)
    assert old is not None and old.project == {"docs/a/old.md"}
    again = ProjectWriter(project, old)
    again.text("docs/new.md", "new")
    assert again.finish() == 1
    assert not (project / "docs/a").exists() and (project / "docs/user.md").read_text() == "mine"
    # After a run that did not finish, a file at a path it writes may be its own.
    ProjectWriter(project, Manifest(complete=False)).text("docs/user.md", "regenerated")


def test_claim(tmp_path):
    assert claim(tmp_path / "new") == Manifest()
    (tmp_path / "full").mkdir()
    (tmp_path / "full/x").write_text("x")
    with pytest.raises(OutputRefused):
        claim(tmp_path / "full")
    assert claim(tmp_path / "full", shared=True) == Manifest()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputRefused, match="not a directory"):
        claim(tmp_path / "file")


def test_layer_page_states_fidelity_against_chance():
    from atlas_site.render import fidelity_line

    line = fidelity_line({"label_correlation": 0.61, "shuffled_correlation": 0.02, "label_auprc": 0.5,
                          "positive_fraction": 0.1, "sample_images": 500.0})
    assert "over 500 sample images" in line and "0.610" in line and "shuffled among units: 0.020" in line
    assert "AUPRC 0.500 (chance 0.100)" in line
    assert fidelity_line({}) == "" and fidelity_line(None) == ""
