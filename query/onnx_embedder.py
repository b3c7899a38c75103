"""The atlas's text embedder as ONNX: queries embedded with onnxruntime, no torch.

An atlas carries its embedder in a folder (``embedder/`` inside the atlas)
written by :func:`builder.embedder_export.export_embedder`:

- ``model.onnx``: the transformer, inputs ``input_ids``, ``attention_mask``
  (and ``token_type_ids`` where the model takes them), int64 of shape
  ``(batch, sequence)``; output ``token_embeddings`` float32
  ``(batch, sequence, dim)``;
- ``tokenizer.json``: the `tokenizers` file of the sentence-transformers
  tokenizer, with truncation and padding left to the manifest;
- ``embedder.json``: the manifest (:class:`EmbedderManifest`): pooling,
  normalization, ``max_seq_length``, padding token, files with size and
  sha256, versions.

:class:`OnnxEmbedder` has the contract of :class:`query.embedder.Embedder`
(``name``, ``dim``, ``embed(texts)`` of unit float32 rows) and reproduces the
sentence-transformers output to a cosine of 1 - 1e-6 (fp32 export). This
module imports neither torch, transformers nor sentence-transformers, even
indirectly: onnxruntime and tokenizers only, imported when a folder is loaded.
:func:`query_embedder` picks what embeds an atlas's queries: its ONNX
embedder, or (for atlases built before it) sentence-transformers, loaded
only then.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from query.embedder import BATCH_SIZE, normalize, threads_for
from query.errors import AtlasError, FormatVersionError

log = logging.getLogger(__name__)

FORMAT = "dnd-atlas-onnx-embedder"
FORMAT_VERSION = 1
MANIFEST_FILE = "embedder.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
ATLAS_EMBEDDER_DIR = "embedder"  # the folder's name inside an atlas
ATLAS_META_KEY = "embedder_onnx"  # the atlas meta entry describing that folder (carried_meta)
BUILD_EXTRA = "pip install 'dnd-atlas[build]'"
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens")
TOKEN_BUDGET = 4096  # tokens per onnxruntime call, padding included (BATCH_SIZE texts at most)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
_ENCODING_FIELD = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


class EmbedderError(AtlasError):
    """An ONNX embedder folder is missing, incomplete or corrupt."""


class EmbedderUnavailable(AtlasError):
    """No embedder can embed an atlas's queries on this machine (no ONNX embedder, no torch stack)."""


@dataclass(frozen=True)
class EmbedderFile:
    """One file of the folder, with what it must hash to."""

    path: str  # relative to the folder
    size: int
    sha256: str


