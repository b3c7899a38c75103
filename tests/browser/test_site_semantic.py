"""Semantic search in the static site, no server: in headless Chromium the search box
ranks neurons as ``dnd-atlas search`` does (same top 5, same order, ties included),
filters by model and layer, finds "zebra pattern" for "stripes" where keyword search
finds nothing, loads nothing large before the first search, never leaves the site's
origin, and falls back on keyword search when the runtime is not in the site or
cannot load.

Needs onnxruntime-web in the cache (``python -m atlas_site.runtime``, which
``make test`` runs; skipped otherwise) and exports the minilm embedder once into
the cache (about a minute the first time). The demo-atlas check is marked slow
(a 400-image demo build takes about 4 minutes on 2 cores). Figures (page weight,
time to the first result) go to test-artifacts/semantic-*.json.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import random
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest

from atlas_site.data import layer_path
from atlas_site.runtime import find_runtime
from query import Atlas
from testkit.chromium import ARTIFACTS, chromium_context, require_chromium

LOAD_TIMEOUT_MS = 120_000
require_chromium()  # skips this module without Chromium or Playwright

# A demo-like vocabulary: few distinct label texts on many neurons (ties everywhere);
# "zebra pattern" is the only striped concept and shares no word with "stripes".
VOCABULARY = ["red", "blue", "green", "yellow", "circle", "square", "triangle", "star", "ring",
              "checkered", "dotted", "plain", "sky", "grass", "brick", "red circle", "blue square",
              "green triangle", "yellow star", "brick wall", "blue sky", "grass field",
              "dog faces", "cat", "car wheels", "wood grain", "water", "text"]
QUERIES = ["stripes", "red circle", "checkered", "a blue square", "dots", "green grass",
           "wall of bricks", "animal face", "star shape", "sky"]
FILTERED = [("red", "cnn", None), ("circle", None, "conv2"), ("sky", "vit", "blocks.3")]


def concept_neurons(seed: int = 0) -> list[dict]:
    """~150 neurons over two models and four layers with 1-3 labels from VOCABULARY,
    one of them "zebra pattern", a few dead ones."""
    rng = random.Random(seed)
    layers = [("cnn", "conv2", 40), ("cnn", "conv4", 50), ("vit", "blocks.3", 40), ("vit", "head", 20)]
    out = []
    for model, layer, n in layers:
        for unit in range(n):
            labels = rng.sample(VOCABULARY, rng.randint(1, 3))
            status = "dead" if rng.random() < 0.05 else "ok"
            out.append({"model": model, "layer": layer, "unit": unit, "status": status,
                        "labels": labels if status == "ok" else []})
    out[57]["labels"] = ["zebra pattern", "grass"]
    out[57]["status"] = "ok"
    return out


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(root: Path):
    """A static server over ``root`` on 127.0.0.1 (free port, in a thread); returns (url, stop)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()

    return f"http://127.0.0.1:{httpd.server_address[1]}", stop


@pytest.fixture(scope="module")
def runtime():
    folder = find_runtime()
    if folder is None:
        pytest.skip("onnxruntime-web is not in the cache: python -m atlas_site.runtime")
    return folder


@pytest.fixture(scope="module")
def onnx_minilm(runtime):
    from testkit.embedders import onnx_export

    return onnx_export("minilm")


@pytest.fixture(scope="module")
def sites(tmp_path_factory, minilm, onnx_minilm):
    """The concept atlas (with its ONNX embedder) built twice: with semantic search, and
    with no runtime in the cache (keyword only; the warnings of that build are kept)."""
    from atlas_site.build import build_site
    from testkit.atlases import write_atlas
    from testkit.embedders import carry_embedder

    root = tmp_path_factory.mktemp("semantic")
    atlas = write_atlas(root / "atlas", minilm, concept_neurons())
    carry_embedder(atlas, onnx_minilm)
    served = root / "served"
    build_site(atlas, root / "out-semantic")
    handler = _Capture()
    logging.getLogger("atlas_site").addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DND_ATLAS_CACHE", str(root / "empty-cache"))
            build_site(atlas, root / "out-keyword")
    finally:
        logging.getLogger("atlas_site").removeHandler(handler)
    served.mkdir()
    for name in ("semantic", "keyword"):
        (root / f"out-{name}/site").rename(served / name)
    broken_copy(served / "semantic", served / "broken")
    url, stop = serve(served)
    try:
        yield {"url": url, "root": served, "atlas": atlas, "warnings": handler.warnings}
    finally:
        stop()


