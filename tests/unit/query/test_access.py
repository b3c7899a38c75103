"""Opening an atlas file another process holds: bounded waits, never a lock error
while the holder lets go in time; copies taken under a shared lock; a writer
that releases the file between writes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from query.access import (
    LOCK_TIMEOUT_ENV,
    AtlasBusy,
    FileState,
    backoff_delays,
    connect,
    copy_database,
    is_lock_conflict,
    lock_timeout,
)
from query.errors import AtlasError
from query.writer import AtlasWriter
from testkit.locks import hold, readable_elsewhere


@pytest.fixture
def db(tmp_path) -> Path:
    path = tmp_path / "atlas.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE t AS SELECT range AS i FROM range(1000)")
    con.close()
    return path


def test_a_reader_waits_for_a_writer_that_lets_go(db):
    holder = hold(db, 1.5)
    t0 = time.monotonic()
    con = connect(db, read_only=True, timeout=60)
    waited = time.monotonic() - t0
    try:
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 1000
    finally:
        con.close()
    assert holder.wait(timeout=30) == 0
    assert 0.5 < waited < 30


def test_a_writer_waits_for_readers_and_gives_up_after_the_timeout(db):
    holder = hold(db, 30, mode="ro")
    try:
        t0 = time.monotonic()
        with pytest.raises(AtlasBusy, match=f"not released within 0.5 s.*{LOCK_TIMEOUT_ENV}"):
            connect(db, read_only=False, timeout=0.5, what="the atlas at X")
        assert time.monotonic() - t0 < 10
        # readers share the file with each other at once
        connect(db, read_only=True, timeout=0).close()
    finally:
        holder.kill()
        holder.wait()


def test_other_open_failures_are_not_retried(tmp_path):
    bad = tmp_path / "not-a-db.duckdb"
    bad.write_bytes(b"this is not a database" * 100)
    t0 = time.monotonic()
    with pytest.raises(AtlasError, match="is damaged") as err:
        connect(bad, read_only=True, timeout=60)
    assert not isinstance(err.value, AtlasBusy)
    assert time.monotonic() - t0 < 10
    assert not is_lock_conflict(ValueError("Could not set lock on file"))


def test_lock_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(LOCK_TIMEOUT_ENV, raising=False)
    assert lock_timeout() == 600
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "2.5")
    assert lock_timeout() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(LOCK_TIMEOUT_ENV, bad)
        with pytest.raises(AtlasError, match=LOCK_TIMEOUT_ENV):
            lock_timeout()


def test_backoff_grows_to_its_cap_with_jitter():
    delays = backoff_delays(first=0.01, cap=0.5, seed=0)
    got = [next(delays) for _ in range(12)]
    assert 0.005 <= got[0] <= 0.01
    assert all(0.25 <= d <= 0.5 for d in got[7:])  # 0.01 * 2**6 > 0.5: capped
    assert len(set(got)) == len(got)  # jittered, so that waiting processes do not retry in step


def test_copy_database_copies_a_committed_state_with_its_wal(db, tmp_path):
    crash = ("import duckdb, os, sys; con = duckdb.connect(sys.argv[1]); "
             "con.execute(\"SET checkpoint_threshold = '1GB'\"); "
             "con.execute('INSERT INTO t VALUES (-1)'); os._exit(0)")
    subprocess.run([sys.executable, "-c", crash, str(db)], check=True, timeout=120)
    assert Path(f"{db}.wal").exists()  # a writer died before checkpointing
    state = copy_database(db, tmp_path / "copy.duckdb")
    assert state == FileState.of(db)
    con = duckdb.connect(str(tmp_path / "copy.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 1001
    finally:
        con.close()
    holder = hold(db, 30)
    try:
        with pytest.raises(AtlasBusy):
            copy_database(db, tmp_path / "again.duckdb", timeout=0)
        assert not (tmp_path / "again.duckdb").exists()
    finally:
        holder.kill()
        holder.wait()


def test_file_state_changes_with_a_write(db):
    before = FileState.of(db)
    con = duckdb.connect(str(db))
    con.execute("INSERT INTO t VALUES (5000)")
    con.close()
    assert FileState.of(db) != before


def test_the_writer_lets_readers_in_between_writes(tmp_path):
    atlas = tmp_path / "atlas"
    writer = AtlasWriter(atlas)
    try:
        db = atlas / "atlas.duckdb"
        assert not readable_elsewhere(db)
        writer.release()
        assert readable_elsewhere(db)
        writer.set_meta(note="written after a release")  # opens the file again
        assert not readable_elsewhere(db)
        writer.release()
        holder = hold(db, 1.0, mode="ro")
        writer.set_meta(note="written while a reader held the file")  # waits for it
        assert holder.wait(timeout=30) == 0
        assert writer.meta()["note"] == "written while a reader held the file"
    finally:
        writer.close()
    assert readable_elsewhere(atlas / "atlas.duckdb")


def test_attach_waits_for_a_writer_and_gives_up_after_the_timeout(db, tmp_path):
    from query.access import attach_read_only

    con = duckdb.connect(str(tmp_path / "merged.duckdb"))
    try:
        holder = hold(db, 1.5)
        attach_read_only(con, db, "src", timeout=60)  # the merge waits for the shard's build
        assert con.execute("SELECT count(*) FROM src.t").fetchone()[0] == 1000
        con.execute("DETACH src")
        assert holder.wait(timeout=30) == 0
        holder = hold(db, 30)
        try:
            with pytest.raises(AtlasBusy, match="not released within 0.3 s"):
                attach_read_only(con, db, "src", timeout=0.3, what="shard X")
        finally:
            holder.kill()
            holder.wait()
    finally:
        con.close()
