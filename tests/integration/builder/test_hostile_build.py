"""Real builds (the planted target, a small synthetic probe set) given
hostile configs, outputs and disks: each ends in one ``dnd-atlas: error:``
line and exit 2, or is handled, and what was committed before stays whole.

Builds run in-process through ``query.cli.main`` (one import of torch for
the module); the full and read-only disks are real tmpfs mounts, so those
tests run only where this process may mount (root in a container)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import duckdb
import pytest
import tomli_w

from builder.synthetic.probe import write_probe_set
from query import Atlas
from query.cli import main
from query.schema import DB_FILE

N_PROBE = 40
UNITS = [0, 1]
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    return Path(write_probe_set(tmp_path_factory.mktemp("probe"), n=N_PROBE, seed=3, progress=False))


def config_file(folder: Path, probe: Path, out: Path | str, **model) -> Path:
    cfg = {"out": str(out), "chunk_size": 4,
           "models": [{"name": "planted", "target": "planted", "probe": str(probe), "layers": ["detectors"],
                       "units": UNITS, **model}]}
    path = folder / f"c-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


def build(capsys, cfg: Path, *sets: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["build", "--config", str(cfg), *(f"--set={s}" for s in sets)])
    return rc, capsys.readouterr().err


def assert_one_line(rc: int, err: str, *words: str) -> None:
    """Exit 2 and one ``dnd-atlas: error:`` line holding ``words``, no traceback."""
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("dnd-atlas: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    OUTCOMES["exit 2, one line"] += 1


def neuron_units(out: Path) -> list[int]:
    with duckdb.connect(str(out / DB_FILE), read_only=True) as con:
        return [u for (u,) in con.execute("SELECT unit FROM neurons ORDER BY unit").fetchall()]


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\nhostile builds: {dict(OUTCOMES)}")


# -- values and specs refused before anything is written ----------------------------------


def _template(folder: Path, text: str) -> str:
    p = folder / f"t-{uuid.uuid4().hex[:8]}.txt"
    p.write_text(text)
    return str(p)


BAD = [
    ('dissect.seed="x"', ["'dissect.seed'", "an integer"]),
    ("crop.enabled=maybe", ["'crop.enabled'", "a boolean"]),
    ("fidelity.enabled=perhaps", ["'fidelity.enabled'", "a boolean"]),
    ("fidelity.sample_size=[3]", ["'fidelity.sample_size'", "an integer"]),
    ("models.0.units=[99999]", ["select no unit of layer 'detectors'", "18 units"]),
    ("models.0.layers=5", ["no layer '5'"]),  # a --set number for a string key is its text (Sequential names)
    ("models.0.layers=[5]", ["'models[0].layers'", "a list of strings"]),
    ("models.0.layers={a = 1}", ["'models[0].layers'", "a list of strings"]),
    ("models.0.target_options=3", ["'models[0].target_options'", "a table"]),
    ("models.0.target_options=['weights']", ["'models[0].target_options'", "a table"]),
    ("describe.summarizer=collections:OrderedDict", ["is not a summarizer", "OrderedDict"]),
    ("describe.summarizer=builtins:print", ["summarizer backend 'builtins:print'"]),
    ("describe.captioner=nope", ["unknown captioner backend 'nope'"]),
    ("dissect.prompt_template=TEMPLATE:a photo of {concept} in {style}", ["unknown field {style}"]),
    ("dissect.prompt_template=TEMPLATE:{0}: a photo of {concept}", ["unknown field {0}"]),
    ("dissect.prompt_template=TEMPLATE:a {concept} photo }", ["prompt template", "brace"]),
]


@pytest.mark.parametrize("item, words", BAD, ids=[b[0].split("=")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_values_and_specs_are_one_line_and_write_no_neuron(probe, tmp_path, capsys, item, words):
    if "TEMPLATE:" in item:
        key, _, text = item.partition("=TEMPLATE:")
        item = f"{key}={_template(tmp_path, text)}"
    out = tmp_path / "atlas"
    assert_one_line(*build(capsys, config_file(tmp_path, probe, out), item), *words)
    if (out / DB_FILE).exists():
        with duckdb.connect(str(out / DB_FILE), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM neurons").fetchone()[0] == 0


@pytest.mark.parametrize("raw", ["False", '"false"', "no", "NO", "0"])
def test_crop_enabled_false_in_any_spelling_writes_no_crop(probe, tmp_path, capsys, raw):
    out = tmp_path / "atlas"
    rc, err = build(capsys, config_file(tmp_path, probe, out), f"crop.enabled={raw}")
    assert rc == 0, err
    with duckdb.connect(str(out / DB_FILE), read_only=True) as con:
        n, boxes = con.execute("SELECT count(*), count(x0) FROM evidence").fetchone()
    assert n == 10 * len(UNITS) and boxes == 0
    OUTCOMES["handled"] += 1


def test_a_bare_word_is_one_layer(probe, tmp_path, capsys):
    out = tmp_path / "atlas"
    rc, err = build(capsys, config_file(tmp_path, probe, out), "models.0.layers=detectors")
    assert rc == 0, err
    assert neuron_units(out) == UNITS
    OUTCOMES["handled"] += 1


# -- outputs that cannot hold an atlas ----------------------------------------------------


@pytest.mark.parametrize("where", ["a file", "/dev/null", "below a file"])
def test_an_out_that_is_not_a_folder_is_one_line(probe, tmp_path, capsys, where):
    f = tmp_path / "notes.txt"
    f.write_text("keep me\n")
    out = {"a file": f, "/dev/null": Path(os.devnull), "below a file": f / "atlas"}[where]
    assert_one_line(*build(capsys, config_file(tmp_path, probe, out)), str(out))
    assert f.read_text() == "keep me\n"


# -- what failed builds leave -------------------------------------------------------------


@pytest.mark.parametrize("failure", ["layer typo", "captioner typo", "target typo", "empty probe folder"])
def test_a_failed_build_leaves_an_out_that_takes_the_corrected_config(probe, tmp_path, capsys, failure):
    out = tmp_path / "atlas"
    empty = tmp_path / "empty-probe"
    empty.mkdir()
    sets = {"layer typo": ["models.0.layers=detectorz"], "captioner typo": ["describe.captioner=blip-tiny"],
            "target typo": ["models.0.target=plantd"], "empty probe folder": [f"models.0.probe={empty}"]}[failure]
    rc, err = build(capsys, config_file(tmp_path, probe, out), *sets)
    assert_one_line(rc, err)
    rc, err = build(capsys, config_file(tmp_path, probe, out))
    assert rc == 0, err
    assert neuron_units(out) == UNITS
    OUTCOMES["handled"] += 1


def test_a_resume_removes_the_temp_files_of_a_killed_build(probe, tmp_path, capsys):
    out = tmp_path / "atlas"
    cfg = config_file(tmp_path, probe, out)
    assert build(capsys, cfg)[0] == 0
    thumbs = sorted((out / "images" / "ev").glob("*.webp"))
    stale = [out / "images" / "ev" / f".{thumbs[0].name}.4242.tmp", out / "images" / "gen" / ".x.png.77.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a thumbnail")
    rc, err = build(capsys, cfg)
    assert rc == 0, err
    assert not any(p.exists() for p in stale)
    assert sorted((out / "images" / "ev").glob("*.webp")) == thumbs  # only the temp files went
    assert not list(out.rglob("*.tmp"))
    OUTCOMES["handled"] += 1


N_INTERRUPTS = 8


def test_ctrl_c_at_random_points_of_a_build_exits_130_with_the_resume_hint(probe, tmp_path, capsys):
    """A real SIGINT at random points of in-process builds (model load,
    recording, DuckDB writes): exit 130 and the resume hint, never a
    traceback; the same command then finishes the atlas."""
    assert build(capsys, config_file(tmp_path, probe, tmp_path / "warm-up", units=[]))[0] == 0
    t0 = time.perf_counter()  # a second build: what one takes with everything imported and loaded
    assert build(capsys, config_file(tmp_path, probe, tmp_path / "timing", units=[]))[0] == 0
    duration = time.perf_counter() - t0
    rng = random.Random(130)
    seen: Counter = Counter()
    for attempt in range(N_INTERRUPTS):
        out = tmp_path / f"a{attempt}"
        cfg = config_file(tmp_path, probe, out, units=[])
        timer = threading.Timer(rng.uniform(0.05, 0.9) * duration, os.kill, (os.getpid(), signal.SIGINT))
        capsys.readouterr()
        timer.start()
        try:
            rc = main(["build", "--config", str(cfg)])
        finally:
            timer.cancel()
            timer.join()
        err = capsys.readouterr().err
        assert rc in (0, 130) and "Traceback" not in err, err
        seen[f"exit {rc}"] += 1
        if rc == 130:
            assert err.splitlines()[-1] == f"dnd-atlas: interrupted; run the same command again to resume {out}", err
            assert "Query interrupted" not in err and "rollback" not in err
            rc, err = build(capsys, cfg)
            assert rc == 0, err
        assert neuron_units(out) == list(range(18))
        assert not list(out.rglob("*.tmp"))
    print(f"\nCtrl-C during builds: {dict(seen)}")
    assert seen["exit 130"] >= N_INTERRUPTS // 2, seen
    OUTCOMES["exit 130, resumed"] += seen["exit 130"]
    OUTCOMES["finished before the Ctrl-C"] += seen["exit 0"]


# -- real full and read-only disks (tmpfs) ------------------------------------------------------


@pytest.fixture
def mount(tmp_path):
    """Mount a tmpfs with the given options at a fresh folder; skip where not allowed."""
    mounted = []

    def make(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DND_ATLAS_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "query.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.mark.parametrize("size", ["3m", "7m"])
def test_a_full_disk_is_one_line_and_the_resume_completes(probe, tmp_path, mount, size):
    """A small disk fills during the build (the content cache, a thumbnail or
    the atlas, whichever comes first); after it grows, the same command
    resumes and every neuron is whole."""
    disk = mount(f"size={size}")
    out = disk / "atlas"
    cfg = config_file(tmp_path, probe, out, units=[])  # all 18 units: more than 7 MB with the cache
    r = cli("build", "--config", str(cfg))
    assert_one_line(r.returncode, r.stderr, "no space left", "intact", "run the same command again")
    before = neuron_units(out)  # what was committed when the disk filled: kept, and kept whole
    with duckdb.connect(str(out / DB_FILE), read_only=True) as con:
        per_unit = dict(con.execute("SELECT unit, count(*) FROM evidence GROUP BY unit").fetchall())
    assert set(per_unit) <= set(before) and all(n == 10 for n in per_unit.values())
    print(f"\nfull disk of {size}: {len(before)} of 18 neurons committed before it filled")
    # room for the rest, the cache and the atlas's ONNX embedder (about 90 MB)
    subprocess.run(["mount", "-o", "remount,size=512m", str(disk)], check=True)
    r = cli("build", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert neuron_units(out) == list(range(18))
    with Atlas.open(out) as atlas:
        for unit in range(18):
            rec = atlas.neuron("planted", "detectors", unit)
            if rec.status == "ok":
                assert len(rec.evidence) == 10 and rec.labels
    assert not list(out.rglob("*.tmp"))
    OUTCOMES["handled"] += 1


def test_a_read_only_out_is_one_line(probe, tmp_path, mount, capsys):
    disk = mount("size=1m,ro")
    assert_one_line(*build(capsys, config_file(tmp_path, probe, disk / "atlas")), "read-only")
