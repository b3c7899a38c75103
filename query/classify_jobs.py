"""``POST /classify`` on a server: labelled image sets under one root, each
classify run in a child process with a time and a size limit.

The protocol runs the target model over a folder of images; on a server it
must not read what it was not meant to. So:

- classify is off unless the server was given a root folder of labelled
  image sets (``serve --classify-root DIR``); a request names a set by a path
  relative to that root (``"cifar10-test"``, ``"sets/dogs"``);
- a name that is absolute, climbs (``..``), holds a hidden, empty or odd
  component, leads outside the root through a symlink (the set's folder or
  any of its files), or names a missing, empty or non-folder entry, is
  answered alike: 404 "no labelled image set of that name under the
  server's classify root".
  Nothing outside the root is read, listed or told apart;
- a set with more than ``max_images`` images (or a tree with more than
  ``max_entries`` entries) is refused (413) before any image is read;
- the protocol runs in a child process (``python -m query.classify_jobs``),
  at a lower CPU priority, one at a time (503 while one runs), killed when
  it passes ``timeout`` seconds (504) or when the client goes away, so it
  can neither starve searches nor outlive its request;
- replies carry no absolute path: the atlas by its folder name, the set by
  the name the request gave, any other path as ``<path>`` (:func:`scrub_paths`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from query.errors import AtlasError, QueryError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_IMAGES = 10_000
MAX_ENTRIES_PER_IMAGE = 4  # a set's tree may hold this many entries per allowed image
POLL_S = 0.2
RESULT_MARK = "DND-ATLAS-CLASSIFY-RESULT "
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")  # builder.probe's
# What a child may inherit; threads capped so that a classify does not fight searches for cores.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
             "DND_ATLAS_PROGRESS": "0", "TOKENIZERS_PARALLELISM": "false"}
CHILD_NICE = 10
NOT_FOUND = ("no labelled image set of that name under the server's classify root "
             "(name a folder relative to it, e.g. 'cifar10-test')")
_ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:[^\s'\",;:()\[\]{}]+)")


class ClassifyUnavailable(AtlasError):
    """Classify is off on this server, or not installed."""

    http_status = 501


class ImageSetNotFound(AtlasError):
    """The request names no readable labelled image set under the classify root."""

    http_status = 404


class ImageSetTooLarge(AtlasError):
    """The image set is larger than the server allows."""

    http_status = 413


class ClassifyBusy(AtlasError):
    """Another classify is running."""

    http_status = 503


class ClassifyTimeout(AtlasError):
    """The classify ran past the server's time limit and was stopped."""

    http_status = 504


@dataclass(frozen=True)
class ClassifyLimits:
    """Where image sets live and how much one classify may take."""

    root: Path
    timeout: float = DEFAULT_TIMEOUT_S
    max_images: int = DEFAULT_MAX_IMAGES

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise AtlasError(f"the classify timeout must be > 0 seconds, got {self.timeout}")
        if self.max_images < 1:
            raise AtlasError(f"the classify image limit must be >= 1, got {self.max_images}")

    @classmethod
    def at(cls, root: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT_S,
           max_images: int = DEFAULT_MAX_IMAGES) -> ClassifyLimits:
        """Limits for the root folder ``root`` (which must exist)."""
        path = Path(root).expanduser()
        if not path.is_dir():
            raise AtlasError(f"classify root {str(root)!r} is not a folder")
        return cls(Path(os.path.realpath(path)), float(timeout), int(max_images))


def _inside(root: Path, path: str) -> bool:
    real = Path(os.path.realpath(path))
    return real == root or real.is_relative_to(root)


