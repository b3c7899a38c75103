"""Probe sets: image folders (hostile ones included: testkit.hostile), their
captions (captions.jsonl, Hugging Face metadata.jsonl) and CIFAR releases
exported to folders."""

import json
import os
import pickle
import threading
import warnings

import numpy as np
import pytest

from builder.errors import BuildError, ConfigError
from builder.image_file import DEFAULT_MAX_PIXELS, ProbeFileChanged, ProbeFileError, open_image
from builder.probe import ProbeSet, describe_changes
from testkit.hostile import add_hostile_entries, write_png


def fake_cifar10(root, n=7):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"class{i}".encode() for i in range(10)]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [i % 3 for i in range(n)]}, f)
    return data


def test_cifar_is_exported_once_to_class_folders(tmp_path):
    data = fake_cifar10(tmp_path)
    probe = ProbeSet.scan(f"cifar10:{tmp_path}")
    assert len(probe) == 7
    assert probe.files[0] == "class0/00000.png"
    img = np.asarray(probe.open(0))
    assert img.shape == (32, 32, 3)
    assert (img == data[0].reshape(3, 32, 32).transpose(1, 2, 0)).all()
    again = ProbeSet.scan(f"cifar10:{tmp_path}:test")
    assert again.files == probe.files
    with pytest.raises(BuildError, match="no split"):
        ProbeSet.scan(f"cifar10:{tmp_path}:valid")
    with pytest.raises(BuildError, match="no cifar100 data"):
        ProbeSet.scan(f"cifar100:{tmp_path}")


def test_folder_errors(tmp_path):
    with pytest.raises(BuildError, match="does not exist"):
        ProbeSet.scan(tmp_path / "nope")
    with pytest.raises(BuildError, match="holds no image files"):
        ProbeSet.scan(tmp_path)


def test_hf_dataset_saved_to_disk_is_exported_to_class_folders(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    monkeypatch.setenv("DND_ATLAS_CACHE", str(tmp_path / "cache"))
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])})
    ds = datasets.Dataset.from_dict({"img": images, "label": [0, 1, 0, 1, 1]}, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved"))
    probe = ProbeSet.scan(f"hf:{tmp_path / 'saved'}:test")
    assert probe.files == ("cat/000000.png", "cat/000002.png", "dog/000001.png", "dog/000003.png", "dog/000004.png")
    assert np.asarray(probe.open(1))[0, 0, 0] == 80
    assert ProbeSet.scan(f"hf:{tmp_path / 'saved'}").files == probe.files  # one split: no need to name it
    with pytest.raises(BuildError, match="splits test"):
        ProbeSet.scan(f"hf:{tmp_path / 'saved'}:train")


# -- hostile folders (testkit.hostile): skipped and counted, never a hang ------------

@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / f"ok{i}.png")
    return folder, add_hostile_entries(folder)


