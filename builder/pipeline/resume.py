"""Resuming: one atlas holds one build's settings.

A build started again on the same ``--out`` with the same config skips the
neurons already written; with other settings it is refused. A config that
adds models with the same settings adds them: the atlas meta keeps every
model's config, so a later build of an older model with another config is
refused too.
"""

from __future__ import annotations

from typing import Any

from builder.config import BuildConfig, comparable_fingerprint
from builder.errors import BuildError
from query.writer import AtlasWriter


def with_old_models(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """``new`` with the models of ``old`` that ``new`` does not name, in
    their old order first (``check_resume`` made sure shared ones agree)."""
    if not old:
        return new
    names = {m["name"] for m in new.get("models", [])}
    kept = [m for m in old.get("models", []) if m["name"] not in names]
    return {**new, "models": kept + list(new.get("models", []))}


def check_resume(writer: AtlasWriter, cfg: BuildConfig) -> None:
    """Refuse to mix configs in one atlas: resuming needs the same settings."""
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
