"""The server's snapshots of an atlas: a committed copy, replaced when the atlas
changes, never holding the atlas file longer than a copy."""

from __future__ import annotations

import time

import numpy as np
import pytest

from query.errors import AtlasNotFound
from query.snapshots import Snapshots
from query.writer import AtlasWriter, LabelRow, NeuronResult
from testkit.locks import hold

NEURONS = [
    {"model": "cnn", "layer": "conv", "unit": 0, "labels": ["red circle"]},
    {"model": "cnn", "layer": "conv", "unit": 1, "labels": ["blue sky"]},
]


def add_neuron(atlas, unit: int, text: str) -> None:
    with AtlasWriter(atlas) as w:
        vec = np.ones(384, dtype=np.float32) / np.sqrt(384)
        w.write_neurons([NeuronResult("cnn", "conv", unit, "ok", labels=(LabelRow(1, text, 0.5, vec),))])


def labels(snapshots) -> list[str]:
    with snapshots.use() as snap:
        return [r["text"] for r in snap.thread_atlas().sql("SELECT text FROM labels ORDER BY unit")]


@pytest.fixture
def snapshots(make_atlas, tmp_path):
    atlas = make_atlas(NEURONS)
    snaps = Snapshots(atlas, work_dir=tmp_path / "work", refresh=3600)  # refreshed by hand
    yield snaps
    snaps.close()


def test_a_snapshot_reads_the_atlas_and_follows_its_changes(snapshots):
    assert labels(snapshots) == ["red circle", "blue sky"]
    with snapshots.use() as snap:
        first = snap.folder
        assert snap.thread_atlas().path == snapshots.path  # images and index come from the atlas
        assert (snap.folder / "images").resolve() == snapshots.path / "images"
    assert snapshots.refresh() is False  # nothing changed: no copy
    add_neuron(snapshots.path, 2, "green grass")
    assert snapshots.refresh() is True
    assert labels(snapshots) == ["red circle", "blue sky", "green grass"]
    assert not first.exists()  # the replaced snapshot was deleted
    assert snapshots.copies == 2


def test_a_replaced_snapshot_stays_readable_until_its_last_user_leaves(snapshots):
    with snapshots.use() as old:
        add_neuron(snapshots.path, 2, "green grass")
        assert snapshots.refresh() is True
        assert old.thread_atlas().sql("SELECT count(*) AS n FROM labels")[0]["n"] == 2
        assert old.folder.exists()
    assert not old.folder.exists()
    assert labels(snapshots)[-1] == "green grass"


def test_a_writer_is_never_kept_out_and_a_busy_file_is_skipped(snapshots):
    db = snapshots.path / "atlas.duckdb"
    holder = hold(db, 4)  # a writer of another process gets in while the server serves
    try:
        t0 = time.monotonic()
        assert snapshots.refresh(timeout=0) is False  # busy: try later, do not wait
        assert time.monotonic() - t0 < 2
        assert labels(snapshots) == ["red circle", "blue sky"]  # still served
    finally:
        assert holder.wait(timeout=60) == 0
    add_neuron(snapshots.path, 2, "green grass")
    assert snapshots.refresh(timeout=0) is True


def test_the_watcher_takes_new_snapshots_by_itself(make_atlas, tmp_path):
    atlas = make_atlas(NEURONS, name="watched")
    snaps = Snapshots(atlas, work_dir=tmp_path / "w", refresh=0.2)
    try:
        add_neuron(atlas, 2, "green grass")
        deadline = time.monotonic() + 30
        while labels(snaps)[-1] != "green grass":
            assert time.monotonic() < deadline, "no new snapshot"
            time.sleep(0.05)
    finally:
        snaps.close()
    assert not snaps.work.exists()


def test_a_missing_atlas_is_refused(tmp_path):
    with pytest.raises(AtlasNotFound):
        Snapshots(tmp_path / "nothing", work_dir=tmp_path / "w")
