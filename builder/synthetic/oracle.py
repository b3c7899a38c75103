"""The oracle captioner: exact captions of synthetic probe images (or crops
of them) from the render metadata, so the Describe stage has no captioning
error and label quality measures the rest of the pipeline. It captions the
world the probe folder's manifest names (shapes or marks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from builder.backends.interfaces import Captioner, CaptionItem
from builder.errors import BackendError
from builder.synthetic.probe import load_truth, load_world_index, manifest_world, read_manifest


class OracleCaptioner(Captioner):
    """Captions items whose ``source`` is a file of the synthetic probe set in
    ``probe_dir`` (relative to it, like "images/00000.png", or an absolute
    path inside it) with the caption rule of the folder's world
    (``world.caption`` or ``marks_captions.caption``) for ``item.box``."""

    name = "oracle"

    def __init__(self, probe_dir: str | Path) -> None:
        self.root = Path(probe_dir).resolve()
        manifest = read_manifest(self.root)
        if manifest is None:
            raise BackendError(f"oracle captioner: {self.root} is not a synthetic probe set")
        self.manifest = manifest
        self.world = manifest_world(manifest)
        self._index = load_world_index(self.root)
        self._truth: dict[str, dict[str, np.ndarray]] = {}

    def config_key(self) -> dict[str, Any]:
        """Name plus the world manifest (n, size, seed, format version)."""
        return {"name": self.name, "world": self.manifest}

    def _find(self, source: str) -> str | None:
        """The index key of ``source``, None when the world did not render it."""
        p = Path(source)
        if p.is_absolute():
            try:
                p = p.resolve().relative_to(self.root)
            except ValueError:
                raise BackendError(
                    f"oracle captioner: {source!r} is not inside the probe set {self.root}"
                ) from None
        key = p.as_posix()
        return key if key in self._index else None

    def _key(self, source: str) -> str:
        key = self._find(source)
        if key is None:
            raise BackendError(
                f"oracle captioner: {source!r} is not an image of the probe set {self.root}"
            )
        return key

    def scene_of(self, source: str) -> Any:
        """The scene rendered in probe file ``source``."""
        return self._index[self._key(source)][0]

    def caption(self, items: Sequence[CaptionItem]) -> list[str | None]:
        """One exact caption per item (the crop's when ``item.box`` is set);
        None for an image the world did not render (a file someone added to
        the folder): the neuron is described from its other images."""
        out: list[str | None] = []
        for item in items:
            key = self._find(item.source)
            if key is None:
                out.append(None)
                continue
            scene = self._index[key][0]
            if key not in self._truth:
                self._truth[key] = load_truth(self.root, key)
            out.append(self.world.caption(scene, self._truth[key], item.box))
        return out

