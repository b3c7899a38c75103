"""The files of the site's semantic search: the search box ranks neurons by cosine in
the browser, as ``dnd-atlas search`` does, with no server.

Written under ``docs/`` when the atlas carries its ONNX embedder
(``ATLAS/embedder/``) and the browser runtime is in the cache
(:mod:`atlas_site.runtime`); otherwise the site has keyword search only and
the build says why in one warning::

    assets/onnxruntime-web-1.30.0/         the runtime (ES module, gzip-compressed .wasm, NOTICE)
    data/semantic/index.json               what to load: files, sizes, embedder settings
    data/semantic/model-<sha>/model.onnx.N the atlas's ONNX embedder, in parts of at most 45 MiB
    data/semantic/tokenizer.json.gz        its tokenizer
    data/semantic/labels.json.gz           layers (in Python's (model, layer) order), label
                                           texts and, per text, [layer, unit, rank, ...]
    data/semantic/vectors.<dtype>.N        one unit vector per text, row-major, little-endian

The browser fetches them on the first search only. Vectors: one per distinct
label text (copies of a text tie, :mod:`query.ranking`), float16 (half the
bytes of the atlas's float32; a unit vector's cosines move by at most ~1e-3,
typically ~1e-4, so only two distinct texts closer than that to the query can
swap places against ``dnd-atlas search``).
"""

from __future__ import annotations

import gzip
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atlas_site.assets import MODULES, STATIC
from atlas_site.data import gzip_json, layer_path
from atlas_site.output import ProjectWriter
from atlas_site.runtime import MODULE, ONNXRUNTIME_WEB, WASM, WebRuntime
from query import Atlas
from query.bulk import ok_label_vectors, ok_labels
from query.onnx_embedder import ATLAS_EMBEDDER_DIR, EmbedderError, EmbedderManifest, read_manifest

log = logging.getLogger(__name__)

FORMAT = 1
SEMANTIC_DIR = "data/semantic"
INDEX_FILE = f"{SEMANTIC_DIR}/index.json"
PART_BYTES = 45 * 2**20  # GitHub warns about files over 50 MB (and refuses them over 100 MB)
VECTOR_DTYPE = "float16"  # the compact form of the label vectors (the browser also reads float32)
TOKENIZER_PARTS = {  # what atlas_site/static/semantic/wordpiece.mjs implements
    "model": ("WordPiece",),
    "normalizer": ("BertNormalizer",),
    "pre_tokenizer": ("BertPreTokenizer",),
    "post_processor": ("TemplateProcessing", "BertProcessing", "RobertaProcessing"),
}


@dataclass(frozen=True)
class SemanticLabels:
    """What the browser ranks: layers in Python's (model, layer) order (the tie order),
    distinct label texts of 'ok' neurons, per text the flat ``[layer, unit, rank, ...]``
    of its labels, and per text the label whose stored vector stands for it."""

    layers: tuple[tuple[str, str], ...]
    texts: tuple[str, ...]
    refs: tuple[tuple[int, ...], ...]
    vector_of: tuple[int, ...]  # label_id per text (the smallest with a vector)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``labels.json.gz``."""
        return {"format": FORMAT,
                "layers": [{"path": layer_path(m, ly), "model": m, "layer": ly} for m, ly in self.layers],
                "texts": list(self.texts), "refs": [list(r) for r in self.refs]}


