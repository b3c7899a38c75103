"""``dnd-atlas eval``: run evaluation protocols on an atlas, or compare two.

Declared as an entry point (``dnd_atlas.commands``); the argument function
imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from query.cli import Command

PROTOCOL_CHOICES = ("synthetic", "final-layer", "cosy", "classifier", "fidelity")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("atlas", nargs="?", help="atlas directory")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("ATLAS_A", "ATLAS_B"),
        help="run the protocol(s) on two atlases and show the metrics side by side",
    )
    p.add_argument(
        "--protocol",
        action="append",
        choices=PROTOCOL_CHOICES,
        dest="protocols",
        help="synthetic, final-layer, cosy, classifier or fidelity (repeatable; default: synthetic when "
        "the atlas has ground truth, else final-layer)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--units", action="store_true", help="also list every evaluated unit")
    p.add_argument(
        "--no-save",
        dest="store",
        action="store_false",
        help="do not write the metrics into the atlas's evaluations table",
    )
    p.add_argument("--model", help="evaluate only this model")
    p.add_argument("--layer", help="evaluate only this layer (final-layer: the output layer)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the build's device)")
    g = p.add_argument_group("final-layer")
    g.add_argument("--class-names", metavar="FILE", help="class names, one per line in unit order")
    g.add_argument(
        "--clip-model",
        default="openai/clip-vit-base-patch16",
        metavar="PATH_OR_ID",
        help="CLIP whose text encoder gives the CLIP cosine (default openai/clip-vit-base-patch16)",
    )
    g.add_argument("--no-clip", action="store_true", help="skip the CLIP cosine")
    g.add_argument(
        "--no-mpnet",
        action="store_true",
        help="skip the MPNet cosine (and the top-1/top-5 match it ranks by)",
    )
    g = p.add_argument_group("cosy")
    g.add_argument(
        "--images-per-label",
        type=int,
        default=10,
        metavar="Q",
        help="images generated per label, the unit's and each control label's (default 10)",
    )
    g.add_argument("--max-units", type=int, metavar="N", help="sample at most N units per layer")
    g.add_argument(
        "--control-labels",
        type=int,
        default=10,
        metavar="N",
        help="labels in each layer's control pool (default 10)",
    )
    g.add_argument(
        "--control-threshold",
        type=float,
        default=0.5,
        metavar="COS",
        help="drop control labels at least this similar to the unit's label (default 0.5)",
    )
    g.add_argument(
        "--generator",
        metavar="SPEC",
        help="text-to-image generator (registered name or module:callable; default: the build's)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the unit sample and the control pool"
    )
    g = p.add_argument_group("fidelity")
    g.add_argument("--sample-size", type=int, default=500, metavar="N",
                   help="held-out probe images per model, disjoint from the build's sample (default 500)")
    g.add_argument("--fidelity-seed", type=int, default=1, help="seed of the held-out sample (default 1)")
    g.add_argument("--random-concepts", metavar="FILE", default="",
                   help="concept list the random-label baseline draws from (default data/concepts/common-visual.txt)")
    g = p.add_argument_group("classifier")
    g.add_argument("--images", metavar="DIR", help="labelled images (one folder per class)")
    g.add_argument(
        "--k", type=int, default=5, help="classifier: the k passed to classify_all (default 5)"
    )


def _options(args: argparse.Namespace):
    from builder.evaluation.suite import EvalOptions

    return EvalOptions(
        mpnet=not args.no_mpnet,
        clip_model=None if args.no_clip else args.clip_model,
        class_names_file=args.class_names,
        model=args.model,
        layer=args.layer,
        device=args.device,
        generator=args.generator,
        images_per_label=args.images_per_label,
        max_units=args.max_units,
        control_labels=args.control_labels,
        control_threshold=args.control_threshold,
        seed=args.seed,
        images=args.images,
        k=args.k,
        sample_size=args.sample_size,
        fidelity_seed=args.fidelity_seed,
        concepts=args.random_concepts,
        store=args.store,
    )


def run_eval(args: argparse.Namespace) -> int:
    from builder.errors import BuildError
    from builder.evaluation.suite import (
        compare_metrics,
        default_protocol,
        has_ground_truth,
        run_protocols,
    )

    opts = _options(args)
    if args.compare:
        if args.atlas:
            raise BuildError("eval: give ATLAS or --compare ATLAS_A ATLAS_B, not both")
        a_dir, b_dir = args.compare
        protocols = args.protocols or (
            ["synthetic"]
            if has_ground_truth(a_dir) and has_ground_truth(b_dir)
            else ["final-layer"]
        )
        res_a = run_protocols(a_dir, protocols, opts)
        res_b = run_protocols(b_dir, protocols, opts)
        out_a, out_b = _output(res_a, args.units), _output(res_b, args.units)
        rows = compare_metrics(_shown(res_a), _shown(res_b))
        if args.json:
            print(json.dumps({"a": out_a, "b": out_b, "metrics": rows}, indent=2))
        else:
            print(compare_table(rows, a_dir, b_dir))
        return 0
    if not args.atlas:
        raise BuildError("eval needs an ATLAS directory, or --compare ATLAS_A ATLAS_B")
    protocols = args.protocols or [default_protocol(args.atlas)]
    results = run_protocols(args.atlas, list(dict.fromkeys(protocols)), opts)
    if args.json:
        print(json.dumps(_output(results, args.units), indent=2))
        return 0
    for protocol, res in results.items():
        print(TEXT[protocol](res, args.units))
    return 0


def _strip_units(obj: Any) -> Any:
    """A result without its per-unit lists (``--units`` keeps them)."""
    if isinstance(obj, dict):
        return {
            k: _strip_units(v)
            for k, v in obj.items()
            if not (k in ("units", "per_unit") and isinstance(v, list))
        }
    if isinstance(obj, list):
        return [_strip_units(v) for v in obj]
    return obj


def _output(results: dict[str, dict[str, Any]], units: bool) -> dict[str, Any]:
    """The JSON of a run: the synthetic protocol's keys at the top level
    (``final_layer``, ``planted``, ``units`` with --units: the original
    ``eval --json`` contract), every other protocol under its name, and
    ``protocols``: which ran."""
    from query.evaluations import clean_json

    out: dict[str, Any] = {}
    for protocol, res in results.items():
        shown = res if units else _strip_units(res)
        if protocol == "synthetic":
            out.update(shown)
        else:
            out[protocol] = shown
    out["protocols"] = list(results)
    return clean_json(out)


def _shown(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {p: _strip_units(r) for p, r in results.items()}


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x.is_integer() and abs(x) > 1:
        return f"{int(x)}"  # counts (units, images)
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def compare_table(rows: list[list[Any]], a: str, b: str) -> str:
    """An aligned text table: metric, A, B, B - A."""
    head = ["metric", "A", "B", "B - A"]
    body = []
    for name, va, vb in rows:
        delta = vb - va if va is not None and vb is not None else None
        body.append([name, _fmt(va), _fmt(vb), "-" if delta is None else f"{delta:+.3f}"])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(4)]
    lines = [f"A = {a}", f"B = {b}", ""]
    for r in [head, *body]:
        lines.append(
            "  ".join(
                [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
            ).rstrip()
        )
    return "\n".join(lines)


# -- text output per protocol --------------------------------------------------------


def _text_synthetic(res: dict[str, Any], units: bool) -> str:
    fl, pl = res["final_layer"], res["planted"]
    f = _fmt3
    final = (
        f"final layer ({fl['units']} output units): match {f(fl['match_rate'])}, "
        f"exact {f(fl['exact_rate'])}, MPNet cos {f(fl['mpnet_cos'])}, "
        f"MiniLM cos {f(fl['minilm_cos'])}"
    )
    planted = (
        f"planted: single-concept units {pl['single_units']}: match "
        f"{f(pl['single_match_rate'])}; two-concept units {pl['double_units']}: "
        f"both concepts among labels {f(pl['double_match_rate'])}"
    )
    lines = [final, planted]
    if units:
        for u in res.get("units", []):
            mark = "ok " if u["match"] else "MISS"
            lines.append(
                f"  {mark} {u['model']}/{u['layer']}/{u['unit']}: {'+'.join(u['concepts'])} -> "
                f"{'; '.join(u['labels'])}"
            )
    return "\n".join(lines)


def _text_final_layer(res: dict[str, Any], units: bool) -> str:
    f = _fmt3
    lines = []
    for la in res["layers"]:
        lines.append(
            f"final-layer {la['model']}/{la['layer']} ({la['labeled']} of {la['units']} units labelled; "
            f"class names from {la['class_names']}): CLIP cos {f(la['clip_cos'])}, MPNet cos {f(la['mpnet_cos'])}, "
            f"top-1 {f(la['top1'])}, top-5 {f(la['top5'])}"
        )
        if units:
            for pu in la["per_unit"]:
                lines.append(
                    f"  {pu['unit']}: {pu['class_name']} -> {pu['label']}  (CLIP {f(pu.get('clip_cos'))}, "
                    f"MPNet {f(pu.get('mpnet_cos'))}, rank {pu.get('rank', '-')})"
                )
    if len(res["layers"]) > 1:
        lines.append(
            f"final-layer overall ({res['labeled']} units): CLIP cos {f(res['clip_cos'])}, "
            f"MPNet cos {f(res['mpnet_cos'])}, top-1 {f(res['top1'])}, top-5 {f(res['top5'])}"
        )
    if res.get("clip_model"):
        lines.append(f"  (CLIP text encoder: {res['clip_model']})")
    return "\n".join(lines)


def _text_cosy(res: dict[str, Any], units: bool) -> str:
    f = _fmt3
    lines = []
    for la in res["layers"]:
        extra = (
            f"; {la['units_without_controls']} without controls"
            if la["units_without_controls"]
            else ""
        )
        lines.append(
            f"cosy {la['model']}/{la['layer']}: {la['units']} units, AUC mean {f(la['auc_mean'])} "
            f"(quartiles {f(la['auc_q1'])} / {f(la['auc_median'])} / {f(la['auc_q3'])}){extra}"
        )
        if units:
            for pu in la["per_unit"]:
                lines.append(
                    f"  {pu['unit']}: {pu['label']}  AUC {f(pu['auc'])} ({pu['n_controls']} control labels)"
                )
    lines.append(
        f"cosy overall: {res['units']} units, AUC mean {f(res['auc_mean'])} "
        f"({res['images_per_label']} images per label, control pool of {res['control_labels']} labels per "
        f"layer; {res['images_generated']} images generated, {res['images_recorded']} recorded)"
    )
    return "\n".join(lines)


def _text_classifier(res: dict[str, Any], units: bool) -> str:
    f = _fmt3
    head = (
        f"classifier: {res.get('n_classes')} classes, {res.get('n_images')} images: "
        f"mean AUROC {f(res.get('mean_protocol_auroc'))} (oracle among the top "
        f"{res.get('k')}: {f(res.get('mean_oracle_auroc'))})"
    )
    lines = [head]
    if units:
        for c in res.get("classes", []):
            lines.append(
                f"  {c.get('concept')}: AUROC {f(c.get('protocol_auroc'))} "
                f"(oracle {f(c.get('oracle_auroc'))} by {c.get('oracle_neuron')})"
            )
    return "\n".join(lines)


def _fmt3(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def _text_fidelity(res: dict[str, Any], units: bool) -> str:
    f = _fmt3
    lines = [f"fidelity on {res['sample_images']} held-out probe images (correlation / AUPRC; chance AUPRC "
             f"{f(res['layers'][0]['chance_auprc'])}):"]
    for la in res["layers"]:
        true = (f"; true concepts {f(la.get('true_correlation'))} / {f(la.get('true_auprc'))}"
                if "true_correlation" in la else "")
        lines.append(
            f"  {la['model']}/{la['layer']} ({la['units']} units): labels {f(la.get('label_correlation'))} / "
            f"{f(la.get('label_auprc'))}, label sets {f(la.get('label_set_correlation'))} / "
            f"{f(la.get('label_set_auprc'))}; shuffled {f(la.get('shuffled_correlation'))} / "
            f"{f(la.get('shuffled_auprc'))}; random {f(la.get('random_correlation'))} / "
            f"{f(la.get('random_auprc'))}{true}")
        if units:
            for pu in la["per_unit"]:
                lines.append(f"    {pu['unit']}: {pu['label']}  {f(pu['label_correlation'])} / {f(pu['label_auprc'])}")
    return "\n".join(lines)


TEXT = {
    "synthetic": _text_synthetic,
    "final-layer": _text_final_layer,
    "cosy": _text_cosy,
    "classifier": _text_classifier,
    "fidelity": _text_fidelity,
}


EVAL = Command("eval", "measure label quality (synthetic, final-layer, cosy, classifier) or --compare two atlases",
               add_eval_arguments, run_eval, 50)
