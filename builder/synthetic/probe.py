"""Write the synthetic world as an ordinary probe set on disk.

Layout of a probe folder::

    images/00000.png ...   the scenes (an ordinary image folder)
    masks/00000.npz ...    ground truth: visible object masks, bool
                           (n_objects, H, W) as "masks", plus what the world
                           adds (the marks world: "mark_kind", "mark_ink")
    captions.jsonl         {"file", "caption", "scene"} per image, in order
    world.json             manifest {"n", "size", "seed", ...}, written last;
                           "world" names the world (absent: "shapes")

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
from builder.synthetic.worlds import DEFAULT_WORLD, World, get_world

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


def probe_scene(index: int, size: int, seed: int, world: str = DEFAULT_WORLD) -> Any:
    """Scene ``index`` of the probe set (size, seed, world): depends on
    nothing else, so a resumed or partial write gives the same scenes."""
    rng = np.random.default_rng([seed, index])
    return get_world(world).sample_scene(rng, size)


def world_manifest(n: int, size: int, seed: int, world: str = DEFAULT_WORLD) -> dict[str, Any]:
    """The manifest identifying a probe set; also its config key. The shapes
    world's has no "world" key (as before there were several worlds)."""
    manifest: dict[str, Any] = {
        "kind": "synthetic-world",
        "version": FORMAT_VERSION,
        "n": n,
        "size": size,
        "seed": seed,
    }
    if world != DEFAULT_WORLD:
        manifest["world"] = world
    return manifest


def manifest_world(manifest: dict[str, Any]) -> World:
    """The world a probe folder's manifest names."""
    return get_world(manifest.get("world") or DEFAULT_WORLD)


def read_manifest(probe_dir: str | Path) -> dict[str, Any] | None:
    """The ``world.json`` of a complete probe folder, or None."""
    p = Path(probe_dir) / MANIFEST
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def write_probe_set(
    out_dir: str | Path,
    n: int = 5000,
    size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    world: str = DEFAULT_WORLD,
) -> Path:
    """Render ``n`` scenes of ``world`` (``shapes`` or ``marks``) at ``size``
    pixels (default: the world's, 64 or 128) into ``out_dir`` (layout in the
    module docstring) and return the folder. Returns at once when the folder
    already holds the same (world, n, size, seed) set; refuses a folder
    holding a different one."""
    w = get_world(world)
    size = w.default_size if size is None else int(size)
    out = Path(out_dir)
    want = world_manifest(n, size, seed, w.name)
    have = read_manifest(out)
    if have == want:
        return out
    if have is not None:
        raise BuildError(
            f"{out} already holds a synthetic world ({have.get('world') or DEFAULT_WORLD}) with "
            f"n={have.get('n')}, size={have.get('size')}, seed={have.get('seed')}; use another folder"
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
        scene = probe_scene(i, size, seed, w.name)
        if resume and img_path.is_file() and mask_path.is_file():
            truth = load_truth_file(mask_path)
        else:
            image, truth = w.render(scene)
            buf = io.BytesIO()
            Image.fromarray(image, "RGB").save(buf, format="PNG")
            _atomic_write(img_path, buf.getvalue())
            buf = io.BytesIO()
            np.savez_compressed(buf, **truth)
            _atomic_write(mask_path, buf.getvalue())
        rec = {
            "file": f"images/{name}.png",
            "caption": w.caption(scene, truth, None),
            "scene": w.scene_to_dict(scene),
        }
        lines.append(json.dumps(rec, separators=(",", ":")))
    _atomic_write(out / "captions.jsonl", ("\n".join(lines) + "\n").encode())
    _atomic_write(out / MANIFEST, json.dumps(want, indent=2).encode())
    pending.unlink(missing_ok=True)
    log.info("wrote synthetic probe set of %d images to %s", n, out)
    return out


def load_world_index(probe_dir: str | Path) -> dict[str, tuple[Any, str]]:
    """Relative file ("images/00000.png") -> (scene, caption) for a complete
    probe folder written by ``write_probe_set`` (scenes of its world)."""
    root = Path(probe_dir)
    manifest = read_manifest(root)
    if manifest is None:
        raise BuildError(f"{root} is not a complete synthetic probe set (no {MANIFEST})")
    w = manifest_world(manifest)
    index: dict[str, tuple[Any, str]] = {}
    with open(root / "captions.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                index[rec["file"]] = (w.scene_from_dict(rec["scene"]), rec["caption"])
    return index


def load_masks_file(path: str | Path) -> np.ndarray:
    """Bool masks (n_objects, H, W) stored in one ``masks/*.npz`` file."""
    with np.load(path) as z:
        return z["masks"].astype(bool)


def load_truth_file(path: str | Path) -> dict[str, np.ndarray]:
    """Every ground-truth array stored in one ``masks/*.npz`` file, by name."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def load_truth(probe_dir: str | Path, file: str) -> dict[str, np.ndarray]:
    """Ground-truth arrays of the probe image ``file`` ("images/00000.png")."""
    return load_truth_file(Path(probe_dir) / "masks" / f"{Path(file).stem}.npz")


def load_masks(probe_dir: str | Path, file: str) -> np.ndarray:
    """Visible masks of the probe image ``file`` ("images/00000.png")."""
    stem = Path(file).stem
    return load_masks_file(Path(probe_dir) / "masks" / f"{stem}.npz")
