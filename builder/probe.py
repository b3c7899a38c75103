"""Probe sets: any folder of images, read recursively.

Corrupt or unreadable files are skipped and counted, never fatal. An
optional ``captions.jsonl`` beside the images feeds the ``precomputed``
captioner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from builder.errors import BuildError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}


@dataclass(frozen=True)
class ProbeSet:
    """An image folder. ``files`` are paths relative to ``root``, sorted, so
    image index ``i`` means the same file in every run."""

    root: Path
    files: tuple[str, ...]

    @classmethod
    def scan(cls, root: str | Path) -> ProbeSet:
        """List every image file below ``root`` (hidden folders skipped)."""
        r = Path(root).expanduser().resolve()
        if not r.is_dir():
            raise BuildError(f"probe folder {str(root)!r} does not exist or is not a folder")
        files = []
        for dirpath, dirnames, filenames in os.walk(r):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                    files.append(os.path.relpath(os.path.join(dirpath, name), r).replace(os.sep, "/"))
        if not files:
            raise BuildError(f"probe folder {str(root)!r} holds no image files")
        return cls(r, tuple(sorted(files)))

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def open(self, i: int) -> Image.Image:
        """Image ``i`` as RGB; raises BuildError if the file is not an image."""
        return open_rgb(self.path(i))

    def fingerprint(self) -> str:
        """Identity of the folder's content: each file's relative path, size
        and modification time (hashing every byte of a 50k-image folder would
        cost minutes; captions are keyed by content separately)."""
        h = hashlib.sha256()
        for f in self.files:
            st = (self.root / f).stat()
            h.update(f"{f}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def captions(self) -> dict[str, str]:
        """``captions.jsonl`` (``{"file": ..., "caption": ...}`` per line), if any."""
        p = self.root / "captions.jsonl"
        out: dict[str, str] = {}
        if p.is_file():
            with open(p) as f:
                for n, line in enumerate(f, 1):
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                        out[str(rec["file"])] = str(rec["caption"])
                    except (ValueError, KeyError, TypeError) as exc:
                        raise BuildError(f"{p}:{n}: not a caption record: {exc}") from exc
        return out


def open_rgb(path: str | Path) -> Image.Image:
    """Load an image file fully, as RGB; a clear BuildError if it is not one."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BuildError(f"{path}: not a readable image ({exc.__class__.__name__})") from exc
