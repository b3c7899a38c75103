"""Markdown pages of the site, as strings: home, model, layer and neuron pages.

Untrusted text goes through :func:`atlas_site.escape.text` in page bodies
(``html.escape`` in front matter, nav and site name, which the theme prints
unescaped and Markdown never sees), and every page body is a raw HTML block
(Markdown leaves its inside alone), so a label can neither inject markup nor
Markdown/Jinja syntax. Links inside raw HTML
are not rewritten by mkdocs, so they are written relative to the page with
``.html`` targets (the project sets ``use_directory_urls: false``).
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Any

from atlas_site.escape import number, slug, text, url
from query.bulk import Neighbor
from query.records import LayerInfo, ModelInfo, NeuronRecord
from query.schema import IMAGES_DIR

log = logging.getLogger(__name__)

# Meta keys shown as a table on the home page (the build config gets its own block).
CONFIG_KEYS = ("build_config", "build_fingerprint")


# -- paths ----------------------------------------------------------------------------


def model_page(model: str) -> str:
    """Docs-relative path of a model's page (without extension)."""
    return f"models/{slug(model)}"


def layer_page(model: str, layer: str) -> str:
    """Docs-relative path of a layer's page (without extension)."""
    return f"layers/{slug(model)}/{slug(layer)}"


def neuron_page(model: str, layer: str, unit: int) -> str:
    """Docs-relative path of a neuron's page (without extension)."""
    return f"neurons/{slug(model)}/{slug(layer)}/{int(unit)}"


def chart_file(model: str, layer: str, what: str) -> str:
    """Docs-relative path of one layer histogram."""
    return f"assets/charts/{slug(model)}--{slug(layer)}--{what}.svg"


def href(src_page: str, target: str) -> str:
    """A URL from page ``src_page`` (docs-relative, no extension) to docs-relative ``target``.

    Always goes up to the docs root and down again: one string concatenation,
    which matters at 70 links per page and 25,000 pages.
    """
    return "../" * src_page.count("/") + url(target)


class ImageSet:
    """The atlas images the pages use: validates each path once and remembers it.

    Paths in the atlas are relative to the atlas directory and must lie under
    ``images/``; anything else (absolute paths, ``..``) is refused and the
    page shows a placeholder instead.
    """

    def __init__(self) -> None:
        self.used: set[str] = set()
        self._ok: dict[str, bool] = {}

    def add(self, path: str | None) -> str | None:
        """The docs-relative path of an atlas image, or ``None`` when it is unsafe."""
        if not path:
            return None
        ok = self._ok.get(path)
        if ok is None:
            p = PurePosixPath(path)
            ok = (not p.is_absolute() and len(p.parts) > 1 and p.parts[0] == IMAGES_DIR
                  and ".." not in p.parts and "\\" not in path)
            if not ok:
                log.warning("skipping image outside %s/: %r", IMAGES_DIR, path)
            self._ok[path] = ok
        if not ok:
            return None
        self.used.add(path)
        return path


def _img(page: str, images: ImageSet, path: str | None, cls: str, alt: str = "") -> str:
    target = images.add(path)
    if target is None:
        return f'<span class="{cls} atlas-muted">(no image)</span>'
    return (f'<img class="{cls}" src="{href(page, target)}" alt="{text(alt)}" '
            'loading="lazy" decoding="async">')


def _front_matter(title: str) -> str:
    # HTML-escaped text inside a JSON (= YAML) string: the theme prints
    # page.meta.title unescaped into <title> and the header.
    return f"---\ntitle: {json.dumps(html.escape(title))}\n---\n\n"


def _status_counts(li: LayerInfo) -> str:
    return f"{li.n_ok} ok, {li.n_dead} dead, {li.n_failed} failed"


# -- neuron ---------------------------------------------------------------------------


def neuron_title(rec: NeuronRecord) -> str:
    """Plain-text title of a neuron page: its address and its labels (for search)."""
    head = f"{rec.model} / {rec.layer} / unit {rec.unit}"
    if rec.labels:
        return f"{head}: " + " · ".join(lb.text for lb in rec.labels)
    return f"{head} ({rec.status})"


BODY_MARKER = "<!-- atlas-body -->"