def broken_copy(site: Path, dest: Path) -> None:
    """``site`` hard-linked into ``dest``, its runtime's .wasm replaced by garbage."""
    for src in site.rglob("*"):
        if src.is_file():
            dst = dest / src.relative_to(site)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.name.endswith(".wasm.gz"):
                dst.write_bytes(gzip.compress(b"not a wasm module"))
            else:
                os.link(src, dst)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.warnings.append(record.getMessage())


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium_context(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


# When each engine first answered, in ms since the page's navigation started.
ANSWER_TIMES = """new MutationObserver(() => {
  const l = document.querySelector('.atlas-search-results');
  const key = l && l.dataset.engine && '__answered_' + l.dataset.engine;
  if (key && !window[key]) window[key] = performance.now();
}).observe(document, {subtree: true, childList: true, attributes: true});"""


def open_tab(context, origin: str):
    """A tab that records errors, requests (its workers' too) and when the search
    page's engines first answered."""
    tab = context.new_page()
    tab.add_init_script(ANSWER_TIMES)
    tab.errors, tab.requests = [], []
    tab.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: tab.errors.append(str(e)))
    tab.on("request", lambda r: tab.requests.append(r.url))
    tab.origin = origin
    return tab


def big_file(url: str) -> bool:
    """Whether ``url`` is one of the semantic search's files (not the small site.json)."""
    return any(p in url for p in ("/data/semantic/", "/assets/semantic/", "/assets/onnxruntime-web"))


def outside(tab) -> list[str]:
    return [u for u in tab.requests if not u.startswith(tab.origin + "/")]


def search_ui(tab, query: str, model: str | None = None, layer: str | None = None,
              engine: str = "semantic") -> list[tuple[str, int, str]]:
    """Search on the search page (its form and filters); ``(path, unit, label)`` of the hits."""
    tab.fill(".atlas-search-input", query)
    tab.select_option(".atlas-search-model", model or "")
    tab.select_option(".atlas-search-layer", layer or "")
    tab.press(".atlas-search-input", "Enter")
    tab.wait_for_function(  # the answer to this query with these filters, not an earlier one
        "([q, e, m, l]) => { const r = document.querySelector('.atlas-search-results');"
        " return r.dataset.query === q && r.dataset.engine === e && r.dataset.model === m && r.dataset.layer === l; }",
        arg=[query, engine, model or "", layer or ""], timeout=LOAD_TIMEOUT_MS)
    return hits_shown(tab)


def hits_shown(tab) -> list[tuple[str, int, str]]:
    rows = tab.eval_on_selector_all(
        ".atlas-search-results li", "lis => lis.map(li => [li.querySelector('a').getAttribute('href'),"
        " li.querySelector('.atlas-hit-label').textContent])")
    return [(href.split("#", 1)[1].rsplit("/", 1)[0], int(href.rsplit("/", 1)[1]), label)
            for href, label in rows]


def cli_top(atlas_dir: Path, query: str, k: int = 5, model=None, layer=None):
    with Atlas.open(atlas_dir) as atlas:
        hits = atlas.search(query, k=k, model=model, layer=layer)
    return [(layer_path(h.model, h.layer), h.unit, h.matched_label) for h in hits]


def answer_times(tab) -> dict[str, float]:
    """Seconds from navigation to the first keyword and semantic answers, and the
    semantic engine's own loading time."""
    got = tab.evaluate("async () => [window.__answered_keyword, window.__answered_semantic, "
                       "(await Atlas.search.engines.find(e => e.name === 'semantic').prepare()).loadMs]")
    return {name: None if v is None else round(v / 1000, 2)
            for name, v in zip(("first_keyword_result_s", "first_semantic_result_s", "semantic_load_s"), got)}


