"""``dnd-atlas classify``: neurons picked by description, measured as classifiers.

Declared as an entry point (``dnd_atlas.commands``); this module imports
nothing heavy at module level, so building the parser never loads torch.
"""

from __future__ import annotations

import argparse
import json
import math

from query.cli import Command


def add_classify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("atlas", help="atlas directory (or its atlas.duckdb)")
    p.add_argument("concept", nargs="?",
                   help="class name to find a classifier for, e.g. 'red'; it must name a class "
                        "folder of --images (case-insensitive, _ and - read as spaces)")
    p.add_argument("--images", required=True, metavar="LABELLED_DIR",
                   help="labelled image folder: one sub-folder per class")
    p.add_argument("--all-classes", action="store_true",
                   help="run every class folder of --images and report the mean AUROC")
    p.add_argument("--model", help="only neurons of this model")
    p.add_argument("--layer", help="only neurons of this layer")
    p.add_argument("-k", type=int, default=5,
                   help="candidate neurons measured per concept (default 5)")
    p.add_argument("--text-embedders", metavar="NAMES",
                   help="rank by the mean cosine of several text embedders, e.g. minilm,mpnet "
                        "(default: the atlas's own embedder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run_classify(args: argparse.Namespace) -> int:
    from builder.evaluation.classifier import classify, classify_all
    from query.errors import QueryError

    if args.all_classes and args.concept:
        raise QueryError("give a CONCEPT or --all-classes, not both")
    if not args.all_classes and not (args.concept or "").strip():
        raise QueryError("empty concept: give a class name, e.g. \"dog\", or --all-classes")
    if args.batch_size < 1:
        raise QueryError(f"--batch-size must be a positive integer, got {args.batch_size}")
    embedders = args.text_embedders.split(",") if args.text_embedders else None
    common = {"model": args.model, "layer": args.layer, "k": args.k, "text_embedders": embedders,
              "device": args.device, "batch_size": args.batch_size}
    if args.all_classes:
        batch = classify_all(args.atlas, args.images, **common)
        if args.json:
            _print_json(batch.to_dict())
        else:
            _print_batch(batch)
        return 0
    res = classify(args.atlas, args.concept, args.images, **common)
    if args.json:
        _print_json(res.to_dict())
    else:
        _print_one(res)
    return 0


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _run_line(run) -> str:
    line = (f"{run.n_images} labelled images in {len(run.classes)} classes from {run.images}; "
            f"ranked by {'+'.join(run.text_embedders)}; target forward {run.record_seconds:.1f} s "
            f"({run.seconds_per_1000_images:.1f} s per 1,000 images)")
    extra = []
    if run.n_skipped:
        extra.append(f"{run.n_skipped} unreadable files skipped")
    if run.n_unlabelled:
        extra.append(f"{run.n_unlabelled} images outside any class folder ignored")
    return line + ("; " + ", ".join(extra) if extra else "")


def _print_one(res) -> None:
    from query.cli import format_table

    s = res.score
    print(f"concept {s.concept!r} -> class folder {s.class_name!r}: "
          f"{s.n_positives} positives, {s.n_negatives} negatives")
    print(_run_line(res.run))
    print()
    rows = [(c.rank, "*" if c.tied_top else "", c.model, c.layer, c.unit, c.similarity, c.auroc,
             c.matched_label, " | ".join(c.labels)) for c in s.candidates]
    print(format_table(["#", "top", "model", "layer", "unit", "similarity", "AUROC", "matched",
                        "labels"], rows))
    print()
    tied = "the best neuron" if s.n_tied == 1 else f"the {s.n_tied} neurons tied at the top (*)"
    print(f"protocol AUROC ({tied}, similarity {s.top_similarity:.3f}): {_fmt(s.protocol_auroc)}")
    print(f"oracle AUROC (best of the {len(s.candidates)} candidates, chosen with the labels; "
          f"an upper bound): {_fmt(s.oracle_auroc)} ({s.oracle_neuron or '-'})")


def _print_batch(batch) -> None:
    from query.cli import format_table

    print(_run_line(batch.run))
    print()
    rows = []
    for s in batch.classes:
        best = s.candidates[0] if s.candidates else None
        rows.append((s.class_name, s.n_positives, s.n_tied,
                     best.name if best else None, best.matched_label if best else None,
                     s.top_similarity, s.protocol_auroc, s.oracle_auroc))
    print(format_table(["class", "positives", "tied", "best neuron", "matched", "similarity",
                        "protocol AUROC", "oracle AUROC"], rows))
    print()
    print(f"mean protocol AUROC over {len(batch.classes)} classes: {_fmt(batch.mean_protocol_auroc)}  "
          f"(oracle, best of k per class: {_fmt(batch.mean_oracle_auroc)})")


def _fmt(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


CLASSIFY = Command("classify", "find neurons to use as classifiers by their descriptions and measure their AUROC",
                   add_classify_arguments, run_classify, 60)
