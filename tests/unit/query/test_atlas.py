"""Atlas.open, meta, models, layers, neuron() and summary()."""

import json

import duckdb
import pytest

from query import Atlas, AtlasError, AtlasNotFound, FormatVersionError, QueryError
from query.records import Candidate, Evidence, Label, NeuronRecord
from query.schema import DB_FILE, FORMAT_VERSION

NEURONS = [
    {"model": "cnn", "layer": "conv1", "unit": 0, "labels": ["red striped circle", "stripes"],
     "scores": [0.9, 0.4], "max_activation": 3.5, "interpretability": 0.8},
    {"model": "cnn", "layer": "conv1", "unit": 1, "labels": ["blue sky"]},
    {"model": "cnn", "layer": "conv2", "unit": 2, "labels": [], "status": "dead",
     "reason": "constant activation"},
    {"model": "vit", "layer": "block1", "unit": 0, "labels": ["dog faces"]},
    {"model": "vit", "layer": "conv1", "unit": 0, "labels": ["grass"]},
]

DETAILS = [
    """INSERT INTO captions VALUES
       ('k1', 'img/1.png', NULL, NULL, NULL, NULL, 'oracle', 'a red striped circle'),
       ('k2', 'img/2.png', 4, 5, 30, 40, 'oracle', 'red stripes')""",
    """INSERT INTO evidence (model, layer, unit, rank, source, x0, y0, x1, y1, activation, thumbnail, caption_key) VALUES
       ('cnn', 'conv1', 0, 1, 'img/1.png', NULL, NULL, NULL, NULL, 3.5, 'images/a.png', 'k1'),
       ('cnn', 'conv1', 0, 2, 'img/2.png', 4, 5, 30, 40, 3.1, 'images/b.png', 'k2'),
       ('cnn', 'conv1', 0, 3, 'img/3.png', NULL, NULL, NULL, NULL, 2.0, 'images/c.png', NULL)""",
    """INSERT INTO candidates (model, layer, unit, position, concept, topk_squared, image_products, score, selected_rank, samples) VALUES
       ('cnn', 'conv1', 0, 0, 'red striped circle', 1.5, 0.7, 1.4, 1, '["images/g1.png"]'),
       ('cnn', 'conv1', 0, 1, 'stripes', 4.0, 0.2, 0.2, 2, NULL),
       ('cnn', 'conv1', 0, 2, 'zebra', 9.0, -1, -1, NULL, NULL)""",
    """INSERT INTO call_counts VALUES
       ('cnn', 'conv1', 0, 'captioner_images', 10, 4),
       ('cnn', 'conv1', 0, 'generated_images', 30, 10),
       ('cnn', 'conv1', 1, 'captioner_images', 10, 0)""",
    """INSERT INTO stage_times VALUES ('cnn', 'caption', 12.5)""",
    """INSERT INTO meta VALUES ('probe', '"synthetic"')""",
]


@pytest.fixture
def atlas_dir(make_atlas):
    return make_atlas(NEURONS, sql=DETAILS)


def test_open_dir_or_file_and_meta(atlas_dir):
    for path in (atlas_dir, atlas_dir / DB_FILE, str(atlas_dir)):
        with Atlas.open(path) as atlas:
            meta = atlas.meta
            assert meta["format_version"] == FORMAT_VERSION
            assert meta["embedder"] == "minilm" and meta["embedder_dim"] == 384
            assert meta["build_config"] == {"fixture": True}
            assert meta["probe"] == "synthetic"
            assert meta["index_count"] == 5
            assert atlas.path == atlas_dir


