"""The final-layer protocol: output units' labels against their class names.

An output unit of a classifier has a known meaning, its class. The protocol
(Describe-and-Dissect, section 4.1) compares each output unit's label 1 with
its class name: mean cosine similarity of their CLIP text embeddings and of
their all-mpnet-base-v2 embeddings, and top-1 / top-5 concept match (the
class name is the nearest, or among the 5 nearest, class names to the
label by MPNet cosine).

Class names come from, in this order: a file given by the caller (one name
per line, in unit order), the synthetic world's ground truth (output units),
or the torchvision weights the target was loaded with
(``weights.meta["categories"]``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import BuildError
from builder.evaluation.view import AtlasView
from query.evaluations import WHOLE, EvalRow

log = logging.getLogger(__name__)

PROTOCOL = "final-layer"
DEFAULT_CLIP = "openai/clip-vit-base-patch16"
TOP_K = 5


@dataclass(frozen=True)
class FinalLayerTarget:
    """One output layer and the class name of each of its units."""

    model: str
    layer: str
    class_names: tuple[str, ...]
    source: str  # "file:<path>" | "ground-truth" | "torchvision:<weights>"


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a file, one per line in unit order (blank lines and
    surrounding whitespace dropped)."""
    p = Path(path)
    if not p.is_file():
        raise BuildError(f"--class-names: no such file: {path}")
    names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise BuildError(f"--class-names: {path} holds no class name")
    return names


def torchvision_categories(target: str, options: dict[str, Any]) -> tuple[list[str], str] | None:
    """``weights.meta["categories"]`` of a torchvision target's weights
    (no download: the metadata ships with torchvision), and the weights'
    name; None when the target names no torchvision weights."""
    weights = options.get("weights")
    if not weights:
        return None
    name = target.removeprefix("torchvision:")
    if ":" in name or "/" in name:
        return None
    try:
        import torchvision

        if name not in torchvision.models.list_models():
            return None
        enum = torchvision.models.get_model_weights(name)
        w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except (ImportError, KeyError, ValueError) as exc:
        log.warning("no class names from torchvision weights %s of %s: %s", weights, name, exc)
        return None
    cats = w.meta.get("categories")
    return (list(cats), f"torchvision:{w}") if cats else None


def _output_layer(view: AtlasView, model: str, n: int, layer: str | None) -> str | None:
    layers = view.model_layers(model)
    if layer is not None:
        match = [li for li in layers if li.layer == layer]
        if not match:
            return None
        if match[0].n_units != n:
            raise BuildError(
                f"final-layer: {model}/{layer} has {match[0].n_units} units but there are {n} class names"
            )
        return layer
    fits = [li.layer for li in layers if li.n_units == n]
    return fits[-1] if fits else None


def find_targets(
    view: AtlasView,
    class_names: Sequence[str] | None = None,
    model: str | None = None,
    layer: str | None = None,
) -> list[FinalLayerTarget]:
    """The output layers to evaluate and their class names (see the module doc)."""
    models = [m for m in sorted({li.model for li in view.layers}) if model is None or m == model]
    if model is not None and not models:
        raise BuildError(
            f"final-layer: the atlas has no model {model!r} "
            f"(it has {', '.join(sorted({li.model for li in view.layers})) or 'none'})"
        )
    out: list[FinalLayerTarget] = []
    if class_names:
        names = tuple(class_names)
        for m in models:
            lay = _output_layer(view, m, len(names), layer)
            if lay is not None:
                out.append(FinalLayerTarget(m, lay, names, "file"))
        if not out:
            shapes = ", ".join(
                f"{li.model}/{li.layer} ({li.n_units})" for li in view.layers if li.model in models
            )
            raise BuildError(
                f"final-layer: no layer has {len(names)} units, one per class name "
                f"(layers: {shapes}); pick one with --layer"
            )
        return out
    built = {(li.model, li.layer) for li in view.layers}
    for m in models:
        for lay, info in sorted(view.ground_truth.get(m, {}).items()):
            if info.get("role") == "output" and (m, lay) in built and layer in (None, lay):
                out.append(
                    FinalLayerTarget(m, lay, tuple(c[0] for c in info["concepts"]), "ground-truth")
                )
    if out:
        return out
    for m in models:
        row = view.models.get(m)
        if row is None:
            continue
        cfg = row["config"]
        found = torchvision_categories(
            cfg.get("target", row["target"]), cfg.get("target_options") or {}
        )
        if found is None:
            continue
        cats, source = found
        lay = _output_layer(view, m, len(cats), layer)
        if lay is not None:
            out.append(FinalLayerTarget(m, lay, tuple(cats), source))
    if not out:
        raise BuildError(
            "final-layer: no class names for any output layer: the atlas has no synthetic ground truth "
            "and no model loaded torchvision weights with categories; give --class-names FILE "
            "(one name per line, in unit order)"
        )
    return out


