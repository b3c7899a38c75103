"""Ground-truth evaluation of a synthetic-world atlas.

Targets that know what their units mean expose ``ground_truth`` (role
``output``: an output unit and its class concept; role ``planted``: a unit
built to detect one or two concepts; ``world``: the synthetic world whose
vocabulary the concepts belong to, ``shapes`` when absent); the builder
stores it in the atlas meta. A label *names* a concept when the world's
vocabulary terms it uses (``concept_terms``) include the concept and no other
concept of the same kind ("striped circle" names circle; "circle and square"
does not).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import BuildError
from builder.synthetic.worlds import World, get_world

log = logging.getLogger(__name__)


def names_concept(label: str, concept: str, world: World | None = None) -> bool:
    """True when ``label`` names ``concept`` and no rival of the same kind,
    in the vocabulary of ``world`` (default: the shapes world)."""
    w = world or get_world()
    terms = w.concept_terms(label)
    if concept not in terms:
        return False
    kind = w.concept_kind(concept)
    return all(t == concept or w.concept_kind(t) != kind for t in terms)


def _mean_cos(embedder_name: str, a: Sequence[str], b: Sequence[str]) -> float:
    from query.embedder import get_embedder

    if not a:
        return float("nan")
    emb = get_embedder(embedder_name)
    ea, eb = emb.embed(list(a)), emb.embed(list(b))
    return float(np.mean(np.sum(ea * eb, axis=1)))


def evaluate_synthetic(atlas_dir: str | Path, mpnet: bool = True) -> dict[str, Any]:
    """The synthetic-world metrics of an atlas (see ``dnd-atlas eval``)."""
    from query.atlas import Atlas
    from query.bulk import labels_by_unit

    with Atlas.open(atlas_dir, allow_older=True) as atlas:
        gt: dict[str, dict[str, dict]] = atlas.meta.get("ground_truth") or {}
        if not gt:
            raise BuildError(
                f"the atlas at {atlas_dir} has no ground truth: eval needs a synthetic-world atlas "
                "(models whose units have known concepts, e.g. from `dnd-atlas demo`)"
            )
        final_labels: list[str] = []
        final_names: list[str] = []
        final_match: list[bool] = []
        final_exact: list[bool] = []
        single: list[bool] = []
        double: list[bool] = []
        per_unit: list[dict[str, Any]] = []
        built = {(li.model, li.layer) for li in atlas.layers()}
        for model, layers in sorted(gt.items()):
            for layer, info in sorted(layers.items()):
                if (model, layer) not in built:
                    continue
                labels = labels_by_unit(atlas, model, layer)
                world = get_world(info.get("world"))
                concept_terms = world.concept_terms
                for unit, concepts in enumerate(info["concepts"]):
                    labs = labels.get(unit, [])
                    first = labs[0] if labs else ""
                    if info["role"] == "output":
                        concept = concepts[0]
                        final_labels.append(first)
                        final_names.append(concept)
                        final_match.append(names_concept(first, concept, world))
                        final_exact.append(concept_terms(first) == {concept})
                        ok = final_match[-1]
                    elif len(concepts) == 1:
                        ok = names_concept(first, concepts[0], world)
                        single.append(ok)
                    else:
                        terms = set().union(*(concept_terms(lab) for lab in labs)) if labs else set()
                        ok = all(c in terms for c in concepts)
                        double.append(ok)
                    per_unit.append({"model": model, "layer": layer, "unit": unit, "concepts": list(concepts),
                                     "labels": labs, "match": bool(ok)})
    result: dict[str, Any] = {
        "final_layer": {
            "units": len(final_names),
            "match_rate": _rate(final_match),
            "exact_rate": _rate(final_exact),
            "minilm_cos": _mean_cos("minilm", final_labels, final_names) if final_names else None,
            "mpnet_cos": None,
        },
        "planted": {
            "single_units": len(single),
            "single_match_rate": _rate(single),
            "double_units": len(double),
            "double_match_rate": _rate(double),
        },
        "units": per_unit,
    }
    if mpnet and final_names:
        result["final_layer"]["mpnet_cos"] = _mean_cos("mpnet", final_labels, final_names)
    result["layers"] = layer_metrics(per_unit, "mpnet" if mpnet else "minilm")
    return result


def layer_metrics(per_unit: Sequence[dict[str, Any]], embedder_name: str) -> list[dict[str, Any]]:
    """Per ground-truth layer: units, match rate and the mean cosine of the
    labels to the true concepts (``<embedder>_cos``): a one-concept unit's
    label 1 to its concept; a two-concept unit, per concept its nearest
    label, averaged (an unlabelled unit scores 0)."""
    from query.embedder import get_embedder

    emb = get_embedder(embedder_name)
    texts = sorted({t for u in per_unit for t in [*u["labels"], *u["concepts"]]})
    vec = dict(zip(texts, emb.embed(texts))) if texts else {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for u in per_unit:
        groups.setdefault((u["model"], u["layer"]), []).append(u)
    out = []
    for (model, layer), units in groups.items():
        cos = []
        for u in units:
            labs = u["labels"] if len(u["concepts"]) > 1 else u["labels"][:1]
            cos.append(float(np.mean([max((float(vec[c] @ vec[lab]) for lab in labs), default=0.0)
                                      for c in u["concepts"]])))
        out.append({"model": model, "layer": layer, "units": len(units),
                    "match_rate": _rate([u["match"] for u in units]), f"{embedder_name}_cos": float(np.mean(cos))})
    return out


def _rate(xs: Sequence[bool]) -> float | None:
    return float(np.mean(xs)) if xs else None
