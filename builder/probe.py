"""Probe sets: any folder of images, read recursively, whatever else it holds.

``ProbeSet.scan`` lists the files with an image suffix (hidden files and
folders skipped; symlinked files are followed, symlinked folders are not).
Entries that cannot be image files (FIFOs, sockets, devices, broken
symbolic links, symbolic link loops, names that are not valid UTF-8) are
skipped and counted right there (``rejected``), so nothing ever blocks on
them. Files that turn out not to be readable images, or that declare more
pixels than ``record.max_image_pixels``, are skipped and counted when read
(``builder.image_file``). Each file's size and modification time are kept
from the scan: a file that vanishes or changes during a build is noticed
(``changed``, ``ProbeFileChanged``), and the fingerprint of the folder says
which files a resumed build finds added, removed or changed
(``describe_changes``).

Captions for the ``precomputed`` captioner: ``captions.jsonl`` at the root
(``{"file": ..., "caption": ...}`` per line) and any ``metadata.jsonl``, the
Hugging Face ImageFolder convention (``file_name`` relative to the folder
holding it, and a ``text`` or ``caption`` column).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import posixpath
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from builder.errors import BuildError, ConfigError
from builder.image_file import (
    DEFAULT_MAX_PIXELS,
    ProbeFileChanged,  # noqa: F401 - re-exported: what ProbeSet.open raises for a changed file
    ProbeFileError,
    file_kind,
    image_header,
    open_image,
    open_regular,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
CAPTIONS_FILE = "captions.jsonl"
METADATA_FILE = "metadata.jsonl"  # Hugging Face ImageFolder
TEXT_COLUMNS = ("text", "caption")  # metadata.jsonl columns read as captions, in this order


@dataclass(frozen=True)
class ProbeSet:
    """An image folder. ``files`` are paths relative to ``root``, sorted, so
    image index ``i`` means the same file in every run; ``stats`` their
    (size, mtime_ns) at the scan; ``rejected`` the (path, reason) of the
    entries the scan skipped; ``max_pixels`` the limit images are opened with."""

    root: Path
    files: tuple[str, ...]
    stats: tuple[tuple[int, int], ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def scan(cls, root: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ProbeSet:
        """List every image file below ``root``; ``root`` may also be a
        dataset spec (see ``resolve_probe``). Entries that are not regular
        files are skipped, counted in ``rejected`` and logged once."""
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
            raise ConfigError(f"record.max_image_pixels must be a whole number >= 0 (0: no limit), not {max_pixels!r}")
        r = resolve_probe(str(root)).expanduser().resolve()
        if not r.is_dir():
            raise BuildError(f"probe folder {str(root)!r} does not exist or is not a folder")
        found, rejected = _walk(r)
        if not found:
            skipped = f" ({len(rejected)} entries skipped, e.g. {rejected[0][0]!r}: {rejected[0][1]})" if rejected else ""
            raise BuildError(f"probe folder {str(root)!r} holds no image files{skipped}")
        if rejected:
            shown = ", ".join(f"{f!r} ({why})" for f, why in rejected[:5])
            more = f" and {len(rejected) - 5} more" if len(rejected) > 5 else ""
            log.warning("probe folder %s: skipped %d entries that are not image files: %s%s", r, len(rejected),
                        shown, more)
        return cls(r, tuple(f for f, _ in found), tuple(st for _, st in found), tuple(rejected), max_pixels)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def _expect(self, i: int) -> tuple[int, int] | None:
        return self.stats[i] if self.stats else None

    def open(self, i: int) -> Image.Image:
        """Image ``i`` as upright RGB (reduced when very large, see
        ``builder.image_file``); raises ProbeFileError if it is not a readable
        image within the pixel limit, ProbeFileChanged if it vanished or
        changed since the scan."""
        return open_image(self.path(i), self.max_pixels, expect=self._expect(i))

    def header_size(self, i: int) -> tuple[int, int]:
        """The (width, height) ``open(i)`` gives, read from the header only."""
        return image_header(self.path(i), self.max_pixels, expect=self._expect(i))

    def digest(self, i: int) -> str:
        """sha256 of image ``i``'s bytes; ProbeFileChanged if it vanished or changed."""
        h = hashlib.sha256()
        with open_regular(self.path(i), self._expect(i)) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def changed(self, i: int) -> str | None:
        """Why image ``i`` is no longer the file the scan saw (vanished,
        replaced by something that is not a regular file, or another size or
        modification time), or None when it is unchanged."""
        try:
            st = os.stat(self.path(i))
        except OSError:
            return f"probe file {self.files[i]!r} vanished"
        if not stat.S_ISREG(st.st_mode):
            return f"probe file {self.files[i]!r} is now {file_kind(st.st_mode)}"
        if self.stats and (st.st_size, st.st_mtime_ns) != tuple(self.stats[i]):
            return f"probe file {self.files[i]!r} changed"
        return None

    def _stats(self) -> tuple[tuple[int, int], ...]:
        if self.stats:
            return self.stats
        out = []
        for f in self.files:  # a ProbeSet made by hand: the files as they are now
            try:
                st = (self.root / f).stat()
                out.append((st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((-1, -1))
        return tuple(out)

    def manifest(self) -> dict[str, list[int]]:
        """{file: [size, mtime_ns]} as scanned: what ``describe_changes`` compares."""
        return {f: list(st) for f, st in zip(self.files, self._stats())}

    @functools.cached_property
    def _hashes(self) -> tuple[str, str]:
        h = hashlib.sha256()
        for f, (size, mtime) in zip(self.files, self._stats()):
            h.update(f"{f}\x00{size}\x00{mtime}\n".encode())
        files = h.hexdigest()
        for f, why in self.rejected:  # they count as skipped images
            h.update(f"rejected\x00{f}\x00{why}\n".encode("utf-8", "surrogateescape"))
        if self.max_pixels != DEFAULT_MAX_PIXELS:  # another limit skips other files
            h.update(f"max_pixels\x00{self.max_pixels}\n".encode())
        return files, h.hexdigest()

    def fingerprint(self) -> str:
        """Identity of the folder's content as scanned: each file's relative
        path, size and modification time, the skipped entries and the pixel
        limit (hashing every byte of a 50k-image folder would cost minutes;
        captions are keyed by content separately). Recordings are cached by it."""
        return self._hashes[1]

    def files_fingerprint(self) -> str:
        """The part of ``fingerprint`` that names the image files: each
        one's relative path, size and modification time. A resume compares it."""
        return self._hashes[0]

    def common_size(self, sample: int = 64) -> tuple[int, int] | None:
        """The most common (width, height) ``open`` gives, over the headers of
        up to ``sample`` files spread evenly over the folder (ties: the first
        seen); None when none of them is readable."""
        n = len(self.files)
        k = max(1, min(sample, n))
        counts: Counter[tuple[int, int]] = Counter()
        for i in sorted({j * (n - 1) // max(1, k - 1) for j in range(k)}):
            try:
                counts[self.header_size(i)] += 1
            except ProbeFileError:
                continue
        return counts.most_common(1)[0][0] if counts else None

    def captions(self) -> dict[str, str]:
        """Captions by probe file (path relative to ``root``): every
        ``metadata.jsonl`` of the folder (Hugging Face ImageFolder: its
        ``file_name`` is relative to the folder holding it, the caption is
        the ``text`` or ``caption`` column; rows with neither give none), then
        ``captions.jsonl`` at the root, which wins where both name a file.
        A line that is not a JSON object, or lacks the file key, is a
        BuildError naming the file and line."""
        out: dict[str, str] = {}
        for meta in _find_metadata(self.root):
            out.update(read_metadata_jsonl(meta, self.root))
        out.update(read_captions_jsonl(self.root / CAPTIONS_FILE))
        return out

    def has_captions(self) -> bool:
        """Whether the folder has a ``captions.jsonl`` or a ``metadata.jsonl``."""
        return (self.root / CAPTIONS_FILE).is_file() or next(iter(_find_metadata(self.root)), None) is not None


def _walk(root: Path) -> tuple[list[tuple[str, tuple[int, int]]], list[tuple[str, str]]]:
    """(relative path, (size, mtime_ns)) of every regular image file below
    ``root``, sorted, and (relative path, reason) of every entry skipped."""
    found: list[tuple[str, tuple[int, int]]] = []
    rejected: list[tuple[str, str]] = []

    def unreadable_folder(exc: OSError) -> None:
        rel = os.path.relpath(exc.filename or str(root), root).replace(os.sep, "/")
        rejected.append((rel, f"a folder that cannot be listed ({exc.strerror or exc.__class__.__name__})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable_folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            why, st = _regular_file(full, rel)
            if why is None:
                found.append((rel, st))  # type: ignore[arg-type]
            else:
                rejected.append((rel, why))
    found.sort()
    rejected.sort()
    return found, rejected


def _regular_file(full: str, rel: str) -> tuple[str | None, tuple[int, int] | None]:
    """(None, (size, mtime_ns)) for a regular file (a symlink to one
    included), else (the reason it is skipped, None)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8", None
    try:
        st = os.stat(full)
    except FileNotFoundError:
        return ("a broken symbolic link" if os.path.islink(full) else "vanished while scanning"), None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop", None
        return f"cannot be read ({exc.strerror or exc.__class__.__name__})", None
    if not stat.S_ISREG(st.st_mode):
        return file_kind(st.st_mode), None
    return None, (st.st_size, st.st_mtime_ns)


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """How a probe folder's manifest ``new`` differs from ``old`` ({file:
    [size, mtime_ns]}), in words: added, removed and changed files, a few
    named each ("" when the same files are there, unchanged)."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(f for f in set(old) & set(new) if list(old[f]) != list(new[f]))
    parts = [f"{len(names)} {what} ({_some(names)})" for what, names in
             (("added", added), ("removed", removed), ("changed", changed)) if names]
    return ", ".join(parts)


def _some(names: list[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


# -- captions ------------------------------------------------------------------------


def _find_metadata(root: Path):
    """Every ``metadata.jsonl`` below ``root`` (hidden folders skipped), in order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if METADATA_FILE in filenames and os.path.isfile(os.path.join(dirpath, METADATA_FILE)):
            yield Path(dirpath) / METADATA_FILE


def _json_lines(path: Path):
    """(line number, JSON object) of every non-blank line of ``path``; a
    BuildError naming the line for one that is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    raise BuildError(f"{path}:{n}: not a JSON object ({getattr(exc, 'msg', exc)})") from None
                if not isinstance(rec, dict):
                    raise BuildError(f"{path}:{n}: not a JSON object (a JSON {type(rec).__name__})")
                yield n, rec
    except UnicodeDecodeError:
        raise BuildError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise BuildError(f"{path}: cannot be read ({exc.strerror or exc.__class__.__name__})") from None


def read_captions_jsonl(path: Path) -> dict[str, str]:
    """``captions.jsonl``: ``{"file": ..., "caption": ...}`` per line (absent: {})."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for n, rec in _json_lines(path):
        if "file" not in rec or "caption" not in rec:
            missing = "file" if "file" not in rec else "caption"
            raise BuildError(f"{path}:{n}: not a caption record (no {missing!r})")
        out[str(rec["file"])] = str(rec["caption"])
    return out


def read_metadata_jsonl(path: Path, root: Path) -> dict[str, str]:
    """A Hugging Face ImageFolder ``metadata.jsonl``: captions by file path
    relative to ``root`` (``file_name`` is relative to the file's folder);
    the ``text`` column, else ``caption`` (a string, or the first string of a
    list). Rows without one give no caption; a ``file_name`` outside the
    folder is ignored with a warning."""
    base = path.parent.relative_to(root).as_posix()
    out: dict[str, str] = {}
    for n, rec in _json_lines(path):
        if "file_name" not in rec:
            raise BuildError(f"{path}:{n}: no 'file_name' (metadata.jsonl rows name their image in 'file_name')")
        text = _caption_text(rec)
        if text is None:
            continue
        name = str(rec["file_name"]).replace("\\", "/")
        key = posixpath.normpath(posixpath.join(base, name))
        if posixpath.isabs(name) or key == ".." or key.startswith("../"):
            log.warning("%s:%d: file_name %r is outside the probe folder; ignored", path, n, name)
            continue
        out[key] = text
    return out


def _caption_text(rec: dict[str, Any]) -> str | None:
    for col in TEXT_COLUMNS:
        v = rec.get(col)
        if isinstance(v, list):
            v = next((x for x in v if isinstance(x, str) and x.strip()), None)
        if isinstance(v, str) and v.strip():
            return v
    return None


def open_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image file as upright RGB (``builder.image_file.open_image``);
    a one-line ProbeFileError (a BuildError) if it is not one."""
    return open_image(path, max_pixels)


# -- probe sets that are not image folders -----------------------------------------

_CIFAR = {
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "batches.meta", b"label_names", b"labels"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", b"fine_label_names",
                 b"fine_labels"),
}


def resolve_probe(spec: str) -> Path:
    """The image folder for a probe spec.

    A plain path is an image folder (any layout; an ImageNet-style val folder
    with one sub-folder per class works as is). ``cifar10:ROOT[:split]`` and
    ``cifar100:ROOT[:split]`` read the python-pickle release that torchvision
    downloads into ROOT (split ``test`` by default) and export it once as
    PNGs in class folders under ``ROOT/dnd-atlas/``, so every later stage sees
    ordinary files. ``hf:SOURCE[:split]`` reads a Hugging Face ``datasets``
    dataset (a folder written by ``save_to_disk``, or a dataset name already
    in the local Hugging Face cache) and exports its images the same way
    (``pip install 'dnd-atlas[datasets]'``)."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in _CIFAR:
        root, _, split = rest.partition(":")
        return export_cifar(kind, Path(root), split or "test")
    if sep and kind == "hf":
        source, _, split = rest.rpartition(":") if rest.count(":") else (rest, "", "")
        return export_hf_dataset(source or rest, split or None)
    return Path(spec)


def export_cifar(kind: str, root: Path, split: str = "test") -> Path:
    """Export a CIFAR split to ``root/dnd-atlas/<kind>-<split>/<class>/<n>.png``
    (idempotent: a manifest is written last)."""
    import pickle

    import numpy as np

    folder, splits, meta_name, names_key, labels_key = _CIFAR[kind]
    if split not in splits:
        raise BuildError(f"{kind} has no split {split!r}; use one of {', '.join(splits)}")
    src = root / folder
    if not src.is_dir():
        raise BuildError(f"no {kind} data at {src} (download it with torchvision once, or give its root)")
    out = root / "dnd-atlas" / f"{kind}-{split}"
    manifest = out / "manifest.json"
    if manifest.is_file():
        return out
    try:
        with open(src / meta_name, "rb") as f:
            names = [n.decode() for n in pickle.load(f, encoding="bytes")[names_key]]
        n = 0
        for batch in splits[split]:
            with open(src / batch, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            for img, label in zip(data, d[labels_key]):
                cls_dir = out / names[label]
                cls_dir.mkdir(parents=True, exist_ok=True)
                tmp = cls_dir / f".{n:05d}.png.tmp"
                Image.fromarray(img).save(tmp, format="PNG")
                os.replace(tmp, cls_dir / f"{n:05d}.png")
                n += 1
    except (OSError, KeyError, pickle.UnpicklingError, ValueError) as exc:
        raise BuildError(f"{src}: not a readable {kind} release: {exc}") from exc
    manifest.write_text(json.dumps({"kind": kind, "split": split, "images": n}))
    log.info("exported %d %s %s images to %s", n, kind, split, out)
    return out


def export_hf_dataset(source: str, split: str | None = None, cache_root: Path | None = None) -> Path:
    """Export the image column of a ``datasets`` dataset to PNG files in
    class folders (the label column's names) under ``cache_root`` (default:
    ``$DND_ATLAS_CACHE`` or ``~/.cache/dnd-atlas``) / ``hf`` / a hash of the
    source and split; idempotent (a manifest is written last)."""
    import hashlib

    try:
        import datasets
    except ImportError as exc:
        raise BuildError("hf: probe sets need the datasets package: pip install 'dnd-atlas[datasets]'") from exc
    root = cache_root or Path(os.environ.get("DND_ATLAS_CACHE", Path.home() / ".cache" / "dnd-atlas"))
    key = hashlib.sha256(f"{Path(source).resolve() if Path(source).exists() else source}\0{split}".encode())
    out = root / "hf" / key.hexdigest()[:16]
    if (out / "manifest.json").is_file():
        return out
    try:
        if Path(source).exists():
            ds = datasets.load_from_disk(source)
        else:
            ds = datasets.load_dataset(source, split=split)
        if isinstance(ds, datasets.DatasetDict):
            if split is None and len(ds) == 1:
                split = next(iter(ds))
            if split not in ds:
                raise BuildError(f"dataset {source!r} has splits {', '.join(ds)}; name one as hf:{source}:SPLIT")
            ds = ds[split]
    except BuildError:
        raise
    except Exception as exc:  # missing dataset offline, bad folders, format errors
        raise BuildError(f"cannot load the dataset {source!r}: {exc}") from exc
    image_col = next((n for n, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise BuildError(f"dataset {source!r} has no image column")
    label_col = next((n for n, f in ds.features.items() if isinstance(f, datasets.ClassLabel)), None)
    names = ds.features[label_col].names if label_col else None
    for n, row in enumerate(ds):
        folder = out / (names[row[label_col]] if names else "images")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{n:06d}.png.tmp"
        row[image_col].convert("RGB").save(tmp, format="PNG")
        os.replace(tmp, folder / f"{n:06d}.png")
    (out / "manifest.json").write_text(json.dumps({"source": source, "split": split, "images": len(ds)}))
    log.info("exported %d images of %s to %s", len(ds), source, out)
    return out
