"""The published atlas: a site built by mkdocs from fixture atlases (one
ordinary, one whose model output is hostile), checked in its files, and the
rules of ``--out`` (never delete, overwrite or publish a file it did not write)."""

from __future__ import annotations

import gzip
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
NORMAL_LABELS = [["striped circle", "zebra fur"], ["sky", "blue background", "clouds"],
                 ["brick wall", "red"], ["wheels"]]
NORMAL_CAPTIONS = ["a striped circle on grass", "a picture of the sky"]
NORMAL_CONCEPTS = ["striped circle", "zebra fur", "grass"]
ENV = {"DND_ATLAS_PROGRESS": "0", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
       "NO_MKDOCS_2_WARNING": "1"}


def site_atlas(make_atlas, labels: list[list[str]], captions: list[str], concepts: list[str],
               name: str = "atlas", keys=None) -> Path:
    """An atlas of two models (three layers) with thumbnails, captions, candidates
    and call counts; ``labels[i]`` are the labels of neuron i."""
    keys = keys or [("cnn", "conv4", 0), ("cnn", "conv4", 1), ("cnn", "fc", 0),
                    ("vit", "blocks.3", 2)]
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
            sql.append(f"INSERT INTO evidence (model, layer, unit, rank, source, x0, y0, x1, y1, activation, thumbnail, caption_key) VALUES ('{m}', '{ly}', {u}, {rank}, 'p{rank}.png', "
                       f"{box}, {1.0 / rank}, 'images/ev/{rank}.webp', 'k{rank % len(captions)}')")
        for pos, concept in enumerate(concepts):
            samples = json.dumps([f"images/gen/{pos}.webp"])
            sql.append(f"INSERT INTO candidates (model, layer, unit, position, concept, topk_squared, image_products, score, selected_rank, samples) VALUES ('{m}', '{ly}', {u}, {pos}, "
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


def read_data(site: Path, rel: str):
    """A data file of the built site, inflated and parsed."""
    raw = (site / rel).read_bytes()
    return json.loads(gzip.decompress(raw) if rel.endswith(".gz") else raw)


def neuron(site: Path, path: str, unit: int) -> dict:
    """One neuron's record as its page loads it (from its chunk file)."""
    chunk = read_data(site, "data/site.json")["chunk"]
    return read_data(site, f"data/{path}/n/{unit // chunk}.json.gz")["units"][str(unit)]


@pytest.fixture(scope="module")
def built(tmp_path_factory, request):
    """Both sites, built once for the module."""
    make_atlas = request.getfixturevalue("make_atlas")
    normal = site_atlas(make_atlas, NORMAL_LABELS, NORMAL_CAPTIONS, NORMAL_CONCEPTS)
    hostile = site_atlas(make_atlas, [HOSTILE[:3], HOSTILE[3:]], HOSTILE, HOSTILE,
                         name="hostile")
    from atlas_site.build import build_site

    out = tmp_path_factory.mktemp("sites")
    return {
        "normal": build_site(normal, out / "normal", site_name="Fixture atlas"),
        "hostile": build_site(hostile, out / "hostile"),
        "normal_atlas": normal,
        "hostile_atlas": hostile,
    }


@pytest.fixture(scope="module")
def make_atlas(tmp_path_factory, minilm):
    """The atlas factory at module scope, so the two sites are built once per module."""
    from testkit.atlases import write_atlas

    root = tmp_path_factory.mktemp("atlases")

    def make(neurons, sql=(), meta=None, index=True, name="atlas"):
        return write_atlas(root / name, minilm, neurons, sql, meta, index)

    return make


def test_pages_and_data_files_exist(built):
    site = built["normal"]
    assert site.name == "site"
    for rel in ("index.html", "models/cnn.html", "models/vit.html", "layers/cnn/conv4.html",
                "layers/cnn/fc.html", "layers/vit/blocks.3.html", "neuron.html", "search.html",
                "404.html", "data/site.json", "data/search.json.gz",
                "data/cnn/conv4/index.json.gz", "data/cnn/conv4/n/0.json.gz",
                "data/vit/blocks.3/n/0.json.gz", "assets/atlas.js", "assets/atlas-search.js"):
        assert (site / rel).is_file(), rel
    project = site.parent / "project"
    assert (project / "mkdocs.yml").is_file() and (project / "docs/index.md").is_file()
    assert not (site / "neurons").exists()                  # no page per neuron any more
    assert not (site / "search/search_index.json").exists()  # mkdocs search is off


def test_mkdocs_builds_a_handful_of_pages(built):
    site = built["normal"]
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
    # home, 2 models, 3 layers, the neuron template, search, 404: never one per neuron.
    assert len(pages) == 9, pages
    cfg = (site.parent / "project/mkdocs.yml").read_text()
    assert "plugins: []" in cfg and "font: false" in cfg
    nav = json.loads(re.search(r"^nav: (.*)$", cfg, re.M).group(1))
    assert "neuron.md" not in json.dumps(nav)


def test_neuron_record_content(built):
    site = built["normal"]
    rec = neuron(site, "cnn/conv4", 0)
    assert [lb["text"] for lb in rec["labels"]] == ["striped circle", "zebra fur"]
    assert rec["evidence"][0]["caption"] == "a picture of the sky"       # caption k1
    assert rec["evidence"][0]["box"] == [4, 4, 40, 40]
    assert rec["evidence"][0]["image"] == "images/ev/1.webp" and rec["evidence"][0]["frame"] is None
    grass = next(c for c in rec["candidates"] if c["concept"] == "grass")
    assert grass["topk_squared"] == 20.0 and grass["samples"] == ["images/gen/2.webp"]
    assert rec["calls"] == [["captioner_images", 10, 3]]
    assert rec["interpretability"] == pytest.approx(0.2)
    for ev in rec["evidence"]:
        assert (site / ev["image"]).is_file()
    dead = neuron(site, "cnn/conv4", 2)
    assert dead["status"] == "dead" and dead["reason"] == "constant activation"
    info = read_data(site, "data/site.json")
    conv4 = next(li for li in info["layers"] if li["path"] == "cnn/conv4")
    assert conv4["n_ok"] == 2 and conv4["n_dead"] == 1 and conv4["chunks"] == [0]
    assert info["name"] == "Fixture atlas"


def test_similar_neurons_link_across_layers_and_models(built):
    site = built["normal"]
    similar = neuron(site, "cnn/conv4", 0)["similar"]
    targets = {(s["path"], s["unit"]) for s in similar}
    assert ("cnn/conv4", 0) not in targets                       # never itself
    assert ("vit/blocks.3", 2) in targets and ("cnn/fc", 0) in targets
    for path, unit in targets:
        assert str(unit) in read_data(site, f"data/{path}/n/0.json.gz")["units"]
    assert neuron(site, "cnn/conv4", 2)["similar"] == []         # dead: no labels


def test_layer_index_is_the_table(built):
    index = read_data(built["normal"], "data/cnn/conv4/index.json.gz")
    keys = [c["key"] for c in index["columns"]]
    assert keys == ["unit", "thumb", "label", "score", "interpretability", "status"]
    values = index["values"]
    assert values["unit"] == [0, 1, 2]
    assert values["label"] == ["striped circle", "sky", ""]
    assert values["status"] == ["ok", "ok", "dead"]
    assert values["score"][2] is None and values["thumb"][0] == "images/ev/1.webp"
    assert "clouds" in index["text"][1]
    page = html.unescape((built["normal"] / "layers/cnn/conv4.html").read_text())
    assert 'data-atlas-view="layer"' in page and 'data-layer="cnn/conv4"' in page


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
    site = built["normal"]
    docs = site.parent / "project/docs"
    expected = ["images/ev/1.webp", "images/ev/2.webp", "images/gen/0.webp",
                "images/gen/1.webp", "images/gen/2.webp"]
    for root in (docs, site):
        copied = sorted(p.relative_to(root).as_posix() for p in (root / "images").rglob("*")
                        if p.is_file())
        assert copied == expected
    assert not list(site.rglob("outside.webp"))
    vit = neuron(site, "vit/blocks.3", 2)
    assert vit["evidence"][1]["image"] is None      # '../outside.webp' was refused


def test_search_index_holds_every_label(built):
    index = read_data(built["normal"], "data/search.json.gz")
    refs = index["refs"][index["texts"].index("clouds")]
    hits = [(index["layers"][refs[i]], refs[i + 1], refs[i + 2]) for i in range(0, len(refs), 3)]
    assert ("cnn/conv4", 1, 3) in hits
    n_labels = sum(len(index["refs"][i]) // 3 for i in range(len(index["texts"])))
    assert n_labels == 2 + 3 + 2 + 1    # every label of every live neuron


def test_hostile_text_stays_data(built):
    site = built["hostile"]
    rec = neuron(site, "cnn/conv4", 0)
    assert [lb["text"] for lb in rec["labels"]] == HOSTILE[:3]        # intact, as data
    assert {c["concept"] for c in rec["candidates"]} == set(HOSTILE)
    for rel in ("index.html", "layers/cnn/conv4.html", "neuron.html", "search.html",
                "models/cnn.html"):
        page = (site / rel).read_text()
        assert "<script>alert" not in page and "<img src=x" not in page, rel
        assert 'href="javascript:' not in page.lower(), rel
    title = re.search(r"<title>(.*?)</title>", (site / "layers/cnn/conv4.html").read_text(), re.S)
    assert "<" not in title.group(1)


def test_scripts_use_no_html_sinks():
    from atlas_site.assets import SCRIPTS, asset

    for name in SCRIPTS:
        code = asset(name)
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                     "eval(", "new Function", "srcdoc"):
            assert sink not in code, (name, sink)


def test_bad_input_raises_atlas_errors_and_touches_nothing(tmp_path):
    from atlas_site.build import build_site

    with pytest.raises(AtlasNotFound):
        build_site(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    atlas = tmp_path / "a"
    atlas.mkdir()
    (atlas / "atlas.duckdb").write_bytes(b"not a database")
    with pytest.raises(AtlasError):
        build_site(atlas, tmp_path / "out")


# -- the --out rules -----------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_out_refuses_a_folder_it_did_not_make(built, tmp_path):
    from atlas_site.build import build_site
    from atlas_site.output import OutputRefused

    out = tmp_path / "mine"
    (out / "site").mkdir(parents=True)
    (out / "site/important.html").write_text("keep me")
    (out / "project/docs/images").mkdir(parents=True)
    (out / "project/docs/images/photo.png").write_bytes(b"photo")
    before = _tree(out)
    with pytest.raises(OutputRefused, match="not made by `dnd-atlas site`"):
        build_site(built["normal_atlas"], out)
    assert _tree(out) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(OutputRefused):
        build_site(built["normal_atlas"], other, build=False)
    assert _tree(other) == {"notes.txt": b"x"}


def test_out_shared_folder_keeps_other_files(built, tmp_path):
    from atlas_site.build import build_site
    from atlas_site.output import OutputRefused

    out = tmp_path / "demo"
    (out / "probe").mkdir(parents=True)
    (out / "probe/0.png").write_bytes(b"img")
    build_site(built["normal_atlas"], out, shared=True, build=False)
    assert (out / "probe/0.png").read_bytes() == b"img"
    assert (out / "project/mkdocs.yml").is_file()
    busy = tmp_path / "busy"
    (busy / "site").mkdir(parents=True)
    (busy / "site/x.html").write_text("x")
    with pytest.raises(OutputRefused):
        build_site(built["normal_atlas"], busy, shared=True)
    assert _tree(busy) == {"site/x.html": b"x"}


def test_out_regenerates_deleting_only_its_own_files(built, make_atlas, tmp_path):
    from atlas_site.build import build_site
    from atlas_site.output import MANIFEST, OutputRefused

    out = tmp_path / "out"
    site = build_site(built["normal_atlas"], out)
    assert (site / "data/vit/blocks.3/n/0.json.gz").is_file()
    project = out / "project"
    manifest = json.loads((project / MANIFEST).read_text())
    assert "docs/neuron.md" in manifest["project"] and "neuron.html" in manifest["site"]
    (project / "docs/mynotes.md").write_text("# my notes")
    (project / "docs/images/photo.png").write_bytes(b"photo")
    (project / "README.md").write_text("mine")
    (site / ".nojekyll").write_text("")
    # A smaller atlas (no vit model, other images) into the same folder.
    smaller = site_atlas(make_atlas, NORMAL_LABELS, NORMAL_CAPTIONS, ["grass"], name="smaller",
                         keys=[("cnn", "conv4", 0), ("cnn", "conv4", 1)])
    site = build_site(smaller, out)
    assert not (site / "data/vit").exists() and not (project / "docs/data/vit").exists()
    assert not (site / "layers/vit").exists() and not (project / "docs/images/gen/2.webp").exists()
    assert (project / "docs/mynotes.md").read_text() == "# my notes"
    assert (project / "docs/images/photo.png").read_bytes() == b"photo"
    assert (project / "README.md").read_text() == "mine" and (site / ".nojekyll").is_file()
    # Never published: neither by this build nor by mkdocs run by hand (as gh-deploy does).
    assert not (site / "mynotes.html").exists() and not (site / "images/photo.png").exists()
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q", "-f", "mkdocs.yml", "-d",
                    str(tmp_path / "by-hand")], cwd=project, check=True, env=ENV, timeout=300)
    assert (tmp_path / "by-hand/neuron.html").is_file()
    assert not (tmp_path / "by-hand/mynotes.html").exists()
    assert not (tmp_path / "by-hand/images/photo.png").exists()
    # A file a user put into site/ would be lost to the build: refused, nothing touched.
    (site / "important.html").write_text("keep me")
    before = _tree(out)
    with pytest.raises(OutputRefused, match="important.html"):
        build_site(smaller, out)
    assert _tree(out) == before


def test_out_refusal_is_one_line_and_exit_2(built, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "query.cli", "site", str(built["normal_atlas"]),
                           "--out", str(out)], check=False, capture_output=True, text=True, timeout=300,
                          env={**ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "not empty" in proc.stderr
    assert _tree(out) == {"thesis.tex": b"x"}


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
                          check=False, capture_output=True, text=True, timeout=300, env=ENV)
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
