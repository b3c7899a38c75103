"""``dnd-atlas export-embedder``: give an atlas built before the ONNX embedder its own.

Declared as an entry point (``dnd_atlas.commands``); the argument function
imports nothing heavy, the handler imports the exporter (torch) when it runs.
"""

from __future__ import annotations

import argparse
import json

from query.cli import Command

QUANTIZE_CHOICES = ("", "dynamic", "weights")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("atlas", help="atlas directory (or its atlas.duckdb)")
    p.add_argument("--quantize", default="", choices=QUANTIZE_CHOICES, metavar="MODE",
                   help="'' for fp32 (default), 'dynamic' (int8, 4x smaller) or 'weights' "
                        "(int8 weights, float compute; closer to fp32)")
    p.add_argument("--force", action="store_true", help="export again even when the atlas's embedder is current")
    p.add_argument("--json", action="store_true", help="print the embedder's meta entry as JSON")


def run_export(args: argparse.Namespace) -> int:
    """Export the embedder the atlas's meta names into ``ATLAS/embedder/``."""
    from builder.atlas_embedder import export_atlas_embedder

    entry = export_atlas_embedder(args.atlas, args.quantize, force=args.force)
    if args.json:
        print(json.dumps(entry, indent=2))
        return 0
    print(f"{args.atlas}: carries ONNX embedder {entry['name']} ({entry['quantization'] or 'fp32'}, "
          f"{entry['bytes'] / 1e6:.1f} MB in {entry['path']}/); searching it needs no torch")
    return 0


EXPORT_EMBEDDER = Command("export-embedder", "add the ONNX embedder (search without torch) to an atlas",
                          add_export_arguments, run_export, 75)
