"""The fidelity protocol: how true an atlas's labels are, on held-out images.

For every described unit, the presence of its label's concept (the same
presence the build uses: the joint image-text space of a CLIP similarity,
else the build captioner's captions compared by words and embedding) is set
against the unit's activation on a seeded sample of probe images disjoint
from the sample the build selected labels on: simulation correlation and
AUPRC (``builder.pipeline.fidelity``). NeuronEval's sanity checks give the
baselines a true label must beat: the layer's labels shuffled among its
units, and random labels drawn from a concept list; on a synthetic world the
planted concepts themselves are scored too (``true_*``), as the labels a
perfect labeler would give.

A DnD atlas and a CLIP-Dissect atlas of one config get the same held-out
sample and the same presence, so ``dnd-atlas eval --compare A B --protocol
fidelity`` puts them side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from builder.errors import BuildError
from builder.evaluation.view import AtlasView
from query.evaluations import WHOLE, EvalRow

log = logging.getLogger(__name__)

PROTOCOL = "fidelity"
METRICS = ("correlation", "auprc")


@dataclass(frozen=True)
class FidelityOptions:
    """Parameters of a fidelity run."""

    sample_size: int = 500  # held-out probe images per model
    seed: int = 1  # of the held-out sample (it excludes the build's sample whatever the seed)
    shuffles: int = 5  # permutations of the layer's labels
    random_labels: int = 5  # random labels per unit, from ``concepts``
    concepts: str = ""  # the random labels' concept list ("" = data/concepts/common-visual.txt)
    model: str | None = None
    layer: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("sample_size", "shuffles", "random_labels"):
            if getattr(self, name) < 1:
                raise BuildError(f"fidelity: {name} must be >= 1")


def evaluate_fidelity(view: AtlasView, opts: FidelityOptions | None = None) -> tuple[dict[str, Any], list[EvalRow]]:
    """Held-out fidelity of every described unit's labels, per layer, with
    the shuffled-, random- and (synthetic) true-label baselines."""
    from builder.pipeline.clip_dissect import load_concepts

    opts = opts or FidelityOptions()
    cfg = view.build_config(PROTOCOL)
    pool = list(load_concepts(opts.concepts or None).concepts)
    layers_out: list[dict[str, Any]] = []
    rows: list[EvalRow] = []
    n_images = 0
    for m in cfg.models:
        if opts.model not in (None, m.name) or not any(k[0] == m.name for k in view.labels):
            continue
        sample = _held_out_sample(cfg, m, opts)
        if sample is None:
            raise BuildError(f"fidelity: no held-out probe image of model {m.name!r} can be read and captioned")
        n_images = max(n_images, len(sample.images))
        for layer in m.layers:
            units = {u: t for (mm, la, u), t in view.labels.items() if mm == m.name and la == layer}
            if not units or opts.layer not in (None, layer):
                continue
            out = layer_fidelity(sample, layer, units, _all_labels(view, m.name, layer), pool,
                                 _truth(view, m.name, layer), opts)
            layers_out.append({"model": m.name, "layer": layer, **out})
            rows += [EvalRow(m.name, layer, k, v, {"sample_images": len(sample.images)})
                     for k, v in out.items() if k != "per_unit"]
    if not layers_out:
        raise BuildError("fidelity: no described unit (status ok, with a label) to evaluate")
    overall = {f"{who}_{metric}": _mean([la.get(f"{who}_{metric}") for la in layers_out])
               for who in ("label", "label_set", "shuffled", "random", "true") for metric in METRICS}
    overall = {k: v for k, v in overall.items() if v is not None}
    params = {"sample_images": n_images, "seed": opts.seed, "shuffles": opts.shuffles,
              "random_labels": opts.random_labels}
    rows += [EvalRow(WHOLE, WHOLE, k, v, params) for k, v in overall.items()]
    return {**overall, **params, "layers": layers_out}, rows


def _held_out_sample(cfg: Any, m: Any, opts: FidelityOptions):
    """The model loaded as the build loaded it, recorded on a sample of probe
    images disjoint from the build's fidelity sample, with its presence."""
    import dataclasses
    from pathlib import Path

    from builder.backends.registry import captioners, create_backend, similarities
    from builder.cache import ContentCache
    from builder.pipeline.fidelity import build_sample, choose_sample, presence_mode
    from builder.pipeline.record import record_summaries
    from builder.pipeline.run import load_model
    from query.embedder import get_embedder

    device = opts.device or cfg.device
    cfg = dataclasses.replace(cfg, device=device)
    cache = ContentCache(Path(cfg.cache_dir or Path(cfg.out) / "cache") / "cache.sqlite")
    run = load_model(cfg, m, cache, Path(cfg.out) / "images")
    build_sample_idx = choose_sample(len(run.probe), cfg.fidelity.sample_size, cfg.fidelity.seed)
    held = choose_sample(len(run.probe), opts.sample_size, opts.seed, exclude=build_sample_idx)
    if len(held) < 2:
        raise BuildError(
            f"fidelity: model {m.name!r}: the build's fidelity sample holds {len(build_sample_idx)} of the "
            f"{len(run.probe)} probe images, leaving {len(held)} held-out images (build with a smaller "
            "fidelity.sample_size or a larger probe set)")
    images, acts = record_summaries(run.target, run.probe, held, list(m.layers), run.summary, m.vit_tokens,
                                    cfg.record.batch_size)
    similarity = None
    if cfg.dissect.similarity == "clip":
        similarity = create_backend(similarities, "clip", cfg.dissect.similarity_options, device=device)
    captioner = None
    if presence_mode(cfg.fidelity.presence, similarity) != "joint":
        captioner = create_backend(captioners, cfg.describe.captioner, cfg.describe.captioner_options,
                                   probe_dir=str(run.probe.root), device=device)
    return build_sample(run, images, acts, captioner, similarity, get_embedder(cfg.embedder))


