"""The built site in headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright): layer tables sort, filter and page in the browser, the neuron
page renders the neuron its URL names (labels, evidence with crop boxes and
heatmaps, candidates, similar neurons), keyword search reaches a neuron, old
neuron URLs redirect, no console errors, no request leaves the site's
origin, and a hostile atlas executes nothing. Screenshots go to test-artifacts/."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import shutil
import sys
import threading
from dataclasses import dataclass, replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from query.records import Evidence, Label
from testkit.chromium import ARTIFACTS, chromium_context, require_chromium

require_chromium()  # skips this module without Chromium or Playwright


def _load_site_tests():
    """tests/integration/atlas_site/test_site.py, for its site fixtures."""
    path = Path(__file__).resolve().parents[1] / "integration" / "atlas_site" / "test_site.py"
    spec = importlib.util.spec_from_file_location("_dnd_site_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


site_tests = _load_site_tests()
make_atlas = site_tests.make_atlas  # the module-scoped fixture factory
# One more payload that would leave a trace if any handler ran.
PWN = '<img src=x onerror="window.__pwned=1">'


@dataclass(frozen=True)
class EvidenceWithSource(Evidence):
    """Evidence as the builder will soon write it: the plain source thumbnail, its
    size (the frame of ``box``) and a small activation heatmap."""

    source_thumbnail: str | None = None
    source_size: tuple[int, int] | None = None
    heatmap: str | None = None


@dataclass(frozen=True)
class LabelWithFidelity(Label):
    fidelity_correlation: float | None = None


def _with_new_fields(layer_records):
    """``layer_records`` whose cnn/conv4 records carry source thumbnails, heatmaps and a
    fidelity score (fields the atlas does not have yet)."""

    def read(atlas, model, layer):
        records = layer_records(atlas, model, layer)
        if (model, layer) != ("cnn", "conv4"):
            return records
        out = []
        for rec in records:
            # (format v3 records have these fields already: the values here win)
            ev = [EvidenceWithSource(**{**e.__dict__, "source_thumbnail": "images/ev/0.webp",
                                        "source_size": (64, 64), "heatmap": "images/heat/0.png"})
                  for e in rec.evidence]
            labels = [LabelWithFidelity(**{**lb.__dict__, "fidelity_correlation": 0.9 - 0.5 * rec.unit})
                      for lb in rec.labels]
            out.append(replace(rec, evidence=ev, labels=labels))
        return out

    return read


class _PagesLike(SimpleHTTPRequestHandler):
    """A static server that, like GitHub Pages, answers a missing file with the
    site's 404.html (the first path segment names the site)."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if not path.exists():
            site = self.path.lstrip("/").split("/", 1)[0]
            page = Path(self.directory) / site / "404.html"
            if page.is_file():
                body = page.read_bytes()
                self.send_response(404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return None
        return super().send_head()


@pytest.fixture(scope="module")
def server(make_atlas, tmp_path_factory):
    """Three sites built and served over http on 127.0.0.1 (free port, in a thread)."""
    from atlas_site import build
    from bench.site_atlas import BenchAtlas
    from bench.site_atlas import make_atlas as bench_atlas

    normal = site_tests.site_atlas(make_atlas, site_tests.NORMAL_LABELS,
                                   site_tests.NORMAL_CAPTIONS, site_tests.NORMAL_CONCEPTS)
    (normal / "images/heat").mkdir()
    Image.new("L", (7, 7), 255).save(normal / "images/heat/0.png")
    hostile_text = [*site_tests.HOSTILE, PWN]
    # A hostile layer name too (user input: it becomes a slug in URLs, text in pages).
    keys = [("cnn", "conv4", 0), ("cnn", "conv4", 1), ("cnn", "fc", 0), ("vit", "blocks.3", 2),
            ("vit", PWN, 0)]
    hostile = site_tests.site_atlas(make_atlas, [hostile_text[:3], hostile_text[3:]],
                                    hostile_text, hostile_text, name="hostile", keys=keys)
    big = tmp_path_factory.mktemp("big-atlas")
    bench_atlas(big, BenchAtlas(n_layers=1, units=3000, n_probe=400, n_concepts=120, dim=8))
    root = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "layer_records", _with_new_fields(build.layer_records))
        build.build_site(normal, root / "out-normal")
    build.build_site(hostile, root / "out-hostile")
    build.build_site(big, root / "out-big")
    for name in ("normal", "hostile", "big"):
        shutil.move(root / f"out-{name}/site", root / name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_PagesLike, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "root": root}
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    with chromium_context(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def page(browser_context, server):
    """A fresh tab that records console errors, page errors, dialogs and every request."""
    tab = browser_context.new_page()
    tab.errors, tab.dialogs, tab.requests = [], [], []
    tab.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: tab.errors.append(str(e)))
    tab.on("request", lambda r: tab.requests.append(r.url))

    def on_dialog(d):
        tab.dialogs.append(d.message)
        d.dismiss()

    tab.on("dialog", on_dialog)
    yield tab
    outside = [u for u in tab.requests if not u.startswith(server["url"] + "/")]
    tab.close()
    assert outside == [], outside  # the site never leaves its origin (no CDN, no fonts)


