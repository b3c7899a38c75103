"""Site build at scale: synthetic atlases written directly with SQL
(:mod:`bench.site_atlas`), then ``build_site`` (data files, pages, images,
``mkdocs build``) timed end to end; making the atlas is not timed.

- ``25k``: 5 layers x 5,000 units, tiny images (measures the site's own data);
- ``250k``: 5 layers x 50,000 units (the scale of sparse-autoencoder atlases);
- ``25k_photo``: 25,000 neurons whose thumbnails weigh what photographs do
  (distinct 128-px WebPs, 3-6 KB): a probe set of 50,000 images, each neuron's
  top-10 drawn from it, and 3 generated samples per concept of a 3,000-concept
  vocabulary.

Each evidence row names the shared thumbnail of its source image (the layout
the builder moves to: one file per probe image, the crop box drawn by the
browser), not one baked file per crop. Targets: 250k in <= 20 min and
<= 1 GB; 25k photo in <= 5 min and <= 1 GB.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.site_atlas import BenchAtlas, make_atlas

SHAPES = {
    "25k": BenchAtlas(n_layers=5, units=5_000, n_probe=50_000, n_concepts=3_000),
    "250k": BenchAtlas(n_layers=5, units=50_000, n_probe=50_000, n_concepts=3_000),
    "25k_photo": BenchAtlas(n_layers=5, units=5_000, n_probe=50_000, n_concepts=3_000, photo=True),
}


def _size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(tag: str, shape: BenchAtlas) -> dict[str, str]:
    """Make the atlas of ``shape``, build its site; returns the bench lines for ``tag``."""
    from atlas_site.build import build_site

    tmp = Path(tempfile.mkdtemp(prefix=f"dnd-site-bench-{tag}-"))
    try:
        t = time.perf_counter()
        make_atlas(tmp / "atlas", shape)
        t_make = time.perf_counter() - t
        t = time.perf_counter()
        build_site(tmp / "atlas", tmp / "out")
        t_build = time.perf_counter() - t
        site = tmp / "out/site"
        size = _size_bytes(site)
        images = _size_bytes(site / "images")
        n_images = sum(1 for f in (site / "images").rglob("*") if f.is_file())
        out = {
            f"site_build_s_{tag}": f"{t_build:.1f}",
            f"site_size_mb_{tag}": f"{size / 2**20:.0f}",
            f"site_kb_per_unit_{tag}": f"{size / 1024 / shape.n_units:.2f}",
            f"site_data_kb_per_unit_{tag}": f"{(size - images) / 1024 / shape.n_units:.2f}",
            f"site_images_{tag}": str(n_images),
            f"site_pages_{tag}": str(sum(1 for _ in site.rglob("*.html"))),
            f"site_atlas_make_s_{tag}": f"{t_make:.1f}",
        }
        if shape.photo:
            out[f"site_image_kb_mean_{tag}"] = f"{images / 1024 / max(1, n_images):.2f}"
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(only: tuple[str, ...] | None = None) -> dict[str, str]:
    """Every shape of :data:`SHAPES` (or those named in ``only``, or in the
    ``DND_SITE_BENCH`` environment variable, comma-separated)."""
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")
    os.environ.setdefault("DND_ATLAS_PROGRESS", "0")
    env = os.environ.get("DND_SITE_BENCH")
    tags = only or (tuple(env.split(",")) if env else tuple(SHAPES))
    out: dict[str, str] = {}
    for tag in tags:
        out.update(run_one(tag, SHAPES[tag]))
    return out


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key}: {value}", flush=True)