def layer_fidelity(sample: Any, layer: str, first: dict[int, str], labels: dict[int, list[str]],
                   pool: Sequence[str], truth: dict[int, list[str]], opts: FidelityOptions) -> dict[str, Any]:
    """One layer's metrics: its labels (label 1, and the label set), the
    layer's labels shuffled among its units, random labels and (when known)
    the true concepts; means over units, and per unit."""
    units = sorted(first)
    rng = np.random.default_rng([opts.seed, len(units)])
    per_unit: list[dict[str, Any]] = []
    for u in units:
        row = {"unit": u, "label": first[u], **_scores("label", sample.score([first[u]], layer, u)[0])}
        row.update(_scores("label_set", sample.set_score(labels.get(u) or [first[u]], layer, u)))
        others = [first[v] for v in units if v != u] or [first[u]]
        row.update(_mean_scores("shuffled", sample.score(list(rng.choice(others, opts.shuffles)), layer, u)))
        row.update(_mean_scores("random", sample.score(list(rng.choice(pool, opts.random_labels)), layer, u)))
        if u in truth:
            row.update(_scores("true", sample.set_score(truth[u], layer, u)))
        per_unit.append(row)
    out: dict[str, Any] = {"units": len(units), "chance_auprc": sample.positive_fraction}
    for key in ("label", "label_set", "shuffled", "random", "true"):
        for metric in METRICS:
            mean = _mean([r.get(f"{key}_{metric}") for r in per_unit])
            if mean is not None:
                out[f"{key}_{metric}"] = mean
    out["per_unit"] = per_unit
    return out


def _scores(prefix: str, f: Any) -> dict[str, float]:
    return {f"{prefix}_correlation": f.correlation, f"{prefix}_auprc": f.auprc}


def _mean_scores(prefix: str, fs: Sequence[Any]) -> dict[str, float | None]:
    return {f"{prefix}_correlation": _mean([f.correlation for f in fs]),
            f"{prefix}_auprc": _mean([f.auprc for f in fs])}


def _all_labels(view: AtlasView, model: str, layer: str) -> dict[int, list[str]]:
    from query.atlas import Atlas
    from query.bulk import labels_by_unit

    with Atlas.open(view.path, allow_older=True) as atlas:
        return labels_by_unit(atlas, model, layer)


def _truth(view: AtlasView, model: str, layer: str) -> dict[int, list[str]]:
    """The planted or output concepts of a synthetic-world layer, per unit."""
    info = view.ground_truth.get(model, {}).get(layer)
    return {u: list(c) for u, c in enumerate(info["concepts"])} if info else {}


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [float(x) for x in xs if x is not None and x == x]
    return float(np.mean(vals)) if vals else None
