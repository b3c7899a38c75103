"""``dnd-atlas serve``: a read-only HTTP API over one atlas (FastAPI + uvicorn).

Endpoints (JSON unless noted; the OpenAPI schema is at ``/openapi.json`` and
interactive docs at ``/docs``; ``HEAD`` works wherever ``GET`` does):

- ``GET /search?q=&k=&model=&layer=``: neurons by text concept, the objects
  ``dnd-atlas search --json`` prints; concurrent searches are answered
  together (:mod:`query.batch_search`);
- ``GET /models``, ``GET /layers?model=``: what the atlas holds;
- ``GET /neurons/{model}/{layer}/{unit}``: one neuron's full record (layer
  names may contain dots and slashes);
- ``POST /classify``: neurons usable as a classifier of a concept, scored on
  a labelled image set under the server's classify root, in a child process
  with a time and a size limit; off unless ``--classify-root`` is given
  (:mod:`query.classify_jobs`);
- ``GET /images/{path}``: the atlas's thumbnails, crops and generated samples
  (image files under the atlas's ``images/`` folder only), so that the
  ``thumbnail`` and ``samples`` paths of a record resolve against the server.

The server reads published snapshots of the atlas (:mod:`query.snapshots`),
never the atlas file itself for longer than a copy, so builds, merges and
``eval`` can write the atlas while it is served; it serves their writes a
few seconds later.

Errors are ``{"detail": "<one line>"}`` and never name a server path: 400 for
a malformed request, 404 for an unknown model, layer, unit, route, image or
image set, 413 for an image set over the size limit, 422 when a parameter
fails its declared limits, 501 when searching or classifying is not
available on this machine (no torch, classify off), 503 while another
classify runs, 504 when a classify passes the time limit: everything else
works without torch.

FastAPI and uvicorn are imported inside the functions that need them, so the
CLI can register ``serve`` (``add_serve_arguments``) without loading them.
"""

import argparse
import functools
import ipaddress
import logging
import os
import re
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from query.errors import AtlasError, QueryError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_K = 100
MAX_QUERY_CHARS = 200
MAX_NAME_CHARS = 200  # model and layer names in parameters
MAX_PATH_CHARS = 4096
MAX_UNIT = 2**31 - 1  # units are INTEGER in the atlas
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a SIGTERM
# Texts must hold a character that str.strip() keeps. Spelled out rather than
# \S, whose meaning differs between Python, Rust (pydantic) and JSON Schema
# (ECMA-262) regexes, so that the schema says exactly what the server accepts.
NOT_BLANK = r"[^\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
# Only these are served from images/: never scripts (SVG) or stray files.
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
}

# QueryError messages of query.atlas that name something that does not exist
# (the rest, e.g. an ambiguous layer or an empty query, are malformed requests).
_NOT_FOUND = re.compile(r"^unknown (model|layer)\b|\bout of range\b|\bis not in the atlas\b")


class ServeError(AtlasError):
    """The server cannot start: bad host or port, or the port is taken."""


class SearchUnavailable(AtlasError):
    """Searching needs the embedder, which cannot be loaded on this machine."""


def error_status(exc: AtlasError) -> int:
    """The HTTP status for a library error: its own ``http_status`` when it
    has one (the classify errors), 404 when it names a model, layer or unit
    that does not exist, 501 when searching is not available, 503 when the
    atlas stays locked by a writer, else 400."""
    from query.access import AtlasBusy

    own = getattr(exc, "http_status", None)
    if isinstance(own, int):
        return own
    if isinstance(exc, SearchUnavailable):
        return 501
    if isinstance(exc, AtlasBusy):
        return 503
    if isinstance(exc, QueryError) and _NOT_FOUND.search(str(exc)):
        return 404
    return 400


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass(frozen=True)
class ServeOptions:
    """How ``serve`` treats the atlas and ``/classify``.

    ``classify_root``: the folder of labelled image sets ``/classify`` may
    read (``None``: classify is off); ``classify_timeout`` (seconds) and
    ``classify_max_images`` bound one classify; ``classify_service`` is the
    ``module:callable`` running the protocol (default: the ``classify``
    entry point the builder declares). ``snapshot_dir`` holds the server's
    copies of the atlas (default: the system's temporary folder);
    ``refresh`` is how often (seconds) it looks for a changed atlas.
    """

    classify_root: str | None = None
    classify_timeout: float = 300.0
    classify_max_images: int = 10_000
    classify_service: str | None = None
    snapshot_dir: str | None = None
    refresh: float = 2.0