def shot(tab, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / f"site-{name}.png"), full_page=True)


def broken_images(tab) -> list[str]:
    """Images of the page content that failed to load (naturalWidth 0)."""
    return tab.evaluate("""async () => {
        const imgs = [...document.querySelectorAll('article img')];
        for (const i of imgs) { i.loading = 'eager'; }
        await Promise.all(imgs.map(i => i.complete ? null :
            new Promise(r => { i.onload = i.onerror = r; })));
        return imgs.filter(i => i.naturalWidth === 0).map(i => i.getAttribute('src'));
    }""")


def units(tab) -> list[str]:
    tab.wait_for_selector("#units tbody tr")
    return tab.eval_on_selector_all("#units tbody tr td:first-child",
                                    "tds => tds.map(t => t.textContent)")


def test_home_and_layer_table_sort_filter(server, page):
    page.goto(f"{server['url']}/normal/index.html")
    assert "Layers" in page.inner_text("article")
    assert broken_images(page) == []
    shot(page, "home")
    page.click("article a[href='layers/cnn/conv4.html']")
    page.wait_for_url("**/layers/cnn/conv4.html")
    assert units(page) == ["0", "1", "2"]
    assert broken_images(page) == []
    heads = page.eval_on_selector_all("#units th", "ths => ths.map(t => t.textContent)")
    assert "Fidelity correlation" in heads            # a column the JS was never told about
    score = page.locator("#units th", has_text="Score")
    score.click()
    assert score.get_attribute("aria-sort") == "ascending"
    score.click()
    assert score.get_attribute("aria-sort") == "descending"
    assert units(page)[0] == "0" and units(page)[-1] == "2"   # scores tie; missing sorts last
    fidelity = page.locator("#units th", has_text="Fidelity correlation")
    fidelity.click()
    assert units(page) == ["1", "0", "2"]             # 0.4 < 0.9, dead unit has none
    page.fill(".atlas-filter", "clouds")
    page.wait_for_function("document.querySelectorAll('#units tbody tr').length === 1")
    assert units(page) == ["1"]
    page.fill(".atlas-filter", "")
    page.fill(".atlas-min[data-key='score']", "0.5")
    page.wait_for_function("document.querySelectorAll('#units tbody tr').length === 2")
    assert sorted(units(page)) == ["0", "1"]
    assert "2 of 3 neurons" in page.inner_text(".atlas-count")
    shot(page, "layer")
    page.click("#units tbody tr >> nth=0 >> a >> nth=0")
    page.wait_for_url("**/neuron.html#cnn/conv4/*")
    assert page.errors == []


def test_big_layer_pages_sorts_and_keeps_state_in_url(server, page):
    index = json.loads(gzip.decompress(
        (server["root"] / "big/data/resnet/layer1/index.json.gz").read_bytes()))
    scores = index["values"]["score"]
    page.goto(f"{server['url']}/big/layers/resnet/layer1.html")
    assert len(units(page)) == 100
    assert "page 1 of 30" in page.inner_text(".atlas-pager")
    page.locator("#units th", has_text="Score").click()
    page.locator("#units th", has_text="Score").click()
    first = int(units(page)[0])
    assert scores[first] == max(s for s in scores if s is not None)
    page.click(".atlas-next")
    page.wait_for_function("document.querySelector('.atlas-pager')?.textContent?.includes('page 2')")
    assert "sort=-score" in page.url and "page=2" in page.url
    word = index["values"]["label"][5].split()[0]
    expected = sum(word in t for t in index["text"])
    page.fill(".atlas-filter", word)
    page.wait_for_function(f"document.querySelector('.atlas-count')?.textContent?.startsWith('{expected} of')")
    page.reload()                                     # the view is in the URL
    page.wait_for_function(f"document.querySelector('.atlas-count')?.textContent?.startsWith('{expected} of')")
    assert page.input_value(".atlas-filter") == word
    assert page.errors == []


