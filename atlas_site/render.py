"""Markdown pages of the site, as strings: home, model and layer pages, the one
neuron page (a template the browser fills from the data files) and the search page.

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
from collections.abc import Mapping, Sequence
from typing import Any

from atlas_site.data import layer_path
from atlas_site.escape import number, slug, text, url
from query.records import LayerInfo, ModelInfo

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


NEURON_PAGE = "neuron"
SEARCH_PAGE = "search"


def neuron_url(model: str, layer: str, unit: int) -> str:
    """Docs-relative URL of a neuron: ``neuron.html#<model slug>/<layer slug>/<unit>``.

    The stable address of a neuron (its fragment is read by the browser, so it
    works on any static host); the pre-2025 ``neurons/<model>/<layer>/<unit>.html``
    addresses are redirected there by the site's 404 page (GitHub Pages).
    """
    return f"{NEURON_PAGE}.html#{layer_path(model, layer)}/{int(unit)}"


def chart_file(model: str, layer: str, what: str) -> str:
    """Docs-relative path of one layer histogram."""
    return f"assets/charts/{slug(model)}--{slug(layer)}--{what}.svg"


def href(src_page: str, target: str) -> str:
    """A URL from page ``src_page`` (docs-relative, no extension) to docs-relative ``target``.

    Always goes up to the docs root and down again: one string concatenation,
    which matters at 70 links per page and 25,000 pages.
    """
    return "../" * src_page.count("/") + url(target)


def _front_matter(title: str) -> str:
    # HTML-escaped text inside a JSON (= YAML) string: the theme prints
    # page.meta.title unescaped into <title> and the header.
    return f"---\ntitle: {json.dumps(html.escape(title))}\n---\n\n"


def _status_counts(li: LayerInfo) -> str:
    return f"{li.n_ok} ok, {li.n_dead} dead, {li.n_failed} failed"


# Charts per layer: (column key, alt text), in display order.
Charts = Mapping[tuple[str, str], Sequence[tuple[str, str]]]


def _chart_imgs(page: str, li: LayerInfo, charts: Charts, lazy: bool) -> str:
    extra = ' loading="lazy"' if lazy else ""
    imgs = [f'<img src="{href(page, chart_file(li.model, li.layer, key))}" '
            f'alt="histogram of {text(alt)}"{extra}>'
            for key, alt in charts.get((li.model, li.layer), ())]
    return '<div class="atlas-charts">' + "".join(imgs) + "</div>\n"


# -- neuron, search and layer pages ---------------------------------------------------


def render_neuron_template() -> str:
    """The one neuron page: the browser renders the neuron its URL fragment names."""
    return (_front_matter("Neuron")
            + '<h1 id="atlas-neuron-title">Neuron</h1>\n\n'
            '<div class="atlas-neuron" data-atlas-view="neuron">\n'
            '<p class="atlas-muted atlas-loading">Loading the neuron…</p>\n'
            "<noscript><p>This page needs JavaScript: it renders the neuron named after "
            "<code>#</code> in its address from the site's data files.</p></noscript>\n"
            "</div>\n")


def render_search() -> str:
    """The search page: semantic search when the site has it (keyword search
    otherwise), with model and layer filters, in the browser."""
    return (_front_matter("Search neurons")
            + "# Search neurons\n\n"
            '<div class="atlas-search-page" data-atlas-view="search">\n'
            '<form class="atlas-search-form" role="search">'
            '<input type="search" class="atlas-search-input" name="q" '
            'placeholder="a concept, e.g. striped circle" autocomplete="off" '
            'aria-label="Search neurons by concept">'
            '<select class="atlas-search-model" aria-label="Model"></select>'
            '<select class="atlas-search-layer" aria-label="Layer"></select>'
            '<button type="submit">Search</button></form>\n'
            '<p class="atlas-search-status atlas-muted"></p>\n'
            '<ol class="atlas-search-results"></ol>\n'
            "<noscript><p>Search runs in the browser and needs JavaScript.</p></noscript>\n"
            "</div>\n")


def fidelity_line(summary: Mapping[str, float | None] | None) -> str:
    """One sentence on a layer's label fidelity and its chance level (the
    build's ``layer_fidelity`` rows); "" when the atlas has none."""
    if not summary or summary.get("label_correlation") is None:
        return ""
    parts = [f"mean correlation {number(summary['label_correlation'])}"]
    if summary.get("shuffled_correlation") is not None:
        parts[0] += f" (labels shuffled among units: {number(summary['shuffled_correlation'])})"
    if summary.get("label_auprc") is not None:
        parts.append(f"AUPRC {number(summary['label_auprc'])} (chance "
                     f"{number(summary.get('positive_fraction'))})")
    n = summary.get("sample_images")
    over = f" over {int(n)} sample images" if n else ""
    return f'<p class="atlas-fidelity">Label fidelity{over}: {"; ".join(parts)}.</p>\n'