@dataclass(frozen=True)
class EmbedderManifest:
    """``embedder.json``: everything needed to reproduce sentence-transformers' output."""

    name: str  # the embedder name the atlas records (meta.embedder): minilm, mpnet, sentence:<path>
    dim: int
    pooling: tuple[str, ...]  # sentence-transformers pooling modes, concatenated in order
    normalize: bool  # the model ends with a Normalize module (rows are normalized anyway)
    max_seq_length: int  # truncation length in tokens, special tokens included
    lowercase: bool  # sentence-transformers' do_lower_case: lowercase before tokenizing
    pad_id: int
    pad_token: str
    inputs: tuple[str, ...]  # graph inputs, fed in this order
    model_file: str
    tokenizer_file: str
    files: tuple[EmbedderFile, ...]
    opset: int
    quantized: bool
    quantization: str = ""  # "" (fp32), "dynamic" or "weights" (int8; builder.embedder_quantize)
    exporter: str = ""
    versions: Mapping[str, str] = field(default_factory=dict)
    source: Mapping[str, Any] = field(default_factory=dict)
    check: Mapping[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        bad = [m for m in self.pooling if m not in POOLING_MODES]
        if not self.pooling or bad:
            raise EmbedderError(f"unsupported pooling {list(self.pooling)}; supported: {', '.join(POOLING_MODES)}")
        if self.dim <= 0 or self.max_seq_length <= 2:
            raise EmbedderError(f"bad manifest: dim {self.dim}, max_seq_length {self.max_seq_length}")
        if self.quantized != bool(self.quantization):
            raise EmbedderError(f"bad manifest: quantized {self.quantized} but quantization {self.quantization!r}")
        unknown = [i for i in self.inputs if i not in INPUT_NAMES]
        if "input_ids" not in self.inputs or unknown:
            raise EmbedderError(f"bad manifest inputs {list(self.inputs)}; known: {', '.join(INPUT_NAMES)}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to ``embedder.json`` (format and version first)."""
        d = {"format": self.format, "version": self.version}
        for key in self.__dataclass_fields__:
            if key in d:
                continue
            value = getattr(self, key)
            if key == "files":
                value = [vars(f).copy() for f in value]
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            d[key] = value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbedderManifest:
        """Parse a manifest; :class:`FormatVersionError` for another format version."""
        if d.get("format") != FORMAT:
            raise EmbedderError(f"not a dnd-atlas ONNX embedder manifest (format {d.get('format')!r})")
        if d.get("version") != FORMAT_VERSION:
            raise FormatVersionError(
                f"ONNX embedder format version {d.get('version')!r} is not supported "
                f"(this dnd-atlas reads version {FORMAT_VERSION}); re-export the embedder"
            )
        try:
            kw = dict(d)
            kw["files"] = tuple(EmbedderFile(**f) for f in d["files"])
            for key in ("pooling", "inputs"):
                kw[key] = tuple(d[key])
            return cls(**kw)
        except (KeyError, TypeError) as exc:
            raise EmbedderError(f"bad ONNX embedder manifest: {exc}") from None


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: str | os.PathLike[str], verify: bool = False) -> EmbedderManifest:
    """The manifest of an embedder folder, after checking its files exist with the right sizes.

    ``verify=True`` also checks every file's sha256 (about 0.25 s per 100 MB).
    Raises :class:`EmbedderError` naming what is missing or wrong.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise EmbedderError(f"{folder} holds no ONNX embedder (no {MANIFEST_FILE})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EmbedderError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise EmbedderError(f"{path} is not a JSON object")
    manifest = EmbedderManifest.from_dict(raw)
    for f in manifest.files:
        p = folder / f.path
        if not p.is_file():
            raise EmbedderError(f"ONNX embedder {folder}: {f.path} is missing")
        if p.stat().st_size != f.size:
            raise EmbedderError(f"ONNX embedder {folder}: {f.path} has {p.stat().st_size} bytes, expected {f.size}")
        if verify and sha256_file(p) != f.sha256:
            raise EmbedderError(f"ONNX embedder {folder}: {f.path} does not match its sha256")
    return manifest


class OnnxEmbedder:
    """An exported sentence-transformers model run with onnxruntime and tokenizers.

    ``embed(texts)`` returns a float32 array of shape ``(len(texts), dim)``
    whose rows have unit L2 norm, like :class:`query.embedder.Embedder`.
    """

    def __init__(self, folder: str | os.PathLike[str], verify: bool = False) -> None:
        start = time.perf_counter()
        self.path = Path(folder)
        self.manifest = read_manifest(self.path, verify=verify)
        self.name: str = self.manifest.name
        self.dim: int = self.manifest.dim
        self._tokenizer = self._load_tokenizer()
        self._sessions: dict[int, Any] = {}
        self._session(1)  # load now: a corrupt model should fail here, not at the first query
        log.info("loaded ONNX embedder %s from %s in %.2f s", self.name, self.path,
                 time.perf_counter() - start)

    def _load_tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        m = self.manifest
        try:
            tok = Tokenizer.from_file(str(self.path / m.tokenizer_file))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
            raise EmbedderError(f"ONNX embedder {self.path}: cannot read {m.tokenizer_file}: {exc}") from None
        tok.enable_truncation(max_length=m.max_seq_length)
        tok.enable_padding(direction="right", pad_id=m.pad_id, pad_token=m.pad_token)
        return tok

    def _session(self, threads: int) -> Any:
        """The onnxruntime session with ``threads`` intra-op threads (one per count, lazily)."""
        if threads not in self._sessions:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3
            # Spinning threads burn a shared machine's cores while they wait.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                self._sessions[threads] = ort.InferenceSession(
                    str(self.path / self.manifest.model_file), so, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # noqa: BLE001 - onnxruntime's exception types are not public API
                raise EmbedderError(
                    f"ONNX embedder {self.path}: cannot load {self.manifest.model_file}: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from None
        return self._sessions[threads]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; returns an ``(n, dim)`` float32 array of unit vectors."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not a single string")
        texts = [t.lower() for t in texts] if self.manifest.lowercase else list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        session = self._session(threads_for(len(texts)))
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        lengths = np.array([sum(e.attention_mask) for e in encodings])
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for rows in _batches(lengths):
            out[rows] = self._embed_batch(session, [encodings[i] for i in rows])
        return normalize(out)

    def _embed_batch(self, session: Any, encodings: list[Any]) -> np.ndarray:
        # encode_batch pads to the longest text of the whole call; trim to this batch's.
        width = max(sum(e.attention_mask) for e in encodings)
        feed = {
            name: np.array([getattr(e, _ENCODING_FIELD[name])[:width] for e in encodings], dtype=np.int64)
            for name in self.manifest.inputs
        }
        mask = feed.get("attention_mask")
        if mask is None:
            mask = np.array([e.attention_mask[:width] for e in encodings], dtype=np.int64)
        (tokens,) = session.run(["token_embeddings"], feed)
        return pool(tokens, mask, self.manifest.pooling)

    def __repr__(self) -> str:
        q = ", int8" if self.manifest.quantized else ""
        return f"OnnxEmbedder(name={self.name!r}, dim={self.dim}{q}, path={str(self.path)!r})"


def _batches(lengths: np.ndarray) -> list[np.ndarray]:
    """Row indices in batches of similar token lengths, each within :data:`TOKEN_BUDGET`.

    Longest first, as sentence-transformers sorts; a budget instead of a
    fixed count keeps one long text from padding 63 short ones to its length.
    """
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        width = int(lengths[order[start]])  # the longest of this batch
        size = max(1, min(BATCH_SIZE, TOKEN_BUDGET // max(width, 1)))
        batches.append(order[start:start + size])
        start += size
    return batches


def pool(tokens: np.ndarray, mask: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Sentence vectors from token embeddings, as sentence-transformers' Pooling does.

    ``tokens`` is ``(batch, sequence, dim)``, ``mask`` the right-padded
    attention mask; one ``(batch, dim)`` block per mode, concatenated.
    """
    m = mask[..., None].astype(np.float32)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(tokens[:, 0])
        elif mode == "max":
            out.append(np.where(m > 0, tokens, -np.inf).max(axis=1))
        else:
            count = np.clip(m.sum(axis=1), 1e-9, None)
            total = (tokens * m).sum(axis=1)
            out.append(total / (count if mode == "mean" else np.sqrt(count)))
    return np.concatenate(out, axis=1).astype(np.float32)


@functools.cache
def _cached(folder: str) -> OnnxEmbedder:
    return OnnxEmbedder(folder)


def get_onnx_embedder(folder: str | os.PathLike[str]) -> OnnxEmbedder:
    """The ONNX embedder in ``folder``, loaded once per process."""
    return _cached(str(Path(folder).resolve()))


def atlas_embedder(atlas_dir: str | os.PathLike[str]) -> OnnxEmbedder | None:
    """The ONNX embedder an atlas carries (``ATLAS/embedder/``), or ``None`` when it has none."""
    folder = Path(atlas_dir) / ATLAS_EMBEDDER_DIR
    if not (folder / MANIFEST_FILE).is_file():
        return None
    return get_onnx_embedder(folder)


def carried_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The atlas meta entry (:data:`ATLAS_META_KEY`) for the embedder folder an atlas carries.

    What ``dnd-atlas info`` shows: the folder (relative to the atlas), the
    embedder's name and dimension, its quantization, the model file's sha256
    and the folder's size in bytes.
    """
    m = read_manifest(folder)
    model = next((f for f in m.files if f.path == m.model_file), None)
    return {
        "path": ATLAS_EMBEDDER_DIR, "name": m.name, "dim": m.dim, "quantization": m.quantization,
        "model_sha256": model.sha256 if model else "", "bytes": sum(f.size for f in m.files),
        "format_version": m.version,
    }


def query_embedder(atlas_dir: str | os.PathLike[str], name: str) -> Any:
    """The embedder that embeds search queries for the atlas at ``atlas_dir``, whose meta names ``name``.

    The atlas's own ONNX embedder (``ATLAS/embedder/``, no torch) when it
    carries one exported from ``name``; else ``name`` loaded with
    sentence-transformers (:func:`query.embedder.get_embedder`), the way
    atlases built before the ONNX embedder are read. Raises
    :class:`EmbedderUnavailable` (one line, what to install or run) when the
    atlas has no ONNX embedder and sentence-transformers cannot load here, and
    :class:`EmbedderError` for a corrupt embedder folder.
    """
    folder = Path(atlas_dir) / ATLAS_EMBEDDER_DIR
    if (folder / MANIFEST_FILE).is_file():
        found = read_manifest(folder).name
        if found == name:
            return get_onnx_embedder(folder)
        log.warning("%s was exported from embedder %r, but the atlas's labels were embedded with %r; "
                    "ignoring it", folder, found, name)
    why = _sentence_transformers_missing()
    if why is None:
        from query.embedder import get_embedder

        try:
            return get_embedder(name)
        except ImportError as exc:  # sentence-transformers is there but torch (or another dependency) is not
            why = f"the Python package {exc.name or 'torch'!r} is not installed"
    raise EmbedderUnavailable(
        f"the atlas {atlas_dir} has no ONNX embedder and {why}: add one with "
        f"`dnd-atlas export-embedder {atlas_dir}` where dnd-atlas[build] is installed, or {BUILD_EXTRA} here"
    )


def _sentence_transformers_missing() -> str | None:
    """Why the sentence-transformers path cannot load here, or ``None`` when it may."""
    for module in ("sentence_transformers", "torch"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"{module.replace('_', '-')} is not installed"
        except (ImportError, ValueError):  # a blocked or broken import machinery counts as missing
            return f"{module.replace('_', '-')} is not installed"
    return None
