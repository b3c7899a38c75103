"""Files every generated project carries, shipped in ``atlas_site/static/``: the
stylesheet, the scripts that render tables, neuron pages and search results in
the browser, and the project's mkdocs hook."""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
# Load order matters: atlas.js defines the helpers the others use.
SCRIPTS = ("atlas.js", "atlas-search.js", "atlas-semantic.js", "atlas-layer.js", "atlas-neuron.js")
# ES modules of the semantic engine's worker, loaded on the first search (not in every page's <head>).
MODULES = ("semantic/worker.mjs", "semantic/search.mjs", "semantic/rank.mjs", "semantic/wordpiece.mjs")
STYLES = ("atlas.css",)
HOOKS = "atlas_hooks.py"


def asset(name: str) -> str:
    """The text of one shipped file of ``static/``."""
    return (STATIC / name).read_text(encoding="utf-8")
