"""The browser runtime's cache: filled from a tarball only when it matches its pinned
sha512 and every file its sha256, found only while intact, never half-written."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile

import pytest

from atlas_site import runtime as rt


def tarball(files: dict[str, bytes]) -> bytes:
    """An npm-style package tarball (members under package/)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


MODULE, WASM = b"export const x = 1;\n", bytes(range(256)) * 40
PACKAGE = json.dumps({"name": "fake-rt", "version": "9.9.9", "license": "MIT",
                      "repository": {"type": "git", "url": "https://example.invalid/rt.git"}}).encode()


@pytest.fixture
def package(tmp_path):
    """A fake package (its tarball on disk) and the spec that pins it."""
    data = tarball({"package.json": PACKAGE, "dist/rt.mjs": MODULE, "dist/rt.wasm": WASM})
    path = tmp_path / "fake-rt-9.9.9.tgz"
    path.write_bytes(data)
    spec = rt.WebRuntime("fake-rt", "9.9.9", integrity(data),
                         {"dist/rt.mjs": hashlib.sha256(MODULE).hexdigest(),
                          "dist/rt.wasm": hashlib.sha256(WASM).hexdigest()},
                         gzip=frozenset({"dist/rt.wasm"}))
    return spec, path


def test_install_from_a_tarball_then_found(package, tmp_path):
    spec, path = package
    folder = rt.install_runtime(spec, tarball=path, folder=tmp_path / "cache/fake-rt-9.9.9")
    assert sorted(p.name for p in folder.iterdir()) == ["NOTICE.txt", "rt.mjs", "rt.wasm.gz", "runtime.json"]
    assert (folder / "rt.mjs").read_bytes() == MODULE
    assert gzip.decompress((folder / "rt.wasm.gz").read_bytes()) == WASM
    notice = (folder / "NOTICE.txt").read_text()
    assert "MIT license" in notice and "https://example.invalid/rt.git" in notice
    assert rt.find_runtime(spec, folder) == folder
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]   # no temp folder left


def test_a_tampered_runtime_is_not_found(package, tmp_path):
    spec, path = package
    folder = rt.install_runtime(spec, tarball=path, folder=tmp_path / "rt")
    (folder / "rt.mjs").write_bytes(b"alert(1)")
    assert rt.find_runtime(spec, folder) is None
    assert rt.install_runtime(spec, tarball=path, folder=folder) == folder   # repaired
    assert rt.find_runtime(spec, folder) == folder


def test_a_tarball_that_misses_its_integrity_installs_nothing(package, tmp_path):
    spec, path = package
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(rt.RuntimeFetchError, match="integrity"):
        rt.install_runtime(spec, tarball=path, folder=tmp_path / "rt")
    assert not (tmp_path / "rt").exists()


def test_a_file_that_misses_its_sha256_installs_nothing(tmp_path):
    data = tarball({"package.json": PACKAGE, "dist/rt.mjs": b"other"})
    spec = rt.WebRuntime("fake-rt", "9.9.9", integrity(data),
                         {"dist/rt.mjs": hashlib.sha256(MODULE).hexdigest()})
    with pytest.raises(rt.RuntimeFetchError, match="sha256"):
        rt.install_runtime(spec, tarball=_write(tmp_path / "a.tgz", data), folder=tmp_path / "rt")
    spec = rt.WebRuntime("fake-rt", "9.9.9", integrity(data), {"dist/none.mjs": "0" * 64})
    with pytest.raises(rt.RuntimeFetchError, match="no dist/none.mjs"):
        rt.install_runtime(spec, tarball=_write(tmp_path / "a.tgz", data), folder=tmp_path / "rt")
    assert not (tmp_path / "rt").exists()


def _write(path, data):
    path.write_bytes(data)
    return path


def test_the_pinned_runtime_lives_in_the_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DND_ATLAS_CACHE", str(tmp_path))
    assert rt.runtime_dir() == tmp_path / "web/onnxruntime-web-1.30.0"
    assert rt.ONNXRUNTIME_WEB.tarball_url == (
        "https://registry.npmjs.org/onnxruntime-web/-/onnxruntime-web-1.30.0.tgz")
    assert rt.find_runtime() is None
    assert rt.main(["--check"]) == 1
    assert "not installed" in capsys.readouterr().out
    assert rt.main(["--tarball", str(_write(tmp_path / "x.tgz", b"junk"))]) == 2
    assert "integrity" in capsys.readouterr().err
