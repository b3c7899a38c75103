"""Progress bars on every long loop; ``DND_ATLAS_PROGRESS=0`` switches them off."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress_enabled() -> bool:
    """Bars are on unless DND_ATLAS_PROGRESS is 0/false/off."""
    return os.environ.get("DND_ATLAS_PROGRESS", "1").lower() not in ("0", "false", "off", "no")


def progress(**kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, disabled when progress is switched off."""
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(disable=not progress_enabled(), **kwargs)
