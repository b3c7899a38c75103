"""``build_site``: an atlas in, an mkdocs-material project and its built site out.

Layout of ``out_dir``::

    project/mkdocs.yml         site_dir: ../site (so `mkdocs gh-deploy` works from project/)
    project/atlas_hooks.py     mkdocs hook: publishes only the files the manifest lists
    project/.dnd-atlas-manifest.json  every file `dnd-atlas site` wrote (see output.py)
    project/docs/index.md      home: models, layers, counts, build config, histograms
    project/docs/models/       one page per model
    project/docs/layers/       one page per layer (the table is filled from its data file)
    project/docs/neuron.md     the one neuron page: neuron.html#<model>/<layer>/<unit>
    project/docs/search.md     keyword search over every label
    project/docs/data/         the data files the browser renders (see data.py)
    project/docs/images/       the atlas images the data names, once each (hard links)
    project/docs/assets/       atlas.css, the scripts, charts/*.svg
    site/                      the built static site

mkdocs builds a handful of pages whatever the size of the atlas: neuron
records are data files, so a 250,000-unit atlas builds in minutes.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from atlas_site import data, render
from atlas_site.assets import HOOKS, MODULES, SCRIPTS, STYLES, asset
from atlas_site.charts import histogram_svg
from atlas_site.images import ImageSet, publish_images
from atlas_site.output import (
    MANIFEST,
    PROJECT_DIR,
    SITE_DIR,
    Manifest,
    OutputRefused,
    ProjectWriter,
    claim,
    files_under,
    replace_site,
    write_manifest,
)
from atlas_site.runtime import find_runtime
from atlas_site.semantic import write_semantic
from query import Atlas
from query.bulk import layer_records, similar_neurons
from query.errors import AtlasError
from query.bulk import Neighbor, layer_records, similar_neurons
from query.evaluations import evaluations
from query.records import LayerInfo, NeuronRecord

log = logging.getLogger(__name__)

__all__ = ["PROJECT_DIR", "SITE_DIR", "OutputRefused", "SiteError", "build_site",
           "generate_project", "run_mkdocs"]

# Above this many layers, layer pages leave the nav (material embeds the nav in every page).
MAX_NAV_LAYERS = 60
N_SIMILAR = 6
CHART_LABEL = {"score": "label-1 concept score", "interpretability": "interpretability score"}


class SiteError(AtlasError):
    """The site could not be generated or built."""


class _Progress:
    """A tqdm bar over units, or nothing when ``DND_ATLAS_PROGRESS=0``."""

    def __init__(self, total: int, desc: str) -> None:
        self.bar = None
        if os.environ.get("DND_ATLAS_PROGRESS", "1").lower() not in ("0", "false", "no", "off"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="unit", leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _docs(rel: str) -> str:
    return f"docs/{rel}"


def _write_layer(writer: ProjectWriter, li: LayerInfo, records: Sequence[NeuronRecord],
                 similar: dict[tuple[str, str, int], list[Neighbor]],
                 images: ImageSet) -> tuple[list[tuple[str, str]], list[int]]:
    """The layer's table data, its neuron chunks and its histograms; returns the charts
    and the chunk numbers."""
    columns = data.layer_columns(records)
    writer.data(_docs(data.index_file(li.model, li.layer)),
                data.gzip_json(data.layer_index(li, records, images, columns)))
    groups = data.chunks(records)
    for k, recs in groups.items():
        units = {str(r.unit): data.neuron_data(r, images, similar.get((r.model, r.layer, r.unit), []))
                 for r in recs}
        writer.data(_docs(data.chunk_file(li.model, li.layer, k)),
                    data.gzip_json({"format": data.DATA_FORMAT, "chunk": k, "units": units}))
    ok = [r for r in records if r.status == "ok"]
    charts = []
    for col in columns:
        if col.kind != "num":
            continue
        if col.key == "interpretability":
            values = [r.interpretability for r in ok]
        elif col.key == "score":
            values = [r.labels[0].concept_score for r in ok if r.labels]
        else:
            values = [getattr(r.labels[0], col.key, None) for r in ok if r.labels]
        label = CHART_LABEL.get(col.key, col.title.lower())
        writer.text(_docs(render.chart_file(li.model, li.layer, col.key)),
                    histogram_svg(values, f"{li.model} / {li.layer}", label))
        charts.append((col.key, label))
    return charts, sorted(groups)


def _nav(names: Sequence[str], layers: Sequence[LayerInfo]) -> tuple[list, list[str]]:
    nav: list = [{"Home": "index.md"}, {"Search": f"{render.SEARCH_PAGE}.md"}]
    not_in_nav = [f"/{render.NEURON_PAGE}.md"]
    if len(layers) <= MAX_NAV_LAYERS:
        for m in names:
            entries = [{"Overview": f"{render.model_page(m)}.md"}]
            entries += [{html.escape(li.layer): f"{render.layer_page(m, li.layer)}.md"}
                        for li in layers if li.model == m]
            nav.append({html.escape(f"Model {m}"): entries})
    else:
        nav.append({"Models": [{html.escape(m): f"{render.model_page(m)}.md"} for m in names]})
        not_in_nav.append("/layers/")
    return nav, not_in_nav


def generate_project(atlas: Atlas, writer: ProjectWriter,
                     site_name: str | None = None, semantic: bool = True) -> dict[str, int]:
    """Write ``mkdocs.yml``, the hook and ``docs/`` for an open atlas through ``writer``;
    returns counts (pages, neurons, data files, images). ``semantic``: add the
    in-browser semantic search when the atlas and the cache allow it
    (:mod:`atlas_site.semantic`)."""
    t0 = time.perf_counter()
    models = {m.model: m for m in atlas.models()}
    layers = atlas.layers()
    names = sorted({*models, *(li.model for li in layers)})
    name = site_name or f"Neuron atlas: {atlas.path.resolve().name}"
    similar = similar_neurons(atlas, k=N_SIMILAR)
    log.info("similar neurons of %d neurons in %.1f s", len(similar), time.perf_counter() - t0)

    images, search = ImageSet(), data.SearchIndex()
    charts: dict[tuple[str, str], list[tuple[str, str]]] = {}
    layer_chunks: dict[tuple[str, str], list[int]] = {}
    n_neurons = 0
    bar = _Progress(sum(li.n_ok + li.n_dead + li.n_failed for li in layers), "neurons")
    for li in layers:
        records = layer_records(atlas, li.model, li.layer)
        key = (li.model, li.layer)
        charts[key], layer_chunks[key] = _write_layer(writer, li, records, similar, images)
        search.add_layer(li.model, li.layer, records)
        n_neurons += len(records)
        bar.update(len(records))
    bar.close()
    del similar
    fidelity = atlas.layer_fidelity()
    for li in layers:
        writer.text(_docs(f"{render.layer_page(li.model, li.layer)}.md"),
                    render.render_layer(li, charts, fidelity.get((li.model, li.layer))))
    for m in names:
        own = [li for li in layers if li.model == m]
        writer.text(_docs(f"{render.model_page(m)}.md"),
                    render.render_model(models.get(m), m, own, charts))
    writer.text(_docs("index.md"), render.render_home(name, atlas.meta, layers, names, charts,
                                                      evaluations=evaluations(atlas)))
    writer.text(_docs(f"{render.NEURON_PAGE}.md"), render.render_neuron_template())
    writer.text(_docs(f"{render.SEARCH_PAGE}.md"), render.render_search())
    writer.data(_docs(data.SEARCH_FILE), data.gzip_json(search.to_dict()))
    sem = write_semantic(atlas, writer, find_runtime()) if semantic else None
    writer.text(_docs(data.SITE_FILE), json.dumps(
        data.site_data(name, layers, names, layer_chunks, semantic=sem), ensure_ascii=False, indent=1))
    for f in (*SCRIPTS, *MODULES, *STYLES):
        writer.text(_docs(f"assets/{f}"), asset(f))
    writer.text(HOOKS, asset(HOOKS))
    nav, not_in_nav = _nav(names, layers)
    writer.text("mkdocs.yml", render.mkdocs_yml(name, nav, not_in_nav,
                                                [f"assets/{f}" for f in SCRIPTS],
                                                [f"assets/{f}" for f in STYLES]))
    published, added = publish_images(atlas.path, images, writer)
    counts = {"pages": len(layers) + len(names) + 3, "neurons": n_neurons,
              "data_files": sum(1 for p in writer.written if p.startswith("docs/data/")),
              "images": published, "images_added": added}
    log.info("generated the project (%s) in %.1f s", counts, time.perf_counter() - t0)
    return counts


def run_mkdocs(project: Path, site_dir: Path | None = None) -> None:
    """``mkdocs build`` of the project (a subprocess, so its memory goes when it ends),
    into ``site_dir`` when given (else the project's own ``site_dir``)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--clean", "-q", "-f", "mkdocs.yml"]
    if site_dir is not None:
        cmd += ["-d", str(site_dir)]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise SiteError(f"mkdocs build failed in {project}: {tail}")
    for line in proc.stderr.splitlines():
        if line.strip():
            log.info("mkdocs: %s", line)


def _build_into(out: Path, project: Path, written: frozenset[str], old: Manifest) -> None:
    """Build into a temp folder, then swap it in for the earlier site (which is left
    as it was when the build fails)."""
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".dnd-atlas-site-build-", dir=out))
    try:
        run_mkdocs(project, tmp)
        # Listed before the swap, so a crash during it leaves no unlisted file behind.
        write_manifest(project, Manifest(written, old.site | files_under(tmp), complete=True))
        site = replace_site(tmp, out / SITE_DIR, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_manifest(project, Manifest(written, site, complete=True))
    log.info("mkdocs build in %.1f s", time.perf_counter() - t0)


def build_site(atlas_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
               site_name: str | None = None, build: bool = True, shared: bool = False,
               semantic: bool = True) -> Path:
    """Render the atlas into ``out_dir/project`` and build it into ``out_dir/site``.

    Returns the built site folder (``out_dir/site``), or the project folder when
    ``build`` is false. ``out_dir`` must be new, empty or made by an earlier
    call (see :mod:`atlas_site.output`); with ``shared`` it may hold other files,
    which are left alone. ``semantic=False`` leaves out the in-browser semantic
    search (keyword search only; see :mod:`atlas_site.semantic`). Open the site with ``python -m http.server -d
    OUT/site``, or publish it with ``mkdocs gh-deploy`` run from ``OUT/project``.
    Raises :class:`AtlasError` subclasses (no atlas, wrong format, a refused
    ``out_dir``, a failed build), in which case nothing a user wrote was touched.
    """
    atlas_path = Path(atlas_dir).expanduser()
    out = Path(out_dir).expanduser()
    if atlas_path.is_dir() and out.resolve() == atlas_path.resolve():
        raise SiteError("--out must not be the atlas directory")
    old = claim(out, shared=shared)
    project = out / PROJECT_DIR
    with Atlas.open(atlas_path) as atlas:
        project.mkdir(parents=True, exist_ok=True)
        write_manifest(project, Manifest(old.project, old.site, complete=False))
        writer = ProjectWriter(project, old)
        generate_project(atlas, writer, site_name=site_name, semantic=semantic)
    removed = writer.finish()
    if removed:
        log.info("removed %d files of the earlier project", removed)
    written = frozenset(writer.written - {MANIFEST})
    write_manifest(project, Manifest(written, old.site, complete=True))
    if not build:
        return project
    _build_into(out, project, written, old)
    return out / SITE_DIR
