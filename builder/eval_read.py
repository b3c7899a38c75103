"""What the evaluation protocols read from an atlas, in a few queries.

Reads with a plain read-only DuckDB connection (which also reads a v1
atlas), closed before any protocol writes its results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from builder.errors import BuildError
from query.schema import DB_FILE


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
        ids = [self.label_ids[k] for k in keys]
        if not ids:
            return np.zeros((0, 0), np.float32)
        con = duckdb.connect(str(self.path / DB_FILE), read_only=True)
        try:
            rows = dict(
                con.execute(
                    f"SELECT label_id, vec FROM label_vectors WHERE label_id IN ({','.join('?' * len(ids))})",
                    ids,
                ).fetchall()
            )
        finally:
            con.close()
        return np.stack([np.asarray(rows[i], dtype=np.float32) for i in ids])


def read_atlas(atlas_dir: str | Path) -> AtlasView:
    """Meta, models, layers and label 1 of each described neuron of an atlas."""
    path = Path(atlas_dir)
    db = path / DB_FILE
    if not db.is_file():
        raise BuildError(f"no atlas at {atlas_dir} ({DB_FILE} missing)")
    con = duckdb.connect(str(db), read_only=True)
    try:
        meta = {}
        for k, v in con.execute("SELECT key, value FROM meta").fetchall():
            try:
                meta[k] = json.loads(v)
            except ValueError:
                meta[k] = v
        models = {
            name: {"target": target, "config": json.loads(config) if config else {}}
            for name, target, config in con.execute(
                "SELECT model, target, config FROM models"
            ).fetchall()
        }
        layers = tuple(
            LayerRow(m, la, int(p), int(n))
            for m, la, p, n in con.execute(
                "SELECT model, layer, position, n_units FROM layers ORDER BY model, position"
            ).fetchall()
        )
        labels: dict[tuple[str, str, int], str] = {}
        ids: dict[tuple[str, str, int], int] = {}
        for m, la, u, text, lid in con.execute(
            "SELECT l.model, l.layer, l.unit, l.text, l.label_id FROM labels l JOIN neurons n "
            "ON n.model = l.model AND n.layer = l.layer AND n.unit = l.unit "
            "WHERE l.rank = 1 AND n.status = 'ok' ORDER BY l.model, l.layer, l.unit"
        ).fetchall():
            labels[(m, la, int(u))] = text
            ids[(m, la, int(u))] = int(lid)
    finally:
        con.close()
    return AtlasView(path, meta, models, layers, labels, ids)