def render_layer(li: LayerInfo, charts: Charts, fidelity: Mapping[str, float | None] | None = None) -> str:
    """The Markdown of one layer's page: its label fidelity against chance,
    histograms and the table the browser fills from the layer's index file
    (sortable, filterable, paged)."""
    page = layer_page(li.model, li.layer)
    title = f"{li.model} / {li.layer}"
    crumbs = (f'<p class="atlas-crumbs"><a href="{href(page, "index.html")}">Home</a> › '
              f'<a href="{href(page, model_page(li.model) + ".html")}">{text(li.model)}</a> › '
              f"{text(li.layer)}</p>\n")
    table = (f'<div class="atlas-table" data-atlas-view="layer" '
             f'data-layer="{text(layer_path(li.model, li.layer))}">'
             '<p class="atlas-muted atlas-loading">Loading the table…</p>'
             "<noscript><p>The table needs JavaScript.</p></noscript></div>\n</div>\n")
    return "".join([
        _front_matter(title), "# ", text(title), '\n\n<div class="atlas-layer">\n', crumbs,
        f"<p>{li.n_units} units ({text(li.kind)}): {_status_counts(li)}.</p>\n", fidelity_line(fidelity),
        _chart_imgs(page, li, charts, lazy=False), table])


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


def _charts(page: str, layers: Sequence[LayerInfo], charts: Charts) -> list[str]:
    return [f"<h3>{text(li.model)} / {text(li.layer)}</h3>\n" + _chart_imgs(page, li, charts, True)
            for li in layers]


def render_model(mi: ModelInfo | None, name: str, layers: Sequence[LayerInfo],
                 charts: Charts) -> str:
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
    out += _charts(page, layers, charts)
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
                model_names: Sequence[str], charts: Charts,
                evaluations: Sequence[dict[str, Any]] = ()) -> str:
    """The Markdown of the home page: models, layers and counts, evaluation
    results, build config, histograms."""
    page = "index"
    totals = {k: sum(getattr(li, f"n_{k}") for li in layers) for k in ("ok", "dead", "failed")}
    units = sum(li.n_units for li in layers)
    out = [_front_matter(site_name), "# ", text(site_name), "\n\n<div class=\"atlas-home\">\n"]
    out.append(
        f"<p>A Describe-and-Dissect neuron atlas of {len(model_names)} model(s), "
        f"{len(layers)} layer(s) and {units} units: {totals['ok']} ok, {totals['dead']} dead, "
        f"{totals['failed']} failed. Search the labels with the search box (or the "
        f'<a href="{href(page, SEARCH_PAGE + ".html")}">search page</a>); open a layer to '
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
    out.append("<h2>Score distributions</h2>\n<p>Per layer, over the neurons with status ok: "
               "concept score of label 1, interpretability score (mean pairwise similarity of "
               "the top images) and any other per-label score the atlas holds.</p>\n")
    out += _charts(page, layers, charts)
    out.append("</div>\n")
    return "".join(out)


def mkdocs_yml(site_name: str, nav: list[Any], not_in_nav: Sequence[str],
               scripts: Sequence[str], styles: Sequence[str]) -> str:
    """The project's ``mkdocs.yml`` (JSON is YAML, so every value is quoted safely).

    No mkdocs search plugin: neuron pages are not mkdocs pages, the site's own
    script searches the label index. No web fonts, no CDN: no outside request.
    """
    lines = [
        "# Generated by `dnd-atlas site`; regenerate rather than edit.",
        f"site_name: {json.dumps(html.escape(site_name))}",
        "docs_dir: docs",
        "site_dir: ../site",
        "use_directory_urls: false",
        "theme:",
        "  name: material",
        "  font: false  # no Google Fonts: the site makes no third-party requests",
        "plugins: []",
        f"extra_css: {json.dumps(list(styles))}",
        f"extra_javascript: {json.dumps(list(scripts))}",
        "hooks: [atlas_hooks.py]",
        f"nav: {json.dumps(nav)}",
        "not_in_nav: |",
        *[f"  {p}" for p in not_in_nav],
        "",
    ]
    return "\n".join(lines)

