"""``build_site``: an atlas in, an mkdocs-material project and its built site out.

Layout of ``out_dir``::

    project/mkdocs.yml        site_dir: ../site (so `mkdocs gh-deploy` works from project/)
    project/atlas_hooks.py    mkdocs hook pasting neuron page bodies into the built pages
    project/atlas_html/       those bodies (escaped HTML), one JSON file per layer
    project/docs/index.md     home: models, layers, counts, build config, histograms
    project/docs/models/      one page per model (in the nav)
    project/docs/layers/      one page per layer (in the nav unless there are many)
    project/docs/neurons/     one page per neuron (not_in_nav: keeps the build linear)
    project/docs/images/      the atlas images the pages use (hard links when possible)
    project/docs/assets/      atlas.css, atlas.js, charts/*.svg
    site/                     the built static site
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from atlas_site import render
from atlas_site.assets import CSS, HOOKS, JS
from atlas_site.charts import histogram_svg
from query import Atlas
from query.bulk import layer_records, similar_neurons
from query.errors import AtlasError
from query.evaluations import evaluations
from query.schema import IMAGES_DIR

log = logging.getLogger(__name__)

PROJECT_DIR = "project"
SITE_DIR = "site"
# Neuron page bodies, pasted into the built pages by the project's hook (atlas_hooks.py).
BODIES_DIR = "atlas_html"
# Generated parts of docs/ (removed before regenerating; images/ is pruned instead).
GENERATED = ("index.md", "models", "layers", "neurons", "assets")
# Above this many layers, layer pages leave the nav (material embeds the nav in every page).
MAX_NAV_LAYERS = 60
N_SIMILAR = 6


class SiteError(AtlasError):
    """The site could not be generated or built."""


class _Progress:
    """A tqdm bar over pages, or nothing when ``DND_ATLAS_PROGRESS=0``."""

    def __init__(self, total: int, desc: str) -> None:
        self.bar = None
        if os.environ.get("DND_ATLAS_PROGRESS", "1").lower() not in ("0", "false", "no", "off"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="page", leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _write(path: Path, content: str) -> None:
    path.write_text(content, encoding="utf-8")


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_images(atlas_dir: Path, docs: Path, used: set[str]) -> int:
    """Hard-link (or copy) each used image into ``docs`` once, drop images no page
    uses any more; returns how many files were added."""
    root = (atlas_dir / IMAGES_DIR).resolve()
    added = 0
    for rel in sorted(used):
        src = (atlas_dir / rel).resolve()
        if not src.is_relative_to(root) or not src.is_file():
            log.warning("image %s is missing from the atlas", rel)
            continue
        dst = docs / rel
        if dst.is_file() and dst.stat().st_size == src.stat().st_size:
            continue
        if dst.exists():
            dst.unlink()
        _link_or_copy(src, dst)
        added += 1
    images = docs / IMAGES_DIR
    if images.is_dir():
        for path in images.rglob("*"):
            if path.is_file() and path.relative_to(docs).as_posix() not in used:
                path.unlink()
    return added


def _clean(docs: Path) -> None:
    for name in GENERATED:
        path = docs / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def generate_project(atlas_dir: str | os.PathLike[str], project: Path,
                     site_name: str | None = None) -> dict[str, int]:
    """Write ``mkdocs.yml`` and ``docs/`` for the atlas into ``project``; returns counts
    (pages, neuron pages, images). Raises :class:`AtlasError` subclasses on bad input."""
    t0 = time.perf_counter()
    docs = project / "docs"
    with Atlas.open(atlas_dir) as atlas:
        meta = atlas.meta
        models = {m.model: m for m in atlas.models()}
        layers = atlas.layers()
        names = sorted({*models, *(li.model for li in layers)})
        name = site_name or f"Neuron atlas: {atlas.path.resolve().name}"
        similar = similar_neurons(atlas, k=N_SIMILAR)
        log.info("similar neurons of %d neurons in %.1f s", len(similar), time.perf_counter() - t0)

        docs.mkdir(parents=True, exist_ok=True)
        bodies = project / BODIES_DIR
        _clean(docs)
        shutil.rmtree(bodies, ignore_errors=True)
        for sub in ("assets/charts", "models", "layers", "neurons"):
            (docs / sub).mkdir(parents=True, exist_ok=True)
        _write(docs / "assets/atlas.css", CSS)
        _write(docs / "assets/atlas.js", JS)
        _write(project / "atlas_hooks.py", HOOKS)

        images = render.ImageSet()
        n_neurons = 0
        total = sum(li.n_ok + li.n_dead + li.n_failed for li in layers)
        bar = _Progress(total, "neuron pages")
        for li in layers:
            records = layer_records(atlas, li.model, li.layer)
            folder = render.neuron_page(li.model, li.layer, 0).rsplit("/", 1)[0]
            (docs / folder).mkdir(parents=True, exist_ok=True)
            layer_bodies: dict[str, str] = {}
            for rec in records:
                key = (rec.model, rec.layer, rec.unit)
                md, body = render.render_neuron(rec, images, similar.get(key, []))
                _write(docs / f"{render.neuron_page(*key)}.md", md)
                layer_bodies[str(rec.unit)] = body
            path = bodies / f"{folder}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(path, json.dumps(layer_bodies, ensure_ascii=False))
            n_neurons += len(records)
            bar.update(len(records))
            ok = [r for r in records if r.status == "ok"]
            scores = [r.labels[0].concept_score for r in ok if r.labels]
            _write(docs / render.chart_file(li.model, li.layer, "score"), histogram_svg(
                scores, f"{li.model} / {li.layer}", "label-1 concept score"))
            _write(docs / render.chart_file(li.model, li.layer, "interpretability"), histogram_svg(
                [r.interpretability for r in ok], f"{li.model} / {li.layer}",
                "interpretability score"))
            path = docs / f"{render.layer_page(li.model, li.layer)}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(path, render.render_layer(li, records, images))
        bar.close()
        for m in names:
            own = [li for li in layers if li.model == m]
            _write(docs / f"{render.model_page(m)}.md", render.render_model(models.get(m), m, own))
        _write(docs / "index.md", render.render_home(name, meta, layers, names,
                                                     evaluations=evaluations(atlas)))

    nav: list = [{"Home": "index.md"}]
    not_in_nav = ["/neurons/"]
    if len(layers) <= MAX_NAV_LAYERS:
        for m in names:
            entries = [{"Overview": f"{render.model_page(m)}.md"}]
            entries += [{html.escape(li.layer): f"{render.layer_page(m, li.layer)}.md"}
                        for li in layers if li.model == m]
            nav.append({html.escape(f"Model {m}"): entries})
    else:
        nav.append({"Models": [{html.escape(m): f"{render.model_page(m)}.md"} for m in names]})
        not_in_nav.append("/layers/")
    _write(project / "mkdocs.yml", render.mkdocs_yml(name, nav, not_in_nav))
    added = copy_images(Path(atlas_dir) if Path(atlas_dir).is_dir() else Path(atlas_dir).parent,
                        docs, images.used)
    counts = {"pages": n_neurons + len(layers) + len(names) + 1, "neuron_pages": n_neurons,
              "images": len(images.used), "images_added": added}
    log.info("generated %d pages in %.1f s", counts["pages"], time.perf_counter() - t0)
    return counts


def run_mkdocs(project: Path) -> None:
    """``mkdocs build`` of the project (a subprocess, so its memory goes when it ends)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--clean", "-q", "-f", "mkdocs.yml"],
        cwd=project, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise SiteError(f"mkdocs build failed in {project}: {tail}")
    for line in proc.stderr.splitlines():
        if line.strip():
            log.info("mkdocs: %s", line)


def build_site(atlas_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
               site_name: str | None = None, build: bool = True) -> Path:
    """Render the atlas into ``out_dir/project`` and build it into ``out_dir/site``.

    Returns the built site folder (``out_dir/site``), or the project folder when
    ``build`` is false. Open the site with ``python -m http.server -d OUT/site``,
    or publish it with ``mkdocs gh-deploy`` run from ``OUT/project``. Raises
    :class:`AtlasError` subclasses (no atlas, wrong format, a failed build).
    """

    atlas_path = Path(atlas_dir).expanduser()
    out = Path(out_dir).expanduser()
    if atlas_path.is_dir() and out.resolve() == atlas_path.resolve():
        raise SiteError("--out must not be the atlas directory")
    if out.exists() and not out.is_dir():
        raise SiteError(f"{out} exists and is not a directory")
    project = out / PROJECT_DIR
    project.mkdir(parents=True, exist_ok=True)
    generate_project(atlas_path, project, site_name=site_name)
    if not build:
        return project
    t0 = time.perf_counter()
    run_mkdocs(project)
    log.info("mkdocs build in %.1f s", time.perf_counter() - t0)
    return out / SITE_DIR
