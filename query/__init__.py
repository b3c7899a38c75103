"""dnd-atlas query: reading atlases (Python API, CLI search), the atlas format,
its FAISS index and the text embedder.

Importing this package never imports torch: embedders load it lazily, when a
search first needs to embed a query. Its names load on first use, so
importing ``query.cli`` (every ``dnd-atlas`` invocation) costs no DuckDB.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Atlas": "query.atlas",
    "AtlasError": "query.errors",
    "AtlasNotFound": "query.errors",
    "FormatVersionError": "query.errors",
    "QueryError": "query.errors",
    "Candidate": "query.records",
    "Evidence": "query.records",
    "Label": "query.records",
    "LayerInfo": "query.records",
    "ModelInfo": "query.records",
    "NeuronRecord": "query.records",
    "SearchHit": "query.records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'query' has no attribute {name!r}")
