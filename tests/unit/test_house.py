"""The house: ``builder -> query <- atlas_site``, no import circle anywhere,
and each builder sub-package imports only those below it.

Every import counts, the ones deferred inside functions too: a deferred
import is still a dependency, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("builder", "query", "atlas_site", "testkit", "bench")
# builder's sub-packages, lowest first: each may import only those before it
# (and the shared builder.* modules: config, probe, cache, errors, ...).
BUILDER_LAYERS = ("builder.backends", "builder.synthetic", "builder.pipeline", "builder.evaluation",
                  "builder.commands")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Internal modules ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n in MODULES else node.module for n in names]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def test_query_imports_neither_builder_nor_atlas_site():
    for mod, deps in GRAPH.items():
        if mod.split(".")[0] == "query":
            up = sorted(d for d in deps if d.split(".")[0] in ("builder", "atlas_site"))
            assert not up, f"{mod} imports {up}"
            text = MODULES[mod].read_text()
            for node in ast.walk(ast.parse(text)):  # nor names them by string (lazy imports)
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    assert not node.value.startswith(("builder.", "atlas_site.")), f"{mod}: {node.value!r}"


def test_atlas_site_does_not_import_builder():
    for mod, deps in GRAPH.items():
        if mod.startswith("atlas_site"):
            assert not [d for d in deps if d.startswith("builder")], mod


def test_builder_sub_packages_import_only_those_below():
    def layer(m: str) -> int | None:
        return next((i for i, p in enumerate(BUILDER_LAYERS) if m == p or m.startswith(p + ".")), None)

    for mod, deps in GRAPH.items():
        mine = layer(mod)
        if mine is None:
            continue
        above = sorted(d for d in deps if layer(d) is not None and layer(d) > mine)
        assert not above, f"{mod} imports {above}"


def test_bench_imports_nothing_from_tests():
    for mod, deps in GRAPH.items():
        if mod.startswith("bench"):
            assert "sys.path" not in MODULES[mod].read_text(), mod
            assert not [d for d in deps if d.startswith("tests")], mod


def test_no_import_circle():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                circles.append(sorted(scc))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_graph_sees_deferred_imports():
    """The checks above would pass vacuously if imports inside functions were missed."""
    assert "builder.pipeline.run" in GRAPH["builder.commands.build"]  # imported inside run_build
    assert "builder.pipeline.dnd" in GRAPH["builder.pipeline.run"]
