"""The evaluation suite: run a protocol on an atlas, store its metrics, compare atlases.

Protocols (DESIGN.md section 5):

- ``synthetic``: labels vs the synthetic world's planted concepts
  (:func:`builder.evaluation.synthetic.evaluate_synthetic`);
- ``final-layer``: output units' labels vs their class names
  (:mod:`builder.evaluation.final_layer`);
- ``cosy``: AUC of each unit on images generated from its label vs control
  images (:mod:`builder.evaluation.cosy`);
- ``classifier``: the unit whose label is closest to a class name as a
  one-unit classifier on labelled images (``builder.evaluation.classifier``).

Each run replaces the protocol's rows of the atlas's ``evaluations`` table.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import BuildError
from query.evaluations import WHOLE, EvalRow, write_evaluations

log = logging.getLogger(__name__)

PROTOCOLS = ("synthetic", "final-layer", "cosy", "classifier", "fidelity")


@dataclass(frozen=True)
class EvalOptions:
    """Everything the protocols take (CLI flags)."""

    mpnet: bool = True
    clip_model: str | None = "openai/clip-vit-base-patch16"  # None: no CLIP cosine
    class_names: tuple[str, ...] | None = None
    class_names_file: str | None = None
    model: str | None = None
    layer: str | None = None
    device: str | None = None
    generator: str | None = None  # cosy: another generator than the build's
    images_per_label: int = 10
    max_units: int | None = None
    control_labels: int = 10
    control_threshold: float = 0.5
    seed: int = 0
    images: str | None = None  # labelled images for ``classifier``
    k: int = 5
    store: bool = True
    sample_size: int = 500  # fidelity: held-out probe images per model
    fidelity_seed: int = 1
    concepts: str = ""  # fidelity: the random labels' concept list


def has_ground_truth(atlas_dir: str | Path) -> bool:
    """True for a synthetic-world atlas (units with known concepts)."""
    from builder.evaluation.view import read_atlas

    return bool(read_atlas(atlas_dir).ground_truth)


def default_protocol(atlas_dir: str | Path) -> str:
    """``synthetic`` when the atlas has ground truth, else ``final-layer``."""
    return "synthetic" if has_ground_truth(atlas_dir) else "final-layer"


def run_protocol(
    atlas_dir: str | Path, protocol: str, opts: EvalOptions | None = None
) -> dict[str, Any]:
    """Run one protocol on the atlas, write its rows to ``evaluations`` (unless
    ``opts.store`` is false) and return its result dict."""
    opts = opts or EvalOptions()
    if protocol not in PROTOCOLS:
        raise BuildError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "synthetic":
        result, rows = _synthetic(atlas_dir, opts)
    elif protocol == "final-layer":
        from builder.evaluation.final_layer import evaluate_final_layer, read_class_names
        from builder.evaluation.view import read_atlas

        names = opts.class_names or (
            read_class_names(opts.class_names_file) if opts.class_names_file else None
        )
        result, rows = evaluate_final_layer(
            read_atlas(atlas_dir),
            names,
            opts.model,
            opts.layer,
            opts.clip_model,
            opts.mpnet,
            opts.device or "auto",
        )
    elif protocol == "fidelity":
        from builder.evaluation.fidelity import FidelityOptions, evaluate_fidelity
        from builder.evaluation.view import read_atlas

        result, rows = evaluate_fidelity(read_atlas(atlas_dir), FidelityOptions(
            sample_size=opts.sample_size, seed=opts.fidelity_seed, concepts=opts.concepts, model=opts.model,
            layer=opts.layer, device=opts.device))
    elif protocol == "cosy":
        from builder.evaluation.cosy import CosyOptions, evaluate_cosy
        from builder.evaluation.view import read_atlas

        result, rows = evaluate_cosy(
            read_atlas(atlas_dir),
            CosyOptions(
                images_per_label=opts.images_per_label,
                control_labels=opts.control_labels,
                control_threshold=opts.control_threshold,
                max_units=opts.max_units,
                seed=opts.seed,
                model=opts.model,
                layer=opts.layer,
                device=opts.device,
                generator=opts.generator,
            ),
        )
    else:
        result, rows = _classifier(atlas_dir, opts)
    if opts.store:
        write_evaluations(atlas_dir, protocol, rows)
    return result


def _synthetic(atlas_dir: str | Path, opts: EvalOptions) -> tuple[dict[str, Any], list[EvalRow]]:
    from builder.evaluation.synthetic import evaluate_synthetic

    res = evaluate_synthetic(atlas_dir, mpnet=opts.mpnet)
    rows = [
        EvalRow(WHOLE, WHOLE, f"{part}.{k}", float(v) if v is not None else None)
        for part in ("final_layer", "planted")
        for k, v in res[part].items()
    ]
    for la in res["layers"]:
        units = [u for u in res["units"] if (u["model"], u["layer"]) == (la["model"], la["layer"])]
        for key, value in la.items():
            if key not in ("model", "layer", "units"):
                rows.append(EvalRow(la["model"], la["layer"], key, value,
                                    {"per_unit": units} if key == "match_rate" else {}))
    return res, rows


def _classifier(atlas_dir: str | Path, opts: EvalOptions) -> tuple[dict[str, Any], list[EvalRow]]:
    if not opts.images:
        raise BuildError(
            "the classifier protocol needs --images DIR (labelled images: one folder per class)"
        )
    try:
        from builder.evaluation.classifier import classify_all
    except ImportError as exc:
        raise BuildError(
            f"the classifier protocol is not available in this dnd-atlas (builder.evaluation.classifier: {exc})"
        ) from exc
    res = classify_all(
        atlas_dir,
        opts.images,
        model=opts.model,
        layer=opts.layer,
        k=opts.k,
        device=opts.device or "auto",
    )
    result = res.to_dict()
    params = {"images": str(opts.images), "k": opts.k}
    rows = [
        EvalRow(
            WHOLE,
            WHOLE,
            "mean_protocol_auroc",
            result.get("mean_protocol_auroc"),
            {**params, "classes": result.get("classes", [])},
        ),
        EvalRow(WHOLE, WHOLE, "mean_oracle_auroc", result.get("mean_oracle_auroc"), params),
        EvalRow(WHOLE, WHOLE, "n_classes", result.get("n_classes"), params),
        EvalRow(WHOLE, WHOLE, "n_images", result.get("n_images"), params),
    ]
    return result, rows


def flatten_metrics(result: Any, prefix: str = "") -> list[tuple[str, float | None]]:
    """Every numeric scalar of a protocol result as (dotted name, value), in
    order; per-unit lists are skipped, per-layer lists are named by
    ``model/layer``. This is what ``--compare`` puts side by side."""
    out: list[tuple[str, float | None]] = []
    if isinstance(result, dict):
        for k, v in result.items():
            if k in ("units", "per_unit") and isinstance(v, list) or "seconds" in str(k):
                continue  # per-unit lists; timings are not quality
            name = f"{prefix}.{k}" if prefix else str(k)
            if k == "layers" and isinstance(v, list):
                for item in v:
                    if isinstance(item, dict) and "model" in item and "layer" in item:
                        out += flatten_metrics(
                            {kk: vv for kk, vv in item.items() if kk not in ("model", "layer")},
                            f"{prefix + '.' if prefix else ''}{item['model']}/{item['layer']}",
                        )
            else:
                out += flatten_metrics(v, name)
    elif isinstance(result, bool):
        return out
    elif isinstance(result, (int, float)):
        out.append((prefix, float(result) if math.isfinite(float(result)) else None))
    elif result is None and prefix:
        out.append((prefix, None))
    return out


def compare_metrics(a: dict[str, Any], b: dict[str, Any]) -> list[list[Any]]:
    """``[[name, value_a, value_b], ...]`` over the metrics of either result
    (a's order, then b's extra ones; None where one side lacks it)."""
    fa, fb = dict(flatten_metrics(a)), dict(flatten_metrics(b))
    names = list(fa) + [n for n in fb if n not in fa]
    return [[n, fa.get(n), fb.get(n)] for n in names]


def run_protocols(
    atlas_dir: str | Path, protocols: Sequence[str], opts: EvalOptions
) -> dict[str, Any]:
    """Run each protocol; returns ``{protocol: result}`` in the order given."""
    return {p: run_protocol(atlas_dir, p, opts) for p in protocols}