def _clip_texts(clip_model: str, device: str):
    from builder.backends.clip import ClipSimilarity

    try:
        sim = ClipSimilarity(model=clip_model, device=device)
    except BuildError as exc:
        raise BuildError(
            f"final-layer: {exc} (give --clip-model PATH_OR_ID, or --no-clip)"
        ) from exc
    return sim.embed_texts


def _mpnet_texts():
    from query.embedder import get_embedder
    from query.errors import AtlasError

    try:
        emb = get_embedder("mpnet")
    except AtlasError as exc:
        raise BuildError(f"final-layer: {exc} (or pass --no-mpnet)") from exc
    return emb.embed


def evaluate_final_layer(
    view: AtlasView,
    class_names: Sequence[str] | None = None,
    model: str | None = None,
    layer: str | None = None,
    clip_model: str | None = DEFAULT_CLIP,
    mpnet: bool = True,
    device: str = "auto",
) -> tuple[dict[str, Any], list[EvalRow]]:
    """The final-layer metrics of every output layer found by :func:`find_targets`.

    Returns the result (overall means over every labelled output unit, and
    per layer: ``units``, ``labeled``, ``clip_cos``, ``mpnet_cos``, ``top1``,
    ``top5`` and each unit's numbers) and the rows for the ``evaluations``
    table. ``clip_model=None`` skips CLIP, ``mpnet=False`` skips MPNet and
    with it the top-k match. Units without a label (dead, failed) count in
    ``units`` only."""
    targets = find_targets(view, class_names, model, layer)
    clip_fn = _clip_texts(clip_model, device) if clip_model else None
    mpnet_fn = _mpnet_texts() if mpnet else None
    layers_out: list[dict[str, Any]] = []
    rows: list[EvalRow] = []
    all_units: list[dict[str, Any]] = []
    for t in targets:
        labels = view.layer_labels(t.model, t.layer)
        units = sorted(u for u in labels if u < len(t.class_names))
        labs = [labels[u] for u in units]
        names = [t.class_names[u] for u in units]
        per_unit = [
            {"unit": u, "class_name": n, "label": lab} for u, n, lab in zip(units, names, labs)
        ]
        if clip_fn is not None and units:
            for pu, c in zip(per_unit, _rowwise_cos(clip_fn(labs), clip_fn(names))):
                pu["clip_cos"] = c
        if mpnet_fn is not None and units:
            el, ec = mpnet_fn(labs), mpnet_fn(list(t.class_names))
            sims = np.asarray(el, np.float64) @ np.asarray(ec, np.float64).T
            for i, (pu, u) in enumerate(zip(per_unit, units)):
                pu["mpnet_cos"] = float(sims[i, u])
                # ties with the own class (duplicate class names) do not push it down
                pu["rank"] = int(np.sum(sims[i] > sims[i, u] + 1e-9))
        summary = _summary(per_unit, len(t.class_names), clip_fn is not None, mpnet_fn is not None)
        layers_out.append(
            {
                "model": t.model,
                "layer": t.layer,
                "class_names": t.source,
                **summary,
                "per_unit": per_unit,
            }
        )
        all_units += per_unit
        for metric, value in summary.items():
            details = (
                {"class_names": t.source, "clip_model": clip_model}
                if metric != "units"
                else {"class_names": t.source, "clip_model": clip_model, "per_unit": per_unit}
            )
            rows.append(EvalRow(t.model, t.layer, metric, value, details))
    overall = _summary(
        all_units,
        sum(len(t.class_names) for t in targets),
        clip_fn is not None,
        mpnet_fn is not None,
    )
    for metric, value in overall.items():
        rows.append(
            EvalRow(
                WHOLE,
                WHOLE,
                metric,
                value,
                {"clip_model": clip_model, "layers": [f"{t.model}/{t.layer}" for t in targets]},
            )
        )
    result = {**overall, "clip_model": clip_model, "mpnet": bool(mpnet), "layers": layers_out}
    return result, rows


def _summary(
    per_unit: list[dict[str, Any]], n_units: int, clip: bool, mpnet: bool
) -> dict[str, Any]:
    def mean(key: str, on: bool) -> float | None:
        vals = [pu[key] for pu in per_unit if key in pu]
        return float(np.mean(vals)) if on and vals else None

    ranks = [pu["rank"] for pu in per_unit if "rank" in pu]
    return {
        "units": n_units,
        "labeled": len(per_unit),
        "clip_cos": mean("clip_cos", clip),
        "mpnet_cos": mean("mpnet_cos", mpnet),
        "top1": float(np.mean([r < 1 for r in ranks])) if mpnet and ranks else None,
        "top5": float(np.mean([r < TOP_K for r in ranks])) if mpnet and ranks else None,
    }


def _rowwise_cos(a: np.ndarray, b: np.ndarray) -> list[float]:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return [float(x) for x in np.sum(a * b, axis=1)]