def render_neuron(
    rec: NeuronRecord, images: ImageSet, similar: Sequence[Neighbor]
) -> tuple[str, str]:
    """One neuron's page as ``(markdown, body_html)``.

    The Markdown holds what search should find (title with the labels, the
    labels and candidate concepts) and :data:`BODY_MARKER`; the project's hook
    pastes ``body_html`` (evidence, tables, similar neurons) there after the
    page is rendered, so neither Markdown's raw-HTML parser nor the search
    indexer walks it: that keeps 25,000 pages within minutes.
    """
    page = neuron_page(rec.model, rec.layer, rec.unit)
    title = neuron_title(rec)
    md = [_front_matter(title), "# ", text(title), "\n\n"]
    if rec.labels or rec.candidates:
        md.append('<p class="atlas-summary">')
        if rec.labels:
            md.append(
                "Labels: "
                + "; ".join(
                    f"{lb.rank}. <strong>{text(lb.text)}</strong> ({number(lb.concept_score)})"
                    for lb in rec.labels
                )
                + ". "
            )
        if rec.candidates:
            md.append("Candidate concepts: " + "; ".join(text(c.concept) for c in rec.candidates))
        md.append("</p>\n\n")
    md.append(BODY_MARKER + "\n")
    out = ['<div class="atlas-neuron">\n']
    out.append(
        f'<p class="atlas-crumbs"><a href="{href(page, "index.html")}">Home</a> › '
        f'<a href="{href(page, model_page(rec.model) + ".html")}">{text(rec.model)}</a> › '
        f'<a href="{href(page, layer_page(rec.model, rec.layer) + ".html")}">'
        f"{text(rec.layer)}</a> › unit {rec.unit}</p>\n"
    )
    facts = [
        ("Status", text(rec.status)),
        ("Interpretability score", number(rec.interpretability)),
        ("Max activation", number(rec.max_activation)),
    ]
    if rec.reason:
        facts.append(("Reason", text(rec.reason)))
    out.append('<table><tbody>\n')
    out += [f"<tr><th>{k}</th><td>{v}</td></tr>\n" for k, v in facts]
    out.append("</tbody></table>\n")

    if rec.evidence:
        out.append("<h2>Top images</h2>\n<div class=\"atlas-grid\">\n")
        for ev in rec.evidence:
            where = ("crop " + ",".join(str(int(v)) for v in ev.box)) if ev.box else "whole image"
            out.append(
                f"<figure>{_img(page, images, ev.thumbnail, 'atlas-evidence', ev.caption or '')}"
                f"<figcaption>#{ev.rank} · activation {number(ev.activation)} · {where}"
                f"<br>{text(ev.caption)}</figcaption></figure>\n")
        out.append("</div>\n")

    if rec.candidates:
        out.append(
            "<h2>Candidate concepts</h2>\n<table><thead><tr>"
            "<th>#</th><th>Concept</th><th>TopK-Squared</th><th>Image-Products</th>"
            "<th>Score</th><th>Label</th><th>Generated samples</th></tr></thead><tbody>\n")
        for c in rec.candidates:
            samples = "".join(_img(page, images, s, "atlas-sample", c.concept) for s in c.samples)
            out.append(
                f"<tr><td>{c.position}</td><td>{text(c.concept)}</td>"
                f"<td>{number(c.topk_squared)}</td><td>{number(c.image_products)}</td>"
                f"<td>{number(c.score)}</td><td>{number(c.selected_rank)}</td>"
                f"<td>{samples}</td></tr>\n")
        out.append("</tbody></table>\n")

    if rec.calls:
        out.append("<h2>Calls per stage</h2>\n<table><thead><tr>"
                   "<th>Stage</th><th>Calls</th><th>Cached</th></tr></thead><tbody>\n")
        out += [f"<tr><td>{text(stage)}</td><td>{calls}</td><td>{cached}</td></tr>\n"
                for stage, (calls, cached) in rec.calls.items()]
        out.append("</tbody></table>\n")

    if similar:
        out.append("<div class=\"atlas-similar\" data-search-exclude>\n<h2>Similar neurons</h2>\n"
                   "<ul>\n")
        for nb in similar:
            target = neuron_page(nb.model, nb.layer, nb.unit) + ".html"
            out.append(
                f'<li><a class="atlas-similar-link" href="{href(page, target)}">'
                f"{text(nb.model)} / {text(nb.layer)} / unit {nb.unit}</a>: "
                f"{text(nb.label)} <span class=\"atlas-muted\">cosine "
                f"{number(nb.similarity)}</span></li>\n")
        out.append("</ul>\n</div>\n")
    out.append("</div>\n")
    return "".join(md), "".join(out)


# -- layer ----------------------------------------------------------------------------