def test_models_and_layers(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        assert [m.model for m in atlas.models()] == ["cnn", "vit"]
        layers = atlas.layers()
        assert [(li.model, li.layer) for li in layers] == [
            ("cnn", "conv1"), ("cnn", "conv2"), ("vit", "block1"), ("vit", "conv1")]
        conv2 = atlas.layers("cnn")[1]
        assert (conv2.n_units, conv2.n_ok, conv2.n_dead, conv2.n_failed) == (3, 0, 1, 0)
        assert atlas.layers("cnn")[0].n_ok == 2
        with pytest.raises(QueryError, match="valid models: cnn, vit"):
            atlas.layers("nope")


def test_neuron_full_record(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        rec = atlas.neuron("cnn", "conv1", 0)
    assert isinstance(rec, NeuronRecord)
    assert (rec.model, rec.layer, rec.unit, rec.status, rec.reason) == ("cnn", "conv1", 0, "ok", None)
    assert rec.max_activation == 3.5 and rec.interpretability == 0.8
    assert rec.labels == [Label(1, "red striped circle", 0.9), Label(2, "stripes", 0.4)]
    assert rec.candidates[0] == Candidate(0, "red striped circle", 1.5, 0.7, 1.4, 1, ["images/g1.png"])
    assert [c.concept for c in rec.candidates] == ["red striped circle", "stripes", "zebra"]
    assert rec.candidates[2].selected_rank is None and rec.candidates[2].samples == []
    assert rec.evidence[0] == Evidence(1, "img/1.png", None, 3.5, "images/a.png", "k1",
                                       "a red striped circle")
    assert rec.evidence[1].box == (4, 5, 30, 40) and rec.evidence[1].caption == "red stripes"
    assert rec.evidence[2].caption is None
    assert rec.calls == {"captioner_images": (10, 4), "generated_images": (30, 10)}
    d = rec.to_dict()
    assert d["labels"][0] == {"rank": 1, "text": "red striped circle", "concept_score": 0.9,
                              "fidelity_correlation": None, "fidelity_auprc": None}
    json.dumps(d)  # serializable


def test_neuron_dead_record(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        rec = atlas.neuron(None, "conv2", 2)
    assert rec.status == "dead" and rec.reason == "constant activation" and rec.labels == []


def test_neuron_resolution_errors(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        assert atlas.neuron(None, "block1", 0).model == "vit"  # unique layer name
        with pytest.raises(QueryError, match=r"valid layers: conv1, conv2, block1"):
            atlas.neuron(None, "layer9", 0)
        with pytest.raises(QueryError, match=r"several models \(cnn, vit\)"):
            atlas.neuron(None, "conv1", 0)
        with pytest.raises(QueryError, match=r"in model 'vit'; valid layers: block1, conv1"):
            atlas.neuron("vit", "conv2", 0)
        with pytest.raises(QueryError, match="valid models: cnn, vit"):
            atlas.neuron("resnet", "conv1", 0)
        with pytest.raises(QueryError, match=r"valid units: 0\.\.1"):
            atlas.neuron("cnn", "conv1", 5)
        with pytest.raises(QueryError, match="not in the atlas"):
            atlas.neuron("cnn", "conv2", 0)  # in range, not built


def test_choices_are_truncated(make_atlas):
    neurons = [{"model": "m", "layer": f"l{i:02d}", "unit": 0, "labels": ["x"]} for i in range(30)]
    with Atlas.open(make_atlas(neurons)) as atlas, pytest.raises(QueryError) as err:
        atlas.neuron("m", "nope", 0)
    assert "l19, ... (10 more)" in str(err.value) and "l20" not in str(err.value)


def test_summary(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        s = atlas.summary()
    json.dumps(s)
    assert s["totals"] == {"ok": 4, "dead": 1, "failed": 0, "units": 7, "labels": 5,
                           "label_vectors": 5}
    cnn = s["models"][0]
    assert cnn["model"] == "cnn" and cnn["totals"]["dead"] == 1
    assert cnn["calls"]["captioner_images"]["calls"] == 20
    assert cnn["calls"]["captioner_images"]["calls_per_neuron"] == pytest.approx(20 / 3)
    assert cnn["calls"]["summarizer_requests"]["calls"] == 0
    assert cnn["stage_seconds"] == {"caption": 12.5}
    assert "build_config" not in s["meta"] and s["meta"]["embedder"] == "minilm"
    assert s["index"] == {"present": True, "count": 5, "current": True}


def test_missing_atlas(tmp_path):
    with pytest.raises(AtlasNotFound, match="no atlas at"):
        Atlas.open(tmp_path / "nope")
    with pytest.raises(AtlasNotFound):
        Atlas.open(tmp_path / "nope", read_only=False)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_not_an_atlas(tmp_path):
    duckdb.connect(str(tmp_path / DB_FILE)).close()
    with pytest.raises(AtlasNotFound, match="not a dnd-atlas database"):
        Atlas.open(tmp_path)


def test_create_writable(tmp_path):
    with Atlas.open(tmp_path / "new", read_only=False, create=True) as atlas:
        assert atlas.meta["format_version"] == FORMAT_VERSION and atlas.models() == []


def _set_version(atlas_dir, version):
    con = duckdb.connect(str(atlas_dir / DB_FILE))
    con.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", [str(version)])
    con.close()


def test_newer_format_version(atlas_dir):
    _set_version(atlas_dir, FORMAT_VERSION + 1)
    for read_only in (True, False):
        with pytest.raises(FormatVersionError, match="newer than this dnd-atlas supports"):
            Atlas.open(atlas_dir, read_only=read_only)


def test_older_format_version_needs_writable_open(atlas_dir, monkeypatch):
    from query import atlas as atlas_mod
    from query import schema

    # Simulate a code version with one more migration than the atlas has.
    extra = [*schema.MIGRATIONS, ["CREATE TABLE extra_v2 (x INTEGER)"]]
    monkeypatch.setattr(schema, "MIGRATIONS", extra)
    monkeypatch.setattr(schema, "FORMAT_VERSION", len(extra))
    monkeypatch.setattr(atlas_mod, "FORMAT_VERSION", len(extra))
    with pytest.raises(FormatVersionError, match="rebuild the atlas, or open it writable"):
        Atlas.open(atlas_dir)
    with Atlas.open(atlas_dir, read_only=False) as atlas:
        assert atlas.meta["format_version"] == len(extra)
    with Atlas.open(atlas_dir) as atlas:
        assert atlas.con.execute("SELECT count(*) FROM extra_v2").fetchone() == (0,)


def test_read_only_creates_no_files(atlas_dir):
    before = sorted(p.name for p in atlas_dir.iterdir())
    with Atlas.open(atlas_dir) as atlas:
        atlas.layers()
        atlas.neuron("cnn", "conv1", 0)
        atlas.search("sky", k=1)
    assert sorted(p.name for p in atlas_dir.iterdir()) == before


def test_closed_atlas(atlas_dir):
    atlas = Atlas.open(atlas_dir)
    atlas.close()
    atlas.close()
    with pytest.raises(AtlasError, match="closed"):
        atlas.layers()
