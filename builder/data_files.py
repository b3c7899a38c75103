"""Where the files the product ships (``data/``) are found once installed."""

from __future__ import annotations

from pathlib import Path


def data_root() -> Path:
    """The installed ``data/`` folder (package ``dnd_atlas_data``), or the
    repository's when running from a checkout without installing."""
    try:
        import dnd_atlas_data

        return Path(dnd_atlas_data.__file__).resolve().parent
    except ImportError:
        return Path(__file__).resolve().parents[1] / "data"


def data_path(*parts: str) -> Path:
    """A path inside ``data/``."""
    return data_root().joinpath(*parts)
