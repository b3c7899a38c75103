"""The semantic search files of the site, without a browser: one vector per distinct
label text of the 'ok' neurons, layers in the CLI's tie order, parts under the static
hosts' limit, float16 vectors, and keyword search only (one warning) when the
atlas's embedder or the runtime is missing or unfit."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from atlas_site import semantic
from atlas_site.output import Manifest, ProjectWriter
from atlas_site.runtime import MODULE, NOTICE_FILE, ONNXRUNTIME_WEB, WASM
from query import Atlas
from query.embedder import model_path
from query.onnx_embedder import ATLAS_EMBEDDER_DIR, MANIFEST_FILE, EmbedderFile, EmbedderManifest

NEURONS = [
    {"model": "vit", "layer": "head", "unit": 3, "labels": ["red", "sky"]},
    {"model": "cnn", "layer": "conv4", "unit": 1, "labels": ["sky", "red circle"]},
    {"model": "cnn", "layer": "conv4", "unit": 0, "labels": ["red"]},
    {"model": "cnn", "layer": "conv2", "unit": 7, "labels": ["zebra pattern"]},
    {"model": "cnn", "layer": "conv2", "unit": 8, "labels": ["dead label"], "status": "dead"},
]


def fake_embedder(atlas: Path, name: str = "minilm", dim: int = 384, model: bytes = b"onnx" * 1000,
                  tokenizer: dict | None = None) -> Path:
    """An embedder folder with the real minilm tokenizer (or ``tokenizer``) and stand-in
    model bytes: enough for the site build, which never runs the model."""
    folder = atlas / ATLAS_EMBEDDER_DIR
    folder.mkdir()
    (folder / "model.onnx").write_bytes(model)
    if tokenizer is None:
        shutil.copyfile(model_path("minilm") / "tokenizer.json", folder / "tokenizer.json")
    else:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    files = tuple(EmbedderFile(p, (folder / p).stat().st_size,
                               hashlib.sha256((folder / p).read_bytes()).hexdigest())
                  for p in ("model.onnx", "tokenizer.json"))
    m = EmbedderManifest(name=name, dim=dim, pooling=("mean",), normalize=True, max_seq_length=256,
                         lowercase=False, pad_id=0, pad_token="[PAD]",
                         inputs=("input_ids", "attention_mask", "token_type_ids"),
                         model_file="model.onnx", tokenizer_file="tokenizer.json", files=files,
                         opset=18, quantized=False)
    (folder / MANIFEST_FILE).write_text(json.dumps(m.to_dict()))
    return folder


def fake_runtime(root: Path) -> Path:
    """A runtime folder with the pinned file names (contents never run here)."""
    root.mkdir()
    for path in ONNXRUNTIME_WEB.files:
        (root / ONNXRUNTIME_WEB.stored_name(path)).write_bytes(path.encode() * 10)
    (root / NOTICE_FILE).write_text("notice")
    return root


@pytest.fixture
def atlas_dir(make_atlas):
    return make_atlas(NEURONS)


def write(atlas_dir: Path, tmp_path: Path, runtime: Path | None):
    project = tmp_path / "project"
    writer = ProjectWriter(project, Manifest())
    with Atlas.open(atlas_dir) as atlas:
        out = semantic.write_semantic(atlas, writer, runtime)
    return out, project / "docs", writer


def test_one_vector_per_text_of_ok_neurons_in_key_order(atlas_dir):
    with Atlas.open(atlas_dir) as atlas:
        labels, vecs = semantic.semantic_labels(atlas)
        ids = {r["text"]: r["label_id"] for r in atlas.sql("SELECT label_id, text FROM labels ORDER BY label_id DESC")}
    assert labels.layers == (("cnn", "conv2"), ("cnn", "conv4"), ("vit", "head"))
    assert labels.texts == ("red", "red circle", "sky", "zebra pattern")   # no dead neuron's label
    refs = dict(zip(labels.texts, labels.refs))
    assert refs["red"] == (1, 0, 1, 2, 3, 1) and refs["sky"] == (1, 1, 1, 2, 3, 2)
    assert labels.vector_of == tuple(ids[t] for t in labels.texts)      # the smallest label_id
    assert vecs.shape == (4, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    d = labels.to_dict()
    assert d["layers"][2] == {"path": "vit/head", "model": "vit", "layer": "head"}


def test_vector_precision_parts_and_encoding():
    assert semantic.VECTOR_DTYPE == "float16"
    v = np.array([[0.5, -0.25], [1.0, 0.0]], np.float32)
    assert np.frombuffer(semantic.encode_vectors(v, "float16"), "<f2").tolist() == [0.5, -0.25, 1.0, 0.0]
    assert [bytes(p) for p in semantic.split(b"abcdefg", 3)] == [b"abc", b"def", b"g"]
    assert [bytes(p) for p in semantic.split(b"", 3)] == [b""]
    assert semantic.PART_BYTES < 50 * 10**6                          # GitHub's warning size


def test_written_files_and_index(atlas_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(semantic, "PART_BYTES", 1500)
    model = bytes(range(256)) * 20
    fake_embedder(atlas_dir, model=model)
    out, docs, writer = write(atlas_dir, tmp_path, fake_runtime(tmp_path / "rt"))
    assert out["index"] == semantic.INDEX_FILE
    ix = json.loads((docs / semantic.INDEX_FILE).read_text())
    assert out["bytes"] == ix["bytes"] + (docs / semantic.INDEX_FILE).stat().st_size
    assert len(ix["model"]["parts"]) == 4                            # 5,120 bytes in 1,500-byte parts
    assert b"".join((docs / p).read_bytes() for p in ix["model"]["parts"]) == model
    assert ix["model"]["sha256"] == hashlib.sha256(model).hexdigest()
    vec = np.frombuffer(b"".join((docs / p).read_bytes() for p in ix["vectors"]["parts"]), "<f2")
    with Atlas.open(atlas_dir) as atlas:
        full = semantic.semantic_labels(atlas)[1]
    assert ix["vectors"]["bytes"] == full.size * 2                    # half the atlas's float32
    assert np.array_equal(vec.reshape(4, 384), full.astype(np.float16))
    assert np.abs(vec.reshape(4, 384) @ full.T - full @ full.T).max() < 1e-3
    labels = json.loads(gzip.decompress((docs / ix["labels"]).read_bytes()))
    assert labels["texts"] == ["red", "red circle", "sky", "zebra pattern"]
    assert json.loads(gzip.decompress((docs / ix["tokenizer"]).read_bytes()))["model"]["type"] == "WordPiece"
    assert ix["runtime"]["module"].endswith(MODULE.rsplit("/", 1)[1])
    assert ix["runtime"]["wasm"].endswith(".wasm.gz") and WASM.endswith(".wasm")
    for rel in (ix["runtime"]["module"], ix["runtime"]["wasm"], f"{ix['runtime']['dir']}/{NOTICE_FILE}"):
        assert (docs / rel).is_file() and f"docs/{rel}" in writer.written
    assert ix["embedder"]["name"] == "minilm" and ix["vectors"]["dtype"] == "float16"
    assert set(ix["files"]) >= {*ix["model"]["parts"], ix["labels"], ix["tokenizer"]}


@pytest.mark.parametrize("why, setup", [
    ("not in the cache", lambda atlas, tmp: None),
    ("no usable ONNX embedder", lambda atlas, tmp: "no-embedder"),
    ("labels were embedded with 'minilm'", lambda atlas, tmp: fake_embedder(atlas, name="mpnet")),
    ("768 dimensions", lambda atlas, tmp: fake_embedder(atlas, dim=768)),
    ("tokenizer's model is BPE", lambda atlas, tmp: fake_embedder(
        atlas, tokenizer={"model": {"type": "BPE"}, "normalizer": None})),
])
def test_keyword_search_only_with_one_warning(atlas_dir, tmp_path, caplog, why, setup):
    made = setup(atlas_dir, tmp_path)
    runtime = None if why == "not in the cache" else fake_runtime(tmp_path / "rt")
    if made is None and runtime is None:
        fake_embedder(atlas_dir)
    with caplog.at_level(logging.WARNING, logger="atlas_site"):
        out, docs, writer = write(atlas_dir, tmp_path, runtime)
    assert out is None and not (docs / "data/semantic").exists() and not writer.written
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "keyword search only" in warnings[0] and why in warnings[0]
