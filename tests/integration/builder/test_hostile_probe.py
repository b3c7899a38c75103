"""Builds over hostile probe folders (testkit.hostile): every entry ends in a
skip counted in the build summary or one clear line with exit 2, never a
hang or a traceback; captions from Hugging Face ``metadata.jsonl``; probe
files deleted mid-build fail their neurons, and a resume over a changed probe
folder is refused naming the changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import tomli_w

from builder.config import BuildConfig
from builder.errors import BuildError
from builder.pipeline import dnd
from builder.pipeline.run import build
from builder.synthetic.probe import write_probe_set
from testkit.hostile import add_hostile_entries

N_PROBE = 40


def synthetic_probe(folder: Path) -> Path:
    return Path(write_probe_set(folder, n=N_PROBE, seed=3, progress=False))


def config(probe: Path, out: Path, models=("planted",), **sections) -> dict:
    specs = {"planted": ("planted", ["detectors"]), "cnn": ("demo-cnn", ["fc"])}
    cfg = {
        "out": str(out),
        "chunk_size": 6,
        "models": [{"name": m, "target": specs[m][0], "probe": str(probe), "layers": specs[m][1]} for m in models],
        "dissect": {"enabled": False, "similarity_options": {"target": "demo-cnn"}},
    }
    cfg.update(sections)
    return cfg


EVIDENCE = "SELECT e.model, e.source, c.text FROM evidence e LEFT JOIN captions c USING (caption_key)"


def rows(atlas: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(atlas / "atlas.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.mark.timeout(300)  # a FIFO that blocked the reader would hang the build: this fails the test instead
def test_a_hostile_probe_folder_builds_and_counts_every_skip(tmp_path):
    probe = synthetic_probe(tmp_path / "probe")
    entries = add_hostile_entries(probe / "images")
    n_read = sum(e.outcome == "read" for e in entries)
    n_skip = sum(e.outcome in ("rejected", "skipped") for e in entries)
    summary = build(BuildConfig.from_dict(config(probe, tmp_path / "atlas", models=("planted", "cnn"))))
    for m in summary.models:
        assert m.skipped_images == n_skip and m.failed == 0 and m.ok + m.dead == 18
    assert f"{n_skip} probe images skipped" in summary.text()
    atlas = tmp_path / "atlas"
    assert sorted(rows(atlas, "SELECT model, n_probe_images, n_skipped_images FROM models")) == [
        ("cnn", N_PROBE + n_read, n_skip), ("planted", N_PROBE + n_read, n_skip)]
    # the valid odd images are evidence like any other; the oracle has no caption for them
    hostile_read = {f"images/{e.name}" for e in entries if e.outcome == "read"}
    ev = rows(atlas, EVIDENCE)
    assert all(cap is None for _, src, cap in ev if src in hostile_read)
    assert all(cap is not None for _, src, cap in ev if src not in hostile_read)
    assert sum(m.missing_captions for m in summary.models) == sum(1 for _, src, _ in ev if src in hostile_read)
    # the fidelity sample (every readable image here) keeps only the images the oracle could caption
    assert set(rows(atlas, "SELECT model, value FROM layer_fidelity WHERE metric = 'sample_images'")) == {
        ("cnn", N_PROBE), ("planted", N_PROBE)}


@pytest.mark.timeout(300)
def test_the_cli_gives_one_line_and_exit_2_for_a_bad_metadata_line(tmp_path):
    probe = synthetic_probe(tmp_path / "probe")
    add_hostile_entries(probe / "images")
    (probe / "metadata.jsonl").write_text('{"file_name": "images/00000.png", "text": "a red circle"}\n{"file_name"\n')
    cfg = tmp_path / "c.toml"
    cfg.write_text(tomli_w.dumps(config(probe, tmp_path / "atlas", describe={"captioner": "precomputed"})))
    env = {**os.environ, "DND_ATLAS_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "query.cli", "--log-level", "ERROR", "build", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=280, env=env, check=False)  # no warnings about the skipped files
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and "metadata.jsonl:2: not a JSON object" in r.stderr


def test_captions_from_metadata_jsonl_and_missing_ones_skipped(tmp_path):
    src = synthetic_probe(tmp_path / "synthetic")
    probe = tmp_path / "probe"
    (probe / "part").mkdir(parents=True)
    truth = [json.loads(line) for line in (src / "captions.jsonl").read_text().splitlines()]
    meta, part_meta = [], []
    for i, rec in enumerate(truth):  # every fifth image has no caption; half the rest use "caption"
        name = Path(rec["file"]).name
        sub = i % 2 == 1
        (probe / ("part" if sub else "") / name).write_bytes((src / rec["file"]).read_bytes())
        if i % 5 == 4:
            continue
        (part_meta if sub else meta).append({"file_name": name, ("caption" if sub else "text"): rec["caption"]})
    (probe / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    (probe / "part" / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in part_meta))
    cfg = BuildConfig.from_dict(config(probe, tmp_path / "atlas", describe={"captioner": "precomputed"},
                                       crop={"enabled": False}))
    summary = build(cfg).models[0]
    assert summary.ok + summary.dead == 18 and summary.failed == 0
    want = {m["file_name"]: m["text"] for m in meta} | {f"part/{m['file_name']}": m["caption"] for m in part_meta}
    ev = [(src_, cap) for _, src_, cap in rows(tmp_path / "atlas", EVIDENCE)]
    assert {cap for src_, cap in ev if src_ in want} and all(cap == want[s] for s, cap in ev if s in want)
    assert all(cap is None for s, cap in ev if s not in want)
    assert summary.missing_captions == sum(1 for s, _ in ev if s not in want) > 0


def test_a_probe_file_deleted_after_recording_fails_its_neurons_and_the_resume_names_it(tmp_path, monkeypatch):
    probe = synthetic_probe(tmp_path / "probe")
    cfg = BuildConfig.from_dict(config(probe, tmp_path / "atlas"))
    record = dnd.record_topk
    deleted: list[str] = []

    def record_then_delete(target, probe_set, *args, **kwargs):
        records, stats = record(target, probe_set, *args, **kwargs)
        victim = probe_set.files[int(records["detectors"].top_idx[0, 0])]  # unit 0's best image
        (probe_set.root / victim).unlink()
        deleted.append(victim)
        return records, stats

    monkeypatch.setattr(dnd, "record_topk", record_then_delete)
    summary = build(cfg).models[0]
    monkeypatch.undo()
    assert summary.failed >= 1 and summary.ok + summary.dead + summary.failed == 18
    failed = rows(tmp_path / "atlas", "SELECT unit, reason FROM neurons WHERE status = 'failed'")
    assert (0, f"probe file {deleted[0]!r} vanished after recording") in failed
    assert not rows(tmp_path / "atlas", f"SELECT * FROM evidence WHERE source = '{deleted[0]}'")
    # the vanished file left the fidelity sample instead of failing the build
    assert rows(tmp_path / "atlas", "SELECT value FROM layer_fidelity WHERE metric = 'sample_images'") == [
        (N_PROBE - 1,)]

    # a resume over the changed folder is refused, naming what changed and what to do
    kept = sorted(p.name for p in (probe / "images").iterdir())
    (probe / "images" / "extra.png").write_bytes((probe / "images" / kept[0]).read_bytes())
    os.utime(probe / "images" / kept[1], ns=(1, 1))
    with pytest.raises(BuildError) as exc:
        build(cfg)
    msg = str(exc.value)
    assert "\n" not in msg and "the probe folder of model 'planted'" in msg
    assert f"1 added ('images/extra.png'), 1 removed ({deleted[0]!r}), 1 changed ('images/{kept[1]}')" in msg
    assert "restore it to resume, or build into a new --out" in msg
