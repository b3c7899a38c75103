"""The ONNX embedder an atlas carries, so that reading and searching it needs no torch.

Every build exports the config's ``embedder`` (fp32, or int8 with
``embedder_quantize``) into ``ATLAS/embedder/`` and records it in the meta
(``embedder_onnx``, :func:`query.onnx_embedder.carried_meta`);
``dnd-atlas export-embedder ATLAS`` adds one to an atlas built before.

An export takes about 13 s for minilm on 2 busy cores, so it is made once
per model files, settings and name into the user's cache
(``$DND_ATLAS_CACHE/onnx-embedders/``, see :func:`query.embedder.cache_root`)
and copied into each atlas (hard links where the file system allows): a
second build pays only the sha256 checks, well under a second. Each copy is
staged beside ``ATLAS/embedder`` and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from builder.embedder_export import (
    DEFAULT_OPSET,
    ExportError,
    current_export,
    export_embedder,
    quantization_mode,
    resolve_embedder,
    source_digest,
)
from query.embedder import cache_root
from query.onnx_embedder import (
    ATLAS_EMBEDDER_DIR,
    ATLAS_META_KEY,
    FORMAT_VERSION,
    carried_meta,
    read_manifest,
)

log = logging.getLogger(__name__)

EXPORTS_DIR = "onnx-embedders"  # under cache_root()
BUILD_STACK = ("torch", "sentence_transformers", "onnx")  # what exporting needs beyond the light install


def cached_export(name: str, quantize: bool | str = "", force: bool = False) -> Path:
    """A folder of the user's cache holding a current ONNX export of embedder ``name``.

    Exported on the first call for these model files and settings (an
    :class:`ExportError` when the model does not export), reused afterwards.
    """
    mode = quantization_mode(quantize)
    name, folder = resolve_embedder(name)
    key = hashlib.sha256(json.dumps(
        {"name": name, "source": source_digest(folder), "mode": mode, "opset": DEFAULT_OPSET,
         "format": FORMAT_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name.rsplit("/", 1)[-1])[:40]
    dest = cache_root() / EXPORTS_DIR / f"{slug}-{mode or 'fp32'}-{key}"
    export_embedder(name, dest, quantize=mode, force=force)
    return dest


def carry_embedder(atlas_dir: str | os.PathLike[str], name: str, quantize: bool | str = "",
                   force: bool = False) -> dict[str, Any]:
    """Make ``ATLAS/embedder/`` a current ONNX export of embedder ``name``; returns its meta entry.

    ``quantize``: ``""`` (fp32), ``"dynamic"`` or ``"weights"`` (int8, see
    :mod:`builder.embedder_quantize`). A folder already current (same model
    files, name and settings, intact) is kept as it is unless ``force``.
    Raises :class:`ExportError` when the model cannot be exported.
    """
    mode = quantization_mode(quantize)
    target = Path(atlas_dir) / ATLAS_EMBEDDER_DIR
    if not force and current_export(target, name, mode) is not None:
        return carried_meta(target)
    try:
        source = cached_export(name, mode, force=force)
    except OSError as exc:  # an unwritable cache: export straight into the atlas
        log.warning("cannot use the export cache (%s); exporting into %s", exc, target)
        export_embedder(name, target, quantize=mode, force=True)
        return carried_meta(target)
    _copy_folder(source, target)
    read_manifest(target, verify=True)
    log.info("the atlas %s carries ONNX embedder %s (%s)", atlas_dir, name, mode or "fp32")
    return carried_meta(target)


def carried_embedder_meta(atlas_dir: str | os.PathLike[str], name: str,
                          quantize: bool | str = "") -> dict[str, Any]:
    """What a build adds to the atlas meta: ``{"embedder_onnx": ...}`` after :func:`carry_embedder`.

    An embedder that does not export is not fatal to a build: it is logged
    and ``{}`` returned, and the atlas is searched with sentence-transformers.
    """
    try:
        return {ATLAS_META_KEY: carry_embedder(atlas_dir, name, quantize)}
    except ExportError as exc:
        log.warning("the atlas will not carry an ONNX embedder (searching it needs torch): %s", exc)
        return {}


def _copy_folder(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` (hard links where possible), replacing ``dest`` atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    old = dest.with_name(f".{dest.name}-old-{os.getpid()}")
    try:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                out = tmp / path.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, out)
                except OSError:
                    shutil.copy2(path, out)
        tmp.chmod(0o755)  # mkdtemp makes it private; an atlas is shared like any folder
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def export_atlas_embedder(atlas: str | os.PathLike[str], quantize: bool | str = "",
                          force: bool = False) -> dict[str, Any]:
    """Add (or refresh) the ONNX embedder of an existing atlas; returns its meta entry.

    ``dnd-atlas export-embedder``: the embedder the atlas's meta names is
    exported into ``ATLAS/embedder/`` and recorded in the meta. The atlas is
    opened for writing (an older format is migrated, as any writer does) before
    the export, so a locked atlas (being served or built) fails at once.
    """
    from query.atlas import Atlas
    from query.errors import AtlasError
    from query.writer import AtlasWriter

    _require_build_stack()
    mode = quantization_mode(quantize)
    with Atlas.open(atlas, read_only=True, allow_older=True) as reader:  # AtlasNotFound, newer format
        atlas_dir = reader.path
    writer = AtlasWriter(atlas_dir)
    try:
        name = writer.meta().get("embedder")
        if not name:
            raise AtlasError(f"the atlas {atlas} names no embedder in its meta; rebuild it")
        entry = carry_embedder(atlas_dir, str(name), mode, force=force)
        writer.set_meta(**{ATLAS_META_KEY: entry})
    finally:
        writer.close()
    return entry


def _require_build_stack() -> None:
    """Raise ModuleNotFoundError for the first package of the exporter that is missing,
    before anything is opened (the CLI says to install ``dnd-atlas[build]``)."""
    import importlib.util

    for module in BUILD_STACK:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
