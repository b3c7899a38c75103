"""The ``dnd-atlas`` command line: a thin layer over the library.

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a name, a help
line, a function adding its arguments and a function running it
(``run(args) -> int``). Library errors (:class:`query.errors.AtlasError`)
become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from query.errors import AtlasError

PROG = "dnd-atlas"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares it, ``run(args)`` executes it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


def lazy(spec: str) -> Callable[..., Any]:
    """A function that imports ``module:attr`` on first call and calls it.

    Lets commands owned by other packages (builder, atlas_site) register here
    without importing them, and torch with them, for every command.
    """
    module, _, attr = spec.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    call.__name__ = attr
    call.__qualname__ = spec
    return call


# -- output helpers ---------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows as an aligned plain-text table (numbers right-aligned, floats to 3 places)."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h), *(len(r[i]) for r in text)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in text]
    return "\n".join(out)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _open(path: str):
    from query.atlas import Atlas

    return Atlas.open(path, read_only=True)


# -- search -----------------------------------------------------------------------


def _add_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("atlas", help="atlas directory (or its atlas.duckdb)")
    p.add_argument("query", help="concept to search for, e.g. 'striped circle'")
    p.add_argument("-k", type=int, default=10, help="number of neurons to return (default 10)")
    p.add_argument("--model", help="only neurons of this model")
    p.add_argument("--layer", help="only neurons of this layer")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_search(args: argparse.Namespace) -> int:
    with _open(args.atlas) as atlas:
        hits = atlas.search(args.query, k=args.k, model=args.model, layer=args.layer)
    if args.json:
        _print_json([h.to_dict() for h in hits])
        return 0
    if not hits:
        print("no matching neurons")
        return 0
    rows = [
        (i, h.model, h.layer, h.unit, h.similarity, h.score, h.matched_label, " | ".join(h.labels))
        for i, h in enumerate(hits, 1)
    ]
    print(format_table(
        ["#", "model", "layer", "unit", "similarity", "score", "matched", "labels"], rows))
    return 0


# -- neuron -----------------------------------------------------------------------


def _add_neuron(p: argparse.ArgumentParser) -> None:
    p.add_argument("atlas", help="atlas directory (or its atlas.duckdb)")
    p.add_argument("layer", help="layer name")
    p.add_argument("unit", type=int, help="unit (channel) index")
    p.add_argument("--model", help="model name (needed when several models have this layer)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _run_neuron(args: argparse.Namespace) -> int:
    with _open(args.atlas) as atlas:
        rec = atlas.neuron(args.model, args.layer, args.unit)
    if args.json:
        _print_json(rec.to_dict())
        return 0
    print(f"{rec.model} / {rec.layer} / unit {rec.unit}")
    print(format_table(["field", "value"], [
        ("status", rec.status),
        ("reason", rec.reason),
        ("max activation", rec.max_activation),
        ("interpretability", rec.interpretability),
    ]))
    sections: list[tuple[str, list[str], list[Sequence[object]]]] = [
        ("labels", ["rank", "label", "concept score"],
         [(lb.rank, lb.text, lb.concept_score) for lb in rec.labels]),
        ("candidates", ["#", "concept", "topk_squared", "image_products", "score", "label rank"],
         [(c.position, c.concept, c.topk_squared, c.image_products, c.score, c.selected_rank)
          for c in rec.candidates]),
        ("evidence", ["rank", "activation", "box", "source", "caption"],
         [(e.rank, e.activation, ",".join(map(str, e.box)) if e.box else "whole",
           e.source, e.caption) for e in rec.evidence]),
        ("calls", ["stage", "calls", "cached"],
         [(stage, calls, cached) for stage, (calls, cached) in rec.calls.items()]),
    ]
    for title, headers, rows in sections:
        if rows:
            print(f"\n{title}")
            print(format_table(headers, rows))
    return 0


# -- info -------------------------------------------------------------------------


def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("atlas", help="atlas directory (or its atlas.duckdb)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def _run_info(args: argparse.Namespace) -> int:
    with _open(args.atlas) as atlas:
        s = atlas.summary()
    if args.json:
        _print_json(s)
        return 0
    print(f"atlas {s['path']}")
    print(format_table(["key", "value"], [
        (k, v if isinstance(v, (str, int, float)) else json.dumps(v))
        for k, v in s["meta"].items()
    ]))
    t = s["totals"]
    print(f"\n{t['units']} units: {t['ok']} ok, {t['dead']} dead, {t['failed']} failed; "
          f"{t['labels']} labels, {t['label_vectors']} vectors; "
          f"index {'current' if s['index']['current'] else 'missing or stale'}")
    for m in s["models"]:
        print(f"\nmodel {m['model']}")
        print(format_table(
            ["layer", "kind", "units", "ok", "dead", "failed"],
            [(li["layer"], li["kind"], li["n_units"], li["n_ok"], li["n_dead"], li["n_failed"])
             for li in m["layers"]],
        ))
        print(format_table(
            ["stage", "calls", "cached", "calls/neuron", "cached/neuron", "seconds"],
            [(stage, c["calls"], c["cached"], c["calls_per_neuron"], c["cached_per_neuron"],
              m["stage_seconds"].get(stage)) for stage, c in m["calls"].items()],
        ))
    return 0


COMMANDS: list[Command] = [
    Command("search", "find neurons whose labels match a text concept", _add_search, _run_search),
    Command("neuron", "show everything the atlas knows about one neuron", _add_neuron, _run_neuron),
    Command("info", "summarize an atlas: models, layers, statuses, call counts", _add_info,
            _run_info),
    Command("build", "run the Describe-and-Dissect pipeline and write (or resume) an atlas",
            lazy("builder.cli:add_build_arguments"), lazy("builder.cli:run_build")),
    Command("demo", "render the synthetic world and build the demo atlas, offline",
            lazy("builder.cli:add_demo_arguments"), lazy("builder.cli:run_demo")),
    Command("eval", "measure label quality (synthetic, final-layer, cosy, classifier) or --compare two atlases",
            lazy("builder.cli_eval:add_eval_arguments"), lazy("builder.cli_eval:run_eval")),
    Command("classify", "find neurons to use as classifiers by their descriptions and measure their AUROC",
            lazy("builder.cli_classify:add_classify_arguments"), lazy("builder.cli_classify:run_classify")),
    Command("merge", "merge shard atlases (build --shard I/N) into one atlas",
            lazy("builder.cli_scale:add_merge_arguments"), lazy("builder.cli_scale:run_merge")),
    Command("serve", "serve an atlas over HTTP: search, models, layers, neurons, classify, images",
            lazy("query.server:add_serve_arguments"), lazy("query.server:run_serve")),
    Command("site", "render an atlas into an mkdocs-material site (GitHub Pages ready)",
            lazy("atlas_site.cli:add_site_arguments"), lazy("atlas_site.cli:run_site")),
    # -- Commands owned by other packages ------------------------------------------------
    # `build`, `demo`, `eval`, `site` (and later `classify`, `serve`, `bench`) are added
    # HERE, one line each, with their functions imported lazily so that `query` keeps
    # importing without torch, e.g.:
    #   Command("build", "run the DnD pipeline and write an atlas",
    #           lazy("builder.cli:add_build_arguments"), lazy("builder.cli:run_build")),
    # A lazy add_arguments imports its module when the parser is built (every
    # invocation), so keep such argument modules free of heavy imports.
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Build, search, evaluate and publish Describe-and-Dissect neuron atlases.")
    parser.add_argument(
        "--log-level", default="WARNING", type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except AtlasError as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `dnd-atlas search ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
