"""Evaluation results in the atlas: the ``evaluations`` table (format v2),
written by ``dnd-atlas eval`` and read by ``info``, the site and ``--compare``.

Each protocol's run replaces that protocol's earlier rows in one
transaction, so the table always holds one coherent result per protocol.
Rows with ``model`` and ``layer`` set to ``''`` describe the whole atlas.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from query.errors import AtlasNotFound
from query.schema import DB_FILE

WHOLE = ""  # model / layer of an atlas-wide row


@dataclass(frozen=True)
class EvalRow:
    """One metric of one protocol, for a layer (or the whole atlas)."""

    model: str
    layer: str
    metric: str
    value: float | None
    details: dict[str, Any] = field(default_factory=dict)


def write_evaluations(atlas_dir: str | Path, protocol: str, rows: Sequence[EvalRow]) -> int:
    """Replace every row of ``protocol`` with ``rows`` in one transaction.

    Opens the atlas with :class:`query.writer.AtlasWriter`, which migrates an
    older atlas (no ``evaluations`` table) first. Returns the rows written."""
    from query.writer import AtlasWriter

    if not (Path(atlas_dir) / DB_FILE).is_file():
        raise AtlasNotFound(f"no atlas at {atlas_dir} ({DB_FILE} missing)")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    seen: set[tuple[str, str, str]] = set()
    values = []
    for r in rows:
        key = (r.model, r.layer, r.metric)
        if key in seen:
            raise ValueError(f"duplicate evaluation row {protocol}/{'/'.join(key)}")
        seen.add(key)
        details = json.dumps(clean_json(r.details), sort_keys=True, default=_json_default) if r.details else None
        values.append([protocol, r.model, r.layer, r.metric, _finite(r.value), details, now])
    with AtlasWriter(atlas_dir) as w:
        w.replace_evaluations(protocol, values)
    return len(values)


def read_evaluations(atlas_dir: str | Path, protocol: str | None = None) -> list[dict[str, Any]]:
    """The stored rows of an atlas (see :func:`evaluations`); ``[]`` for an
    atlas older than the table."""
    from query.atlas import Atlas

    with Atlas.open(atlas_dir, allow_older=True) as atlas:
        return evaluations(atlas, protocol)


def evaluations(atlas: Any, protocol: str | None = None) -> list[dict[str, Any]]:
    """An open atlas's ``dnd-atlas eval`` results (``details`` parsed), ordered
    by protocol, model, layer, metric; ``[]`` when it has none."""
    has = atlas.sql("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'evaluations'")
    if not has[0]["n"]:
        return []
    sql = "SELECT protocol, model, layer, metric, value, details, evaluated_at FROM evaluations"
    params: list[Any] = []
    if protocol is not None:
        sql += " WHERE protocol = ?"
        params.append(protocol)
    rows = atlas.sql(sql + " ORDER BY protocol, model, layer, metric", params)
    for r in rows:
        r["details"] = json.loads(r["details"]) if r["details"] else {}
    return rows


def clean_json(obj: Any) -> Any:
    """``obj`` with NaN and infinities replaced by None (strict JSON) and
    numpy scalars made plain."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _json_default(obj: Any) -> Any:
    # numpy scalars in per-unit details
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