def semantic_labels(atlas: Atlas) -> tuple[SemanticLabels, np.ndarray]:
    """The labels of the atlas's 'ok' neurons as the browser ranks them, and one stored
    vector per text (float32, texts x dim). A text none of whose labels has a vector is
    left out, as ``dnd-atlas search`` never finds it."""
    rows = ok_labels(atlas)  # first: it also finishes any pending result on the connection
    ids, vecs = ok_label_vectors(atlas)
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    first: dict[str, int] = {}
    for r in rows:
        lid = int(r["label_id"])
        if lid in row_of and (r["text"] not in first or lid < first[r["text"]]):
            first[r["text"]] = lid
    layers = tuple(sorted({(r["model"], r["layer"]) for r in rows if r["text"] in first}))
    pos = {key: i for i, key in enumerate(layers)}
    texts = tuple(sorted(first))
    tpos = {t: i for i, t in enumerate(texts)}
    refs: list[list[int]] = [[] for _ in texts]
    for r in rows:
        if r["text"] in tpos:
            refs[tpos[r["text"]]].extend((pos[(r["model"], r["layer"])], int(r["unit"]), int(r["rank"])))
    vector_of = tuple(first[t] for t in texts)
    dim = vecs.shape[1] if len(ids) else 0
    out = vecs[[row_of[i] for i in vector_of]] if texts else np.zeros((0, dim), np.float32)
    return SemanticLabels(layers, texts, tuple(map(tuple, refs)), vector_of), out


