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
        """List every image file below ``root`` (hidden folders skipped);
        ``root`` may also be a dataset spec (see ``resolve_probe``)."""
        r = resolve_probe(str(root)).expanduser().resolve()
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
