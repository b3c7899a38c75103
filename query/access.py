"""Sharing one atlas file between processes: readers that never block writers.

DuckDB lets one process hold a database file read-write, or any number of
processes hold it read-only, never both at once; a second opener fails at
once with "Could not set lock on file ... Conflicting lock is held". So that
``search``, ``neuron``, ``info``, ``site`` and ``serve`` keep working while a
build, a merge or ``eval`` writes an atlas (and the other way round):

- every opener (:func:`connect`) retries a lock conflict with a bounded,
  jittered exponential backoff instead of failing, up to
  :func:`lock_timeout` seconds (``$DND_ATLAS_LOCK_TIMEOUT``), then raises
  :class:`AtlasBusy`;
- writers hold the file only while they write (``AtlasWriter.release``
  between a build's chunks), so waiting readers get in between chunks;
- a long-lived reader (``dnd-atlas serve``) never holds the atlas itself: it
  reads a private copy (:func:`copy_database`, taken in a fraction of a
  second under a shared lock) and takes a new one when the atlas changes
  (:mod:`query.snapshots`).

Opening a DuckDB file costs ~30 ms and closing it ~15 ms here (against
~1.5 ms for a query on an open connection), so readers that serve many
requests keep their connection and do not reopen per request.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from query.dberrors import GuardedConnection, db_error, os_error
from query.errors import AtlasError, AtlasWriteError

log = logging.getLogger(__name__)

LOCK_TIMEOUT_ENV = "DND_ATLAS_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 600.0  # seconds; a build's chunk or an eval's write takes far less
FIRST_DELAY = 0.01
MAX_DELAY = 0.5
_LOCK_WORDS = ("could not set lock", "conflicting lock")


class AtlasBusy(AtlasError):
    """Another process held the atlas file for longer than the lock timeout."""


@dataclass(frozen=True)
class FileState:
    """What identifies one version of an atlas file: a changed one differs."""

    inode: int
    size: int
    mtime_ns: int
    wal_size: int  # -1 when there is no write-ahead log

    @classmethod
    def of(cls, db: str | os.PathLike[str]) -> FileState:
        """The state of ``db`` and its ``.wal`` now; raises OSError when ``db`` is missing."""
        st = os.stat(db)
        try:
            wal = os.stat(f"{db}.wal").st_size
        except FileNotFoundError:
            wal = -1
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, wal)


def lock_timeout() -> float:
    """Seconds an opener waits for another process to release the atlas file:
    ``$DND_ATLAS_LOCK_TIMEOUT`` when set (0 = fail at once), else 600."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise AtlasError(f"{LOCK_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value >= 0:
        raise AtlasError(f"{LOCK_TIMEOUT_ENV} must be >= 0, got {raw!r}")
    return value


def is_lock_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is DuckDB refusing a file another process has locked."""
    text = str(exc).lower()
    return isinstance(exc, duckdb.Error) and any(w in text for w in _LOCK_WORDS)


def backoff_delays(first: float = FIRST_DELAY, cap: float = MAX_DELAY, seed: int | None = None):
    """Endless jittered exponential delays: ``first``, about twice that, ...
    up to ``cap`` (each drawn in [d/2, d], so that waiting processes do not
    retry in step)."""
    rng = random.Random(seed)
    delay = first
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(cap, delay * 2)


def connect(
    db: str | os.PathLike[str], read_only: bool, timeout: float | None = None, what: str = "",
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection to ``db``, retrying while another process holds a
    conflicting lock on it, for up to ``timeout`` seconds (default
    :func:`lock_timeout`). Raises :class:`AtlasBusy` after that, and
    :class:`AtlasError` for any other failure to open (one line each)."""
    timeout = lock_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    delays = backoff_delays()
    waited = False
    while True:
        try:
            con = duckdb.connect(str(db), read_only=read_only)
        except duckdb.Error as exc:
            if not is_lock_conflict(exc):  # damaged, read-only, full disk: one line (query.dberrors)
                raise db_error(exc, db, "open to read" if read_only else "open for writing") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise AtlasBusy(
                    f"{what or db} is held by another process (a build, merge or eval writing it?) "
                    f"and was not released within {timeout:g} s; try again later, or raise "
                    f"{LOCK_TIMEOUT_ENV}") from None
            if not waited:
                log.info("%s is locked by another process; waiting up to %g s", db, timeout)
                waited = True
            time.sleep(min(next(delays), max(left, 0.0)))
            continue
        if waited:
            log.info("%s opened after waiting for another process", db)
        return con


def attach_read_only(
    con: duckdb.DuckDBPyConnection, db: str | os.PathLike[str], alias: str,
    timeout: float | None = None, what: str = "",
) -> None:
    """``ATTACH`` ``db`` read-only to ``con`` as ``alias``, retrying while
    another process writes it, like :func:`connect` (:class:`AtlasBusy` after
    ``timeout``, default :func:`lock_timeout`)."""
    timeout = lock_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    delays = backoff_delays()
    quoted = str(db).replace("'", "''")
    while True:
        try:
            con.execute(f"ATTACH '{quoted}' AS {alias} (READ_ONLY)")
            return
        except duckdb.Error as exc:
            left = deadline - time.monotonic()
            if not is_lock_conflict(exc):
                raise
            if left <= 0:
                raise AtlasBusy(f"{what or db} is held by another process and was not released "
                                f"within {timeout:g} s; try again later, or raise {LOCK_TIMEOUT_ENV}") from None
            time.sleep(min(next(delays), max(left, 0.0)))


def copy_database(
    db: str | os.PathLike[str], dest: str | os.PathLike[str], timeout: float = 0.0,
) -> FileState:
    """Copy the DuckDB file ``db`` (and its write-ahead log, if any) to ``dest``
    while holding a read-only connection to it, so that no writer changes it
    during the copy; returns the state of the file that was copied.

    ``timeout`` (seconds, default 0: one attempt) bounds the wait for a
    writer to release the file; :class:`AtlasBusy` when it does not. The
    copy is written under a temporary name and renamed into place.
    """
    dest = Path(dest)
    con = connect(db, read_only=True, timeout=timeout)
    try:
        state = FileState.of(db)
        for suffix in ("", ".wal"):
            src = Path(f"{db}{suffix}")
            if suffix and not src.exists():
                continue
            tmp = dest.with_name(f".{dest.name}{suffix}.copying")
            shutil.copyfile(src, tmp)
            os.replace(tmp, f"{dest}{suffix}")
    finally:
        con.close()
    return state


def connect_writable(atlas_dir: Path, db: Path, images_dir: Path) -> GuardedConnection:
    """Create the atlas folder (and its images folder) and open ``db`` for
    writing; a folder that is a file, read-only, full, locked or damaged
    is a one-line AtlasError, not a traceback."""
    if atlas_dir.exists() and not atlas_dir.is_dir():
        raise AtlasWriteError(f"cannot write an atlas at {atlas_dir}: it is a file, not a folder")
    for folder in (atlas_dir, images_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, folder, "create the folder") from None
    if db.exists() and not db.is_file():
        raise AtlasWriteError(f"cannot write an atlas at {atlas_dir}: {db.name} is not a file")
    return GuardedConnection(connect(db, read_only=False, what=f"the atlas at {atlas_dir}"), db, "write")
