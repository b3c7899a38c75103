"""``dnd-atlas serve``: a read-only HTTP API over one atlas (FastAPI + uvicorn).

Endpoints (JSON unless noted; the OpenAPI schema is at ``/openapi.json`` and
interactive docs at ``/docs``):

- ``GET /search?q=&k=&model=&layer=``: neurons by text concept, the objects
  ``dnd-atlas search --json`` prints;
- ``GET /models``, ``GET /layers?model=``: what the atlas holds;
- ``GET /neurons/{model}/{layer}/{unit}``: one neuron's full record (layer
  names may contain dots and slashes);
- ``POST /classify``: neurons usable as a classifier of a concept, scored on
  a folder of images on the server (needs the builder, i.e. torch; else 501);
- ``GET /images/{path}``: the atlas's thumbnails, crops and generated samples
  (image files under the atlas's ``images/`` folder only), so that the
  ``thumbnail`` and ``samples`` paths of a record resolve against the server.

Errors are ``{"detail": "<one line>"}``: 400 for a malformed request, 404 for
an unknown model, layer, unit, route, image or images folder, 422 when a parameter fails its
declared limits, 501 when searching or classifying is not available on this
machine (no torch): everything else works without torch.

FastAPI and uvicorn are imported inside the functions that need them, so the
CLI can register ``serve`` (``add_serve_arguments``) without loading them.
"""

import argparse
import ipaddress
import logging
import os
import re
import socket
import sys
import threading
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
    """The HTTP status for a library error: 404 when it names a model, layer or
    unit that does not exist, 501 when searching is not available, else 400."""
    if isinstance(exc, SearchUnavailable):
        return 501
    if isinstance(exc, QueryError) and _NOT_FOUND.search(str(exc)):
        return 404
    return 400


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _Readers:
    """Atlas handles for the server's worker threads.

    A DuckDB connection must not be used by two threads at once, so each
    thread reads through its own cursor of one read-only connection. Searches
    run one at a time on the main handle: the embedder (its tokenizer and the
    torch thread setting it changes) and the FAISS thread setting are
    process-wide, and one FAISS index is loaded, not one per thread.
    """

    def __init__(self, atlas_dir: str | os.PathLike[str]) -> None:
        from query.atlas import Atlas

        self.main = Atlas.open(atlas_dir, read_only=True)
        self.path = self.main.path
        self.search_lock = threading.Lock()
        self.classify_lock = threading.Lock()
        self._local = threading.local()
        self._opened: list[Any] = []
        self._opened_lock = threading.Lock()

    def atlas(self):
        """This thread's Atlas (a cursor of the main connection)."""
        from query.atlas import Atlas

        atlas = getattr(self._local, "atlas", None)
        if atlas is None:
            with self._opened_lock:
                if self.main.con is None:
                    raise AtlasError("the server is shutting down")
                atlas = Atlas(self.path, self.main.con.cursor(), read_only=True)
                self._opened.append(atlas)
            self._local.atlas = atlas
        return atlas

    def embedder(self):
        """The atlas's search embedder, loaded once: its ONNX embedder when it
        carries one, else sentence-transformers (``query_embedder``).

        Raises :class:`SearchUnavailable` when it cannot be loaded here (no
        ONNX embedder and no torch, the embedder package not installed): the
        rest of the API works without it.
        """
        from query.onnx_embedder import query_embedder

        name = self.main.meta.get("embedder")
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
            with self.search_lock:
                self.embedder()
        except SearchUnavailable as exc:
            log.warning("%s", exc)

    def close(self) -> None:
        with self._opened_lock:
            for atlas in self._opened:
                atlas.close()
            self._opened.clear()
            self.main.close()


