"""The ONNX embedder for test and bench atlases: exported once into the user's
cache (13 s to a minute on 2 busy cores), then hard-linked into each atlas's
``embedder/`` folder (what a build writes there, see :mod:`query.onnx_embedder`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from query.embedder import cache_root
from query.onnx_embedder import ATLAS_EMBEDDER_DIR, MANIFEST_FILE, read_manifest

EXPORTS = "onnx-embedders"


def onnx_export(name: str = "minilm") -> Path:
    """A folder holding a current fp32 ONNX export of embedder ``name`` (made on first use)."""
    from builder.embedder_export import export_embedder

    folder = cache_root() / EXPORTS / f"testkit-{name}-fp32"
    export_embedder(name, folder)
    return folder


def carry_embedder(atlas_dir: Path, folder: Path) -> Path:
    """Put the export in ``folder`` into ``atlas_dir/embedder/`` (hard links where possible)."""
    manifest = read_manifest(folder)
    target = Path(atlas_dir) / ATLAS_EMBEDDER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_FILE, *(f.path for f in manifest.files)):
        dst = target / name
        dst.unlink(missing_ok=True)
        try:
            os.link(folder / name, dst)
        except OSError:
            shutil.copyfile(folder / name, dst)
    return target
