"""The browser runtime of the site's semantic search: onnxruntime-web, from the npm registry.

The site runs the atlas's ONNX embedder in the browser with onnxruntime-web
(its WebAssembly build). Its files are too large for the repository (the
``.wasm`` is 14 MB), so they live in a cache folder,
``$DND_ATLAS_CACHE/web/onnxruntime-web-1.30.0/`` (default
``~/.cache/dnd-atlas``), filled once by :func:`install_runtime`
(``python -m atlas_site.runtime``; ``make test`` and ``make demo`` run it):

- from the pinned npm tarball, downloaded from registry.npmjs.org, or a local
  copy of it (``--tarball FILE``, e.g. from ``npm pack onnxruntime-web@1.30.0``);
- the tarball must match its pinned sha512 integrity (npm's), each file taken
  from it its pinned sha256;
- the ``.wasm`` is stored gzip-compressed (14.2 MB -> 3.7 MB), the way the site
  ships it (the browser inflates it), with a notice naming the package and its
  license.

A site build never downloads: without the folder it ships keyword search
only (one warning). Node and npm are never needed.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from query.embedder import cache_root
from query.errors import AtlasError

log = logging.getLogger(__name__)

RUNTIME_FILE = "runtime.json"
NOTICE_FILE = "NOTICE.txt"
DOWNLOAD_TIMEOUT_S = 60
DOWNLOAD_TRIES = 3


class RuntimeFetchError(AtlasError):
    """The browser runtime could not be fetched or does not match its pinned hashes."""


@dataclass(frozen=True)
class WebRuntime:
    """An npm package pinned by version and integrity, and the files the site takes from it.

    ``files`` maps a path inside the package (``dist/...``) to its sha256;
    ``gzip`` names those stored (and shipped) gzip-compressed.
    """

    name: str
    version: str
    integrity: str  # npm's "sha512-<base64>" of the tarball
    files: Mapping[str, str]
    gzip: frozenset[str] = field(default_factory=frozenset)
    registry: str = "https://registry.npmjs.org"

    @property
    def folder_name(self) -> str:
        """``<name>-<version>``: the cache folder and the site's asset folder."""
        return f"{self.name}-{self.version}"

    @property
    def tarball_url(self) -> str:
        """The tarball's address on the registry (what ``npm view NAME dist.tarball`` says)."""
        return f"{self.registry}/{self.name}/-/{self.name}-{self.version}.tgz"

    def stored_name(self, path: str) -> str:
        """The name a package file has in the cache folder and the site."""
        base = path.rsplit("/", 1)[-1]
        return base + ".gz" if path in self.gzip else base


ONNXRUNTIME_WEB = WebRuntime(
    name="onnxruntime-web",
    version="1.30.0",
    integrity="sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ==",
    files={
        # the wasm backend's ES module with its Emscripten glue inlined, and its binary
        "dist/ort.wasm.bundle.min.mjs": "11e64bd8ffe11bd1a2a2f0d6275fdfbbba7262f0b76b99b53d228a8a22ef3d90",
        "dist/ort-wasm-simd-threaded.wasm": "3398c10d07d229bd91b364548e130e0e51a8e5704b88c7c083ebbeb78842dee2",
    },
    gzip=frozenset({"dist/ort-wasm-simd-threaded.wasm"}),
)
MODULE = "dist/ort.wasm.bundle.min.mjs"
WASM = "dist/ort-wasm-simd-threaded.wasm"


def runtime_dir(spec: WebRuntime = ONNXRUNTIME_WEB) -> Path:
    """The cache folder of ``spec``: ``$DND_ATLAS_CACHE/web/<name>-<version>``."""
    return cache_root() / "web" / spec.folder_name


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_runtime(spec: WebRuntime = ONNXRUNTIME_WEB, folder: Path | None = None) -> Path | None:
    """The runtime folder (default: the cache's) when it is complete and every file
    matches what :func:`install_runtime` recorded, else ``None``."""
    folder = Path(folder) if folder is not None else runtime_dir(spec)
    try:
        record = json.loads((folder / RUNTIME_FILE).read_text(encoding="utf-8"))
        if record.get("name") != spec.name or record.get("version") != spec.version:
            return None
        files = record["files"]
        if set(files) != {spec.stored_name(p) for p in spec.files} | {NOTICE_FILE}:
            return None
        for name, sha in files.items():
            if _sha256((folder / name).read_bytes()) != sha:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return folder


