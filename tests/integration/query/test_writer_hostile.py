"""The atlas's files in a hostile world, on real DuckDB files: Ctrl-C inside
write transactions, output paths that are files or damaged databases, a
full disk (simulated here; a real one in tests/integration/builder/
test_hostile_build.py) and the CLI's one-line answers to all of them."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pytest

from query.atlas import Atlas
from query.cli import main
from query.dberrors import deferred_interrupt, is_disk_full
from query.errors import AtlasDamaged, AtlasError, AtlasWriteError, DiskFullError
from query.schema import DB_FILE
from query.writer import AtlasWriter, CandidateRow, EvidenceRow, LabelRow, NeuronResult

DIM = 8
N_CANDIDATES, N_EVIDENCE = 5, 10


def results(n: int, start: int = 0) -> list[NeuronResult]:
    """``n`` neurons with two labels, candidates and evidence each."""
    v = np.ones(DIM, dtype=np.float32) / np.sqrt(DIM)
    return [
        NeuronResult(
            "m", "l", u, "ok", None, 1.0, 0.5,
            labels=(LabelRow(1, f"concept {u}", 0.5, v), LabelRow(2, f"other {u}", 0.2, v)),
            candidates=tuple(CandidateRow(i, f"c{i}", 1.0, 0.1, 0.3, None) for i in range(N_CANDIDATES)),
            evidence=tuple(EvidenceRow(r, f"img{r}.png", None, 1.0 / r, f"images/ev/{r}.webp")
                           for r in range(1, N_EVIDENCE + 1)),
            calls={"captioner_images": (3, 1)},
        )
        for u in range(start, start + n)
    ]


def complete_neurons(atlas: Path) -> list[int]:
    """Units written, after checking each one has every row of its transaction."""
    con = duckdb.connect(str(atlas / DB_FILE), read_only=True)
    try:
        units = [u for (u,) in con.execute("SELECT unit FROM neurons ORDER BY unit").fetchall()]
        for table, per in [("labels", 2), ("candidates", N_CANDIDATES), ("evidence", N_EVIDENCE),
                           ("call_counts", 1)]:
            counts = dict(con.execute(f"SELECT unit, count(*) FROM {table} GROUP BY unit").fetchall())
            assert counts == {u: per for u in units}, (table, counts, units)
        n_vectors = con.execute("SELECT count(*) FROM label_vectors").fetchone()[0]
        assert n_vectors == 2 * len(units)
        return units
    finally:
        con.close()


def _one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dnd-atlas: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


# -- Ctrl-C -----------------------------------------------------------------------------


N_ATTEMPTS = 12
N_NEURONS = 24


def test_ctrl_c_inside_write_transactions_commits_or_rolls_back_whole(tmp_path):
    """A real SIGINT at random points of a run of per-neuron transactions:
    always a KeyboardInterrupt (never DuckDB's 'Query interrupted' or 'cannot
    rollback'), the writer still usable, every neuron whole or absent."""
    probe = tmp_path / "timing"
    t0 = time.perf_counter()
    with AtlasWriter(probe) as w:
        w.write_neurons(results(N_NEURONS))
    duration = time.perf_counter() - t0
    rng = random.Random(13)
    outcomes: Counter = Counter()
    for attempt in range(N_ATTEMPTS):
        out = tmp_path / f"a{attempt}"
        w = AtlasWriter(out)
        timer = threading.Timer(rng.uniform(0.0, duration), os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
            w.write_neurons(results(N_NEURONS))
            time.sleep(0.001)
            outcomes["finished"] += 1
        except KeyboardInterrupt:
            outcomes["interrupted"] += 1
        finally:
            timer.cancel()
            timer.join()
        w.con.execute("BEGIN TRANSACTION")  # no transaction was left open
        w.con.execute("ROLLBACK")
        w.write_neurons(results(2, start=N_NEURONS))  # and the writer still writes
        w.close()
        units = complete_neurons(out)
        assert units == sorted(units) and set(range(N_NEURONS, N_NEURONS + 2)) <= set(units)
        outcomes[f"{len(units) - 2} of {N_NEURONS} neurons"] += 0  # the spread, for a failing run's message
    print(f"\nCtrl-C inside writes: {dict(outcomes)}")
    assert outcomes["interrupted"] >= N_ATTEMPTS // 2, outcomes


def test_a_held_ctrl_c_is_raised_when_the_block_ends():
    got = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal arrives here and is held
            got.append("block finished")
    assert got == ["block finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored


# -- output folders and damaged files ---------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "devnull", "under-a-file", "db-is-a-folder"])
def test_an_output_that_cannot_hold_an_atlas_is_one_line(tmp_path, where):
    f = tmp_path / "a-file"
    f.write_text("x")
    out = {"file": f, "devnull": Path(os.devnull), "under-a-file": f / "atlas",
           "db-is-a-folder": tmp_path / "atlas"}[where]
    if where == "db-is-a-folder":
        (out / DB_FILE).mkdir(parents=True)
    with pytest.raises(AtlasWriteError) as info:
        AtlasWriter(out)
    assert len(str(info.value).splitlines()) == 1 and str(out) in str(info.value)


@pytest.fixture
def written(tmp_path) -> Path:
    out = tmp_path / "atlas"
    with AtlasWriter(out) as w:
        w.set_meta(embedder="minilm", embedder_dim=DIM, build_config={"x": 1})
        w.upsert_model("m", "planted", "p", 10, 0, {}, [("l", "linear", 40)])
        w.write_neurons(results(40))
    return out


def _damage(atlas: Path, how: str) -> None:
    db = atlas / DB_FILE
    data = db.read_bytes()
    db.write_bytes({"half": data[: len(data) // 2], "tenth": data[: len(data) // 10], "100 bytes": data[:100],
                    "empty": b"", "text": b"not a database\n" * 50}[how])


DAMAGE = ["half", "tenth", "100 bytes", "empty", "text"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_atlas_is_one_line_for_readers_and_writers(written, how):
    _damage(written, how)
    with pytest.raises(AtlasError) as info:
        with Atlas.open(written) as atlas:
            atlas.layers()
            atlas.neuron("m", "l", 3)
            atlas.sql("SELECT * FROM evidence")
    assert isinstance(info.value, (AtlasDamaged, AtlasError)) and len(str(info.value).splitlines()) == 1
    assert "damaged" in str(info.value) or "not a dnd-atlas database" in str(info.value), info.value
    with pytest.raises(AtlasError) as info:
        with AtlasWriter(written) as w:
            w.write_neurons(results(1, start=99))
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("how", ["half", "text"])
@pytest.mark.parametrize("command", [["info"], ["neuron", "l", "3", "--model", "m"], ["search", "concept"]])
def test_the_cli_reads_a_damaged_atlas_as_one_line(written, how, command, capsys):
    _damage(written, how)
    argv = [command[0], str(written), *command[1:]]
    assert main(argv) == 2
    _one_line(capsys)


# -- a full disk, simulated (a real one: tests/integration/builder/test_hostile_build.py) -----------


class _FullAfter:
    """A DuckDB connection that runs out of space after ``n`` INSERTs."""

    def __init__(self, con, n: int) -> None:
        self.con, self.left = con, n

    def execute(self, sql, *args, **kwargs):
        if sql.startswith("INSERT"):
            self.left -= 1
            if self.left < 0:
                raise duckdb.IOException('Could not write file "atlas.duckdb": No space left on device')
        return self.con.execute(sql, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.con, name)


def test_a_full_disk_mid_write_is_one_line_and_keeps_what_was_committed(tmp_path):
    out = tmp_path / "atlas"
    w = AtlasWriter(out)
    w.write_neurons(results(5))
    w.con._con = _FullAfter(w.con._con, 12)  # neurons 5 and 6 fit (6 INSERTs each), 7 does not
    with pytest.raises(DiskFullError) as info:
        try:
            w.write_neurons(results(5, start=5))
        finally:
            w.con._con = w.con._con.con
            w.close()
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "no space left" in message and "intact" in message
    assert complete_neurons(out) == list(range(7))


def test_full_disk_errors_of_every_layer_are_recognised():
    import sqlite3

    assert is_disk_full(OSError(28, "No space left on device"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert is_disk_full(duckdb.IOException('Could not write file "x": No space left on device'))
    assert is_disk_full(duckdb.FatalException(
        'FATAL Error: Failed to create checkpoint because of error: Could not write file "x": No space left on device'))
    assert not is_disk_full(OSError(13, "Permission denied"))
    assert not is_disk_full(ValueError("No space left on device"))