def page_weight(tab, root: Path, origin: str) -> dict[str, int]:
    """Bytes of every semantic-search file the tab fetched, by kind."""
    kinds = {"runtime": "/assets/onnxruntime-web", "model": "/data/semantic/model-",
             "tokenizer": "/data/semantic/tokenizer", "vectors": "/data/semantic/vectors",
             "labels": "/data/semantic/labels", "index": "/data/semantic/index",
             "scripts": "/assets/semantic/"}
    out = dict.fromkeys(kinds, 0)
    for url in set(tab.requests):
        rel = url[len(origin):].split("?")[0]
        for kind, prefix in kinds.items():
            if rel.startswith(prefix):
                out[kind] += (root / rel.lstrip("/")).stat().st_size
    return out


@pytest.fixture(scope="module")
def semantic_tab(browser, sites):
    """The semantic site's search page after its first semantic answer (one load for
    the module's tests); the time to that answer and the page weight are recorded."""
    origin = f"{sites['url']}/semantic"
    tab = open_tab(browser, sites["url"])
    tab.goto(f"{origin}/index.html")
    tab.wait_for_selector(".atlas-header-input")
    tab.wait_for_timeout(300)
    before = list(tab.requests)
    tab.goto(f"{origin}/search.html#q={quote(QUERIES[0])}")
    tab.wait_for_selector(".atlas-search-results[data-engine=semantic]", timeout=LOAD_TIMEOUT_MS)
    metrics = {**answer_times(tab),
               "bytes": page_weight(tab, sites["root"] / "semantic", origin)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "semantic-fixture.json").write_text(json.dumps(metrics, indent=1))
    tab.before_search = before
    tab.metrics = metrics
    yield tab
    tab.close()


def test_nothing_large_loads_before_the_first_search(semantic_tab):
    early = [u for u in semantic_tab.before_search if big_file(u)]
    assert early == []
    weight = semantic_tab.metrics["bytes"]
    assert weight["model"] > 1e6 and weight["runtime"] > 1e6 and weight["vectors"] > 0
    assert outside(semantic_tab) == []


def test_top5_equals_dnd_atlas_search(semantic_tab, sites):
    for query in QUERIES:
        got = search_ui(semantic_tab, query)[:5]
        assert got == cli_top(sites["atlas"], query), query
    assert "semantic search" in semantic_tab.inner_text(".atlas-search-status")
    assert semantic_tab.errors == [] and outside(semantic_tab) == []


def test_similarities_match_the_cli(semantic_tab, sites):
    hits = semantic_tab.evaluate("async (q) => (await Atlas.search.run(q, {k: 5})).hits", "zebra")
    with Atlas.open(sites["atlas"]) as atlas:
        want = atlas.search("zebra", k=5)
    # float16 label vectors: cosines within 1e-3 of the CLI's float32 ones
    assert [h["similarity"] for h in hits] == pytest.approx([h.similarity for h in want], abs=1e-3)


def test_filters_by_model_and_layer(semantic_tab, sites):
    for query, model, layer in FILTERED:
        got = search_ui(semantic_tab, query, model=model, layer=layer)
        assert got[:5] == cli_top(sites["atlas"], query, model=model, layer=layer), (query, model, layer)
        if model:
            assert all(path.startswith(model + "/") for path, _, _ in got)
        if layer:
            assert all(path.endswith("/" + layer) for path, _, _ in got)
    semantic_tab.select_option(".atlas-search-model", "vit")
    layers = semantic_tab.eval_on_selector_all(".atlas-search-layer option", "os => os.map(o => o.value)")
    assert layers == ["", "blocks.3", "head"]          # the layers of the chosen model only
    assert "model=vit" in semantic_tab.url             # the view is kept in the address


def test_stripes_finds_zebra_pattern_where_keyword_search_does_not(semantic_tab):
    got = search_ui(semantic_tab, "stripes")
    assert got[0][2] == "zebra pattern"
    keyword = semantic_tab.evaluate("async () => (await Atlas.search.keyword('stripes', 50)).hits")
    assert not [h for h in keyword if h["label"] == "zebra pattern"]


def test_header_box_answers_semantically(semantic_tab):
    semantic_tab.fill(".atlas-header-input", "stripes")
    link = semantic_tab.locator(".atlas-suggest a.atlas-hit-link").first
    semantic_tab.wait_for_function(
        "document.querySelector('.atlas-suggest-list').dataset.engine === 'semantic' && "
        "document.querySelector('.atlas-suggest-list').dataset.query === 'stripes'")
    assert "zebra pattern" in link.inner_text()


