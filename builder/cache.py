"""A content-addressed cache of expensive results, safe against kill -9.

Keys hash everything that changes a result (stage name and version, backend
config, inputs' content), never a file name alone, so a stale result is
never reused. Values are bytes in an SQLite file in WAL mode: each ``put``
commits, so a killed build keeps everything it paid for.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T", bound=Hashable)
V = TypeVar("V")

STAGE_VERSIONS = {
    "record": 1,
    "crops": 2,
    "caption": 1,
    "summarize": 1,
    "generate": 1,
    "gen-record": 1,
    "embed-image": 1,
}


def content_key(stage: str, *parts: Any) -> str:
    """sha256 over the stage name, its version and canonical JSON of ``parts``."""
    h = hashlib.sha256()
    h.update(json.dumps([stage, STAGE_VERSIONS.get(stage, 0), parts], sort_keys=True, default=str).encode())
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (for caption keys: content, not name)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ContentCache:
    """Namespaced key -> bytes store. ``enabled=False`` makes every lookup
    miss (the benchmarks' caches-off mode) while still accepting puts."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.enabled = enabled
        self._lock = threading.Lock()
        self._con = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.execute(
            "CREATE TABLE IF NOT EXISTS cache (ns TEXT, key TEXT, value BLOB, PRIMARY KEY (ns, key))"
        )
        self._con.commit()

    def get(self, ns: str, key: str) -> bytes | None:
        if not self.enabled:
            return None
        with self._lock:
            row = self._con.execute("SELECT value FROM cache WHERE ns=? AND key=?", (ns, key)).fetchone()
        return None if row is None else bytes(row[0])

    def get_many(self, ns: str, keys: list[str]) -> dict[str, bytes]:
        """Every cached value among ``keys`` (missing keys are absent)."""
        if not self.enabled or not keys:
            return {}
        out: dict[str, bytes] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                part = keys[i : i + 500]
                q = f"SELECT key, value FROM cache WHERE ns=? AND key IN ({','.join('?' * len(part))})"
                for k, v in self._con.execute(q, (ns, *part)):
                    out[k] = bytes(v)
        return out

    def put(self, ns: str, key: str, value: bytes) -> None:
        self.put_many(ns, {key: value})

    def put_many(self, ns: str, items: dict[str, bytes]) -> None:
        if not items:
            return
        with self._lock:
            self._con.executemany(
                "INSERT OR REPLACE INTO cache VALUES (?, ?, ?)", [(ns, k, v) for k, v in items.items()]
            )
            self._con.commit()

    def fetch(
        self,
        ns: str,
        keys: Mapping[T, str],
        compute: Callable[[list[T]], Sequence[V]],
        encode: Callable[[V], bytes] = lambda v: v,  # type: ignore[assignment,return-value]
        decode: Callable[[bytes], V] = lambda b: b,  # type: ignore[assignment,return-value]
    ) -> tuple[dict[T, V], set[str]]:
        """Every item's value: decoded from the cache where its key is there,
        else computed and stored. The one way the pipeline pays for a result.

        ``keys`` maps each item to its content key; items sharing a key share
        one value, computed once. ``compute(items)`` gets one item per missing
        key, in ``keys`` order, and returns their values in that order; a value
        that is an ``Exception`` is handed back but not stored, so a failure is
        retried by the next build. Returns (value per item, keys computed now).
        """
        got = self.get_many(ns, list(dict.fromkeys(keys.values())))
        by_key: dict[str, V] = {k: decode(v) for k, v in got.items()}
        first: dict[str, T] = {}
        for item, k in keys.items():
            if k not in by_key:
                first.setdefault(k, item)
        fresh: set[str] = set()
        if first:
            values = list(compute(list(first.values())))
            if len(values) != len(first):
                raise ValueError(f"{ns}: computed {len(values)} values for {len(first)} items")
            by_key.update(zip(first, values))
            fresh = set(first)
            self.put_many(ns, {k: encode(v) for k, v in zip(first, values) if not isinstance(v, Exception)})
        return {item: by_key[k] for item, k in keys.items()}, fresh

    # -- typed helpers ------------------------------------------------------
    def get_json(self, ns: str, key: str) -> Any:
        raw = self.get(ns, key)
        return None if raw is None else json.loads(raw)

    def put_json(self, ns: str, key: str, value: Any) -> None:
        self.put(ns, key, json.dumps(value).encode())

    def close(self) -> None:
        with self._lock:
            self._con.close()


def pack_arrays(**arrays: np.ndarray) -> bytes:
    """npz bytes of named arrays."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_arrays(raw: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