class _Readers:
    """What the server's requests read: the atlas's snapshots (each thread
    through its own cursor), the search batcher and the classify jobs."""

    def __init__(self, atlas_dir: str | os.PathLike[str], options: ServeOptions) -> None:
        from query.batch_search import SearchBatcher
        from query.classify_jobs import ClassifyJobs, ClassifyLimits
        from query.plugins import service_spec
        from query.snapshots import Snapshots

        limits = None
        if options.classify_root is not None:
            limits = ClassifyLimits.at(options.classify_root, options.classify_timeout,
                                       options.classify_max_images)
        self.snapshots = Snapshots(atlas_dir, options.snapshot_dir, refresh=options.refresh)
        self.path = self.snapshots.path
        self.jobs = ClassifyJobs(limits, options.classify_service or service_spec("classify"))
        self.batcher = SearchBatcher(self.snapshots, self.embedder)

    def meta(self) -> dict[str, Any]:
        with self.snapshots.use() as snap:
            return snap.thread_atlas().meta

    def embedder(self):
        """The atlas's search embedder, loaded once: its ONNX embedder when it
        carries one, else sentence-transformers (``query_embedder``).

        Raises :class:`SearchUnavailable` when it cannot be loaded here (no
        ONNX embedder and no torch, the embedder package not installed): the
        rest of the API works without it.
        """
        from query.onnx_embedder import query_embedder

        name = self.meta().get("embedder")
        if not name:
            raise SearchUnavailable("the atlas meta has no 'embedder'; rebuild the atlas")
        try:
            return query_embedder(self.path, str(name))
        except (ImportError, AtlasError) as exc:
            raise SearchUnavailable(
                f"search is not available on this server: {_one_line(exc)}") from None

    def preload(self) -> None:
        """Load the embedder now, so the first search is not slow; when it cannot
        be loaded, say so once and serve everything else."""
        try:
            self.embedder()
        except SearchUnavailable as exc:
            log.warning("%s", exc)

    def close(self) -> None:
        self.jobs.close()
        self.batcher.close()
        self.snapshots.close()