def resolve_image_set(limits: ClassifyLimits, name: str) -> Path:
    """The folder of the image set ``name`` under ``limits.root``, after
    checking that it and every file in it lie inside the root, that it holds
    an image and no more images than allowed. Raises :class:`ImageSetNotFound`
    (the same for every way a name can fail) or :class:`ImageSetTooLarge`."""
    # one answer for every failure, naming nothing (not even the name: see scrub_paths)
    missing = ImageSetNotFound(NOT_FOUND)
    parts = name.rstrip("/").split("/") if isinstance(name, str) else []  # "set/" is "set"
    if not parts or any(not p or p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
        raise missing
    folder = limits.root.joinpath(*parts)
    if not _inside(limits.root, str(folder)) or not os.path.isdir(os.path.realpath(folder)):
        raise missing
    n_images = _count_images(limits, Path(os.path.realpath(folder)), name, missing)
    if n_images == 0:
        raise missing
    return Path(os.path.realpath(folder))


def _count_images(limits: ClassifyLimits, folder: Path, name: str, missing: AtlasError) -> int:
    """Images below ``folder`` as the protocol lists them (hidden entries
    skipped, symlinked folders not followed); ``missing`` when a file leads
    out of the root, too large past the limits."""
    n_images, n_entries = 0, 0
    max_entries = limits.max_images * MAX_ENTRIES_PER_IMAGE + 1000
    too_large = ImageSetTooLarge(
        f"that image set holds more than {limits.max_images} images, this server's limit")
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        n_entries += len(dirnames) + len(filenames)
        if n_entries > max_entries:
            raise too_large
        for f in filenames:
            if f.startswith("."):
                continue
            path = os.path.join(dirpath, f)
            if os.path.islink(path) and not _inside(limits.root, path):
                raise missing
            if f.lower().endswith(IMAGE_SUFFIXES):
                n_images += 1
                if n_images > limits.max_images:
                    raise too_large
    return n_images


def scrub_paths(obj: Any) -> Any:
    """``obj`` (JSON data or a string) with every absolute path replaced by
    ``<path>``.

    Every one, not only the server's own: replacing known paths by friendly
    names would answer a request that echoes a guessed path (a concept or a
    model name) differently when the guess is right, telling the client
    where the atlas or the root lives.
    """
    if isinstance(obj, dict):
        return {k: scrub_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_paths(v) for v in obj]
    if not isinstance(obj, str):
        return obj
    return _ABSOLUTE.sub("<path>", obj)


class ClassifyJobs:
    """Runs classify requests in child processes, one at a time.

    ``limits`` ``None`` means classify is off; ``service`` is the
    ``module:callable`` of the protocol (the ``classify`` entry point of the
    builder), imported only in the child.
    """

    def __init__(self, limits: ClassifyLimits | None, service: str | None) -> None:
        self.limits = limits
        self.service = service
        self._slot = threading.Lock()
        self._running: set[subprocess.Popen] = set()

    def image_set(self, name: str) -> Path:
        """The checked folder of image set ``name`` (see :func:`resolve_image_set`)."""
        if self.limits is None:
            raise ClassifyUnavailable(
                "classify is off on this server; start it with --classify-root DIR "
                "(a folder of labelled image sets)")
        if self.service is None:
            raise ClassifyUnavailable(
                "classify is not installed on this server (pip install 'dnd-atlas[build]')")
        return resolve_image_set(self.limits, name)

    async def run(self, atlas_dir: Path, concept: str, images: Path, model: str | None,
                  layer: str | None, k: int, gone: Callable[[], Awaitable[bool]]) -> dict[str, Any]:
        """The protocol's result as a dict, computed by a child process over
        the atlas folder ``atlas_dir`` and the checked set folder ``images``;
        stopped when it outlives the time limit or ``gone()`` says the client left."""
        assert self.limits is not None and self.service is not None
        if not self._slot.acquire(blocking=False):
            raise ClassifyBusy("another classify is running on this server; try again later")
        try:
            request = {"service": self.service, "atlas": str(atlas_dir), "concept": concept,
                       "images": str(images), "model": model, "layer": layer, "k": k,
                       "cpu_limit": self.limits.timeout}
            return await self._child(request, gone)
        finally:
            self._slot.release()

    async def _child(self, request: dict[str, Any], gone: Callable[[], Awaitable[bool]]) -> dict[str, Any]:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "query.classify_jobs"], stdin=subprocess.PIPE,
                stdout=out, stderr=err, env={**os.environ, **CHILD_ENV}, start_new_session=True)
            self._running.add(proc)
            try:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(request).encode())
                proc.stdin.close()
                deadline = time.monotonic() + self.limits.timeout  # type: ignore[union-attr]
                while proc.poll() is None:
                    if time.monotonic() > deadline:
                        raise ClassifyTimeout(
                            f"classify ran past this server's limit of {self.limits.timeout:g} s "  # type: ignore[union-attr]
                            "and was stopped; try a smaller image set")
                    if await gone():
                        log.info("classify client went away; stopping its job")
                        raise ClassifyTimeout("the client went away")
                    await asyncio.sleep(POLL_S)
            finally:
                _kill(proc)
                self._running.discard(proc)
            out.seek(0)
            err.seek(0)
            return _answer(proc.returncode, out.read().decode(errors="replace"),
                           err.read().decode(errors="replace"))

    def close(self) -> None:
        """Kill every running child (the server is stopping)."""
        for proc in list(self._running):
            _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.warning("classify child %d did not exit", proc.pid)


