"""Write the synthetic world as an ordinary probe set on disk.

Layout of a probe folder::

    images/00000.png ...   the scenes (an ordinary image folder)
    masks/00000.npz ...    visible object masks, bool (n_objects, H, W)
    captions.jsonl         {"file", "caption", "scene"} per image, in order
    world.json             manifest {"n", "size", "seed", ...}, written last

A folder whose ``world.json`` matches (n, size, seed) is complete and is
reused as is; an interrupted write resumes, skipping files already written
(every file is written to a temp name and renamed, so existing ones are whole).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from builder.errors import BuildError
from builder.synthetic.world import (
    Scene,
    caption,
    render_full,
    sample_scene,
    scene_from_dict,
    scene_to_dict,
)

log = logging.getLogger(__name__)

MANIFEST = "world.json"
_PENDING = "world.pending.json"
FORMAT_VERSION = 1


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _progress(iterable: Any, total: int, enabled: bool, desc: str) -> Any:
    if not enabled or os.environ.get("DND_ATLAS_PROGRESS", "1") in ("0", "false", "no"):
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc)


def probe_scene(index: int, size: int, seed: int) -> Scene:
    """Scene ``index`` of the probe set (size, seed): depends on nothing else,
    so a resumed or partial write gives the same scenes."""
    rng = np.random.default_rng([seed, index])
    return sample_scene(rng, size=size)


def world_manifest(n: int, size: int, seed: int) -> dict[str, Any]:
    """The manifest identifying a probe set; also its config key."""
    return {
        "kind": "synthetic-world",
        "version": FORMAT_VERSION,
        "n": n,
        "size": size,
        "seed": seed,
    }


def read_manifest(probe_dir: str | Path) -> dict[str, Any] | None:
    """The ``world.json`` of a complete probe folder, or None."""
    p = Path(probe_dir) / MANIFEST
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def write_probe_set(
    out_dir: str | Path, n: int = 5000, size: int = 64, seed: int = 0, progress: bool = True
) -> Path:
    """Render ``n`` scenes into ``out_dir`` (layout in the module docstring)
    and return the folder. Returns at once when the folder already holds the
    same (n, size, seed) world; refuses a folder holding a different one."""
    out = Path(out_dir)
    want = world_manifest(n, size, seed)
    have = read_manifest(out)
    if have == want:
        return out
    if have is not None:
        raise BuildError(
            f"{out} already holds a synthetic world with n={have.get('n')}, "
            f"size={have.get('size')}, seed={have.get('seed')}; use another folder"
        )
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    pending = out / _PENDING
    resume = pending.is_file() and json.loads(pending.read_text()) == want
    if not resume:
        _atomic_write(pending, json.dumps(want).encode())
    lines = []
    for i in _progress(range(n), n, progress, "synthetic probe set"):
        name = f"{i:05d}"
        img_path = out / "images" / f"{name}.png"
        mask_path = out / "masks" / f"{name}.npz"
        scene = probe_scene(i, size, seed)
        if resume and img_path.is_file() and mask_path.is_file():
            masks = load_masks_file(mask_path)
        else:
            r = render_full(scene)
            masks = r.masks
            buf = io.BytesIO()
            Image.fromarray(r.image, "RGB").save(buf, format="PNG")
            _atomic_write(img_path, buf.getvalue())
            buf = io.BytesIO()
            np.savez_compressed(buf, masks=masks)
            _atomic_write(mask_path, buf.getvalue())
        rec = {
            "file": f"images/{name}.png",
            "caption": caption(scene, masks),
            "scene": scene_to_dict(scene),
        }
        lines.append(json.dumps(rec, separators=(",", ":")))
    _atomic_write(out / "captions.jsonl", ("\n".join(lines) + "\n").encode())
    _atomic_write(out / MANIFEST, json.dumps(want, indent=2).encode())
    pending.unlink(missing_ok=True)
    log.info("wrote synthetic probe set of %d images to %s", n, out)
    return out


def load_world_index(probe_dir: str | Path) -> dict[str, tuple[Scene, str]]:
    """Relative file ("images/00000.png") -> (scene, caption) for a complete
    probe folder written by ``write_probe_set``."""
    root = Path(probe_dir)
    if read_manifest(root) is None:
        raise BuildError(f"{root} is not a complete synthetic probe set (no {MANIFEST})")
    index: dict[str, tuple[Scene, str]] = {}
    with open(root / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                index[rec["file"]] = (scene_from_dict(rec["scene"]), rec["caption"])
    return index


def load_masks_file(path: str | Path) -> np.ndarray:
    """Bool masks (n_objects, H, W) stored in one ``masks/*.npz`` file."""
    with np.load(path) as z:
        return z["masks"].astype(bool)


def load_masks(probe_dir: str | Path, file: str) -> np.ndarray:
    """Visible masks of the probe image ``file`` ("images/00000.png")."""
    stem = Path(file).stem
    return load_masks_file(Path(probe_dir) / "masks" / f"{stem}.npz")