def create_app(atlas_dir: str | os.PathLike[str], preload: bool = False,
               options: ServeOptions | None = None):
    """A FastAPI app serving the atlas at ``atlas_dir`` read-only.

    Takes the first snapshot of the atlas now, so a bad path raises
    :class:`query.errors.AtlasNotFound` (or another :class:`AtlasError`) here
    rather than on the first request; ``preload=True`` also loads the search
    embedder. ``options`` (:class:`ServeOptions`) sets the classify root and
    limits and where snapshots go. Everything is closed, and the snapshots
    deleted, when the app shuts down.
    """
    import contextlib

    from fastapi import FastAPI

    readers = _Readers(atlas_dir, options or ServeOptions())
    try:
        if preload:
            readers.preload()
        images_root = (readers.path / "images").resolve()
    except BaseException:
        readers.close()
        raise

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            readers.close()

    app = FastAPI(
        title="dnd-atlas",
        summary="Search and read a Describe-and-Dissect neuron atlas.",
        description=f"Atlas: `{readers.path.name}`. Read-only.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.readers = readers
    app.add_middleware(_HeadAsGet)
    _add_error_handlers(app, readers)
    _add_read_routes(app, readers, images_root)
    _add_classify_route(app, readers)
    return app


class _HeadAsGet:
    """ASGI middleware: a ``HEAD`` request is answered as its ``GET`` would be,
    headers only (RFC 9110), wherever a ``GET`` route matches; elsewhere it
    gets the ``GET``'s 405 or 404."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class _ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail


@functools.cache
def _error_model():
    from pydantic import BaseModel

    class Error(BaseModel):
        """Every error answer: one line saying what is wrong."""

        detail: str

    return Error


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    Error = _error_model()
    text = {400: "malformed request", 404: "unknown model, layer, unit, file or image set",
            413: "the image set is over the server's size limit",
            422: "a parameter is outside its limits", 501: "not available on this server",
            503: "busy: another classify runs", 504: "the classify passed the server's time limit"}
    return {c: {"model": Error, "description": text[c]} for c in codes}


def _add_error_handlers(app, readers: _Readers) -> None:
    """Errors are always ``{"detail": str}``: one line, no traceback, no server path."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from query.classify_jobs import scrub_paths

    def answer(detail: str, status: int, headers=None) -> JSONResponse:
        return JSONResponse({"detail": scrub_paths(detail)},
                            status_code=status, headers=headers)

    @app.exception_handler(_ApiError)
    async def _api_error(request: Request, exc: _ApiError) -> JSONResponse:
        return answer(exc.detail, exc.status)

    @app.exception_handler(AtlasError)
    async def _atlas_error(request: Request, exc: AtlasError) -> JSONResponse:
        status = error_status(exc)
        return answer(_one_line(exc), status, {"Retry-After": "5"} if status == 503 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body")]
            where = ".".join(loc)
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else
                         str(err.get("msg", "invalid")))
        return answer("; ".join(parts) or "invalid request", 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return answer(str(exc.detail), exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)


def _add_read_routes(app, readers: _Readers, images_root: Path) -> None:
    import asyncio
    from typing import Annotated

    from fastapi import Path as PathParam
    from fastapi import Query
    from fastapi.responses import FileResponse

    from query.records import LayerInfo, ModelInfo, NeuronRecord, SearchHit

    Name = Annotated[str | None, Query(max_length=MAX_NAME_CHARS)]

    @app.get("/search", response_model=list[SearchHit], responses=_errors(400, 404, 422, 501),
             summary="neurons whose labels match a text concept, best first")
    async def search(
        q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS, pattern=NOT_BLANK,
                                description="the concept, e.g. 'striped circle'")],
        k: Annotated[int, Query(ge=1, le=MAX_K, description="how many neurons")] = 10,
        model: Annotated[str | None, Query(max_length=MAX_NAME_CHARS,
                                           description="only neurons of this model")] = None,
        layer: Annotated[str | None, Query(max_length=MAX_NAME_CHARS,
                                           description="only neurons of this layer")] = None,
        min_fidelity: Annotated[float | None, Query(ge=-1.0, le=1.0, description=(
            "only labels whose fidelity correlation is at least this"))] = None,
    ) -> list[SearchHit]:
        # answered in the batcher's next round, with every other search waiting
        return await asyncio.wrap_future(readers.batcher.submit(
            q, k=k, model=model, layer=layer, min_fidelity=min_fidelity))

    @app.get("/models", response_model=list[ModelInfo], summary="the target models")
    def models() -> list[ModelInfo]:
        with readers.snapshots.use() as snap:
            return snap.thread_atlas().models()

    @app.get("/layers", response_model=list[LayerInfo], responses=_errors(404, 422),
             summary="layers with neuron counts per status")
    def layers(model: Name = None) -> list[LayerInfo]:
        with readers.snapshots.use() as snap:
            return snap.thread_atlas().layers(model)

    # {layer:path} so that a layer name may hold slashes as well as dots; the
    # unit is the last segment.
    @app.get("/neurons/{model}/{layer:path}/{unit}", response_model=NeuronRecord,
             responses=_errors(400, 404, 422),
             summary="everything the atlas knows about one neuron")
    def neuron(
        model: Annotated[str, PathParam(max_length=MAX_NAME_CHARS)],
        layer: Annotated[str, PathParam(max_length=MAX_NAME_CHARS,
                                        description="layer name, e.g. layer4.0.conv2")],
        unit: Annotated[int, PathParam(ge=0, le=MAX_UNIT)],
    ) -> NeuronRecord:
        with readers.snapshots.use() as snap:
            return snap.thread_atlas().neuron(model, layer, unit)

    @app.get("/images/{path:path}", response_class=FileResponse,
             responses={200: {"content": {t: {} for t in sorted(set(IMAGE_TYPES.values()))},
                              "description": "the image file"}, **_errors(404)},
             summary="an image of the atlas (thumbnail, crop, generated sample)")
    def image(path: Annotated[str, PathParam(max_length=MAX_PATH_CHARS)]) -> FileResponse:
        file = _image_file(images_root, path)
        if file is None:
            raise _ApiError(404, f"no image {path!r} in the atlas")
        return FileResponse(file, media_type=IMAGE_TYPES[file.suffix.lower()],
                            headers={"X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "public, max-age=3600"})


def _add_classify_route(app, readers: _Readers) -> None:
    import asyncio
    from typing import Annotated

    from fastapi import Body, Request
    from pydantic import BaseModel, ConfigDict, Field

    from query.classify_jobs import scrub_paths

    class ClassifyRequest(BaseModel):
        """Find neurons that classify ``concept``, scored on the labelled image
        set ``images`` (a folder under the server's classify root)."""

        model_config = ConfigDict(extra="forbid")

        concept: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, pattern=NOT_BLANK,
                             description="the concept to classify, e.g. 'striped circle'")
        images: str = Field(min_length=1, max_length=MAX_PATH_CHARS,
                            description="a labelled image set: a folder under the server's "
                                        "classify root, named relative to it (one sub-folder "
                                        "per class)")
        model: str | None = Field(None, max_length=MAX_NAME_CHARS,
                                  description="only neurons of this model")
        layer: str | None = Field(None, max_length=MAX_NAME_CHARS,
                                  description="only neurons of this layer")
        k: int = Field(5, ge=1, le=MAX_K, description="how many neurons to return")

    @app.post("/classify", response_model=dict[str, Any],
              responses=_errors(400, 404, 413, 422, 501, 503, 504),
              summary="neurons usable as zero-training classifiers of a concept")
    async def classify(body: Annotated[ClassifyRequest, Body()], request: Request) -> dict[str, Any]:
        folder = await asyncio.to_thread(readers.jobs.image_set, body.images)
        with readers.snapshots.use() as snap:
            result = await readers.jobs.run(snap.folder, body.concept, folder, body.model,
                                            body.layer, body.k, request.is_disconnected)
        result = scrub_paths(result)  # errors are scrubbed by the error handlers
        if isinstance(result, dict):
            result.update(atlas=readers.path.name, images=body.images)
        return result


def _image_file(root: Path, relative: str) -> Path | None:
    """The image file ``relative`` names under ``root``, or ``None`` when it is not
    one: outside ``root`` (``..``, absolute, a symlink leading out), missing, not
    a regular file, or not an image type served."""
    if not relative or "\x00" in relative or "\\" in relative:
        return None
    try:
        file = (root / relative).resolve()
    except (OSError, ValueError, RuntimeError):  # RuntimeError: symlink loop (3.10-3.12)
        return None
    if file == root or not file.is_relative_to(root):
        return None
    if file.suffix.lower() not in IMAGE_TYPES:
        return None
    try:
        return file if file.is_file() else None
    except (OSError, ValueError):
        return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dnd-atlas")
    except PackageNotFoundError:  # running from a checkout that is not installed
        return "0"


# -- CLI --------------------------------------------------------------------------------


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {port}")
    return port


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {value}")
    return seconds


def _count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {count}")
    return count


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Declare ``dnd-atlas serve``'s arguments (imports nothing heavy)."""
    d = ServeOptions()
    p.add_argument("atlas", help="atlas directory (or its atlas.duckdb)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}, this machine only; "
                        "another address exposes the atlas, and /classify when it is on, "
                        "to the network)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--classify-root", metavar="DIR", default=None,
                   help="turn POST /classify on: requests name labelled image sets by their "
                        "path relative to DIR, and nothing outside DIR is read (default: off)")
    p.add_argument("--classify-timeout", metavar="S", type=_seconds, default=d.classify_timeout,
                   help=f"stop a classify after S seconds (default {d.classify_timeout:g})")
    p.add_argument("--classify-max-images", metavar="N", type=_count, default=d.classify_max_images,
                   help=f"refuse image sets of more than N images (default {d.classify_max_images})")
    p.add_argument("--snapshot-dir", metavar="DIR", default=None,
                   help="where the server keeps its copies of the atlas database (default: the "
                        "system's temporary folder; they need the database's size)")
    p.add_argument("--refresh", metavar="S", type=_seconds, default=d.refresh,
                   help=f"look for a changed atlas every S seconds (default {d.refresh:g})")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6); raises :class:`ServeError`."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ServeError(f"cannot resolve host {host!r}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Terminated(Exception):
    """SIGTERM arrived (raised by the handler :func:`run_serve` installs)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def run_serve(args: argparse.Namespace) -> int:
    """Serve the atlas until stopped; returns the exit status: 0 when uvicorn
    stops by itself, 143 after SIGTERM. Ctrl-C (SIGINT) raises
    KeyboardInterrupt once uvicorn has shut down gracefully, which the CLI
    turns into status 130."""
    import uvicorn

    options = ServeOptions(
        classify_root=args.classify_root, classify_timeout=args.classify_timeout,
        classify_max_images=args.classify_max_images, snapshot_dir=args.snapshot_dir,
        refresh=args.refresh)
    app = create_app(args.atlas, preload=True, options=options)
    try:
        sock = bind(args.host, args.port)
    except BaseException:
        app.state.readers.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(args.host):
        log.warning("listening on %s: anyone who can reach it can read the atlas%s", args.host,
                    " and classify the image sets under the classify root"
                    if args.classify_root else "")
    print(f"serving {app.state.readers.path} on http://{shown}:{port} "
          f"(API docs: http://{shown}:{port}/docs; Ctrl-C stops)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="info", access_log=True, lifespan="on")
    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the
    # signal again with the handler it found: KeyboardInterrupt for SIGINT,
    # _Terminated for SIGTERM.
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except _Terminated:
        return EXIT_TERMINATED
    finally:
        sock.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
