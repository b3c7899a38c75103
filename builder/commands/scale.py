"""Command-line handlers of scale-out builds: ``dnd-atlas merge`` and
``dnd-atlas build --ray N``.

The argument function imports nothing heavy (``query.cli`` builds every
parser on every invocation); the handlers import the builder lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from query.cli import Command


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the merged atlas: a new folder (or an empty one)")
    p.add_argument("shards", nargs="+", metavar="SHARD",
                   help="shard atlases built with --shard I/N (or atlases of other neurons, same settings)")
    p.add_argument("--json", action="store_true", help="print the merge summary as JSON")


def run_merge(args: argparse.Namespace) -> int:
    """``dnd-atlas merge OUT SHARD...``: one atlas from shard atlases."""
    from query.merge import merge_atlases

    summary = merge_atlases(args.out, args.shards)
    _print(summary, args.json)
    return 0


def run_ray_build(cfg: Any, n: int, as_json: bool = False, cache_enabled: bool = True) -> int:
    """``dnd-atlas build --ray N``: ``cfg`` (a loaded BuildConfig) as N Ray
    shard builds merged into ``cfg.out``; prints the summary, returns 0."""
    from builder.pipeline.shards import ray_build

    try:
        summary = ray_build(cfg, n, cache_enabled=cache_enabled)
    except KeyboardInterrupt:
        print(f"dnd-atlas: interrupted; run the same command again to resume the shards of {cfg.out}",
              file=sys.stderr)
        return 130
    _print(summary, as_json)
    return 0


def _print(summary: Any, as_json: bool) -> None:
    print(json.dumps(summary.to_dict(), indent=2) if as_json else summary.text())


MERGE = Command("merge", "merge shard atlases (build --shard I/N) into one atlas", add_merge_arguments, run_merge, 70)