def render_layer(li: LayerInfo, records: Sequence[NeuronRecord], images: ImageSet) -> str:
    """The Markdown of one layer's page: histograms and a sortable, filterable table."""
    page = layer_page(li.model, li.layer)
    title = f"{li.model} / {li.layer}"
    out = [_front_matter(title), "# ", text(title), "\n\n<div class=\"atlas-layer\">\n"]
    out.append(
        f'<p class="atlas-crumbs"><a href="{href(page, "index.html")}">Home</a> › '
        f'<a href="{href(page, model_page(li.model) + ".html")}">{text(li.model)}</a> › '
        f"{text(li.layer)}</p>\n"
        f"<p>{li.n_units} units ({text(li.kind)}): {_status_counts(li)}.</p>\n"
        '<div class="atlas-charts">'
        f'<img src="{href(page, chart_file(li.model, li.layer, "score"))}" '
        'alt="histogram of label-1 concept scores">'
        f'<img src="{href(page, chart_file(li.model, li.layer, "interpretability"))}" '
        'alt="histogram of interpretability scores"></div>\n')
    table_id = "units"
    out.append(
        f'<div class="atlas-controls" data-table="{table_id}">'
        '<label>Filter labels <input type="search" class="atlas-filter" '
        'placeholder="words in labels"></label>'
        '<label>Minimum score <input type="number" step="any" class="atlas-min"></label>'
        '<span class="atlas-count"></span></div>\n'
        f'<table id="{table_id}" data-sortable data-search-exclude>'
        '<thead><tr><th data-sort="num">Unit</th><th>Top image</th>'
        '<th data-sort="text">Label 1</th><th data-sort="num">Score</th>'
        '<th data-sort="num">Interpretability</th><th data-sort="text">Status</th>'
        '</tr></thead><tbody>\n')
    for rec in records:
        first = rec.labels[0] if rec.labels else None
        score = first.concept_score if first else None
        label = first.text if first else ""
        thumb = rec.evidence[0].thumbnail if rec.evidence else None
        link = href(page, neuron_page(rec.model, rec.layer, rec.unit) + ".html")
        words = " ".join(lb.text for lb in rec.labels).lower()
        out.append(
            f'<tr data-score="{"" if score is None else repr(float(score))}" '
            f'data-text="{text(words)}">'
            f'<td data-v="{rec.unit}"><a href="{link}">{rec.unit}</a></td>'
            f"<td>{_img(page, images, thumb, 'atlas-thumb') if thumb else ''}</td>"
            f'<td><a href="{link}">{text(label)}</a></td>'
            f'<td data-v="{"" if score is None else repr(float(score))}">{number(score)}</td>'
            f'<td data-v="{"" if rec.interpretability is None else repr(float(rec.interpretability))}">'
            f"{number(rec.interpretability)}</td><td>{text(rec.status)}</td></tr>\n")
    out.append("</tbody></table>\n</div>\n")
    return "".join(out)


# -- model and home ---------------------------------------------------------------------


def _layers_table(page: str, layers: Sequence[LayerInfo], with_model: bool) -> list[str]:
    head = "<th>Model</th>" if with_model else ""
    out = [f"<table><thead><tr>{head}<th>Layer</th><th>Kind</th>"
           "<th>Units</th><th>OK</th><th>Dead</th><th>Failed</th></tr></thead><tbody>\n"]
    for li in layers:
        model = (f'<td><a href="{href(page, model_page(li.model) + ".html")}">'
                 f"{text(li.model)}</a></td>") if with_model else ""
        out.append(
            f"<tr>{model}<td><a href=\"{href(page, layer_page(li.model, li.layer) + '.html')}\">"
            f"{text(li.layer)}</a></td><td>{text(li.kind)}</td><td>{li.n_units}</td>"
            f"<td>{li.n_ok}</td><td>{li.n_dead}</td><td>{li.n_failed}</td></tr>\n")
    out.append("</tbody></table>\n")
    return out


def _charts(page: str, layers: Sequence[LayerInfo]) -> list[str]:
    out = []
    for li in layers:
        out.append(
            f"<h3>{text(li.model)} / {text(li.layer)}</h3>\n<div class=\"atlas-charts\">"
            f'<img src="{href(page, chart_file(li.model, li.layer, "score"))}" '
            'alt="histogram of label-1 concept scores" loading="lazy">'
            f'<img src="{href(page, chart_file(li.model, li.layer, "interpretability"))}" '
            'alt="histogram of interpretability scores" loading="lazy"></div>\n')
    return out


def render_model(mi: ModelInfo | None, name: str, layers: Sequence[LayerInfo]) -> str:
    """The Markdown of one model's page: its probe set, config and layers."""
    page = model_page(name)
    out = [_front_matter(f"Model {name}"), "# Model ", text(name), "\n\n<div class=\"atlas-model\">\n"]
    out.append(f'<p class="atlas-crumbs"><a href="{href(page, "index.html")}">Home</a> › '
               f"{text(name)}</p>\n")
    if mi is not None:
        out.append("<table><tbody>\n")
        for k, v in [("Target", mi.target), ("Probe set", mi.probe),
                     ("Probe images", mi.n_probe_images), ("Skipped images", mi.n_skipped_images)]:
            out.append(f"<tr><th>{k}</th><td>{text(v)}</td></tr>\n")
        out.append("</tbody></table>\n")
    out += _layers_table(page, layers, with_model=False)
    if mi is not None and mi.config:
        out.append("<h2>Model config</h2>\n<pre class=\"atlas-config\"><code>"
                   f"{text(json.dumps(mi.config, indent=2, sort_keys=True, default=str))}"
                   "</code></pre>\n")
    out.append("<h2>Score distributions</h2>\n")
    out += _charts(page, layers)
    out.append("</div>\n")
    return "".join(out)