def test_tokenizer_matches_python_tokenizers(semantic_tab, onnx_minilm):
    from tokenizers import Tokenizer

    from testkit.labels import QUERIES as MORE
    from testkit.labels import make_labels

    texts = [*make_labels(), *MORE, *QUERIES]
    tok = Tokenizer.from_file(str(onnx_minilm / "tokenizer.json"))
    tok.enable_truncation(max_length=256)
    want = [e.ids for e in tok.encode_batch(texts)]
    got = semantic_tab.evaluate(
        "async (texts) => (await Atlas.search.engines.find(x => x.name === 'semantic')"
        ".prepare()).tokenize(texts)", texts)
    assert [i for i, (a, b) in enumerate(zip(got, want)) if a != b] == []


def test_keyword_only_when_the_runtime_is_not_in_the_cache(browser, sites):
    assert [w for w in sites["warnings"] if "keyword search only" in w and "atlas_site.runtime" in w]
    info = json.loads((sites["root"] / "keyword/data/site.json").read_text())
    assert info["semantic"] is None and not (sites["root"] / "keyword/data/semantic").exists()
    tab = open_tab(browser, sites["url"])
    try:
        tab.goto(f"{sites['url']}/keyword/search.html")
        assert search_ui(tab, "red circle", engine="keyword")[0][2] == "red circle"
        assert "keyword search" in tab.inner_text(".atlas-search-status")
        assert not [u for u in tab.requests if big_file(u)]
        assert tab.errors == [] and outside(tab) == []
    finally:
        tab.close()


def test_keyword_fallback_when_the_runtime_cannot_load(browser, sites):
    tab = open_tab(browser, sites["url"])
    try:
        tab.goto(f"{sites['url']}/broken/search.html#q=red%20circle")
        tab.wait_for_function("document.querySelector('.atlas-search-status').textContent"
                              ".includes('could not load')", timeout=LOAD_TIMEOUT_MS)
        assert hits_shown(tab)[0][2] == "red circle"
        assert tab.get_attribute(".atlas-search-results", "data-engine") == "keyword"
        assert search_ui(tab, "brick wall", engine="keyword")[0][2] == "brick wall"
        assert outside(tab) == []
    finally:
        tab.close()


# -- the demo atlas ----------------------------------------------------------------------

DEMO_QUERIES = ["red circle", "striped pattern", "checkered", "zebra", "blue sky", "grass field",
                "a yellow star", "dots", "brick wall", "purple ring"]


@pytest.mark.slow
def test_demo_atlas_top5_equals_the_cli(tmp_path, browser, runtime, onnx_minilm, capsys):
    """On a 400-image demo atlas, for 10 queries the site's top 5 is what the
    ``dnd-atlas search -k 5 --json`` command prints."""
    from atlas_site.build import build_site
    from query.cli import main
    from testkit.embedders import carry_embedder

    assert main(["demo", "--out", str(tmp_path / "demo"), "--probe-images", "400", "--no-site"]) == 0
    atlas = tmp_path / "demo/atlas"
    carry_embedder(atlas, onnx_minilm)
    build_site(atlas, tmp_path / "out")
    url, stop = serve(tmp_path / "out/site")
    tab = open_tab(browser, url)
    try:
        tab.goto(f"{url}/search.html#q={quote(DEMO_QUERIES[0])}")
        tab.wait_for_selector(".atlas-search-results[data-engine=semantic]", timeout=LOAD_TIMEOUT_MS)
        times = answer_times(tab)
        got = {q: search_ui(tab, q)[:5] for q in DEMO_QUERIES}
        capsys.readouterr()
        for q in DEMO_QUERIES:
            assert main(["search", str(atlas), q, "-k", "5", "--json"]) == 0
            cli = json.loads(capsys.readouterr().out)
            assert got[q] == [(layer_path(h["model"], h["layer"]), h["unit"], h["matched_label"])
                              for h in cli], q
        metrics = {**times, "bytes": page_weight(tab, tmp_path / "out/site", url)}
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "semantic-demo.json").write_text(json.dumps(metrics, indent=1))
        assert tab.errors == [] and outside(tab) == []
    finally:
        tab.close()
        stop()
