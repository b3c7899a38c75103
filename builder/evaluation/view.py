"""What the evaluation protocols read from an atlas, in a few reads through
``query`` (which also reads older format versions), closed before any
protocol writes its results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LayerRow:
    model: str
    layer: str
    position: int
    n_units: int


@dataclass(frozen=True)
class AtlasView:
    """The parts of an atlas the protocols use."""

    path: Path
    meta: dict[str, Any]
    models: dict[str, dict[str, Any]]  # name -> {"target": spec, "config": model config}
    layers: tuple[LayerRow, ...]  # in model, position order
    labels: dict[tuple[str, str, int], str]  # label 1 of every neuron with status ok
    label_ids: dict[tuple[str, str, int], int]  # its label_id (row of label_vectors)

    @property
    def ground_truth(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The synthetic world's known unit concepts (``{}`` for a real model)."""
        return self.meta.get("ground_truth") or {}

    def model_layers(self, model: str) -> list[LayerRow]:
        return [li for li in self.layers if li.model == model]

    def layer_labels(self, model: str, layer: str) -> dict[int, str]:
        """unit -> label 1, for the described units of one layer."""
        return {u: t for (m, la, u), t in self.labels.items() if m == model and la == layer}

    def label_vectors(self, keys: list[tuple[str, str, int]]) -> np.ndarray:
        """The stored (L2-normalized, ``meta.embedder``) vectors of these units' label 1."""
        from query.atlas import Atlas
        from query.bulk import label_vectors_of

        with Atlas.open(self.path, allow_older=True) as atlas:
            return label_vectors_of(atlas, [self.label_ids[k] for k in keys])

    def build_config(self, protocol: str) -> Any:
        """The atlas's build config (its meta ``build_config``) as a
        ``BuildConfig``, for protocols that rerun the build's backends."""
        from builder.config import BuildConfig
        from builder.errors import BuildError

        view = self
        raw = view.meta.get("build_config")
        if not isinstance(raw, dict):
            raise BuildError(f"{protocol}: the atlas at {view.path} has no build_config in its meta")
        raw = dict(raw)
        models = []
        for m in raw.get("models", []):
            m = dict(m)
            # the redaction of secrets also hides `vit_tokens` ("token"); the models table has it
            if m.get("vit_tokens") == "<redacted>":
                m["vit_tokens"] = (
                    view.models.get(m.get("name"), {}).get("config", {}).get("vit_tokens") or "cls"
                )
            models.append(m)
        raw["models"] = models
        try:
            return BuildConfig.from_dict(raw)
        except BuildError as exc:
            raise BuildError(f"{protocol}: the atlas's build_config does not load: {exc}") from exc


def read_atlas(atlas_dir: str | Path) -> AtlasView:
    """Meta, models, layers and label 1 of each described neuron of an atlas
    (any format version this dnd-atlas reads)."""
    from query.atlas import Atlas
    from query.bulk import first_labels

    with Atlas.open(atlas_dir, allow_older=True) as atlas:
        models = {m.model: {"target": m.target, "config": m.config} for m in atlas.models()}
        layers = tuple(LayerRow(li.model, li.layer, li.position, li.n_units)
                       for li in sorted(atlas.layers(), key=lambda li: (li.model, li.position)))
        first = first_labels(atlas)
        return AtlasView(Path(atlas_dir), atlas.meta, models, layers, {k: t for k, (t, _) in first.items()},
                         {k: i for k, (_, i) in first.items()})
