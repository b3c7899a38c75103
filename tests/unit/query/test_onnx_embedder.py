"""The ONNX embedder an atlas carries reproduces sentence-transformers, without torch.

minilm is exported once per session (the default, TorchScript exporter:
13 s on 2 busy cores); the int8 variants are quantized from that export (a
few seconds each). The dynamo exporter and mpnet are checked in slow tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from query import onnx_embedder as oe
from query.errors import AtlasError, FormatVersionError
from testkit.blocked_imports import blocking_preamble
from testkit.labels import QUERIES, make_labels

ROOT = Path(__file__).resolve().parents[3]


LABELS = make_labels()


@pytest.fixture(scope="session")
def export_root(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-embedders")


@pytest.fixture(scope="session")
def onnx_fp32(export_root):
    from builder.embedder_export import export_embedder

    manifest = export_embedder("minilm", export_root / "minilm")
    return export_root / "minilm", manifest


@pytest.fixture(scope="session", params=["dynamic", "weights"])
def onnx_int8(request, onnx_fp32, export_root):
    from builder.embedder_export import quantize_embedder

    folder = export_root / f"minilm-{request.param}"
    return folder, quantize_embedder(onnx_fp32[0], folder, request.param)


@pytest.fixture(scope="session")
def reference(minilm):
    return minilm.embed(LABELS), minilm.embed(list(QUERIES))


def _top10_overlaps(labels, queries, ref_labels, ref_queries) -> list[float]:
    out = []
    for q, r in zip(queries, ref_queries):
        got = set(np.argsort(-(labels @ q), kind="stable")[:10])
        want = set(np.argsort(-(ref_labels @ r), kind="stable")[:10])
        out.append(len(got & want) / 10)
    return out


def test_fp32_reproduces_sentence_transformers(onnx_fp32, reference):
    emb = oe.OnnxEmbedder(onnx_fp32[0])
    vecs = emb.embed(LABELS)
    assert vecs.shape == (len(LABELS), 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    cos = np.sum(vecs * reference[0], axis=1)
    assert cos.min() >= 0.999, LABELS[int(cos.argmin())]
    overlaps = _top10_overlaps(vecs, emb.embed(list(QUERIES)), *reference)
    assert overlaps == [1.0] * len(QUERIES)


def test_tokens_match_sentence_transformers(onnx_fp32, minilm):
    tok = oe.OnnxEmbedder(onnx_fp32[0])._tokenizer
    st = minilm._model
    want = st.preprocess(LABELS) if hasattr(st, "preprocess") else st.tokenize(LABELS)
    want_ids = [[i for i, m in zip(row, mask) if m] for row, mask in
                zip(want["input_ids"].tolist(), want["attention_mask"].tolist())]
    got_ids = [[i for i, m in zip(e.ids, e.attention_mask) if m] for e in tok.encode_batch(LABELS)]
    assert got_ids == want_ids
    assert max(len(ids) for ids in got_ids) == 256  # the long label is truncated at max_seq_length


@pytest.mark.parametrize("n", [1, 3, 30])
def test_batching_and_padding_do_not_change_vectors(onnx_fp32, n):
    emb = oe.OnnxEmbedder(onnx_fp32[0])
    long = max(LABELS, key=len)  # 256 tokens: 30 texts take two batches of oe.TOKEN_BUDGET
    texts = LABELS[-n:] + [long]
    together = emb.embed(texts)
    alone = np.stack([emb.embed([t])[0] for t in (texts[0], texts[-1])])
    np.testing.assert_allclose(together[[0, -1]], alone, atol=1e-5)
    assert emb.embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        emb.embed("a single string")


def test_int8_variants_stay_close(onnx_int8, onnx_fp32, reference):
    """Measured on minilm: dynamic min 0.970 / mean 0.992, weights min 0.995 / mean 0.999."""
    folder, manifest = onnx_int8
    mode = manifest["quantization"]
    emb = oe.OnnxEmbedder(folder)
    vecs = emb.embed(LABELS)
    cos = np.sum(vecs * reference[0], axis=1)
    overlaps = _top10_overlaps(vecs, emb.embed(list(QUERIES)), *reference)
    floor, mean, overlap = {"dynamic": (0.95, 0.985, 0.85), "weights": (0.99, 0.998, 0.95)}[mode]
    assert cos.min() >= floor and cos.mean() >= mean, (cos.min(), cos.mean())
    assert np.mean(overlaps) >= overlap, overlaps
    fp32_size = onnx_fp32[1]["files"][0]["size"]
    assert manifest["quantized"] and manifest["files"][0]["size"] < 0.3 * fp32_size


def test_manifest_records_what_reproduces_the_model(onnx_fp32):
    folder, manifest = onnx_fp32
    on_disk = json.loads((folder / oe.MANIFEST_FILE).read_text())
    assert on_disk == manifest
    assert manifest["format"] == oe.FORMAT and manifest["version"] == oe.FORMAT_VERSION
    assert (manifest["name"], manifest["dim"], manifest["pooling"], manifest["normalize"]) == \
        ("minilm", 384, ["mean"], True)
    assert manifest["max_seq_length"] == 256 and not manifest["quantized"]
    assert manifest["inputs"][:2] == ["input_ids", "attention_mask"]
    assert {"sentence-transformers", "transformers", "torch", "onnxruntime"} <= set(manifest["versions"])
    assert manifest["check"]["min_cosine"] >= 0.9999
    for f in manifest["files"]:
        assert oe.sha256_file(folder / f["path"]) == f["sha256"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [oe.MANIFEST_FILE, oe.MODEL_FILE, oe.TOKENIZER_FILE])  # no temp files left behind


def test_export_is_reused_when_up_to_date(onnx_fp32):
    from builder.embedder_export import export_embedder

    folder, manifest = onnx_fp32
    before = (folder / oe.MODEL_FILE).stat()
    assert export_embedder("minilm", folder) == manifest
    after = (folder / oe.MODEL_FILE).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_atlas_embedder_finds_the_folder(onnx_fp32, tmp_path):
    assert oe.atlas_embedder(tmp_path) is None
    (tmp_path / oe.ATLAS_EMBEDDER_DIR).symlink_to(onnx_fp32[0], target_is_directory=True)
    emb = oe.atlas_embedder(tmp_path)
    assert emb is oe.atlas_embedder(tmp_path) and emb.name == "minilm"


def _copy(onnx_fp32, dest: Path) -> Path:
    """A copy of the export whose model file is a symlink (the 90 MB file is not copied)."""
    dest.mkdir()
    for name in (oe.MANIFEST_FILE, oe.TOKENIZER_FILE):
        shutil.copy(onnx_fp32[0] / name, dest / name)
    (dest / oe.MODEL_FILE).symlink_to(onnx_fp32[0] / oe.MODEL_FILE)
    return dest


def _edit_manifest(folder: Path, **changes) -> None:
    path = folder / oe.MANIFEST_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_bad_folders_raise_one_line_errors(onnx_fp32, tmp_path):
    with pytest.raises(oe.EmbedderError, match="holds no ONNX embedder"):
        oe.OnnxEmbedder(tmp_path / "nowhere")
    bad = _copy(onnx_fp32, tmp_path / "json")
    (bad / oe.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(oe.EmbedderError, match="not valid JSON"):
        oe.OnnxEmbedder(bad)
    old = _copy(onnx_fp32, tmp_path / "version")
    _edit_manifest(old, version=oe.FORMAT_VERSION + 1)
    with pytest.raises(FormatVersionError, match="re-export the embedder"):
        oe.OnnxEmbedder(old)
    missing = _copy(onnx_fp32, tmp_path / "missing")
    (missing / oe.TOKENIZER_FILE).unlink()
    with pytest.raises(oe.EmbedderError, match="tokenizer.json is missing"):
        oe.OnnxEmbedder(missing)
    pooling = _copy(onnx_fp32, tmp_path / "pooling")
    _edit_manifest(pooling, pooling=["lasttoken"])
    with pytest.raises(oe.EmbedderError, match="unsupported pooling"):
        oe.OnnxEmbedder(pooling)


def test_corrupt_files_are_caught(onnx_fp32, tmp_path):
    tok = _copy(onnx_fp32, tmp_path / "tok")
    data = bytearray((tok / oe.TOKENIZER_FILE).read_bytes())
    data[:1] = b"["  # same size, no longer a tokenizer
    (tok / oe.TOKENIZER_FILE).write_bytes(bytes(data))
    with pytest.raises(oe.EmbedderError, match="does not match its sha256"):
        oe.OnnxEmbedder(tok, verify=True)
    with pytest.raises(oe.EmbedderError, match="cannot read tokenizer.json"):
        oe.OnnxEmbedder(tok)
    model = _copy(onnx_fp32, tmp_path / "model")
    (model / oe.MODEL_FILE).unlink()
    (model / oe.MODEL_FILE).write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(oe.EmbedderError, match="has 900 bytes, expected"):
        oe.OnnxEmbedder(model)
    files = json.loads((model / oe.MANIFEST_FILE).read_text())["files"]
    files[0]["size"] = 900
    _edit_manifest(model, files=files)
    with pytest.raises(oe.EmbedderError, match="cannot load model.onnx") as err:
        oe.OnnxEmbedder(model)
    assert "\n" not in str(err.value) and isinstance(err.value, AtlasError)


NO_TORCH = blocking_preamble() + r"""
import json, sys
from query.onnx_embedder import OnnxEmbedder
emb = OnnxEmbedder(sys.argv[1])
vecs = emb.embed(json.loads(sys.argv[2]))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("RESULT", json.dumps({"name": emb.name, "vecs": vecs.tolist(), "loaded": loaded}))
"""


def test_runs_where_torch_cannot_be_imported(onnx_fp32):
    texts = ["red circle", "dog faces", "日本の寺"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(onnx_fp32[0]), json.dumps(texts)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["name"] == "minilm" and result["loaded"] == []
    here = oe.OnnxEmbedder(onnx_fp32[0]).embed(texts)
    np.testing.assert_allclose(np.asarray(result["vecs"], dtype=np.float32), here, atol=1e-5)


def test_pooling_modes_ignore_padding():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    tokens[1, 2:] = 100.0  # padding positions must not count
    mean, cls, top, sqrt = (oe.pool(tokens, mask, [m]) for m in ("mean", "cls", "max", "mean_sqrt_len_tokens"))
    np.testing.assert_allclose(mean[1], tokens[1, :2].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(sqrt[1], tokens[1, :2].sum(axis=0) / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(top[1], tokens[1, :2].max(axis=0))
    np.testing.assert_allclose(cls, tokens[:, 0])
    both = oe.pool(tokens, mask, ["cls", "mean"])
    assert both.shape == (2, 6) and np.allclose(both[:, 3:], mean)


def test_batches_respect_the_token_budget():
    lengths = np.array([5, 256, 7, 256, 3] + [10] * 100)
    batches = oe._batches(lengths)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert all(len(b) <= oe.BATCH_SIZE and len(b) * lengths[b].max() <= oe.TOKEN_BUDGET for b in batches)
    first = lengths[batches[0]].tolist()  # longest first; the batch is as wide as its first
    assert first[:2] == [256, 256] and len(first) == oe.TOKEN_BUDGET // 256


def test_queries_run_on_one_thread_and_bulk_on_half_the_cores(onnx_fp32, monkeypatch):
    monkeypatch.delenv("DND_ATLAS_EMBED_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    emb = oe.OnnxEmbedder(onnx_fp32[0])  # its own sessions
    emb.embed(["one query"])
    assert list(emb._sessions) == [1]
    emb.embed([f"label {i}" for i in range(oe.BATCH_SIZE + 1)])
    assert sorted(emb._sessions) == [1, 2]
    assert emb._sessions[2].get_session_options().intra_op_num_threads == 2


def _st_folder(tmp_path: Path, modules: list[str], pooling: dict, prompt: str | None = None) -> Path:
    folder = tmp_path / "st"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": i, "name": str(i), "path": ["", "1_Pooling", "2_Dense"][i],
          "type": f"sentence_transformers.models.{kind}"} for i, kind in enumerate(modules)]))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    if prompt:
        (folder / "config_sentence_transformers.json").write_text(json.dumps({"default_prompt_name": prompt}))
    return folder


def test_sentence_config_reads_pooling_and_refuses_what_does_not_export(tmp_path):
    from builder.embedder_export import ExportError, quantization_mode, read_sentence_config

    cfg = read_sentence_config(_st_folder(tmp_path / "a", ["Transformer", "Pooling"],
                                          {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}))
    assert (cfg.pooling, cfg.normalize, cfg.max_seq_length) == (("cls", "mean"), False, 128)
    cfg = read_sentence_config(_st_folder(tmp_path / "b", ["Transformer", "Pooling", "Normalize"],
                                          {"pooling_mode": "max"}))
    assert (cfg.pooling, cfg.normalize) == (("max",), True)
    with pytest.raises(ExportError, match="do not export"):
        read_sentence_config(_st_folder(tmp_path / "c", ["Transformer", "Pooling", "Dense"], {}))
    with pytest.raises(ExportError, match="weightedmean"):
        read_sentence_config(_st_folder(tmp_path / "d", ["Transformer", "Pooling"],
                                        {"pooling_mode": "weightedmean"}))
    with pytest.raises(ExportError, match="default prompt"):
        read_sentence_config(_st_folder(tmp_path / "e", ["Transformer", "Pooling"], {}, prompt="query"))
    assert [quantization_mode(q) for q in (False, True, "dynamic", "weights")] == \
        ["", "dynamic", "dynamic", "weights"]
    with pytest.raises(ExportError, match="valid: dynamic, weights"):
        quantization_mode("int4")


def test_quantize_weights_keeps_a_small_graph_close(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from builder.embedder_quantize import quantize_weights

    rng = np.random.default_rng(1)
    table = rng.normal(size=(100, 64)).astype(np.float32)
    weight = rng.normal(size=(64, 80)).astype(np.float32) * np.linspace(0.01, 3, 80, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
         helper.make_node("MatMul", ["rows", "weight"], ["out"])],
        "tiny", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", 80])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "weight")])
    src, dest = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    assert quantize_weights(src, dest) == 2
    q = onnx.load(str(dest))
    big_floats = [t.name for t in q.graph.initializer
                  if t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 1000]
    assert big_floats == []  # only scales stay float
    ids = rng.integers(0, 100, size=(3, 7))
    want = table[ids] @ weight
    got = ort.InferenceSession(str(dest), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    rel = np.abs(got - want).max(axis=(0, 1)) / np.abs(want).max(axis=(0, 1))
    assert rel.max() < 0.03  # per-column scales: small and large columns are equally precise
    assert dest.stat().st_size < 0.4 * src.stat().st_size


@pytest.mark.slow
def test_mpnet_reproduces_sentence_transformers(tmp_path):
    from builder.embedder_export import export_embedder
    from query.embedder import find_mpnet_parts, get_embedder

    try:
        find_mpnet_parts()
    except AtlasError:
        pytest.skip("the all-mpnet-base-v2 parts are not installed")
    export_embedder("mpnet", tmp_path / "mpnet")
    emb, st = oe.OnnxEmbedder(tmp_path / "mpnet"), get_embedder("mpnet")
    assert emb.dim == 768 and emb.manifest.max_seq_length == 384 and emb.manifest.inputs == (
        "input_ids", "attention_mask")
    vecs, ref = emb.embed(LABELS), st.embed(LABELS)
    cos = np.sum(vecs * ref, axis=1)
    assert cos.min() >= 0.999, LABELS[int(cos.argmin())]
    overlaps = _top10_overlaps(vecs, emb.embed(list(QUERIES)), ref, st.embed(list(QUERIES)))
    assert overlaps == [1.0] * len(QUERIES)


@pytest.mark.slow
def test_dynamo_exporter_reproduces_sentence_transformers(tmp_path, reference):
    from builder.embedder_export import export_embedder

    manifest = export_embedder("minilm", tmp_path / "dynamo", exporter="dynamo")
    assert manifest["exporter"] == "dynamo"
    cos = np.sum(oe.OnnxEmbedder(tmp_path / "dynamo").embed(LABELS) * reference[0], axis=1)
    assert cos.min() >= 0.999, LABELS[int(cos.argmin())]