def test_neuron_page_from_its_url(server, page):
    page.goto(f"{server['url']}/normal/neuron.html#cnn/conv4/0")
    page.wait_for_selector(".atlas-similar")
    text = page.inner_text("article")
    assert "cnn / conv4 / unit 0" in page.inner_text("h1")
    assert "striped circle" in text and "a picture of the sky" in text and "grass" in text
    assert "fidelity correlation 0.900" in text
    assert "captioner_images" in text
    assert page.title().startswith("cnn / conv4 / unit 0: striped circle · zebra fur")
    assert broken_images(page) == []
    # The plain source thumbnail with the crop box drawn by the browser; whole images have none.
    assert page.locator(".atlas-evidence img:first-child").count() == 2
    assert page.locator(".atlas-evidence .atlas-box").count() == 1
    box = page.eval_on_selector(".atlas-box", "b => [b.style.left, b.style.width]")
    assert box == ["6.25%", "56.25%"]                 # (4..40) of a 64-px source
    heat = page.locator(".atlas-evidence img.atlas-heat").first
    assert not heat.is_visible()
    page.check(".atlas-heat-toggle")
    assert heat.is_visible()
    shot(page, "neuron")
    page.click("a.atlas-similar-link >> nth=0")
    page.wait_for_function("!location.hash.endsWith('/cnn/conv4/0') && "
                           "document.querySelector('h1').textContent.indexOf('unit') > 0 && "
                           "!document.querySelector('h1').textContent.endsWith('conv4 / unit 0')")
    assert page.url.split("#")[1] != "cnn/conv4/0"
    page.goto(f"{server['url']}/normal/neuron.html#cnn/conv4/99")
    page.wait_for_selector(".atlas-error")
    assert "not in this atlas" in page.inner_text(".atlas-error")
    page.goto(f"{server['url']}/normal/neuron.html#vit/blocks.3/2")
    page.wait_for_selector(".atlas-grid")
    assert page.locator(".atlas-evidence .atlas-box").count() == 0   # baked thumbnails
    assert page.errors == []


def test_old_neuron_urls_redirect(server, page):
    page.goto(f"{server['url']}/normal/neurons/cnn/conv4/1.html")
    page.wait_for_url("**/normal/neuron.html#cnn/conv4/1")
    page.wait_for_selector(".atlas-labels")
    assert "clouds" in page.inner_text("article")
    assert [e for e in page.errors if "404" not in e] == []   # the 404 itself is logged


def test_keyword_search_reaches_a_neuron(server, page):
    page.goto(f"{server['url']}/normal/index.html")
    page.fill(".atlas-header-input", "cloud")
    link = page.locator(".atlas-suggest a.atlas-hit-link").first
    link.wait_for(timeout=20_000)
    assert "clouds" in link.inner_text() and "cnn / conv4 / unit 1" in link.inner_text()
    shot(page, "search")
    link.click()
    page.wait_for_url("**/neuron.html#cnn/conv4/1")
    page.wait_for_selector(".atlas-labels")
    assert "clouds" in page.inner_text("article")
    page.goto(f"{server['url']}/normal/search.html#q=striped")
    page.wait_for_selector(".atlas-search-results a")
    hits = page.eval_on_selector_all(".atlas-search-results a", "as => as.map(a => a.href)")
    assert hits and all("neuron.html#" in h for h in hits)
    assert "keyword search" in page.inner_text(".atlas-search-status")
    page.fill(".atlas-search-input", "nothing-like-this")
    page.press(".atlas-search-input", "Enter")
    page.wait_for_function("document.querySelector('.atlas-search-status')?.textContent?.startsWith('No neuron')")
    assert page.errors == []


def test_hostile_site_executes_nothing(server, page):
    base = f"{server['url']}/hostile"
    for path, ready in (("neuron.html#cnn/conv4/0", ".atlas-grid"),
                        ("neuron.html#cnn/conv4/1", ".atlas-grid"),
                        ("layers/cnn/conv4.html", "#units tbody tr"), ("index.html", "article"),
                        ("search.html#q=script", ".atlas-search-results li")):
        page.goto(f"{base}/{path}")
        page.wait_for_selector(ready)
        page.evaluate("() => [...document.querySelectorAll('article img')]"
                      ".forEach(i => { i.loading = 'eager'; })")
        page.wait_for_timeout(200)
        assert page.evaluate("() => window.__pwned") is None, path
        assert page.dialogs == [], path
        assert page.locator("article script").count() == 0, path
        assert page.locator("article a[href^='javascript']").count() == 0, path
    info = json.loads((server["root"] / "hostile/data/site.json").read_text())
    evil = next(li["path"] for li in info["layers"] if li["layer"] == PWN)
    for path, ready in ((f"layers/{evil}.html", "#units tbody tr"),
                        (f"neuron.html#{evil}/0", ".atlas-grid")):
        page.goto(f"{base}/{path}")
        page.wait_for_selector(ready)
        page.wait_for_timeout(200)
        assert PWN in page.inner_text("article h1"), path
        assert page.evaluate("() => window.__pwned") is None, path
    page.goto(f"{base}/neuron.html#cnn/conv4/0")
    page.wait_for_selector(".atlas-grid")
    text = page.inner_text("article")
    for payload in [*site_tests.HOSTILE, PWN]:
        assert payload in text, payload                # shown literally
    shot(page, "hostile")
    page.fill(".atlas-header-input", "config")
    page.locator(".atlas-suggest a.atlas-hit-link").first.wait_for(timeout=20_000)
    assert "{{ config }}" in page.inner_text(".atlas-suggest")
    page.wait_for_timeout(300)
    assert page.evaluate("() => window.__pwned") is None
    assert page.dialogs == [] and page.errors == []
    shot(page, "hostile-search")
