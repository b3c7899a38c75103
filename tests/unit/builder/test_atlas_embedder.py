"""The ONNX embedder an atlas carries: exported once into the user's cache, linked
into each atlas, added to older atlases, copied by merge; the config key.

Files of a carried embedder are hard links into the export cache: tests
replace them, never write into them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import pytest

from builder.atlas_embedder import (
    cached_export,
    carried_embedder_meta,
    carry_embedder,
    export_atlas_embedder,
)
from builder.commands.embedder import EXPORT_EMBEDDER
from builder.config import BuildConfig, ModelConfig
from builder.errors import ConfigError
from query import Atlas
from query.errors import AtlasNotFound
from query.merge import merge_atlases
from query.onnx_embedder import (
    ATLAS_EMBEDDER_DIR,
    ATLAS_META_KEY,
    MANIFEST_FILE,
    OnnxEmbedder,
    carried_meta,
    read_manifest,
)
from testkit.atlases import hits_difference, search_hits

NEURONS = [
    {"model": "m", "layer": "conv1", "unit": 0, "labels": ["red circle", "red"]},
    {"model": "m", "layer": "conv1", "unit": 1, "labels": ["striped pattern"]},
    {"model": "m", "layer": "conv2", "unit": 0, "labels": ["blue sky", "clouds"]},
    {"model": "m", "layer": "conv2", "unit": 1, "labels": ["dog face", "fur"]},
]
FINGERPRINT = {"build_fingerprint": {"embedder": "minilm", "models": [{"name": "m"}]},
               "labeler": "dnd", "shard": ""}


def test_carrying_is_linked_from_the_cache_and_kept_when_current(make_atlas):
    atlas = make_atlas(NEURONS)
    entry = carry_embedder(atlas, "minilm")
    model = atlas / ATLAS_EMBEDDER_DIR / "model.onnx"
    cache = cached_export("minilm")
    assert read_manifest(cache).files == read_manifest(atlas / ATLAS_EMBEDDER_DIR, verify=True).files
    ino = os.stat(model).st_ino
    assert carry_embedder(atlas, "minilm") == entry and os.stat(model).st_ino == ino
    assert entry == carried_meta(atlas / ATLAS_EMBEDDER_DIR)
    assert entry["name"] == "minilm" and entry["dim"] == 384 and entry["quantization"] == ""
    assert entry["bytes"] > 80e6 and len(entry["model_sha256"]) == 64 and entry["path"] == "embedder"


def test_a_damaged_carried_embedder_is_replaced(make_atlas):
    atlas = make_atlas(NEURONS)
    carry_embedder(atlas, "minilm")
    tok = atlas / ATLAS_EMBEDDER_DIR / "tokenizer.json"
    size = tok.stat().st_size
    tok.unlink()
    tok.write_text(" " * size)  # same size, other sha256
    carry_embedder(atlas, "minilm")
    read_manifest(atlas / ATLAS_EMBEDDER_DIR, verify=True)  # raises if still damaged
    assert not [p for p in atlas.iterdir() if p.name.startswith(".embedder")], "a staging folder was left"


def test_export_atlas_embedder_adds_one_to_an_older_atlas(make_atlas, minilm):
    atlas = make_atlas(NEURONS)
    with Atlas.open(atlas) as a:
        assert ATLAS_META_KEY not in a.meta
    entry = export_atlas_embedder(atlas)
    with Atlas.open(atlas) as a:
        assert a.meta[ATLAS_META_KEY] == entry
        assert isinstance(a.embedder, OnnxEmbedder)
    queries = ["red", "dog", "sky"]
    assert hits_difference(search_hits(atlas, queries), search_hits(atlas, queries, embedder=minilm)) is None


def test_export_atlas_embedder_refuses_a_missing_atlas(tmp_path):
    with pytest.raises(AtlasNotFound):
        export_atlas_embedder(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_the_command_prints_one_summary_line(make_atlas, capsys):
    atlas = make_atlas(NEURONS)
    parser = argparse.ArgumentParser()
    EXPORT_EMBEDDER.add_arguments(parser)
    assert EXPORT_EMBEDDER.run(parser.parse_args([str(atlas)])) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "carries ONNX embedder minilm (fp32, 90.9 MB in embedder/)" in out
    assert EXPORT_EMBEDDER.run(parser.parse_args([str(atlas), "--json"])) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "minilm"
    with pytest.raises(SystemExit):
        parser.parse_args([str(atlas), "--quantize", "int4"])


def test_an_embedder_that_does_not_export_leaves_the_build_going(tmp_path, caplog):
    folder = tmp_path / "dense-model"
    folder.mkdir()
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]))
    with caplog.at_level(logging.WARNING, logger="builder.atlas_embedder"):
        assert carried_embedder_meta(tmp_path / "atlas", f"sentence:{folder}") == {}
    assert "will not carry an ONNX embedder" in caplog.text and "Dense" in caplog.text
    assert not (tmp_path / "atlas" / ATLAS_EMBEDDER_DIR).exists()


def test_merge_copies_the_embedder_a_shard_carries(make_atlas, minilm, tmp_path):
    a = make_atlas(NEURONS[:2], meta=FINGERPRINT, name="shard-a")
    b = make_atlas(NEURONS[2:], meta=FINGERPRINT, name="shard-b")
    entry = carry_embedder(b, "minilm")  # only the second shard carries one
    out = tmp_path / "merged"
    merge_atlases(out, [a, b])
    read_manifest(out / ATLAS_EMBEDDER_DIR, verify=True)
    with Atlas.open(out) as merged:
        assert merged.meta[ATLAS_META_KEY] == entry
        assert isinstance(merged.embedder, OnnxEmbedder)
    queries = ["red", "dog", "sky", "stripes"]
    assert hits_difference(search_hits(out, queries), search_hits(out, queries, embedder=minilm)) is None


def test_merge_without_a_carried_embedder_warns(make_atlas, tmp_path, caplog):
    a = make_atlas(NEURONS[:2], meta=FINGERPRINT, name="shard-a")
    with caplog.at_level(logging.WARNING, logger="query.merge"):
        merge_atlases(tmp_path / "merged", [a])
    assert "no shard carries an ONNX embedder" in caplog.text
    assert not (tmp_path / "merged" / ATLAS_EMBEDDER_DIR).exists()
    with Atlas.open(tmp_path / "merged") as merged:
        assert ATLAS_META_KEY not in merged.meta


def test_embedder_quantize_is_checked_and_not_a_content_setting():
    model = ModelConfig(name="m", target="planted", probe="p", layers=("detectors",))
    assert BuildConfig(models=(model,)).embedder_quantize == ""
    weights = BuildConfig(models=(model,), embedder_quantize="weights")
    assert weights.fingerprint() == BuildConfig(models=(model,)).fingerprint()  # resumes either way
    assert weights.to_dict()["embedder_quantize"] == "weights"
    with pytest.raises(ConfigError, match="embedder_quantize"):
        BuildConfig(models=(model,), embedder_quantize="int4")


@pytest.mark.slow
def test_an_int8_embedder_is_carried_on_request(make_atlas):
    atlas = make_atlas(NEURONS)
    entry = export_atlas_embedder(atlas, "weights")
    assert entry["quantization"] == "weights" and entry["bytes"] < 40e6
    assert read_manifest(atlas / ATLAS_EMBEDDER_DIR).quantized
    assert json.loads((atlas / ATLAS_EMBEDDER_DIR / MANIFEST_FILE).read_text())["check"]["min_cosine"] > 0.99
    with Atlas.open(atlas) as a:
        assert a.search("red circle", k=1)[0].matched_label == "red circle"
