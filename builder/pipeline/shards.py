"""A sharded build on a Ray cluster: N shard builds as Ray tasks, then a merge.

Ray schedules the tasks (one GPU each when the driver sees CUDA, one CPU
otherwise); this module only submits them, waits, and merges. Each shard is
an ordinary resumable build into ``<out>.shards/shard-<i>``, so running the
same command again after a failure resumes every unfinished shard.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from builder.config import BuildConfig
from builder.errors import BuildError
from builder.pipeline.run import build
from query.merge import MergeSummary, merge_atlases

log = logging.getLogger(__name__)

RAY_MISSING = "Ray is not installed; install it with: pip install 'dnd-atlas[ray]'"


@dataclasses.dataclass
class RayBuildSummary:
    """The shard builds' summaries (``BuildSummary.to_dict()``) and the merge."""

    out: str
    shards: list[dict[str, Any]]
    merge: MergeSummary
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "seconds": round(self.seconds, 2), "shards": self.shards,
                "merge": self.merge.to_dict()}

    def text(self) -> str:
        """The human summary printed by ``dnd-atlas build --ray N``."""
        lines = [f"atlas written to {self.out} by {len(self.shards)} Ray shard builds in {self.seconds:.1f} s"]
        for i, s in enumerate(self.shards):
            parts = [f"{m['model']} {m['neurons']} neurons ({m['ok']} ok, {m['dead']} dead, {m['failed']} failed)"
                     for m in s["models"]]
            lines.append(f"  shard {i}: {s['seconds']:.1f} s; " + "; ".join(parts))
        lines.append("  " + self.merge.text())
        return "\n".join(lines)


def shard_dirs(out: str | Path, n_shards: int) -> list[Path]:
    """Where the shards of ``out`` are built: ``<out>.shards/shard-<i>``."""
    base = Path(f"{Path(out)}.shards")
    return [base / f"shard-{i}" for i in range(n_shards)]


def shard_configs(cfg: BuildConfig, n_shards: int, gpu: bool = False) -> list[BuildConfig]:
    """The config of each shard build: ``shard = "i/n"`` into its own folder.

    On GPUs, Ray hands each task one device as ``cuda``; a fixed ``cuda:N``
    would put every shard on the same card, so it becomes ``cuda``."""
    if n_shards < 1:
        raise BuildError(f"--ray needs at least 1 shard, got {n_shards}")
    if cfg.shard:
        raise BuildError("a Ray build makes its own shards; drop shard / --shard from the config")
    device = "cuda" if gpu and cfg.device.startswith("cuda:") else cfg.device
    return [
        dataclasses.replace(cfg, shard=f"{i}/{n_shards}", out=str(d), device=device)
        for i, d in enumerate(shard_dirs(cfg.out, n_shards))
    ]


def _build_shard(cfg_dict: dict[str, Any], cache_enabled: bool) -> dict[str, Any]:
    """One shard build, run inside a Ray worker; returns its summary dict."""
    return build(BuildConfig.from_dict(cfg_dict), cache_enabled=cache_enabled).to_dict()


def ray_build(
    cfg: BuildConfig, n_shards: int, init_kwargs: dict[str, Any] | None = None, cache_enabled: bool = True,
) -> RayBuildSummary:
    """Build ``cfg`` as ``n_shards`` Ray tasks and merge them into ``cfg.out``.

    Connects with ``ray.init(**init_kwargs)`` (a cluster named by
    ``RAY_ADDRESS``, or a new local one) unless Ray is already initialized,
    and shuts down only a Ray it started. Every shard is waited for, so the
    work of the others is kept when one fails; a failure raises one
    :class:`BuildError` naming the failed shards (run again to resume them).
    """
    try:
        import ray
    except ImportError as exc:
        raise BuildError(RAY_MISSING) from exc
    import torch

    t0 = time.perf_counter()
    if Path(cfg.out).exists() and any(Path(cfg.out).iterdir()):
        raise BuildError(f"{cfg.out} already exists and is not empty; a Ray build merges into a new --out")
    gpu = torch.cuda.is_available()
    configs = shard_configs(cfg, n_shards, gpu)
    started = not ray.is_initialized()
    if started:
        ray.init(**(init_kwargs or {}))
    try:
        resources = {"num_gpus": 1} if gpu else {"num_cpus": 1}
        task = ray.remote(max_retries=0, **resources)(_build_shard)
        refs = [task.remote(c.to_dict(), cache_enabled) for c in configs]
        index = {ref: i for i, ref in enumerate(refs)}
        log.info("submitted %d shard builds to Ray (%s each)", n_shards, "1 GPU" if gpu else "1 CPU")
        results: dict[int, dict[str, Any]] = {}
        errors: dict[int, str] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            try:
                results[i] = ray.get(done[0])
                log.info("shard %d/%d finished in %.1f s", i, n_shards, results[i]["seconds"])
            except ray.exceptions.RayError as exc:  # a RayTaskError wraps the worker's exception
                errors[i] = _first_line(getattr(exc, "cause", None) or exc)
                log.error("shard %d/%d failed: %s", i, n_shards, errors[i])
    finally:
        if started:
            ray.shutdown()
    if errors:
        i = min(errors)
        raise BuildError(
            f"{len(errors)} of {n_shards} shard builds failed (shard {i}: {errors[i]}); "
            "run the same command again to resume them"
        )
    merged = merge_atlases(cfg.out, [Path(c.out) for c in configs])
    return RayBuildSummary(cfg.out, [results[i] for i in range(n_shards)], merged, time.perf_counter() - t0)


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
    return text if isinstance(exc, BuildError) else f"{type(exc).__name__}: {text}"
