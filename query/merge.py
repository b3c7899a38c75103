"""Merging shard atlases into one atlas.

A big model is built as N shards (``dnd-atlas build --shard I/N``, one per
GPU, SLURM array task or Ray task); each shard is a complete atlas of its
share of the neurons. :func:`merge_atlases` checks that the shards were built
with the same settings, copies their rows in bulk into a new atlas (DuckDB
``ATTACH ... (READ_ONLY)`` then ``INSERT ... SELECT``), copies their
content-addressed images and the ONNX embedder a shard carries, and rebuilds
the FAISS index. Label ids are stable
hashes of (model, layer, unit, rank), so merged ids never collide and equal
those of a single-process build.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from query.errors import FormatVersionError, MergeError
from query.index import build_index
from query.onnx_embedder import ATLAS_EMBEDDER_DIR, ATLAS_META_KEY, EmbedderError, carried_meta, read_manifest
from query.schema import DB_FILE, FORMAT_VERSION, IMAGES_DIR, current_version, migrate

log = logging.getLogger(__name__)

# Meta keys that must be equal in every shard (besides build_fingerprint, compared model by model).
_SAME_META = ("labeler", "embedder", "embedder_dim", "concept_set")
# Meta keys the merged atlas computes itself.
_OWN_META = ("format_version", "index_count", "shard", "merged_from", ATLAS_META_KEY)
_NEURON_KEY = "model, layer, unit"
# Per-neuron tables compared when two shards hold the same neuron (floats rounded).
_COMPARED = {
    "neurons": "model, layer, unit",
    "labels": "model, layer, unit, rank",
    "candidates": "model, layer, unit, position",
    "evidence": "model, layer, unit, rank",
}


@dataclass
class MergeSummary:
    """What :func:`merge_atlases` wrote."""

    out: str
    shards: list[str]
    neurons: int = 0
    labels: int = 0
    images: int = 0
    overlapping: int = 0  # neurons present (identically) in more than one shard
    missing: dict[str, int] = field(default_factory=dict)  # model -> selected neurons no shard holds
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out, "shards": self.shards, "neurons": self.neurons, "labels": self.labels,
            "images": self.images, "overlapping": self.overlapping, "missing": self.missing,
            "seconds": round(self.seconds, 2),
        }

    def text(self) -> str:
        """The human summary printed by ``dnd-atlas merge``."""
        lines = [
            f"merged {len(self.shards)} shards into {self.out} in {self.seconds:.1f} s: "
            + f"{self.neurons} neurons, {self.labels} labels, {self.images} images"
        ]
        if self.overlapping:
            lines.append(f"  {self.overlapping} neurons were in more than one shard (identical; kept once)")
        for model, n in sorted(self.missing.items()):
            if n:
                lines.append(f"  warning: {model}: {n} neurons are in no shard (an unfinished or missing shard?)")
        return "\n".join(lines)


def merge_atlases(out: str | os.PathLike[str], shards: list[str | os.PathLike[str]]) -> MergeSummary:
    """Merge shard atlases (or any atlases of disjoint neurons built with the
    same settings) into the new atlas ``out``; returns what was written.

    Refuses, with one-line :class:`MergeError`s: an ``out`` that exists and is
    not an empty folder, a shard that is not an atlas, shards built with other
    settings (labeler, embedder, build fingerprint; the ``shard`` key may
    differ, and atlases of different models may be merged when every model
    they share has the same config), the same model seen on different probe
    sets, and a neuron held by two shards with different content. The atlas
    is assembled in a temporary folder beside ``out`` and renamed into place,
    so a failed merge leaves nothing behind.
    """
    t0 = time.perf_counter()
    out = Path(out)
    paths = [Path(s) for s in shards]
    if not paths:
        raise MergeError("merge needs at least one shard atlas")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out} already exists and is not empty; merge into a new folder")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise MergeError("the same shard is named twice")
    if out.resolve() in resolved:
        raise MergeError(f"{out} is one of the shards; merge into a new folder")
    metas = [_shard_meta(p) for p in paths]
    meta = _merged_meta(paths, metas)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / IMAGES_DIR).mkdir(parents=True)
    summary = MergeSummary(str(out), [str(p) for p in paths])
    try:
        con = duckdb.connect(str(tmp / DB_FILE))
        try:
            migrate(con)
            con.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [(k, json.dumps(v, sort_keys=True)) for k, v in meta.items()],
            )
            for p in paths:
                summary.overlapping += _copy_rows(con, p)
            summary.neurons = con.execute("SELECT count(*) FROM neurons").fetchone()[0]
            summary.labels = con.execute("SELECT count(*) FROM labels").fetchone()[0]
            summary.missing = _missing(con, meta.get("build_fingerprint") or {})
            build_index(tmp, con=con)
            carried = _copy_embedder(paths, str(meta.get("embedder") or ""), tmp)
            if carried:
                con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [ATLAS_META_KEY, json.dumps(carried, sort_keys=True)])
            con.execute("CHECKPOINT")
        finally:
            con.close()
        for p in paths:
            summary.images += _copy_images(p / IMAGES_DIR, tmp / IMAGES_DIR)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.seconds = time.perf_counter() - t0
    log.info("merged %d shards into %s: %d neurons", len(paths), out, summary.neurons)
    return summary


def _shard_meta(path: Path) -> dict[str, Any]:
    db = path / DB_FILE
    if not db.is_file():
        raise MergeError(f"{path} is not an atlas (no {DB_FILE})")
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error as exc:
        raise MergeError(f"cannot open {db} (is its build still running?): {str(exc).splitlines()[0]}") from exc
    try:
        version = current_version(con)
        if version > FORMAT_VERSION:
            raise MergeError(f"{path} has atlas format {version}, newer than this dnd-atlas ({FORMAT_VERSION})")
        meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta").fetchall()}
    finally:
        con.close()
    if not meta.get("build_fingerprint"):
        raise MergeError(f"{path} has no build_fingerprint in its meta: it was not written by dnd-atlas build")
    return meta


def _merged_meta(paths: list[Path], metas: list[dict[str, Any]]) -> dict[str, Any]:
    """The first shard's meta, checked against every other shard, with the
    models of all shards, their ground truth, ``shard`` = "" and ``merged_from``."""
    first = metas[0]
    fp = json.loads(json.dumps(first["build_fingerprint"]))
    config = json.loads(json.dumps(first.get("build_config") or {}))
    models = {m["name"]: m for m in fp.get("models", [])}
    config_models = {m["name"]: m for m in config.get("models", [])}
    ground_truth = dict(first.get("ground_truth") or {})
    for path, meta in zip(paths[1:], metas[1:]):
        for key in _SAME_META:
            if meta.get(key) != first.get(key):
                raise MergeError(
                    f"{path} was built with another {key} ({meta.get(key)!r}) than {paths[0]} "
                    f"({first.get(key)!r}); merge only shards of one build config"
                )
        other = meta["build_fingerprint"]
        a, b = _strip(other), _strip(fp)
        if a != b:
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise MergeError(
                f"{path} was built with other settings than {paths[0]} ({', '.join(changed)}); "
                "merge only shards of one build config"
            )
        for m in other.get("models", []):
            if m["name"] in models and models[m["name"]] != m:
                raise MergeError(
                    f"{path} holds model {m['name']!r} built with another config than {paths[0]}; "
                    "merge only shards of one build config"
                )
            models.setdefault(m["name"], m)
        for m in (meta.get("build_config") or {}).get("models", []):
            config_models.setdefault(m["name"], m)
        ground_truth.update(meta.get("ground_truth") or {})
    fp["models"] = list(models.values())
    if config:
        config["models"] = list(config_models.values())
        config["shard"] = ""
    merged = {k: v for k, v in first.items() if k not in _OWN_META}
    merged.update(
        build_fingerprint=fp, build_config=config, ground_truth=ground_truth, shard="",
        merged_from=[str(p) for p in paths],
    )
    return merged


def _copy_rows(con: duckdb.DuckDBPyConnection, shard: Path) -> int:
    """Copy one shard's rows into the merged atlas in one transaction;
    returns how many of its neurons were already there (and identical)."""
    alias = "shard_src"
    con.execute(f"ATTACH '{_sql_str(shard / DB_FILE)}' AS {alias} (READ_ONLY)")
    try:
        have = {r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog = ?", [alias]
        ).fetchall()}
        con.execute("BEGIN TRANSACTION")
        try:
            _check_models(con, alias, shard)
            con.execute(f"INSERT OR IGNORE INTO models BY NAME SELECT * FROM {alias}.models")
            con.execute(f"INSERT OR IGNORE INTO layers BY NAME SELECT * FROM {alias}.layers")
            con.execute(
                "CREATE OR REPLACE TEMP TABLE _overlap AS "
                f"SELECT {_NEURON_KEY} FROM {alias}.neurons INTERSECT SELECT {_NEURON_KEY} FROM main.neurons"
            )
            overlap = con.execute("SELECT count(*) FROM _overlap").fetchone()[0]
            if overlap:
                _check_overlap(con, alias, shard)
            fresh = f"WHERE ({_NEURON_KEY}) NOT IN (SELECT ({_NEURON_KEY}) FROM _overlap)"
            for table in ("neurons", "labels", "candidates", "evidence", "call_counts"):
                con.execute(f"INSERT INTO main.{table} BY NAME SELECT * FROM {alias}.{table} {fresh}")
            # ids are stable hashes: an overlapping neuron's vectors are already there
            con.execute(f"INSERT OR IGNORE INTO main.label_vectors BY NAME SELECT * FROM {alias}.label_vectors")
            con.execute(f"INSERT OR IGNORE INTO main.captions BY NAME SELECT * FROM {alias}.captions")
            con.execute(
                f"INSERT INTO main.stage_times BY NAME SELECT * FROM {alias}.stage_times "
                "ON CONFLICT (model, stage) DO UPDATE SET seconds = stage_times.seconds + excluded.seconds"
            )
            if "evaluations" in have and con.execute(f"SELECT count(*) FROM {alias}.evaluations").fetchone()[0]:
                log.warning("%s: evaluation results of a shard are not merged; run dnd-atlas eval on the merged atlas",
                            shard)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return overlap
    finally:
        con.execute(f"DETACH {alias}")


def _check_models(con: duckdb.DuckDBPyConnection, alias: str, shard: Path) -> None:
    """The same model must have been recorded on the same probe set with the same layers."""
    for table, key in (("models", "model"), ("layers", "model, layer")):
        model = _first_differing(con, alias, table, key)
        if model is not None:
            raise MergeError(
                f"{shard}: model {model!r} differs from the other shards in table {table} "
                "(another probe set or layers?); merge only shards of one build"
            )


def _first_differing(con: duckdb.DuckDBPyConnection, alias: str, table: str, key: str) -> str | None:
    row = con.execute(
        f"SELECT model FROM (SELECT * FROM {alias}.{table} WHERE ({key}) IN (SELECT ({key}) FROM main.{table}) "
        f"EXCEPT SELECT * FROM main.{table}) LIMIT 1"
    ).fetchone()
    return None if row is None else row[0]


def _check_overlap(con: duckdb.DuckDBPyConnection, alias: str, shard: Path) -> None:
    """A neuron held by two shards must have the same rows in both (floats to 4 places)."""
    for table, order in _COMPARED.items():
        sel = f"SELECT t.model, t.layer, t.unit, t.* FROM {{src}}.{table} t JOIN _overlap o USING ({_NEURON_KEY}) ORDER BY {order}"
        mine = _rounded(con.execute(sel.format(src=alias)).fetchall())
        theirs = _rounded(con.execute(sel.format(src="main")).fetchall())
        if mine != theirs:
            first = next((a for a, b in zip(mine, theirs) if a != b), (mine or theirs)[-1])
            raise MergeError(
                f"{shard} holds neuron {first[0]}/{first[1]}/{first[2]} with other {table} rows than an earlier "
                "shard; merge only shards of one build"
            )


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "models"}


def _rounded(rows: list[tuple]) -> list[tuple]:
    return [tuple(round(v, 4) if isinstance(v, float) else v for v in r) for r in rows]


def _missing(con: duckdb.DuckDBPyConnection, fingerprint: dict[str, Any]) -> dict[str, int]:
    """Per model: how many neurons the config selects that no shard wrote."""
    units = {m["name"]: m.get("units") or [] for m in fingerprint.get("models", [])}
    out: dict[str, int] = {}
    for model, layer, n_units in con.execute("SELECT model, layer, n_units FROM layers").fetchall():
        wanted = {u for u in units.get(model, []) if u < n_units} or set(range(n_units))
        have = {r[0] for r in con.execute(
            "SELECT unit FROM neurons WHERE model = ? AND layer = ?", [model, layer]
        ).fetchall()}
        out[model] = out.get(model, 0) + len(wanted - have)
    return out


def _copy_images(src: Path, dst: Path) -> int:
    """Copy image files whose (content-addressed) names are not in ``dst`` yet;
    hard links where the file system allows. Returns the number copied."""
    if not src.is_dir():
        return 0
    n = 0
    for root, _dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        for name in files:
            if name.startswith("."):  # a thumbnail's temp file left by a killed build
                continue
            target = dst / rel / name
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(Path(root) / name, target)
            except OSError:
                shutil.copy2(Path(root) / name, target)
            n += 1
    return n


def _copy_embedder(shards: list[Path], name: str, out: Path) -> dict[str, Any]:
    """Copy the ONNX embedder of the first shard that carries an intact one of
    embedder ``name`` into ``out``; returns its meta entry ({} when none does)."""
    for shard in shards:
        src = shard / ATLAS_EMBEDDER_DIR
        try:
            if read_manifest(src, verify=True).name != name:
                continue
        except (EmbedderError, FormatVersionError):  # none, broken or newer: another shard may do
            continue
        _copy_images(src, out / ATLAS_EMBEDDER_DIR)  # the same hard-link-or-copy of every file
        return carried_meta(out / ATLAS_EMBEDDER_DIR)
    log.warning("no shard carries an ONNX embedder of %r: searching the merged atlas needs torch "
                "(dnd-atlas export-embedder adds one)", name)
    return {}


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")