def encode_vectors(vecs: np.ndarray, dtype: str) -> bytes:
    """The vectors as the browser reads them: row-major, little-endian ``dtype``."""
    return np.ascontiguousarray(vecs, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def split(data: bytes | memoryview, part_bytes: int | None = None) -> list[memoryview]:
    """``data`` in consecutive parts of at most ``part_bytes`` (default :data:`PART_BYTES`;
    one part, possibly empty, at least)."""
    part_bytes = part_bytes or PART_BYTES
    view = memoryview(data)
    return [view[i:i + part_bytes] for i in range(0, max(len(view), 1), part_bytes)]


def embedder_problem(atlas: Atlas, dim: int) -> str | None:
    """Why the atlas's embedder cannot run the site's search (``None`` when it can)."""
    folder = atlas.path / ATLAS_EMBEDDER_DIR
    try:
        manifest = read_manifest(folder)
    except EmbedderError as exc:
        return f"the atlas carries no usable ONNX embedder ({exc})"
    if manifest.name != atlas.meta.get("embedder"):
        return (f"the atlas's ONNX embedder is {manifest.name!r} but its labels were embedded "
                f"with {atlas.meta.get('embedder')!r}")
    if dim and manifest.dim != dim:
        return f"the ONNX embedder gives {manifest.dim} dimensions, the label vectors {dim}"
    try:
        spec = json.loads((folder / manifest.tokenizer_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"cannot read the embedder's {manifest.tokenizer_file}: {exc}"
    for part, kinds in TOKENIZER_PARTS.items():
        kind = (spec.get(part) or {}).get("type")
        if kind not in kinds:
            return f"its tokenizer's {part} is {kind}; the browser reads {', '.join(kinds)}"
    return None


def _parts(writer: ProjectWriter, prefix: str, rel: str, data: bytes | memoryview) -> list[str]:
    names = []
    for i, part in enumerate(split(data)):
        name = f"{rel}.{i}"
        writer.data(prefix + name, part)
        names.append(name)
    return names


def _runtime(writer: ProjectWriter, prefix: str, folder: Path, spec: WebRuntime) -> dict[str, Any]:
    base = f"assets/{spec.folder_name}"
    for path in (*spec.files, "NOTICE.txt"):
        name = spec.stored_name(path) if path in spec.files else path
        writer.link(f"{prefix}{base}/{name}", folder / name)
    return {"name": spec.name, "version": spec.version, "dir": base,
            "module": f"{base}/{spec.stored_name(MODULE)}", "wasm": f"{base}/{spec.stored_name(WASM)}"}


def _embedder_settings(m: EmbedderManifest) -> dict[str, Any]:
    return {"name": m.name, "dim": m.dim, "pooling": list(m.pooling), "lowercase": m.lowercase,
            "max_seq_length": m.max_seq_length, "inputs": list(m.inputs),
            "quantization": m.quantization}


def write_semantic(atlas: Atlas, writer: ProjectWriter, runtime: Path | None,
                   prefix: str = "docs/", spec: WebRuntime = ONNXRUNTIME_WEB) -> dict[str, Any] | None:
    """Write the semantic search files through ``writer`` (paths under ``prefix``).

    Returns what ``site.json`` says about it (``{"index": ..., "bytes": ...}``), or
    ``None`` after one warning saying why the site has keyword search only.
    """
    labels, vecs = semantic_labels(atlas)
    problem = embedder_problem(atlas, vecs.shape[1] if len(vecs) else 0)
    if runtime is None:
        problem = problem or (
            f"{spec.folder_name} is not in the cache; fetch it once with "
            f"`{Path(sys.executable).name} -m atlas_site.runtime` (one download from "
            "registry.npmjs.org, or --tarball FILE)")
    if problem is None and not labels.texts:
        problem = "the atlas has no labelled neurons with vectors"
    if problem is not None:
        log.warning("the site has keyword search only: %s", problem)
        return None
    manifest = read_manifest(atlas.path / ATLAS_EMBEDDER_DIR)
    if manifest.quantized:
        log.warning("the site's semantic search uses the atlas's %s int8 embedder: its similarities "
                    "differ from an fp32 embedder's", manifest.quantization)
    files = _write_files(atlas, writer, prefix, runtime, spec, manifest, labels, vecs)
    sizes = {rel: (writer.root / prefix / rel).stat().st_size for rel in files["all"]}
    sizes.update({f"assets/{m}": (STATIC / m).stat().st_size for m in MODULES})
    index = {"format": FORMAT, **{k: v for k, v in files.items() if k != "all"},
             "bytes": sum(sizes.values()), "files": sizes}
    raw = json.dumps(index, ensure_ascii=False, indent=1).encode()
    writer.data(prefix + INDEX_FILE, raw)
    total = index["bytes"] + len(raw)
    log.info("semantic search: %d label texts (%s), %.1f MB loaded on the first search",
             len(labels.texts), files["vectors"]["dtype"], total / 1e6)
    return {"index": INDEX_FILE, "bytes": total}


def _write_files(atlas: Atlas, writer: ProjectWriter, prefix: str, runtime: Path, spec: WebRuntime,
                 manifest: EmbedderManifest, labels: SemanticLabels,
                 vecs: np.ndarray) -> dict[str, Any]:
    """Write every file but the index; returns the index's entries (and ``all``: the paths)."""
    folder = atlas.path / ATLAS_EMBEDDER_DIR
    model_sha = next(f.sha256 for f in manifest.files if f.path == manifest.model_file)
    model_bytes = (folder / manifest.model_file).read_bytes()
    model = _parts(writer, prefix, f"{SEMANTIC_DIR}/model-{model_sha[:12]}/model.onnx", model_bytes)
    tokenizer = f"{SEMANTIC_DIR}/tokenizer.json.gz"
    writer.data(prefix + tokenizer, gzip.compress((folder / manifest.tokenizer_file).read_bytes(),
                                                  compresslevel=9, mtime=0))
    labels_file = f"{SEMANTIC_DIR}/labels.json.gz"
    writer.data(prefix + labels_file, gzip_json(labels.to_dict()))
    dtype = VECTOR_DTYPE
    raw = encode_vectors(vecs, dtype)
    vectors = _parts(writer, prefix, f"{SEMANTIC_DIR}/vectors.{dtype}", raw)
    rt = _runtime(writer, prefix, runtime, spec)
    written: Sequence[str] = [*model, tokenizer, labels_file, *vectors, rt["module"], rt["wasm"]]
    return {"embedder": _embedder_settings(manifest), "runtime": rt,
            "model": {"parts": model, "bytes": len(model_bytes), "sha256": model_sha},
            "tokenizer": tokenizer, "labels": labels_file,
            "vectors": {"parts": vectors, "bytes": len(raw), "dtype": dtype,
                        "rows": len(labels.texts), "dim": int(vecs.shape[1])},
            "all": list(written)}
