"""``dnd-atlas build`` and ``dnd-atlas demo``: argument handling only.

Declared as entry points (``dnd_atlas.commands`` in pyproject.toml); the
argument functions import nothing heavy, so ``dnd-atlas search`` never loads
torch; the handlers import the pipeline when they run.
"""

from __future__ import annotations

import argparse
import json
import sys

from query.cli import Command

DEMO_SEARCHES = ("red circle", "striped pattern", "checkered")


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML build config (see README: Configuration)")
    p.add_argument("--preset", help="a shipped config: resnet50-imagenet, resnet18-places365, vit-b16-imagenet")
    p.add_argument("--probe", help="probe image folder for every model (overrides the config)")
    p.add_argument("--out", help="atlas directory (overrides the config's `out`)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the config)")
    p.add_argument("--dtype", help="target precision: auto, float32, float16, bfloat16 (overrides the config)")
    p.add_argument("--shard", metavar="I/N", help="build only the I-th of N deterministic shares of the neurons")
    p.add_argument("--ray", type=int, metavar="N",
                   help="build as N shards on a Ray cluster (RAY_ADDRESS, or a local one) and merge them into --out")
    p.add_argument("--labeler", choices=["dnd", "clip-dissect"],
                   help="dnd (default) or the CLIP-Dissect baseline (overrides the config)")
    p.add_argument("--concepts", help="concept list for --labeler clip-dissect (a file, or a name in data/concepts)")
    p.add_argument("--dry-run", action="store_true",
                   help="list layers, neuron counts and expected calls per stage without loading weights")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set record.top_k=20 (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="ignore cached results (still writes them)")
    p.add_argument("--json", action="store_true", help="print the build summary as JSON")


def run_build(args: argparse.Namespace) -> int:
    from builder.config import load_config
    from builder.errors import ConfigError
    from builder.pipeline.run import build

    overrides = list(args.overrides)
    for key in ("out", "device", "dtype", "labeler", "shard"):
        if getattr(args, key):
            overrides.append(f"{key}={json.dumps(getattr(args, key))}")
    if args.concepts:
        overrides.append(f"clip_dissect.concepts={json.dumps(args.concepts)}")
    if not args.config and not args.preset and not overrides:
        raise ConfigError("build needs --config FILE.toml or --preset NAME")
    cfg = load_config(args.config, overrides, args.preset)
    if args.probe:
        import dataclasses

        cfg = dataclasses.replace(cfg, models=tuple(dataclasses.replace(m, probe=args.probe) for m in cfg.models))
    if args.dry_run:
        from builder.pipeline.plan import plan, plan_text

        p = plan(cfg)
        print(json.dumps(p, indent=2) if args.json else plan_text(p))
        return 0
    if args.ray:
        from builder.commands.scale import run_ray_build

        return run_ray_build(cfg, args.ray, as_json=args.json, cache_enabled=not args.no_cache)
    return _run(lambda: build(cfg, cache_enabled=not args.no_cache), args.json, cfg.out)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="folder for the probe set and the atlas (default: demo)")
    p.add_argument("--probe-images", type=int, default=5000, help="synthetic probe images (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic probe set")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the demo build (repeatable)")
    p.add_argument("--json", action="store_true", help="print the build summary as JSON")
    p.add_argument("--no-site", dest="site", action="store_false", help="do not build the demo's static site")


def run_demo(args: argparse.Namespace) -> int:
    from builder.demo import run_demo as demo

    if args.probe_images < 20:
        from builder.errors import ConfigError

        raise ConfigError("--probe-images must be at least 20")
    rc = _run(lambda: demo(args.out, args.probe_images, args.seed, args.overrides), args.json, args.out)
    if rc != 0 or args.json:
        return rc
    _print_examples(f"{args.out}/atlas")
    if args.site:
        import shlex

        from atlas_site.build import SITE_DIR, build_site

        # The demo folder also holds the atlas and probe set: only project/ and site/ are the site's.
        site = build_site(f"{args.out}/atlas", args.out, site_name="dnd-atlas demo", shared=True)
        print(f"\nthe demo site is in {site.parent / SITE_DIR}; open it with:\n"
              f"  python -m http.server -d {shlex.quote(str(site.parent / SITE_DIR))}  (then http://127.0.0.1:8000/)")
    return rc


def _print_examples(atlas: str) -> None:
    from query import Atlas

    print(f"\nthe demo atlas is in {atlas}; try:")
    with Atlas.open(atlas) as a:
        for q in DEMO_SEARCHES:
            print(f"\n  dnd-atlas search {atlas} \"{q}\" -k 3")
            for hit in a.search(q, k=3):
                print(f"    {hit.model}/{hit.layer}/{hit.unit}: {'; '.join(hit.labels)}  (similarity {hit.similarity:.2f})")


def _run(work, as_json: bool, out: str) -> int:
    from query.dberrors import disk_full, is_disk_full, is_interrupt

    try:
        summary = work()
    except BaseException as exc:
        if is_interrupt(exc):  # Ctrl-C, or DuckDB's "Query interrupted" for one
            print(f"dnd-atlas: interrupted; run the same command again to resume {out}", file=sys.stderr)
            return 130
        if is_disk_full(exc):  # an image, the content cache or the atlas: one line, data intact
            raise disk_full(out) from exc
        raise
    print(json.dumps(summary.to_dict(), indent=2) if as_json else summary.text())
    return 0


BUILD = Command("build", "run the Describe-and-Dissect pipeline and write (or resume) an atlas",
                add_build_arguments, run_build, 40)
DEMO = Command("demo", "render the synthetic world and build the demo atlas, offline",
               add_demo_arguments, run_demo, 45)