def _in_thread(fn, timeout=20.0):
    """fn() run in a daemon thread: its result or exception, or a failed test if it blocks."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} blocked for {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.timeout(120)
def test_a_hostile_folder_is_scanned_without_opening_what_is_not_a_file(hostile):
    folder, entries = hostile
    probe = _in_thread(lambda: ProbeSet.scan(folder))
    by = {o: {e.name for e in entries if e.outcome == o} for o in ("rejected", "skipped", "read", "folder")}
    assert {name for name, _ in probe.rejected} == by["rejected"]
    assert set(probe.files) == by["skipped"] | by["read"] | {"ok0.png", "ok1.png", "ok2.png"}
    assert not any(f.startswith("y.jpg") for f in probe.files)  # a folder named y.jpg is walked, it holds nothing
    reasons = dict(probe.rejected)
    assert reasons["x.png"] == "a FIFO"
    assert reasons["dangling.png"] == "a broken symbolic link"
    assert reasons["loop_a.png"] == reasons["loop_b.png"] == "a symbolic link loop"
    assert len(probe.stats) == len(probe.files)
    # the fingerprint is computed from the scan: no stat of a link loop, no UnicodeEncodeError
    assert probe.fingerprint() != probe.files_fingerprint()


@pytest.mark.timeout(120)
def test_each_hostile_file_is_read_or_refused_in_one_line(hostile):
    folder, entries = hostile
    probe = ProbeSet.scan(folder)
    outcome = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning, no palette-transparency warning
        for i, f in enumerate(probe.files):
            try:
                im = _in_thread(lambda i=i: probe.open(i))
                assert im.mode == "RGB" and min(im.size) >= 1
                outcome[f] = "read"
            except ProbeFileError as exc:
                assert "\n" not in str(exc) and f in str(exc)
                outcome[f] = "skipped"
    expected = {e.name: e.outcome for e in entries if e.outcome in ("read", "skipped")}
    assert {f: o for f, o in outcome.items() if f in expected} == expected
    with pytest.raises(ProbeFileError, match="record.max_image_pixels"):
        probe.open(probe.files.index("huge.png"))
    with pytest.raises(ProbeFileError, match="declares more than"):
        probe.open(probe.files.index("bomb.png"))


@pytest.mark.timeout(60)
def test_a_fifo_that_appears_after_the_scan_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "later.png")
    with pytest.raises(ProbeFileError, match="a FIFO"):
        _in_thread(lambda: open_image(tmp_path / "later.png"))
    probe = ProbeSet(tmp_path, ("later.png",))
    with pytest.raises(ProbeFileError, match="a FIFO"):
        _in_thread(lambda: probe.digest(0))


def test_modes_are_converted_to_upright_rgb(hostile):
    from PIL import Image

    folder, _ = hostile
    rotated = open_image(folder / "rotated.jpg")  # stored 40 x 20, red left; EXIF 6: 20 x 40, red on top
    assert rotated.size == (20, 40)
    top, bottom = rotated.getpixel((10, 5)), rotated.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    gray = open_image(folder / "gray16.png")  # 16-bit: 0x8000 and 0xFFFF scale to 8 bits, not clip to white
    assert gray.getpixel((2, 2)) == (128, 128, 128) and gray.getpixel((12, 2)) == (255, 255, 255)
    assert open_image(folder / "cmyk.jpg").getpixel((5, 5))[0] > 200  # CMYK (0, 255, 255, 0) is red
    pal = open_image(folder / "palette.png")
    assert pal.getpixel((12, 5)) == (0, 200, 0)
    anim = open_image(folder / "anim.gif")
    assert anim.getpixel((5, 5)) == (255, 0, 0)  # the first frame
    assert Image.open(folder / "anim.gif").n_frames == 2


@pytest.mark.timeout(120)
def test_the_pixel_limit_is_configurable_and_large_images_are_decoded_reduced(hostile, tmp_path):
    from PIL import Image

    folder, _ = hostile
    with pytest.raises(ProbeFileError, match="144,000,000 pixels"):
        open_image(folder / "huge.png")
    big = open_image(folder / "huge.png", max_pixels=0)  # 0: no limit; decoded, then reduced
    assert big.size == (2048, 2048) and big.getpixel((100, 100)) == (90, 90, 90)
    assert open_image(folder / "huge.png", max_pixels=150_000_000).size == (2048, 2048)
    with pytest.raises(ProbeFileError, match=r"record.max_image_pixels \(1,000\)"):
        open_image(folder / "ok0.png", max_pixels=1000)
    Image.new("RGB", (5000, 2500), (0, 0, 250)).save(tmp_path / "wide.jpg", quality=90)  # draft: read at 1/2
    wide = open_image(tmp_path / "wide.jpg")
    assert wide.size == (2048, 1024) and wide.getpixel((10, 10))[2] > 230
    probe = ProbeSet.scan(folder, max_pixels=0)
    assert probe.header_size(probe.files.index("huge.png")) == (2048, 2048)
    assert probe.fingerprint() != ProbeSet.scan(folder).fingerprint()  # another limit, another recording
    with pytest.raises(ConfigError, match="max_image_pixels"):
        ProbeSet.scan(folder, max_pixels=-1)
    from builder.config import RecordConfig

    assert RecordConfig().max_image_pixels == DEFAULT_MAX_PIXELS


def test_a_file_changed_or_vanished_after_the_scan_is_named(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    probe = ProbeSet.scan(tmp_path)
    assert [probe.changed(i) for i in range(3)] == [None, None, None]
    with open(tmp_path / "1.png", "ab") as f:
        f.write(b"more")
    (tmp_path / "2.png").unlink()
    assert probe.changed(1) == "probe file '1.png' changed"
    assert probe.changed(2) == "probe file '2.png' vanished"
    with pytest.raises(ProbeFileChanged, match="changed since the probe set was scanned"):
        probe.open(1)
    with pytest.raises(ProbeFileChanged, match="vanished"):
        probe.digest(2)
    assert probe.open(0).size == (8, 8)


def test_the_fingerprint_of_a_plain_folder_is_path_size_and_mtime(tmp_path):
    import hashlib

    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i}.png")
    probe = ProbeSet.scan(tmp_path)
    h = hashlib.sha256()  # the formula of earlier versions: their cached recordings stay valid
    for f in probe.files:
        st = (tmp_path / f).stat()
        h.update(f"{f}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
    assert probe.fingerprint() == probe.files_fingerprint() == h.hexdigest()
    os.mkfifo(tmp_path / "fifo.png")
    again = ProbeSet.scan(tmp_path)
    assert again.files_fingerprint() == probe.files_fingerprint() and again.fingerprint() != probe.fingerprint()


def test_describe_changes_names_a_few_files_of_each_kind():
    old = {f"{i}.png": [10, 1] for i in range(6)}
    new = {k: v for k, v in old.items() if k not in ("0.png", "1.png")} | {"new.png": [3, 3]}
    new["5.png"] = [11, 2]
    for i in range(4):
        new[f"n{i}.png"] = [1, 1]
    text = describe_changes(old, new)
    assert text == ("5 added ('n0.png', 'n1.png', 'n2.png' and 2 more), 2 removed ('0.png', '1.png'), "
                    "1 changed ('5.png')")
    assert describe_changes(old, dict(old)) == ""


def test_common_size_is_the_most_common_and_odd_sizes_do_not_decide_it(tmp_path):
    from PIL import Image

    for i in range(9):
        Image.new("RGB", (64, 48), (i, 0, 0)).save(tmp_path / f"{i}.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "0a.png")
    write_png(tmp_path / "0b.png", 3000, 3000, (5,))
    assert ProbeSet.scan(tmp_path).common_size() == (64, 48)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_bytes(b"no image")
    assert ProbeSet.scan(tmp_path / "junk").common_size() is None  # nothing readable: no size to fit to


# -- captions: captions.jsonl and Hugging Face metadata.jsonl ------------------------


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_metadata_jsonl_captions_with_text_or_caption_columns(tmp_path):
    (tmp_path / "train").mkdir()
    _jsonl(tmp_path / "metadata.jsonl", [
        {"file_name": "a.png", "text": "a red circle"},
        {"file_name": "b.png", "caption": "a blue square"},
        {"file_name": "c.png", "label": 3},  # no text column: no caption
        {"file_name": "d.png", "caption": ["", "two captions, the first string is used", "x"]},
        {"file_name": "../outside.png", "text": "ignored"},
        "",
    ])
    _jsonl(tmp_path / "train" / "metadata.jsonl", [{"file_name": "e.png", "text": "relative to train/"}])
    _jsonl(tmp_path / "captions.jsonl", [{"file": "b.png", "caption": "captions.jsonl wins"}])
    probe = ProbeSet(tmp_path, ())
    assert probe.captions() == {
        "a.png": "a red circle", "b.png": "captions.jsonl wins", "d.png": "two captions, the first string is used",
        "train/e.png": "relative to train/",
    }
    assert probe.has_captions()
    assert not ProbeSet(tmp_path / "train" / "nothing", ()).has_captions()


@pytest.mark.parametrize("line, words", [
    ('{"file_name": "a.png", "text": "ok"', "metadata.jsonl:2: not a JSON object"),
    ('["a.png", "text"]', "metadata.jsonl:2: not a JSON object (a JSON list)"),
    ('{"text": "no file"}', "metadata.jsonl:2: no 'file_name'"),
])
def test_bad_metadata_lines_are_one_line_errors(tmp_path, line, words):
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "fine"}, line])
    with pytest.raises(BuildError, match=words.replace("(", r"\(").replace(")", r"\)")) as exc:
        ProbeSet(tmp_path, ()).captions()
    assert "\n" not in str(exc.value)


def test_bad_captions_jsonl_lines_are_one_line_errors(tmp_path):
    _jsonl(tmp_path / "captions.jsonl", [{"file": "a.png", "caption": "x"}, {"file": "b.png"}])
    with pytest.raises(BuildError, match=r"captions.jsonl:2: not a caption record \(no 'caption'\)"):
        ProbeSet(tmp_path, ()).captions()
    (tmp_path / "captions.jsonl").write_bytes(b'{"file": "a.png", "caption": "\xff"}\n')
    with pytest.raises(BuildError, match="not UTF-8 text"):
        ProbeSet(tmp_path, ()).captions()