def create_app(atlas_dir: str | os.PathLike[str], preload: bool = False):
    """A FastAPI app serving the atlas at ``atlas_dir`` read-only.

    Opens the atlas now, so a bad path raises :class:`query.errors.AtlasNotFound`
    (or another :class:`AtlasError`) here rather than on the first request;
    ``preload=True`` also loads the search embedder. The atlas is closed when
    the app shuts down.
    """
    import contextlib
    from typing import Annotated

    from fastapi import Body, FastAPI, Query, Request
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from query.records import LayerInfo, ModelInfo, NeuronRecord, SearchHit

    readers = _Readers(atlas_dir)
    try:
        if preload:
            readers.preload()
        images_root = (readers.path / "images").resolve()
    except BaseException:
        readers.close()
        raise

    class Error(BaseModel):
        """Every error answer: one line saying what is wrong."""

        detail: str

    class ClassifyRequest(BaseModel):
        """Find neurons that classify ``concept``, scored on the images in the
        server-side folder ``images``."""

        model_config = ConfigDict(extra="forbid")

        concept: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, pattern=NOT_BLANK,
                             description="the concept to classify, e.g. 'striped circle'")
        images: str = Field(min_length=1, max_length=MAX_PATH_CHARS,
                            description="a folder of labelled images on the server")
        model: str | None = Field(None, max_length=MAX_NAME_CHARS,
                                  description="only neurons of this model")
        layer: str | None = Field(None, max_length=MAX_NAME_CHARS,
                                  description="only neurons of this layer")
        k: int = Field(5, ge=1, le=MAX_K, description="how many neurons to return")

    class ApiError(Exception):
        def __init__(self, status: int, detail: str) -> None:
            self.status = status
            self.detail = detail

    def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
        text = {400: "malformed request", 404: "unknown model, layer, unit or file",
                422: "a parameter is outside its limits", 501: "not available on this server"}
        return {c: {"model": Error, "description": text[c]} for c in codes}

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

    # -- errors: always {"detail": str}, never a traceback --------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(AtlasError)
    async def _atlas_error(request: Request, exc: AtlasError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(exc)}, status_code=error_status(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body")]
            where = ".".join(loc)
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else
                         str(err.get("msg", "invalid")))
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    # -- endpoints -------------------------------------------------------------------

    Name = Annotated[str | None, Query(max_length=MAX_NAME_CHARS)]

    @app.get("/search", response_model=list[SearchHit], responses=errors(400, 404, 422, 501),
             summary="neurons whose labels match a text concept, best first")
    def search(
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
        with readers.search_lock:
            readers.embedder()  # 501 when it cannot load, before blaming the query
            return readers.main.search(q, k=k, model=model, layer=layer, min_fidelity=min_fidelity)

    @app.get("/models", response_model=list[ModelInfo], summary="the target models")
    def models() -> list[ModelInfo]:
        return readers.atlas().models()

    @app.get("/layers", response_model=list[LayerInfo], responses=errors(404, 422),
             summary="layers with neuron counts per status")
    def layers(model: Name = None) -> list[LayerInfo]:
        return readers.atlas().layers(model)

    # {layer:path} so that a layer name may hold slashes as well as dots; the
    # unit is the last segment.
    @app.get("/neurons/{model}/{layer:path}/{unit}", response_model=NeuronRecord,
             responses=errors(400, 404, 422),
             summary="everything the atlas knows about one neuron")
    def neuron(
        model: Annotated[str, PathParam(max_length=MAX_NAME_CHARS)],
        layer: Annotated[str, PathParam(max_length=MAX_NAME_CHARS,
                                        description="layer name, e.g. layer4.0.conv2")],
        unit: Annotated[int, PathParam(ge=0, le=MAX_UNIT)],
    ) -> NeuronRecord:
        return readers.atlas().neuron(model, layer, unit)

    @app.post("/classify", response_model=dict[str, Any], responses=errors(400, 404, 422, 501),
              summary="neurons usable as zero-training classifiers of a concept")
    def classify(request: Annotated[ClassifyRequest, Body()]) -> dict[str, Any]:
        from query.plugins import service

        try:
            run_classify = service("classify")
        except ImportError as exc:
            raise ApiError(501, f"classify needs the builder and torch: {_one_line(exc)}")
        if run_classify is None:
            raise ApiError(501, "classify is not installed on this server (pip install 'dnd-atlas[build]')")
        images = Path(request.images)  # literal: no ~ expansion on the server
        try:
            is_dir = images.is_dir()
        except (OSError, ValueError):
            is_dir = False
        if not is_dir:
            raise ApiError(404, f"no folder of images at {request.images!r} on the server")
        try:
            with readers.classify_lock:
                result = run_classify(readers.path, request.concept, images,
                                      model=request.model, layer=request.layer, k=request.k)
        except ImportError as exc:  # torch imported lazily inside
            raise ApiError(501, f"classify needs the builder and torch: {_one_line(exc)}")
        return result.to_dict()

    @app.get("/images/{path:path}", response_class=FileResponse,
             responses={200: {"content": {t: {} for t in sorted(set(IMAGE_TYPES.values()))},
                              "description": "the image file"}, **errors(404)},
             summary="an image of the atlas (thumbnail, crop, generated sample)")
    def image(path: Annotated[str, PathParam(max_length=MAX_PATH_CHARS)]) -> FileResponse:
        file = _image_file(images_root, path)
        if file is None:
            raise ApiError(404, f"no image {path!r} in the atlas")
        return FileResponse(file, media_type=IMAGE_TYPES[file.suffix.lower()],
                            headers={"X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "public, max-age=3600"})

    return app


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


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Declare ``dnd-atlas serve``'s arguments (imports nothing heavy)."""
    p.add_argument("atlas", help="atlas directory (or its atlas.duckdb)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}, this machine only; "
                        "another address exposes the atlas and /classify, which reads "
                        "server folders, to the network)")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")


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


def run_serve(args: argparse.Namespace) -> int:
    """Serve the atlas until interrupted; returns the exit status."""
    import uvicorn

    app = create_app(args.atlas, preload=True)
    try:
        sock = bind(args.host, args.port)
    except BaseException:
        app.state.readers.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(args.host):
        log.warning("listening on %s: anyone who can reach it can read the atlas and "
                    "classify images in folders of this machine", args.host)
    print(f"serving {app.state.readers.path} on http://{shown}:{port} "
          f"(API docs: http://{shown}:{port}/docs; Ctrl-C stops)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="info", access_log=True, lifespan="on")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl-C, then raises the signal again.
        pass
    finally:
        sock.close()
    return 0