def _evaluations_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The ``evaluations`` rows (``dnd-atlas eval``) as a table; nothing when there are none."""
    if not rows:
        return []
    head = ("<h2>Evaluations</h2>\n<p>Quality metrics written by <code>dnd-atlas eval</code> "
            "(a blank model and layer: the whole atlas).</p>\n<table><thead><tr><th>Protocol</th>"
            "<th>Model</th><th>Layer</th><th>Metric</th><th>Value</th><th>Evaluated</th>"
            "</tr></thead><tbody>\n")
    out = [head]
    for r in rows:
        when, value = r.get("evaluated_at"), r.get("value")
        if isinstance(value, float) and value.is_integer() and abs(value) > 1:
            value = int(value)  # counts (units, images)
        out.append(f"<tr><td>{text(r.get('protocol'))}</td><td>{text(r.get('model'))}</td>"
                   f"<td>{text(r.get('layer'))}</td><td>{text(r.get('metric'))}</td>"
                   f"<td>{number(value)}</td>"
                   f"<td>{text(str(when)[:16] if when is not None else '')}</td></tr>\n")
    out.append("</tbody></table>\n")
    return out


def render_home(site_name: str, meta: dict[str, Any], layers: Sequence[LayerInfo],
                model_names: Sequence[str], evaluations: Sequence[dict[str, Any]] = ()) -> str:
    """The Markdown of the home page: models, layers and counts, evaluation
    results, build config, histograms."""
    page = "index"
    totals = {k: sum(getattr(li, f"n_{k}") for li in layers) for k in ("ok", "dead", "failed")}
    units = sum(li.n_units for li in layers)
    out = [_front_matter(site_name), "# ", text(site_name), "\n\n<div class=\"atlas-home\">\n"]
    out.append(
        f"<p>A Describe-and-Dissect neuron atlas of {len(model_names)} model(s), "
        f"{len(layers)} layer(s) and {units} units: {totals['ok']} ok, {totals['dead']} dead, "
        f"{totals['failed']} failed. Search the labels with the search box; open a layer to "
        "sort and filter its neurons.</p>\n<h2>Models</h2>\n<ul>\n")
    out += [f'<li><a href="{href(page, model_page(m) + ".html")}">{text(m)}</a></li>\n'
            for m in model_names]
    out.append("</ul>\n<h2>Layers</h2>\n")
    out += _layers_table(page, layers, with_model=True)
    out += _evaluations_table(evaluations)
    out.append("<h2>How this atlas was built</h2>\n<table><tbody>\n")
    for key, value in meta.items():
        if key in CONFIG_KEYS:
            continue
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        out.append(f"<tr><th>{text(key)}</th><td>{text(shown)}</td></tr>\n")
    out.append("</tbody></table>\n")
    if "build_config" in meta:
        out.append("<p>Build configuration:</p>\n<pre class=\"atlas-config\"><code>"
                   f"{text(json.dumps(meta['build_config'], indent=2, sort_keys=True, default=str))}"
                   "</code></pre>\n")
    out.append("<h2>Score distributions</h2>\n<p>Per layer: concept score of label 1 and "
               "interpretability score (mean pairwise similarity of the top images) of the "
               "neurons with status ok.</p>\n")
    out += _charts(page, layers)
    out.append("</div>\n")
    return "".join(out)


def mkdocs_yml(site_name: str, nav: list[Any], not_in_nav: Sequence[str]) -> str:
    """The project's ``mkdocs.yml`` (JSON is YAML, so every value is quoted safely)."""
    lines = [
        "# Generated by `dnd-atlas site`; regenerate rather than edit.",
        f"site_name: {json.dumps(html.escape(site_name))}",
        "docs_dir: docs",
        "site_dir: ../site",
        "use_directory_urls: false",
        "theme:",
        "  name: material",
        "  font: false  # no Google Fonts: the site makes no third-party requests",
        "  features: [search.suggest, search.highlight]",
        "plugins:",
        "  - search",
        "extra_css: [assets/atlas.css]",
        "extra_javascript: [assets/atlas.js]",
        "hooks: [atlas_hooks.py]",
        f"nav: {json.dumps(nav)}",
        "not_in_nav: |",
        *[f"  {p}" for p in not_in_nav],
        "",
    ]
    return "\n".join(lines)

