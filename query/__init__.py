"""dnd-atlas query: reading atlases (Python API, CLI search), the atlas format,
its FAISS index and the text embedder.

Importing this package never imports torch: embedders load it lazily, when a
search first needs to embed a query.
"""

from query.atlas import Atlas
from query.errors import AtlasError, AtlasNotFound, FormatVersionError, QueryError
from query.records import (
    Candidate,
    Evidence,
    Label,
    LayerInfo,
    ModelInfo,
    NeuronRecord,
    SearchHit,
)

__all__ = [
    "Atlas",
    "AtlasError",
    "AtlasNotFound",
    "Candidate",
    "Evidence",
    "FormatVersionError",
    "Label",
    "LayerInfo",
    "ModelInfo",
    "NeuronRecord",
    "QueryError",
    "SearchHit",
]
