"""The CoSy protocol (Kopf et al., NeurIPS 2024) on an atlas.

For each described unit, images are generated from its label 1 and the
unit is recorded on them and on control images: images generated from the
labels of a control pool shared by the layer (labels of other units, picked
to be far apart in text space), minus the pool labels whose text is close to
the unit's own label. The score is the AUC of the unit's activations on its
label's images against the controls: 1 when the label names what the unit
detects, 0.5 when the label's images move the unit no more than unrelated
ones.

The generator, the target and the prompt template are the ones the atlas
was built with (its ``build_config``); images and recordings go through the
build's content cache with the build's keys, so a label that was already a
candidate during the build costs nothing to generate or record again.
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

PROTOCOL = "cosy"
PROMPT_CHUNK = (
    32  # prompts generated and recorded together (bounds memory: images are dropped after)
)

Key = tuple[str, str, int]


@dataclass(frozen=True)
class CosyOptions:
    """Parameters of a CoSy run."""

    images_per_label: int = 10  # Q, images per label (unit labels and control labels alike)
    control_labels: int = 10  # labels in each layer's control pool
    control_threshold: float = (
        0.5  # drop a control label this similar (label vectors) to the unit's label
    )
    max_units: int | None = None  # sample at most this many units per layer
    seed: int = 0  # which units are sampled and where the pool's greedy pick starts
    model: str | None = None
    layer: str | None = None
    device: str | None = None  # None: the build's device
    generator: str | None = None  # None: the build's generator (with its options)
    cache: bool = True

    def __post_init__(self) -> None:
        if self.images_per_label < 1:
            raise BuildError("cosy: --images-per-label must be >= 1")
        if self.control_labels < 1:
            raise BuildError("cosy: --control-labels must be >= 1")
        if self.max_units is not None and self.max_units < 1:
            raise BuildError("cosy: --max-units must be >= 1")
        if not -1.0 <= self.control_threshold <= 1.0:
            raise BuildError("cosy: --control-threshold must be a cosine in [-1, 1]")


def control_pool(texts: Sequence[str], vectors: np.ndarray, size: int, seed: int) -> list[int]:
    """Indices of ``size`` labels spread over text space: a random start, then
    each next label the one least similar to those already picked (greedy
    farthest point). Returns every index when there are at most ``size``."""
    n = len(texts)
    if n <= size:
        return list(range(n))
    rng = np.random.default_rng(seed)
    picked = [int(rng.integers(n))]
    nearest = vectors @ vectors[picked[0]]
    while len(picked) < size:
        nearest[picked] = np.inf
        nxt = int(np.argmin(nearest))
        picked.append(nxt)
        nearest = np.maximum(nearest, vectors @ vectors[nxt])
    return picked


def _unique_labels(view: AtlasView, keys: Sequence[Key]) -> tuple[list[str], np.ndarray]:
    """Distinct texts among these units' label 1 and a stored vector for each."""
    first: dict[str, Key] = {}
    for k in keys:
        first.setdefault(view.labels[k], k)
    texts = list(first)
    return texts, view.label_vectors([first[t] for t in texts])


def _layer_pools(
    view: AtlasView, opts: CosyOptions, layers: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[list[str], np.ndarray]]:
    """Each layer's control pool (texts and vectors): from the labels of its
    own units, topped up from the model's other layers and then the atlas when
    the layer has too few distinct labels."""
    pools = {}
    for model, layer in layers:
        scopes = [
            [k for k in view.labels if k[0] == model and k[1] == layer],
            [k for k in view.labels if k[0] == model],
            list(view.labels),
        ]
        for keys in scopes:
            texts, vecs = _unique_labels(view, keys)
            if len(texts) >= opts.control_labels + 1:
                break
        idx = control_pool(texts, vecs, opts.control_labels, opts.seed)
        pools[(model, layer)] = ([texts[i] for i in idx], vecs[idx] if len(idx) else vecs)
    return pools


