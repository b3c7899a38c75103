"""Resuming: one atlas holds one build's settings.

A build started again on the same ``--out`` with the same config skips the
neurons already written; with other settings it is refused. A config that
adds models with the same settings adds them: the atlas meta keeps every
model's config, so a later build of an older model with another config is
refused too. A model counts once it has a neuron row: what a build that
failed earlier (a typo, an empty probe folder) left of a model with none is
dropped, so the corrected config is accepted.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path
from typing import Any

from builder.config import BuildConfig, comparable_fingerprint
from builder.errors import BuildError
from builder.pipeline.records import ModelRun
from builder.probe import describe_changes
from query.writer import AtlasWriter

PROBE_META = "probe_sets"  # meta: {model: {root, files, skipped, fingerprint}} as first built
log = logging.getLogger(__name__)


def with_old_models(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """``new`` with the models of ``old`` that ``new`` does not name, in
    their old order first (``check_resume`` made sure shared ones agree)."""
    if not old:
        return new
    names = {m["name"] for m in new.get("models", [])}
    kept = [m for m in old.get("models", []) if m["name"] not in names]
    return {**new, "models": kept + list(new.get("models", []))}


def forget_unwritten(writer: AtlasWriter) -> list[str]:
    """Drop what failed earlier builds left of models that have no neuron row
    yet (ok, dead or failed): their model, layer and stage-time rows and
    their entries in the build meta, so a corrected config takes their
    place. When no model has a neuron row, the whole build meta goes (the
    atlas is as new). Returns the names of the models dropped."""
    meta = writer.meta()
    if not meta.get("build_fingerprint"):
        return []
    written = writer.models_with_neurons()
    named = {m.get("name") for m in meta["build_fingerprint"].get("models", []) if isinstance(m, dict)}
    unwritten = sorted(n for n in (named | writer.model_names()) - written if isinstance(n, str))
    writer.forget_models(unwritten)
    if not written:
        writer.delete_meta()
    elif unwritten:
        writer.set_meta(**_without_models(meta, set(unwritten)))
    if unwritten:
        log.info("no neuron of %s was written by an earlier build: its settings are not kept", ", ".join(unwritten))
    return unwritten


def _without_models(meta: dict[str, Any], models: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("build_config", "build_fingerprint"):
        if isinstance(meta.get(key), dict):
            out[key] = {**meta[key], "models": [m for m in meta[key].get("models", []) if m.get("name") not in models]}
    for key in ("ground_truth", PROBE_META):  # a dropped model's probe set is recorded anew when it is built
        if isinstance(meta.get(key), dict):
            out[key] = {k: v for k, v in meta[key].items() if k not in models}
    return out


def check_resume(writer: AtlasWriter, cfg: BuildConfig) -> None:
    """Refuse to mix configs in one atlas: resuming needs the same settings.
    Only what holds neurons counts (``forget_unwritten``): a build that
    failed before writing a model's first neuron left nothing to agree with."""
    forget_unwritten(writer)
    meta = writer.meta()
    old = meta.get("build_fingerprint")
    if not old:
        return
    if meta.get("labeler", "dnd") != cfg.labeler:
        raise BuildError(
            f"the atlas at {cfg.out} was labelled by {meta.get('labeler', 'dnd')!r}, not {cfg.labeler!r}; "
            "use a new --out"
        )
    old = comparable_fingerprint(old)
    new = cfg.redacted_fingerprint()
    old_models = {m["name"]: m for m in old.get("models", [])}
    for m in new["models"]:
        if m["name"] in old_models and old_models[m["name"]] != m:
            raise BuildError(
                f"the atlas at {cfg.out} already holds model {m['name']!r} built with another config; "
                "use a new --out, or the same config to resume"
            )
    strip = lambda d: {k: v for k, v in d.items() if k != "models"}  # noqa: E731
    if strip(old) != strip(new):
        changed = sorted(k for k in set(strip(old)) | set(strip(new)) if strip(old).get(k) != strip(new).get(k))
        raise BuildError(
            f"the atlas at {cfg.out} was built with other settings ({', '.join(changed)}); "
            "use a new --out, or the same config to resume"
        )


def build_meta(cfg: BuildConfig, old: dict[str, Any], embedder: Any) -> dict[str, Any]:
    """The meta entries every build writes: its labeler, shard, config and
    fingerprint (with the atlas's earlier models), embedder and format."""
    from query.schema import FORMAT_VERSION

    return {
        "labeler": cfg.labeler,
        "shard": cfg.shard,
        "build_config": with_old_models(cfg.redacted(), old.get("build_config")),
        "build_fingerprint": with_old_models(cfg.redacted_fingerprint(), old.get("build_fingerprint")),
        "embedder": cfg.embedder,
        "embedder_dim": int(embedder.dim),
        "dnd_atlas_format": FORMAT_VERSION,
    }


def check_probe(writer: AtlasWriter, run: ModelRun) -> None:
    """Refuse to go on with a model whose probe images changed since the
    atlas was started (its neurons would describe two probe sets, and rows
    written before would name files that are gone), in one line naming the
    files added, removed or changed. A model's first build records its probe
    set: the fingerprint of its files in the meta, their list beside the cache."""
    sets = dict(writer.meta().get(PROBE_META) or {})
    probe, fp = run.probe, run.probe.files_fingerprint()
    old = sets.get(run.name)
    if old is None:
        _save_manifest(run, fp)
        sets[run.name] = {"root": str(probe.root), "files": len(probe), "skipped": len(probe.rejected),
                          "fingerprint": fp}
        writer.set_meta(**{PROBE_META: sets})
        return
    if old.get("fingerprint") == fp:
        return
    before = _load_manifest(run, str(old.get("fingerprint")))
    if before is None:
        changes = (f"it holds {len(probe)} image files, {old.get('files')} when the atlas was started (their "
                   "list is gone with the cache, so the changes cannot be named)")
    else:
        changes = describe_changes(before, probe.manifest()) or "its files' sizes or times changed"
    raise BuildError(
        f"the probe folder of model {run.name!r} ({probe.root}) changed since the atlas at {run.cfg.out} was "
        f"started: {changes}; restore it to resume, or build into a new --out"
    )


def _manifest_path(run: ModelRun, fingerprint: str) -> Path:
    return Path(run.cache.path).parent / "probe-manifests" / f"{fingerprint[:32]}.json.gz"


def _save_manifest(run: ModelRun, fingerprint: str) -> None:
    """The probe set's files with their size and mtime, written atomically
    beside the cache, so a later resume can name what changed."""
    path = _manifest_path(run, fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(gzip.compress(json.dumps(run.probe.manifest()).encode()))
    os.replace(tmp, path)


def _load_manifest(run: ModelRun, fingerprint: str) -> dict[str, Any] | None:
    try:
        return json.loads(gzip.decompress(_manifest_path(run, fingerprint).read_bytes()))
    except (OSError, ValueError, EOFError):  # gone with the cache, or unreadable: the counts are still told
        return None