def _answer(code: int, stdout: str, stderr: str) -> dict[str, Any]:
    """The child's result, or the error it reported raised here."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if not lines:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        log.error("classify child exited with %s without a result: %s", code, tail)
        raise AtlasError(f"classify failed on the server (exit status {code})")
    answer = json.loads(lines[-1][len(RESULT_MARK):])
    if "result" in answer:
        return answer["result"]
    kind, detail = answer["error"]["kind"], answer["error"]["detail"]
    if kind == "import":
        raise ClassifyUnavailable(f"classify needs the builder and torch: {detail}")
    if kind == "query":
        raise QueryError(detail)
    if kind == "atlas":
        raise AtlasError(detail)
    log.error("classify child failed: %s", detail)
    raise AtlasError(f"classify failed on the server ({detail.split(':', 1)[0]})")


# -- the child ---------------------------------------------------------------------------


def _load(spec: str) -> Callable[..., Any]:
    import importlib

    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _limit_self(cpu_seconds: float) -> None:
    """Lower priority; die with the parent and past a CPU budget (backstops
    for a server killed without cleaning up)."""
    try:
        os.nice(CHILD_NICE)
    except OSError:
        pass
    try:
        import resource

        budget = int(cpu_seconds) + 30
        resource.setrlimit(resource.RLIMIT_CPU, (budget, budget + 5))
    except (ImportError, ValueError, OSError):
        pass
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def child_main() -> int:
    """Read one request (JSON) from stdin, run it, print the result line."""
    from query.evaluations import clean_json

    request = json.loads(sys.stdin.read())
    _limit_self(float(request.get("cpu_limit") or DEFAULT_TIMEOUT_S))
    try:
        classify = _load(request["service"])
        result = classify(request["atlas"], request["concept"], Path(request["images"]),
                          model=request["model"], layer=request["layer"], k=request["k"])
        data = result.to_dict() if hasattr(result, "to_dict") else result
        # strict JSON: NaN (an undefined AUROC) and infinities become null
        answer: dict[str, Any] = {"result": json.loads(json.dumps(clean_json(data), default=str))}
    except ImportError as exc:
        answer = {"error": {"kind": "import", "detail": " ".join(str(exc).split())}}
    except QueryError as exc:
        answer = {"error": {"kind": "query", "detail": " ".join(str(exc).split())}}
    except AtlasError as exc:
        answer = {"error": {"kind": "atlas", "detail": " ".join(str(exc).split())}}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which logs it
        answer = {"error": {"kind": "bug", "detail": f"{type(exc).__name__}: {exc}"}}
    print(RESULT_MARK + json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(child_main())
