"""The built site in headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright): pages load without console errors, images load, layer tables
sort and filter, the material search box finds a neuron by a label word, and
a hostile atlas executes nothing. Screenshots go to test-artifacts/."""

from __future__ import annotations

import functools
import importlib.util
import shutil
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")


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


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(make_atlas, tmp_path_factory):
    """Both sites built and served over http on 127.0.0.1 (free port, in a thread)."""
    from atlas_site.build import build_site

    normal = site_tests.site_atlas(
        make_atlas,
        [["striped circle", "zebra fur"], ["sky", "blue background", "clouds"],
         ["brick wall", "red"], ["wheels"]],
        ["a striped circle on grass", "a picture of the sky"],
        ["striped circle", "zebra fur", "grass"],
    )
    hostile_text = [*site_tests.HOSTILE, PWN]
    hostile = site_tests.site_atlas(make_atlas, [hostile_text[:3], hostile_text[3:]],
                                    hostile_text, hostile_text, name="hostile")
    root = tmp_path_factory.mktemp("served")
    build_site(normal, root / "out-normal")
    build_site(hostile, root / "out-hostile")
    shutil.move(root / "out-normal/site", root / "normal")
    shutil.move(root / "out-hostile/site", root / "hostile")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0),
                                functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context):
    """A fresh tab that records console errors, page errors and dialogs."""
    tab = browser_context.new_page()
    tab.errors = []
    tab.dialogs = []
    tab.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: tab.errors.append(str(e)))

    def on_dialog(d):
        tab.dialogs.append(d.message)
        d.dismiss()

    tab.on("dialog", on_dialog)
    yield tab
    tab.close()


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


def test_home_and_layer_page(server, page):
    page.goto(f"{server}/normal/index.html")
    assert "Layers" in page.inner_text("article")
    assert broken_images(page) == []
    shot(page, "home")
    page.click("article a[href='layers/cnn/conv4.html']")
    page.wait_for_url("**/layers/cnn/conv4.html")
    assert broken_images(page) == []
    units = lambda: page.eval_on_selector_all(  # noqa: E731
        "#units tbody tr:not([hidden]) td:first-child", "tds => tds.map(t => t.textContent)")
    assert units() == ["0", "1", "2"]
    score = page.locator("#units th", has_text="Score")
    score.click()
    assert page.get_attribute("#units th:nth-child(4)", "aria-sort") == "ascending"
    score.click()
    assert page.get_attribute("#units th:nth-child(4)", "aria-sort") == "descending"
    assert units()[0] == "0"  # label-1 concept scores are all 1.0; dead unit 2 sorts last
    assert units()[-1] == "2"
    page.fill(".atlas-filter", "clouds")
    assert units() == ["1"]
    page.fill(".atlas-filter", "")
    page.fill(".atlas-min", "0.5")
    assert units() == ["0", "1"]
    assert "2 of 3 neurons" in page.inner_text(".atlas-count")
    shot(page, "layer")
    assert page.errors == []


def test_neuron_page_and_similar_link(server, page):
    page.goto(f"{server}/normal/neurons/cnn/conv4/0.html")
    text = page.inner_text("article")
    assert "striped circle" in text and "a striped circle on grass" in text
    assert "Similar neurons" in text
    assert broken_images(page) == []
    assert page.locator("img.atlas-evidence").count() == 2
    shot(page, "neuron")
    page.click("a.atlas-similar-link >> nth=0")
    page.wait_for_url("**/neurons/**")
    assert not page.url.endswith("/neurons/cnn/conv4/0.html")
    assert page.errors == []


def test_search_finds_a_neuron_by_label(server, page):
    page.goto(f"{server}/normal/index.html")
    page.click("input.md-search__input")
    page.keyboard.type("clouds", delay=30)  # material searches on key events
    link = page.locator("a.md-search-result__link").first
    link.wait_for(timeout=20_000)
    shot(page, "search")
    link.click()
    page.wait_for_url("**/neurons/cnn/conv4/1.html*")
    assert "clouds" in page.inner_text("article")
    assert page.errors == []


def test_hostile_site_executes_nothing(server, page):
    for path in ("neurons/cnn/conv4/0.html", "neurons/cnn/conv4/1.html",
                 "layers/cnn/conv4.html", "index.html"):
        page.goto(f"{server}/hostile/{path}")
        page.wait_for_load_state("load")
        page.evaluate("() => [...document.querySelectorAll('article img')]"
                      ".forEach(i => { i.loading = 'eager'; })")
        page.wait_for_timeout(200)
        assert page.evaluate("() => window.__pwned") is None, path
        assert page.dialogs == [], path
    page.goto(f"{server}/hostile/neurons/cnn/conv4/0.html")
    text = page.inner_text("article")
    for payload in [*site_tests.HOSTILE, PWN]:
        assert payload in text, payload
    assert page.locator("article script").count() == 0
    assert page.locator("article a[href^='javascript']").count() == 0
    shot(page, "hostile")
    # Search results render the hostile labels as text too.
    page.click("input.md-search__input")
    page.keyboard.type("config", delay=30)
    page.locator("a.md-search-result__link").first.wait_for(timeout=20_000)
    page.wait_for_timeout(300)
    assert page.evaluate("() => window.__pwned") is None
    assert page.dialogs == []
    shot(page, "hostile-search")