def check_integrity(data: bytes, integrity: str) -> None:
    """Raise :class:`RuntimeFetchError` unless ``data`` matches npm's ``sha512-...`` integrity."""
    algo, _, expected = integrity.partition("-")
    if algo != "sha512":
        raise RuntimeFetchError(f"unsupported integrity {integrity[:12]}...; expected sha512")
    got = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if got != expected:
        raise RuntimeFetchError(f"the tarball does not match its pinned integrity (got sha512-{got[:16]}...)")


def download(url: str, timeout: float = DOWNLOAD_TIMEOUT_S, tries: int = DOWNLOAD_TRIES) -> bytes:
    """The body of ``url`` (HTTP 200 only), retried with backoff on network errors."""
    last: Exception | None = None
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise RuntimeFetchError(f"{url}: HTTP {resp.status}")
                return resp.read()
        except OSError as exc:  # URLError, timeouts, resets
            last = exc
            log.info("download of %s failed (%s); try %d of %d", url, exc, attempt + 1, tries)
            time.sleep(2 ** attempt)
    raise RuntimeFetchError(f"cannot download {url}: {last}")


def _extract(spec: WebRuntime, tarball: bytes) -> dict[str, bytes]:
    """The stored files (by their stored names) out of the package tarball, checked."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        meta = json.loads(tar.extractfile(members["package/package.json"]).read())
        for path, sha in spec.files.items():
            member = members.get(f"package/{path}")
            if member is None:
                raise RuntimeFetchError(f"{spec.folder_name}: the tarball has no {path}")
            data = tar.extractfile(member).read()
            if _sha256(data) != sha:
                raise RuntimeFetchError(f"{spec.folder_name}: {path} does not match its pinned sha256")
            if path in spec.gzip:
                data = gzip.compress(data, compresslevel=9, mtime=0)
            out[spec.stored_name(path)] = data
    repo = meta.get("repository")
    repo = repo.get("url", "") if isinstance(repo, dict) else str(repo or "")
    out[NOTICE_FILE] = (
        f"{spec.name} {spec.version}, {meta.get('license', 'see its package.json')} license "
        f"({repo or spec.name}), from {spec.tarball_url}\n"
        "Files: " + ", ".join(spec.stored_name(p) for p in spec.files) + "\n").encode()
    return out


def install_runtime(spec: WebRuntime = ONNXRUNTIME_WEB, tarball: str | os.PathLike[str] | None = None,
                    folder: Path | None = None) -> Path:
    """Fill the runtime folder (default: the cache's) from ``tarball`` (a local copy of the
    npm tarball) or from the registry; returns the folder. Does nothing when it is
    complete already. The folder appears atomically (temp folder, then rename).
    Raises :class:`RuntimeFetchError` for a tarball that does not match its pins."""
    folder = Path(folder) if folder is not None else runtime_dir(spec)
    if find_runtime(spec, folder) is not None:
        return folder
    if tarball is not None:
        data = Path(tarball).expanduser().read_bytes()
    else:
        log.info("downloading %s", spec.tarball_url)
        data = download(spec.tarball_url)
    check_integrity(data, spec.integrity)
    files = _extract(spec, data)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        record = {"name": spec.name, "version": spec.version, "integrity": spec.integrity,
                  "files": {name: _sha256(content) for name, content in sorted(files.items())}}
        (tmp / RUNTIME_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
        tmp.chmod(0o755)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("installed %s into %s", spec.folder_name, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    """``python -m atlas_site.runtime [--tarball FILE] [--check]``: fill (or check) the cache."""
    p = argparse.ArgumentParser(prog="python -m atlas_site.runtime",
                                description="fetch onnxruntime-web for the site's semantic search")
    p.add_argument("--tarball", metavar="FILE",
                   help="a local onnxruntime-web-1.30.0.tgz (npm pack) instead of the registry")
    p.add_argument("--check", action="store_true", help="only say whether it is installed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        found = find_runtime()
        print(found if found else f"{ONNXRUNTIME_WEB.folder_name} is not installed in {runtime_dir()}")
        return 0 if found else 1
    try:
        print(install_runtime(tarball=args.tarball))
    except (RuntimeFetchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
