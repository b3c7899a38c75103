"""A server process for the tests and ``bench/serve.py``: started, found, drained, stopped.

:func:`serving` starts ``argv`` (a ``dnd-atlas serve`` or the bench's
child), waits for the line where it says ``on http://127.0.0.1:PORT``, keeps
reading its stderr into a list (so the pipe never fills and a failing test
can show it), and on exit stops it with SIGINT as a user's Ctrl-C would,
killing it only when it does not stop in ``stop_timeout`` seconds.
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

LISTENING = re.compile(r"on (http://127\.0\.0\.1:\d+)")


@contextmanager
def serving(argv: list[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
            start_timeout: float = 300, stop_timeout: float = 120) -> Iterator[tuple[str, list[str]]]:
    """``(url, log)`` of the started server; ``log`` grows with its stderr lines.

    Raises :class:`RuntimeError` (with the log so far) when the process exits
    or stays silent about its URL for ``start_timeout`` seconds."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(env) if env is not None else None, cwd=cwd)
    log: list[str] = []
    try:
        yield _listening(proc, log, time.monotonic() + start_timeout), log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _listening(proc: subprocess.Popen, log: list[str], deadline: float) -> str:
    """The URL the server prints, then a thread that keeps reading its stderr into ``log``."""
    while True:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the server exited ({proc.wait()}) before it listened: {''.join(log)[-2000:]}")
        log.append(line)
        found = LISTENING.search(line)
        if found:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server did not say where it listens: {''.join(log)[-2000:]}")
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    return found.group(1)
