"""The ``dnd-atlas`` command line: a thin layer over the library.

Each subcommand is a :class:`Command`: a name, a help line, a function
adding its arguments and a function running it (``run(args) -> int``).
``query`` declares ``search``, ``neuron``, ``info`` and ``serve``; the
builder and the site add theirs through entry points (``query.plugins``). Library errors (:class:`query.errors.AtlasError`)
become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from query.errors import AtlasError

PROG = "dnd-atlas"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` declares it, ``run(args)`` executes it.

    ``order`` places it in ``--help``. Other packages add commands by naming a
    ``Command`` in the ``dnd_atlas.commands`` entry-point group
    (``query.plugins``); their modules import nothing heavy at import time,
    since every invocation builds every command's parser."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    order: int = 100


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
    p.add_argument("--min-fidelity", type=float, metavar="R",
                   help="only labels whose fidelity correlation is at least R (how well the label predicts "
                        "the neuron's activation over the probe set)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_search(args: argparse.Namespace) -> int:
    with _open(args.atlas) as atlas:
        hits = atlas.search(args.query, k=args.k, model=args.model, layer=args.layer,
                            min_fidelity=args.min_fidelity)
    if args.json:
        _print_json([h.to_dict() for h in hits])
        return 0
    if not hits:
        print("no matching neurons")
        return 0
    rows = [
        (i, h.model, h.layer, h.unit, h.similarity, h.fidelity_correlation, h.score, h.matched_label,
         " | ".join(h.labels))
        for i, h in enumerate(hits, 1)
    ]
    print(format_table(
        ["#", "model", "layer", "unit", "similarity", "fidelity", "score", "matched", "labels"], rows))
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
        ("dropped crops", rec.dropped_crops),
    ]))
    sections: list[tuple[str, list[str], list[Sequence[object]]]] = [
        ("labels", ["rank", "label", "concept score", "fidelity r", "fidelity AUPRC"],
         [(lb.rank, lb.text, lb.concept_score, lb.fidelity_correlation, lb.fidelity_auprc) for lb in rec.labels]),
        ("candidates", ["#", "concept", "topk_squared", "image_products", "score", "fidelity r", "label rank",
                        "from"],
         [(c.position, c.concept, c.topk_squared, c.image_products, c.score, c.fidelity_correlation,
           c.selected_rank, c.source) for c in rec.candidates]),
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
            ["layer", "kind", "units", "ok", "dead", "failed", "fidelity r", "chance r"],
            [(li["layer"], li["kind"], li["n_units"], li["n_ok"], li["n_dead"], li["n_failed"],
              li["fidelity"].get("label_correlation"), li["fidelity"].get("shuffled_correlation"))
             for li in m["layers"]],
        ))
        print(format_table(
            ["stage", "calls", "cached", "calls/neuron", "cached/neuron", "seconds"],
            [(stage, c["calls"], c["cached"], c["calls_per_neuron"], c["cached_per_neuron"],
              m["stage_seconds"].get(stage)) for stage, c in m["calls"].items()],
        ))
    return 0


def _add_serve(p: argparse.ArgumentParser) -> None:
    from query.server import add_serve_arguments

    add_serve_arguments(p)


def _run_serve(args: argparse.Namespace) -> int:
    from query.server import run_serve

    return run_serve(args)


COMMANDS: list[Command] = [
    Command("search", "find neurons whose labels match a text concept", _add_search, _run_search, 10),
    Command("neuron", "show everything the atlas knows about one neuron", _add_neuron, _run_neuron, 20),
    Command("info", "summarize an atlas: models, layers, statuses, call counts", _add_info, _run_info, 30),
    Command("serve", "serve an atlas over HTTP: search, models, layers, neurons, classify, images",
            _add_serve, _run_serve, 90),
]


def all_commands() -> list[Command]:
    """This package's commands and those other installed packages add, in
    help order; a name declared twice is an error."""
    from query.plugins import plugin_commands

    commands = COMMANDS + plugin_commands()
    names = [c.name for c in commands]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AtlasError(f"command {dup[0]!r} is declared twice (reinstall dnd-atlas)")
    return sorted(commands, key=lambda c: (c.order, c.name))


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (like every other error)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command (:func:`all_commands`)."""
    parser = _Parser(
        prog=PROG, description="Build, search, evaluate and publish Describe-and-Dissect neuron atlases.")
    parser.add_argument(
        "--log-level", default="WARNING", type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in all_commands():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    try:
        parser = build_parser()
    except AtlasError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
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
    except ModuleNotFoundError as exc:  # an optional dependency of this command is not installed
        print(f"{PROG}: error: {args.command} needs the Python package {exc.name!r}, which is not "
              "installed here (pip install 'dnd-atlas[build]' installs the builder's)", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # e.g. `dnd-atlas search ... | head`
        sys.stderr.close()
        return 0
    except (OSError, RuntimeError, *_db_errors()) as exc:  # the files of a hostile world: one line
        return _environment_error(exc, args.command)


def _db_errors() -> tuple[type[BaseException], ...]:
    """DuckDB's and SQLite's (the content cache) error classes, imported
    only when an error is on its way out."""
    import sqlite3

    import duckdb

    return (duckdb.Error, sqlite3.Error)


def _environment_error(exc: BaseException, command: str) -> int:
    """An OSError or a database error no library code translated (a full disk,
    a read-only or damaged file), or DuckDB's report of a Ctrl-C: one line.
    Anything else (a RuntimeError, an SQLite error other than a full disk)
    is a bug and keeps its traceback."""
    import duckdb

    from query.dberrors import db_error, disk_full, is_disk_full, is_interrupt

    if is_interrupt(exc):
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if is_disk_full(exc):
        message = str(disk_full(getattr(exc, "filename", None) or "the output"))
    elif isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        message = f"{command}: {exc.strerror or type(exc).__name__}{where}"
    elif isinstance(exc, duckdb.Error):
        message = str(db_error(exc, "the atlas database"))
    else:
        raise exc
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