def _select_units(view: AtlasView, opts: CosyOptions) -> dict[tuple[str, str], list[int]]:
    by_layer: dict[tuple[str, str], list[int]] = {}
    for m, la, u in view.labels:
        if opts.model not in (None, m) or opts.layer not in (None, la):
            continue
        by_layer.setdefault((m, la), []).append(u)
    if not by_layer:
        what = "/".join(x for x in (opts.model, opts.layer) if x) or "the atlas"
        raise BuildError(f"cosy: no described unit (status ok, with a label) in {what}")
    rng = np.random.default_rng(opts.seed)
    out = {}
    for key in sorted(by_layer):
        units = sorted(by_layer[key])
        if opts.max_units is not None and len(units) > opts.max_units:
            units = sorted(int(u) for u in rng.choice(units, size=opts.max_units, replace=False))
        out[key] = units
    return out


class _Images:
    """Generated images and the model's activations on them, through the
    build's content cache and with the build's keys (``builder.pipeline.dissect``)."""

    def __init__(self, cfg: Any, view: AtlasView, opts: CosyOptions) -> None:
        from builder.backends.registry import create_backend, generators
        from builder.cache import ContentCache
        from builder.pipeline.dissect import prompt_template

        self.cfg = cfg
        self.q = opts.images_per_label
        self.device = opts.device or cfg.device
        spec = opts.generator or cfg.dissect.generator
        options = cfg.dissect.generator_options if spec == cfg.dissect.generator else {}
        self.generator = create_backend(generators, spec, options, device=self.device)
        self.gcfg = self.generator.config_key()
        self.template = prompt_template(cfg.dissect.prompt_template)
        cache_dir = (
            Path(cfg.cache_dir)
            if cfg.cache_dir and Path(cfg.cache_dir).is_dir()
            else view.path / "cache"
        )
        self.cache = ContentCache(cache_dir / "cache.sqlite", enabled=opts.cache)
        self.generated = 0
        self.recorded = 0

    def activations(self, labels: Sequence[str], model: dict[str, Any]) -> dict[str, np.ndarray]:
        """label -> (Q, units of every recorded layer of ``model``) activations."""
        import torch

        from builder.backends.targets import (
            load_target,
            resolve_device,
            resolve_dtype,
            target_fingerprint,
        )
        from builder.pipeline.dissect import generate_images, record_images
        from builder.progress import progress

        device = resolve_device(self.device)
        target = load_target(model["name"], model["target"], model["target_options"], device,
                             resolve_dtype(self.cfg.dtype, device))
        tfp = target_fingerprint(target, model["target"], model["target_options"])
        d = self.cfg.dissect
        out: dict[str, np.ndarray] = {}
        bar = progress(total=len(labels), desc=f"cosy {model['name']}", unit="label")
        try:
            for s in range(0, len(labels), PROMPT_CHUNK):
                prompts = {lab: self.template.format(concept=lab) for lab in labels[s : s + PROMPT_CHUNK]}
                keys, images, made = generate_images(self.cache, self.generator, list(prompts.values()), self.q,
                                                     d.seed, d.batch_size)
                acts, recorded = record_images(self.cache, target, tfp, model["layers"], model["summary"],
                                               model["vit_tokens"], self.cfg.record.batch_size, images)
                self.generated += len(made)
                self.recorded += len(recorded)
                for lab, p in prompts.items():
                    out[lab] = np.stack([acts[k] for k in keys[p]])
                bar.update(len(prompts))
        finally:
            bar.close()
            del target
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return out

    def close(self) -> None:
        self.cache.close()


def _model_spec(view: AtlasView, cfg: Any, name: str) -> dict[str, Any]:
    """Target spec, options, recorded layers and summary of a model, as built."""
    row = view.models.get(name)
    mc = next((m for m in cfg.models if m.name == name), None)
    if row is None and mc is None:
        raise BuildError(
            f"cosy: model {name!r} is in neither the models table nor the build config"
        )
    conf = row["config"] if row else {}
    layers = conf.get("layers") or (
        list(mc.layers) if mc else [li.layer for li in view.model_layers(name)]
    )
    return {
        "name": name,
        "target": conf.get("target") or (row["target"] if row else mc.target),
        "target_options": dict(conf.get("target_options", mc.target_options if mc else {}) or {}),
        "layers": list(layers),
        "summary": conf.get("summary") or (mc.summary if mc and mc.summary else cfg.record.summary),
        "vit_tokens": conf.get("vit_tokens") or (mc.vit_tokens if mc else "cls"),
    }


