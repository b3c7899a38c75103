"""A bounded HTTP load for the server's tests and ``bench/serve.py``.

``clients`` threads, each on its own keep-alive connection, send GET
requests from a list of paths (client ``i`` takes paths ``i``, ``i +
clients``, ...) until ``seconds`` pass or ``max_requests`` are sent, and
record each request's latency and whether it failed (a status other than
200, a body the check refuses, or a network error). Loopback only.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LoadResult:
    """What a load measured: requests, failures and latencies (ms)."""

    requests: int
    errors: int
    seconds: float
    latencies_ms: tuple[float, ...] = field(repr=False)
    failures: tuple[str, ...] = field(default=(), repr=False)  # the first few, for messages

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def lines(self, prefix: str) -> dict[str, str]:
        """``name: value`` lines for the bench."""
        return {f"{prefix}_rps": f"{self.rps:.1f}", f"{prefix}_p50_ms": f"{self.percentile(50):.1f}",
                f"{prefix}_p95_ms": f"{self.percentile(95):.1f}", f"{prefix}_requests": str(self.requests),
                f"{prefix}_errors": str(self.errors)}


def load(
    base_url: str, paths: Sequence[str], clients: int = 20, seconds: float = 10.0,
    max_requests: int = 100_000, check: Callable[[str, Any], bool] | None = None,
    stop: threading.Event | None = None,
) -> LoadResult:
    """Run the load (see the module doc) against ``base_url``
    (``http://127.0.0.1:PORT``); ``check(path, parsed_json)`` may refuse an
    answer; ``stop`` ends it early when set."""
    url = urllib.parse.urlsplit(base_url)
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the load runs on loopback only, not {url.hostname}")
    deadline = time.monotonic() + seconds
    budget = threading.Semaphore(max_requests)
    results: list[tuple[list[float], list[str]]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        times, failed = [], []
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        j = i
        while time.monotonic() < deadline and not (stop and stop.is_set()) and budget.acquire(False):
            path = paths[j % len(paths)]
            j += clients
            t0 = time.perf_counter()
            problem = _request(conn, path, check)
            times.append((time.perf_counter() - t0) * 1000)
            if problem:
                failed.append(f"{path}: {problem}")
                conn.close()
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.close()
        with lock:
            results.append((times, failed))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies = tuple(x for times, _ in results for x in times)
    failures = [f for _, failed in results for f in failed]
    return LoadResult(len(latencies), len(failures), wall, latencies, tuple(failures[:20]))


def _request(conn: http.client.HTTPConnection, path: str, check) -> str:
    """"" when the answer is good, else what was wrong."""
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    if resp.status != 200:
        return f"status {resp.status}: {body[:200]!r}"
    if check is not None:
        try:
            ok = check(path, json.loads(body))
        except ValueError:
            ok = False
        if not ok:
            return f"refused by the check: {body[:200]!r}"
    return ""
