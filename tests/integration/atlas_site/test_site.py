"""The published atlas: a site built by mkdocs from fixture atlases (one
ordinary, one whose model output is hostile), checked in its files."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from query.errors import AtlasError, AtlasNotFound

HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "[click](javascript:alert(1))",
    "{{ config }}",
    "{% raw %}",
]


def site_atlas(make_atlas, labels: list[list[str]], captions: list[str], concepts: list[str],
               name: str = "atlas") -> Path:
    """An atlas of two models (three layers) with thumbnails, captions, candidates
    and call counts; ``labels[i]`` are the labels of neuron i."""
    keys = [("cnn", "conv4", 0), ("cnn", "conv4", 1), ("cnn", "fc", 0), ("vit", "blocks.3", 2)]
    neurons = [
        {"model": m, "layer": ly, "unit": u, "labels": labels[i % len(labels)],
         "interpretability": 0.2 + 0.1 * i}
        for i, (m, ly, u) in enumerate(keys)
    ]
    neurons.append({"model": "cnn", "layer": "conv4", "unit": 2, "labels": [], "status": "dead",
                    "reason": "constant activation"})
    sql = []
    for i, cap in enumerate(captions):
        sql.append(f"INSERT INTO captions VALUES ('k{i}', 'p{i}.png', NULL, NULL, NULL, NULL, "
                   f"'oracle', {sql_str(cap)})")
    for m, ly, u in keys:
        for rank in (1, 2):
            box = "4, 4, 40, 40" if rank == 1 else "NULL, NULL, NULL, NULL"
            sql.append(f"INSERT INTO evidence VALUES ('{m}', '{ly}', {u}, {rank}, 'p{rank}.png', "
                       f"{box}, {1.0 / rank}, 'images/ev/{rank}.webp', 'k{rank % len(captions)}')")
        for pos, concept in enumerate(concepts):
            samples = json.dumps([f"images/gen/{pos}.webp"])
            sql.append(f"INSERT INTO candidates VALUES ('{m}', '{ly}', {u}, {pos}, "
                       f"{sql_str(concept)}, {10.0 * pos}, 0.5, {2.0 - pos}, "
                       f"{'1' if pos == 0 else 'NULL'}, {sql_str(samples)})")
        sql.append(f"INSERT INTO call_counts VALUES ('{m}', '{ly}', {u}, 'captioner_images', 10, 3)")
    # An image path that escapes images/ must be refused, not copied.
    sql.append("UPDATE evidence SET thumbnail = '../outside.webp' "
               "WHERE model = 'vit' AND rank = 2")
    atlas = make_atlas(neurons, sql=sql, meta={"build_config": {"record": {"top_k": 10}}},
                       name=name)
    for sub, n in (("ev", 3), ("gen", len(concepts))):
        (atlas / "images" / sub).mkdir()
        for i in range(n):
            Image.new("RGB", (32, 32), (40 * i, 100, 200)).save(atlas / f"images/{sub}/{i}.webp")
    Image.new("RGB", (8, 8)).save(atlas / "images/unused.webp")
    (atlas.parent / "outside.webp").write_bytes(b"secret")
    return atlas


def sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


@pytest.fixture(scope="module")
def built(tmp_path_factory, request):
    """Both sites, built once for the module."""
    make_atlas = request.getfixturevalue("make_atlas")
    normal = site_atlas(
        make_atlas,
        [["striped circle", "zebra fur"], ["sky", "blue background", "clouds"],
         ["brick wall", "red"], ["wheels"]],
        ["a striped circle on grass", "a picture of the sky"],
        ["striped circle", "zebra fur", "grass"],
    )
    hostile = site_atlas(make_atlas, [HOSTILE[:3], HOSTILE[3:]], HOSTILE, HOSTILE,
                         name="hostile")
    from atlas_site.build import build_site

    out = tmp_path_factory.mktemp("sites")
    return {
        "normal": build_site(normal, out / "normal", site_name="Fixture atlas"),
        "hostile": build_site(hostile, out / "hostile"),
        "normal_atlas": normal,
    }


@pytest.fixture(scope="module")
def make_atlas(tmp_path_factory, minilm):
    """The atlas factory at module scope, so the two sites are built once per module."""
    from testkit.atlases import write_atlas

    root = tmp_path_factory.mktemp("atlases")

    def make(neurons, sql=(), meta=None, index=True, name="atlas"):
        return write_atlas(root / name, minilm, neurons, sql, meta, index)

    return make


def test_pages_exist(built):
    site = built["normal"]
    assert site.name == "site"
    for page in ("index.html", "models/cnn.html", "models/vit.html", "layers/cnn/conv4.html",
                 "layers/cnn/fc.html", "neurons/cnn/conv4/0.html", "neurons/cnn/conv4/2.html",
                 "neurons/cnn/fc/0.html", "search/search_index.json", "assets/atlas.js"):
        assert (site / page).is_file(), page
    # A layer name with a dot is kept; every page of the layer is there.
    assert (site / "neurons/vit/blocks.3/2.html").is_file()
    project = site.parent / "project"
    assert (project / "mkdocs.yml").is_file() and (project / "docs/index.md").is_file()


def test_nav_is_small(built):
    project = built["normal"].parent / "project"
    cfg = (project / "mkdocs.yml").read_text()
    assert "not_in_nav: |\n  /neurons/" in cfg
    nav = json.loads(re.search(r"^nav: (.*)$", cfg, re.M).group(1))
    assert "neurons/" not in json.dumps(nav)
    # The rendered nav of a neuron page lists home, models and layers only.
    page = (built["normal"] / "neurons/cnn/conv4/0.html").read_text()
    nav_links = re.findall(r'<a href="([^"]+)" class="md-nav__link', page)
    assert nav_links and not any("neurons/" in h for h in nav_links)
    assert len(set(nav_links)) <= 10


def test_neuron_page_content(built):
    site = built["normal"]
    page = (site / "neurons/cnn/conv4/0.html").read_text()
    assert "<title>cnn / conv4 / unit 0: striped circle · zebra fur" in page
    assert "a striped circle on grass" in page            # caption
    assert "grass" in page and "10.000" in page          # candidate and its TopK-Squared
    assert "captioner_images" in html.unescape(page)      # calls per stage
    assert "Interpretability score" in page
    # Thumbnails and generated samples are referenced and were copied.
    srcs = re.findall(r'<img class="atlas-(?:evidence|sample)" src="([^"]+)"', page)
    assert len(srcs) == 2 + 3
    for src in srcs:
        assert (site / "neurons/cnn/conv4" / src).resolve().is_file(), src
    dead = (site / "neurons/cnn/conv4/2.html").read_text()
    assert "constant activation" in dead


def test_similar_neurons_link_across_layers_and_models(built):
    site = built["normal"]
    page = (site / "neurons/cnn/conv4/0.html").read_text()
    links = re.findall(r'class="atlas-similar-link" href="([^"]+)"', page)
    assert links
    targets = {(site / "neurons/cnn/conv4" / h).resolve() for h in links}
    assert all(t.is_file() for t in targets)
    assert (site / "neurons/cnn/conv4/0.html").resolve() not in targets   # never itself
    assert (site / "neurons/vit/blocks.3/2.html").resolve() in targets    # another model
    assert (site / "neurons/cnn/fc/0.html").resolve() in targets          # another layer
    # Dead neurons have no labels, so no neighbours.
    assert "atlas-similar-link" not in (site / "neurons/cnn/conv4/2.html").read_text()


def test_layer_page_is_a_sortable_table(built):
    page = (built["normal"] / "layers/cnn/conv4.html").read_text()
    rows = re.findall(r'<tr data-score="([^"]*)"', page)
    assert len(rows) == 3  # units 0, 1 and the dead unit 2
    assert '<table id="units" data-sortable' in page and 'data-sort="num"' in page
    assert 'href="../../neurons/cnn/conv4/1.html"' in page
    assert 'src="../../images/ev/1.webp"' in page


def test_histograms_exist(built):
    site = built["normal"]
    for layer in ("cnn--conv4", "cnn--fc", "vit--blocks.3"):
        for what in ("score", "interpretability"):
            svg = (site / f"assets/charts/{layer}--{what}.svg").read_text()
            assert svg.startswith("<svg") and "<rect x=" in svg
    home = (site / "index.html").read_text()
    assert "assets/charts/cnn--conv4--score.svg" in home
    assert "top_k" in html.unescape(home)  # the build config from meta


def test_only_used_images_are_copied_once(built):
    docs = built["normal"].parent / "project/docs"
    copied = sorted(p.relative_to(docs).as_posix() for p in (docs / "images").rglob("*.webp"))
    assert copied == ["images/ev/1.webp", "images/ev/2.webp", "images/gen/0.webp",
                      "images/gen/1.webp", "images/gen/2.webp"]
    assert not (built["normal"] / "outside.webp").exists()
    assert "../outside.webp" not in (built["normal"] / "neurons/vit/blocks.3/2.html").read_text()


def test_search_index_contains_labels(built):
    index = json.loads((built["normal"] / "search/search_index.json").read_text())
    by_location = {d["location"]: d for d in index["docs"]}
    entry = by_location["neurons/cnn/conv4/1.html"]
    assert "sky" in entry["title"] and "clouds" in entry["text"]


HOSTILE_PAGES = ("neurons/cnn/conv4/0.html", "neurons/cnn/conv4/1.html", "layers/cnn/conv4.html")


def test_hostile_text_is_escaped(built):
    site = built["hostile"]
    for name in HOSTILE_PAGES:
        page = (site / name).read_text()
        assert "<script>alert" not in page and "<img src=x" not in page, name
        assert 'href="javascript:' not in page.lower(), name
        assert "onerror=alert" not in re.sub(r"&[#\w]+;", "", page).replace(" onerror", ""), name
    page = (site / "neurons/cnn/conv4/0.html").read_text()
    # The text is there, escaped: entities that display the characters literally.
    shown = html.unescape(re.sub(r"<[^>]+>", "", page))
    for s in HOSTILE:
        assert s in shown, s
    page1 = html.unescape(re.sub(r"<[^>]+>", "", (site / "neurons/cnn/conv4/1.html").read_text()))
    assert "{{ config }}" in page1 and "{% raw %}" in page1
    # No Jinja/macro expansion: the config never leaked into the page.
    assert "site_dir" not in page1
    title = re.search(r"<title>(.*?)</title>", (site / HOSTILE_PAGES[0]).read_text(), re.S)
    assert "<" not in title.group(1)


def test_hostile_search_index_is_escaped(built):
    raw = (built["hostile"] / "search/search_index.json").read_text()
    for doc in json.loads(raw)["docs"]:
        assert "<script" not in doc["title"] + doc["text"]
        assert "<img" not in doc["title"] + doc["text"]


def test_bad_input_raises_atlas_errors(tmp_path):
    from atlas_site.build import build_site

    with pytest.raises(AtlasNotFound):
        build_site(tmp_path / "missing", tmp_path / "out")
    atlas = tmp_path / "a"
    atlas.mkdir()
    (atlas / "atlas.duckdb").write_bytes(b"not a database")
    with pytest.raises(AtlasError):
        build_site(atlas, tmp_path / "out")


def test_cli_no_build(built, tmp_path):
    atlas = built["normal_atlas"]
    code = (
        "import sys, argparse\n"
        "from atlas_site.cli import add_site_arguments, run_site\n"
        "p = argparse.ArgumentParser(); add_site_arguments(p)\n"
        "sys.exit(run_site(p.parse_args(sys.argv[1:])))\n"
    )
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-c", code, str(atlas), "--out", str(out),
                           "--no-build", "--site-name", "CLI atlas"],
                          capture_output=True, text=True, timeout=300,
                          env={"DND_ATLAS_PROGRESS": "0", "PATH": "/usr/bin:/bin",
                               "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "mkdocs gh-deploy" in proc.stdout and str(out / "project") in proc.stdout
    assert (out / "project/mkdocs.yml").is_file() and not (out / "site").exists()
    assert 'site_name: "CLI atlas"' in (out / "project/mkdocs.yml").read_text()


def test_site_arguments_import_nothing_heavy():
    code = ("import sys, argparse\nfrom atlas_site.cli import add_site_arguments\n"
            "add_site_arguments(argparse.ArgumentParser())\n"
            "heavy = [m for m in ('duckdb', 'faiss', 'numpy', 'mkdocs', 'torch') if m in sys.modules]\n"
            "print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
