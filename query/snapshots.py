"""Published snapshots of an atlas: what a long-lived reader (``serve``) reads.

A server that held ``atlas.duckdb`` open would lock every writer out for as
long as it runs (DuckDB: one writer or many readers, never both). Opening
the file per request instead costs ~45 ms each (open + close), more than a
whole search. So :class:`Snapshots` copies the database into a private
folder (a fraction of a second, under a shared lock: :func:`query.access.copy_database`),
serves that copy through one long-lived read-only connection, and takes a
new copy when the atlas file changes, at most every ``refresh`` seconds and
never more than ``max_duty`` of the time, so that a writer waits at most
one copy's duration. A copy is only taken while no writer holds the file,
so every snapshot is a committed state of the atlas.

Requests use the current snapshot through :meth:`Snapshots.use`; a replaced
snapshot is closed and deleted once its last request is done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from query.access import AtlasBusy, FileState, copy_database, lock_timeout
from query.atlas import Atlas, resolve_paths
from query.errors import AtlasError, AtlasNotFound
from query.schema import DB_FILE, INDEX_FILE

log = logging.getLogger(__name__)

DEFAULT_REFRESH_S = 2.0
DEFAULT_MAX_DUTY = 0.1  # at most this share of the time spent holding the atlas file
# Linked into each snapshot folder, so that a reader given the folder (a
# classify job) finds the atlas's index and embedder beside the copy.
LINKED = (INDEX_FILE, "embedder", "images")


class Snapshot:
    """One copy of the atlas database, open read-only, shared by the server's threads.

    ``atlas`` reads it as the atlas at its real folder (images, index and
    embedder come from there); :meth:`thread_atlas` gives each thread its own
    cursor. ``cache`` holds data derived from this snapshot (the search engine).
    """

    def __init__(self, number: int, atlas_dir: Path, folder: Path, state: FileState) -> None:
        self.number = number
        self.atlas_dir = atlas_dir
        self.folder = folder
        self.state = state
        opened = Atlas.open(folder / DB_FILE, read_only=True)  # checks the format version
        self.atlas = Atlas(atlas_dir, opened.con, read_only=True)
        self.cache: dict[str, Any] = {}
        self._cursors: list[Atlas] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False

    def thread_atlas(self) -> Atlas:
        """This thread's Atlas over the snapshot (a DuckDB connection must not
        serve two threads at once)."""
        atlas = getattr(self._local, "atlas", None)
        if atlas is None:
            with self._lock:
                if self.atlas.con is None:
                    raise AtlasError("the server is shutting down")
                atlas = Atlas(self.atlas_dir, self.atlas.con.cursor(), read_only=True)
                self._cursors.append(atlas)
            self._local.atlas = atlas
        return atlas

    def _enter(self) -> None:
        with self._lock:
            self._users += 1

    def _leave(self) -> None:
        with self._lock:
            self._users -= 1
            done = self._retired and self._users == 0
        if done:
            self._close()

    def _retire(self) -> None:
        with self._lock:
            self._retired = True
            done = self._users == 0
        if done:
            self._close()

    def _close(self) -> None:
        with self._lock:
            cursors, self._cursors = self._cursors, []
        for atlas in cursors:
            atlas.close()
        self.atlas.close()
        self.cache.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        log.debug("snapshot %d closed", self.number)


class Snapshots:
    """The atlas at ``atlas_dir`` as a sequence of published snapshots.

    The first copy is taken now (waiting, like any reader, while a writer
    holds the file; :class:`AtlasNotFound` or :class:`AtlasBusy` otherwise).
    A watcher thread takes the next ones when the file changes. Copies live
    in a new folder under ``work_dir`` (default: the system's temporary
    folder), deleted by :meth:`close`.
    """

    def __init__(
        self, atlas_dir: str | os.PathLike[str], work_dir: str | os.PathLike[str] | None = None,
        refresh: float = DEFAULT_REFRESH_S, max_duty: float = DEFAULT_MAX_DUTY,
    ) -> None:
        path, db = resolve_paths(atlas_dir)
        if not db.is_file():
            raise AtlasNotFound(f"no atlas at {atlas_dir} (missing {db})")
        if not refresh > 0 or not 0 < max_duty <= 1:
            raise AtlasError(f"bad snapshot settings: refresh {refresh}, max_duty {max_duty}")
        self.path = path.resolve()
        self.db = self.path / db.name
        self.refresh_s = refresh
        self.max_duty = max_duty
        if work_dir is not None:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="dnd-atlas-serve-", dir=work_dir))
        self._swap = threading.Lock()  # guards self.current
        self._taking = threading.Lock()  # one copy at a time
        self._stop = threading.Event()
        self._count = 0
        self._next_try = 0.0
        self.copies = 0  # snapshots taken, the first included
        self.copy_seconds = 0.0  # time spent holding the atlas file to copy it
        try:
            self.current = self._take(timeout=lock_timeout())
        except BaseException:
            shutil.rmtree(self.work, ignore_errors=True)
            raise
        self._watcher = threading.Thread(target=self._watch, name="dnd-atlas-snapshots", daemon=True)
        self._watcher.start()

    @contextlib.contextmanager
    def use(self) -> Iterator[Snapshot]:
        """The current snapshot, kept open until the block ends."""
        with self._swap:
            snap = self.current
            if snap is None:
                raise AtlasError("the server is shutting down")
            snap._enter()
        try:
            yield snap
        finally:
            snap._leave()

    def refresh(self, timeout: float = 0.0) -> bool:
        """Take a new snapshot if the atlas changed since the current one;
        returns whether it did. With ``timeout`` 0 (the watcher's way) a writer
        holding the file means "not now", not a wait."""
        try:
            state = FileState.of(self.db)
        except OSError:
            return False  # the atlas is being replaced or was removed: keep serving the last copy
        with self._taking:
            current = self.current
            if current is None or state == current.state:
                return False
            try:
                snap = self._take(timeout=timeout)
            except AtlasBusy:
                return False
        with self._swap:
            old, self.current = self.current, snap
        if old is not None:
            old._retire()
        log.info("serving snapshot %d of %s", snap.number, self.path)
        return True

    def _take(self, timeout: float) -> Snapshot:
        self._count += 1
        folder = self.work / f"snapshot-{self._count}"
        folder.mkdir()
        try:
            for name in LINKED:
                (folder / name).symlink_to(self.path / name)
            t0 = time.perf_counter()
            state = copy_database(self.db, folder / DB_FILE, timeout=timeout)
            held = time.perf_counter() - t0
            self.copies += 1
            self.copy_seconds += held
            # never hold the atlas more than max_duty of the time
            self._next_try = time.monotonic() + max(self.refresh_s, held / self.max_duty)
            return Snapshot(self._count, self.path, folder, state)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _watch(self) -> None:
        while not self._stop.wait(self.refresh_s / 4):
            if time.monotonic() < self._next_try:
                continue
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive a bad copy; the last one stays
                log.exception("could not take a new snapshot of %s; serving the last one", self.path)
                self._next_try = time.monotonic() + self.refresh_s

    def close(self) -> None:
        """Stop watching, close every snapshot and delete their folder (idempotent)."""
        self._stop.set()
        if self._watcher.is_alive() and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=30)
        with self._swap:
            old, self.current = self.current, None
        if old is not None:
            old._retire()
        shutil.rmtree(self.work, ignore_errors=True)
