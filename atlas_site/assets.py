"""Files every generated project carries, shipped in ``atlas_site/static/``: the
stylesheet, the scripts that render tables, neuron pages and search results in
the browser, and the project's mkdocs hook."""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).resolve().parent / "static"
# Load order matters: atlas.js defines the helpers the others use.
SCRIPTS = ("atlas.js", "atlas-search.js", "atlas-layer.js", "atlas-neuron.js")
STYLES = ("atlas.css",)
HOOKS = "atlas_hooks.py"


def asset(name: str) -> str:
    """The text of one shipped file of ``static/``."""
    return (STATIC / name).read_text(encoding="utf-8")
