"""The atlas's database and files in a hostile world: their failures as
one-line :class:`~query.errors.AtlasError`s, and Ctrl-C kept out of writes.

DuckDB reports a truncated file, a full disk, a read-only folder or another
process's lock as exceptions whose text spans lines; :func:`db_error` names
what happened in one line. DuckDB also turns a Ctrl-C that lands during a
statement into ``RuntimeError: Query interrupted`` (and, landing on a
``BEGIN`` or ``COMMIT``, can leave no transaction to roll back);
:class:`deferred_interrupt` holds SIGINT until a statement or transaction is
over, so a write is either committed or rolled back, then the interrupt is
raised as the ``KeyboardInterrupt`` it was.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import duckdb

from query.errors import AtlasDamaged, AtlasError, AtlasWriteError, DiskFullError

log = logging.getLogger(__name__)

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_FULL_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded", "disk is full")
_DAMAGED_TEXT = ("not a valid duckdb database file", "could not read enough bytes", "corrupt",
                 "checksum", "failed to deserialize", "invalid database", "is not a database")
_READONLY_TEXT = ("read-only file system", "permission denied", "read only")
_LOCK_TEXT = ("conflicting lock", "could not set lock")
_INTERRUPT_TEXT = "query interrupted"


def _text(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError, a DuckDB or SQLite error) says the disk is full."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    if isinstance(exc, (duckdb.Error, sqlite3.Error, RuntimeError, OSError)):
        text = _text(exc).lower()
        return any(t in text for t in _FULL_TEXT)
    return False


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is a Ctrl-C: a KeyboardInterrupt, or DuckDB's report
    of a statement it interrupted for one."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    interrupt = getattr(duckdb, "InterruptException", ())
    if interrupt and isinstance(exc, interrupt):
        return True
    return isinstance(exc, (RuntimeError, duckdb.Error)) and _text(exc).lower().startswith(_INTERRUPT_TEXT)


def disk_full(path: str | Path, detail: str = "") -> DiskFullError:
    """The one-line error for a write that ran out of space under ``path``."""
    more = f" ({detail})" if detail else ""
    return DiskFullError(
        f"no space left on the device holding {path}{more}; everything committed before is intact: "
        "free some space and run the same command again to resume"
    )


def db_error(exc: BaseException, db: str | Path, doing: str = "use") -> AtlasError:
    """``exc``, raised while ``doing`` the atlas database ``db``, as one
    AtlasError line saying what is wrong (damaged, full disk, read-only, locked)."""
    if isinstance(exc, AtlasError):
        return exc
    first = _text(exc)
    low = first.lower()
    if is_disk_full(exc):
        return disk_full(db, first)
    if any(t in low for t in _LOCK_TEXT):
        return AtlasWriteError(f"{db} is in use by another process (a build, eval or serve); "
                               "stop it or wait for it to finish")
    if any(t in low for t in _READONLY_TEXT):
        return AtlasWriteError(f"cannot {doing} {db}: the file or its folder is read-only ({first})")
    if any(t in low for t in _DAMAGED_TEXT) or isinstance(exc, getattr(duckdb, "SerializationException", ())):
        return AtlasDamaged(f"{db} is damaged (truncated, or not a DuckDB file): {first}; "
                            "rebuild the atlas or restore a copy")
    return AtlasError(f"cannot {doing} {db}: {first}")


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
    try:
        con = duckdb.connect(str(db))
    except duckdb.Error as exc:
        raise db_error(exc, db, "open for writing") from None
    return GuardedConnection(con, db, "write")


def os_error(exc: OSError, path: str | Path, doing: str) -> AtlasError:
    """An OSError met while ``doing`` something at ``path``, as one line."""
    if is_disk_full(exc):
        return disk_full(path)
    reason = exc.strerror or _text(exc) or type(exc).__name__
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return AtlasWriteError(f"cannot {doing} {path}: {reason} (a read-only folder?)")
    return AtlasWriteError(f"cannot {doing} {path}: {reason}")


class deferred_interrupt:
    """Hold SIGINT while the block runs, then raise it (the previous handler
    gets it, as if it had just arrived). Only the main thread can hold
    signals: elsewhere this does nothing, and so does a block inside another."""

    _depth = 0  # blocks open in the main thread

    def __init__(self) -> None:
        self._old: Any = None
        self._owner = False
        self._got = False

    def __enter__(self) -> deferred_interrupt:
        if threading.current_thread() is not threading.main_thread():
            return self
        deferred_interrupt._depth += 1
        old = signal.getsignal(signal.SIGINT)
        if deferred_interrupt._depth == 1 and old is not None and old != signal.SIG_IGN:
            self._old, self._owner = old, True
            signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        self._got = True

    def __exit__(self, *exc: object) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        deferred_interrupt._depth -= 1
        if self._owner:
            signal.signal(signal.SIGINT, self._old)
            if self._got:
                log.debug("a Ctrl-C held during a database write is raised now")
                signal.raise_signal(signal.SIGINT)


class GuardedConnection:
    """A DuckDB connection whose errors are one-line AtlasErrors, and whose
    statements run with Ctrl-C held (``hold_interrupts``, for writers);
    everything else is the connection's own."""

    def __init__(self, con: duckdb.DuckDBPyConnection, db: str | Path, doing: str = "write",
                 hold_interrupts: bool = True) -> None:
        self._con = con
        self._db = db
        self._doing = doing
        self._hold = hold_interrupts

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        """``DuckDBPyConnection.execute``, with one-line errors."""
        return self._run("execute", args, kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        """``DuckDBPyConnection.executemany``, with one-line errors."""
        return self._run("executemany", args, kwargs)

    def _run(self, name: str, args: tuple, kwargs: dict) -> Any:
        with deferred_interrupt() if self._hold else contextlib.nullcontext():
            try:
                return getattr(self._con, name)(*args, **kwargs)
            except (duckdb.Error, RuntimeError) as exc:
                if is_interrupt(exc):  # DuckDB swallowed the KeyboardInterrupt: give it back
                    raise KeyboardInterrupt from exc
                if not isinstance(exc, duckdb.Error):
                    raise
                raise db_error(exc, self._db, self._doing) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)
