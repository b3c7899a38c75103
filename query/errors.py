"""Typed errors raised by the library; the CLI prints them as one line."""


class AtlasError(Exception):
    """Base class of every error dnd-atlas reports to a user."""


class AtlasNotFound(AtlasError):
    """The path holds no atlas."""


class FormatVersionError(AtlasError):
    """The atlas was written by an incompatible version of dnd-atlas."""


class QueryError(AtlasError):
    """A query is malformed: empty text, unknown model, layer or unit."""


class MergeError(AtlasError):
    """Shard atlases cannot be merged: other settings, conflicting neurons, a bad output folder."""


class AtlasDamaged(AtlasError):
    """The atlas database is truncated, corrupt or not a DuckDB file at all."""


class AtlasWriteError(AtlasError):
    """The atlas cannot be written: its folder is a file, read-only, or locked."""


class DiskFullError(AtlasWriteError):
    """A write failed for lack of space; what was committed before is intact."""