def _quartiles(xs: Sequence[float]) -> dict[str, float | None]:
    if not xs:
        return {"auc_mean": None, "auc_q1": None, "auc_median": None, "auc_q3": None}
    q1, med, q3 = np.percentile(np.asarray(xs, np.float64), [25, 50, 75])
    return {
        "auc_mean": float(np.mean(xs)),
        "auc_q1": float(q1),
        "auc_median": float(med),
        "auc_q3": float(q3),
    }


def evaluate_cosy(
    view: AtlasView, opts: CosyOptions | None = None
) -> tuple[dict[str, Any], list[EvalRow]]:
    """CoSy AUC of every described unit (or a sample, ``max_units`` per layer).

    Returns the result (overall ``auc_mean``; per layer ``units``,
    ``auc_mean`` and quartiles, the control pool and each unit's AUC) and the
    rows for the ``evaluations`` table."""
    from builder.pipeline.scoring import auc

    opts = opts or CosyOptions()
    cfg = view.build_config("cosy")
    selected = _select_units(view, opts)
    pools = _layer_pools(view, opts, list(selected))
    images = _Images(cfg, view, opts)
    layers_out: list[dict[str, Any]] = []
    rows: list[EvalRow] = []
    all_aucs: list[float] = []
    try:
        for model in sorted({m for m, _ in selected}):
            spec = _model_spec(view, cfg, model)
            offsets, off = {}, 0
            widths = {li.layer: li.n_units for li in view.model_layers(model)}
            for lay in spec["layers"]:
                if lay not in widths:
                    raise BuildError(
                        f"cosy: layer {lay!r} of {model!r} is in its config but not in the atlas"
                    )
                offsets[lay] = off
                off += widths[lay]
            mine = [(la, u) for (m, la), us in selected.items() if m == model for u in us]
            labels = sorted(
                {view.labels[(model, la, u)] for la, u in mine}
                | {t for (m, _), (texts, _) in pools.items() if m == model for t in texts}
            )
            acts = images.activations(labels, spec)
            for (m, lay), units in sorted(selected.items()):
                if m != model:
                    continue
                pool_texts, pool_vecs = pools[(m, lay)]
                keys = [(m, lay, u) for u in units]
                own = view.label_vectors(keys)
                per_unit = []
                for i, u in enumerate(units):
                    label = view.labels[(m, lay, u)]
                    sims = pool_vecs @ own[i] if len(pool_texts) else np.zeros(0)
                    ctrl = [
                        t
                        for t, s in zip(pool_texts, sims)
                        if t != label and s < opts.control_threshold
                    ]
                    col = offsets[lay] + u
                    pos = acts[label][:, col]
                    neg = np.concatenate([acts[t][:, col] for t in ctrl]) if ctrl else np.zeros(0)
                    a = auc(pos, neg) if ctrl else None
                    per_unit.append({"unit": u, "label": label, "auc": a, "n_controls": len(ctrl)})
                aucs = [pu["auc"] for pu in per_unit if pu["auc"] is not None]
                all_aucs += aucs
                stats = {"units": len(aucs), **_quartiles(aucs)}
                no_ctrl = sum(1 for pu in per_unit if pu["auc"] is None)
                layers_out.append(
                    {
                        "model": m,
                        "layer": lay,
                        **stats,
                        "units_without_controls": no_ctrl,
                        "controls": pool_texts,
                        "per_unit": per_unit,
                    }
                )
                for metric, value in stats.items():
                    details: dict[str, Any] = {"images_per_label": opts.images_per_label}
                    if metric == "units":
                        details.update(controls=pool_texts, units_without_controls=no_ctrl)
                    if metric == "auc_mean":
                        details["per_unit"] = per_unit
                    rows.append(EvalRow(m, lay, metric, value, details))
    finally:
        images.close()
    overall = {"units": len(all_aucs), "auc_mean": float(np.mean(all_aucs)) if all_aucs else None}
    params = {
        "images_per_label": opts.images_per_label,
        "control_labels": opts.control_labels,
        "control_threshold": opts.control_threshold,
        "max_units": opts.max_units,
        "seed": opts.seed,
        "generator": images.gcfg,
    }
    for metric, value in overall.items():
        rows.append(EvalRow(WHOLE, WHOLE, metric, value, params))
    result = {
        **overall,
        **params,
        "images_generated": images.generated,
        "images_recorded": images.recorded,
        "layers": layers_out,
    }
    return result, rows
