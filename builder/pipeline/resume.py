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

import logging
from typing import Any

from builder.config import BuildConfig, comparable_fingerprint
from builder.errors import BuildError
from query.writer import AtlasWriter

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
    if isinstance(meta.get("ground_truth"), dict):
        out["ground_truth"] = {k: v for k, v in meta["ground_truth"].items() if k not in models}
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
