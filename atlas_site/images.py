"""The atlas images a site shows, each published once under its atlas name.

The builder names images by content (``images/ev/<hash>.webp``), so a
thumbnail used by many neurons (the same probe image in several top-K lists,
the samples of a concept every neuron of a model shares) is one file in the
site. They are hard-linked from the atlas into ``docs/`` when the file
system allows it (mkdocs then copies them into the built site).
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

from query.schema import IMAGES_DIR

log = logging.getLogger(__name__)


class ImageSet:
    """The atlas images the pages use: validates each path once and remembers it.

    Paths in the atlas are relative to the atlas directory and must lie under
    ``images/``; anything else (absolute paths, ``..``, backslashes, characters
    outside ``[A-Za-z0-9_./-]``) is refused and the page shows a placeholder.
    """

    _OK_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-")

    def __init__(self) -> None:
        self.used: set[str] = set()
        self._ok: dict[str, bool] = {}

    def add(self, path: str | None) -> str | None:
        """The docs-relative path of an atlas image, or ``None`` when it is unsafe."""
        if not path or not isinstance(path, str):
            return None
        ok = self._ok.get(path)
        if ok is None:
            p = PurePosixPath(path)
            ok = (not p.is_absolute() and len(p.parts) > 1 and p.parts[0] == IMAGES_DIR
                  and ".." not in p.parts and set(path) <= self._OK_CHARS)
            if not ok:
                log.warning("skipping image outside %s/: %r", IMAGES_DIR, path)
            self._ok[path] = ok
        if not ok:
            return None
        self.used.add(path)
        return path


def publish_images(atlas_dir: Path, images: ImageSet, writer) -> tuple[int, int]:
    """Link every used image from the atlas into the project's ``docs/`` through
    ``writer`` (a :class:`atlas_site.output.ProjectWriter`); returns ``(published,
    added)``. An image missing from the atlas is logged and left out."""
    root = (atlas_dir / IMAGES_DIR).resolve()
    published = added = 0
    for rel in sorted(images.used):
        src = (atlas_dir / rel).resolve()
        if not src.is_relative_to(root) or not src.is_file():
            log.warning("image %s is missing from the atlas", rel)
            continue
        published += 1
        added += writer.link(f"docs/{rel}", src)
    return published, added
