"""``make bench``: benchmarks printed as ``name: value`` lines.

Every ratio compares two things measured in the same run (these machines
are noisy). Run with ``python -m bench [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import sys

from bench import (
    cold_search,
    cost,
    dictionary,
    embedder,
    fidelity,
    gpu_shapes,
    hostile,
    pipeline,
    recording,
    search,
    serve,
    site,
    worlds,
)

BENCHES = {"recording": recording.run, "search": search.run, "search_1m": search.run_large,
           "pipeline": pipeline.run, "cost": cost.run, "site": site.run, "gpu_shapes": gpu_shapes.run,
           "embedder": embedder.run, "worlds": worlds.run, "dictionary": dictionary.run,
           "cold_search": cold_search.run, "serve": serve.run, "fidelity": fidelity.run,
           "hostile": hostile.run}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these benchmarks")
    args = ap.parse_args(argv)
    for name in args.only or list(BENCHES):
        for key, value in BENCHES[name]().items():
            print(f"{key}: {value}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
