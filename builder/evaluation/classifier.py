"""Classifier finding: neurons picked by their descriptions, used as classifiers.

The DnD paper's application (its Appendix B.8): for a class name, take the
neuron whose description is closest to it in a text embedding space and use
that neuron's activation (its layer's summary: spatial mean or max, as the
atlas was built) as a one-neuron classifier on labelled images; report the
area under the ROC curve. Neurons tied at the top similarity (identical
descriptions, within :data:`TIE_EPS`) are averaged, as in the paper. On
ResNet-50 layer4 the paper reports mean AUROCs over the CIFAR-10 / CIFAR-100
classes of 0.7375 / 0.7606 with DnD descriptions and 0.5906 / 0.6514 with
MILAN's.

Two stages, kept apart so batch mode runs the target once per model for every
class: :func:`rank_neurons` (text only: the atlas's label vectors, or an
ensemble of embedders) and :func:`record_units` (one pass over the labelled
images with hooks on every needed layer). The best AUROC among the ``k``
candidates is reported too, as an *oracle* upper bound: it peeks at the
labels to choose, so it is not what the protocol measures.

A labelled folder holds one sub-folder per class (any depth below it); a
concept names a class when they are equal ignoring case, with ``_`` and
``-`` read as spaces.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import BuildError
from query.errors import QueryError

log = logging.getLogger(__name__)

# Similarities closer than this count as a tie at the top (the paper averages
# the AUROC of every neuron that shares the closest description).
TIE_EPS = 1e-6
DEFAULT_K = 5
BATCH_SIZE = 64


def normalize_name(text: str) -> str:
    """A class-folder name or concept as compared: lower case, ``_``/``-`` as
    spaces, runs of spaces collapsed ("Red_Car" and "red car" are equal)."""
    return " ".join(re.sub(r"[_\-]+", " ", text).lower().split())


def _clean(x: float) -> float | None:
    """NaN (undefined AUROC) as None, so ``--json`` output stays valid JSON."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _choices(values: Sequence[object], limit: int = 20) -> str:
    """Valid choices for an error line: the first ``limit``, then a count."""
    values = [str(v) for v in values]
    if not values:
        return "(none)"
    shown = ", ".join(values[:limit])
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


# -- records ------------------------------------------------------------------------


@dataclass(frozen=True)
class RankedNeuron:
    """A neuron ranked by how close its best label is to a concept."""

    model: str
    layer: str
    unit: int
    similarity: float  # cosine of the best label (averaged over embedders)
    matched_label: str
    labels: tuple[str, ...]  # every label, rank order

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.model, self.layer, self.unit)


@dataclass(frozen=True)
class NeuronScore:
    """A candidate neuron of one concept and its AUROC as a one-neuron classifier."""

    rank: int  # 1-based, by similarity
    model: str
    layer: str
    unit: int
    similarity: float
    matched_label: str
    labels: tuple[str, ...]
    auroc: float  # NaN when undefined (no positive or no negative image was readable)
    tied_top: bool  # shares the top similarity: counts in the protocol AUROC

    @property
    def name(self) -> str:
        return f"{self.model}/{self.layer}/{self.unit}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        d["auroc"] = _clean(self.auroc)
        return d


@dataclass(frozen=True)
class ClassScore:
    """The protocol's result for one concept on one labelled folder.

    ``protocol_auroc`` is the mean AUROC of the neurons tied at the top
    similarity (usually one); ``oracle_auroc`` the best AUROC among all
    candidates, an upper bound that uses the labels to choose.
    """

    concept: str
    class_name: str  # the matched class folder(s), joined by " + "
    n_positives: int
    n_negatives: int
    top_similarity: float
    n_tied: int
    protocol_auroc: float
    oracle_auroc: float
    oracle_neuron: str  # model/layer/unit
    candidates: tuple[NeuronScore, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "concept": self.concept,
            "class_name": self.class_name,
            "n_positives": self.n_positives,
            "n_negatives": self.n_negatives,
            "top_similarity": self.top_similarity,
            "n_tied": self.n_tied,
            "protocol_auroc": _clean(self.protocol_auroc),
            "oracle_auroc": _clean(self.oracle_auroc),
            "oracle_neuron": self.oracle_neuron,
            "candidates": [c.to_dict() for c in self.candidates],
        }


@dataclass(frozen=True)
class RunInfo:
    """What a classify run read: the atlas, the folder, and how fast it went."""

    atlas: str
    images: str
    text_embedders: tuple[str, ...]
    k: int
    classes: tuple[str, ...]  # class folders found
    n_images: int  # labelled images read
    n_skipped: int  # unreadable files
    n_unlabelled: int  # images directly in the folder, in no class folder
    record_seconds: float  # running the target(s) over the images
    seconds: float  # the whole run

    @property
    def seconds_per_1000_images(self) -> float:
        return 1000.0 * self.record_seconds / self.n_images if self.n_images else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["text_embedders"] = list(self.text_embedders)
        d["classes"] = list(self.classes)
        d["seconds_per_1000_images"] = _clean(self.seconds_per_1000_images)
        return d


@dataclass(frozen=True)
class ClassifyResult:
    """:func:`classify`'s answer: the run and the one concept's score."""

    run: RunInfo
    score: ClassScore

    @property
    def protocol_auroc(self) -> float:
        return self.score.protocol_auroc

    @property
    def oracle_auroc(self) -> float:
        return self.score.oracle_auroc

    def to_dict(self) -> dict[str, Any]:
        """Flat: the run's keys and the concept's keys in one object."""
        return {**self.run.to_dict(), **self.score.to_dict()}


@dataclass(frozen=True)
class ClassifyBatchResult:
    """:func:`classify_all`'s answer: every class of the folder and the means
    (NaN AUROCs, from classes without readable images, are left out of them)."""

    run: RunInfo
    classes: tuple[ClassScore, ...]
    mean_protocol_auroc: float
    mean_oracle_auroc: float

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.run.to_dict(),
            "classes": [c.to_dict() for c in self.classes],
            "class_names": list(self.run.classes),
            "n_classes": len(self.classes),
            "mean_protocol_auroc": _clean(self.mean_protocol_auroc),
            "mean_oracle_auroc": _clean(self.mean_oracle_auroc),
        }


# -- the labelled folder ------------------------------------------------------------


@dataclass(frozen=True)
class LabelledImages:
    """A labelled image folder: the files and each one's class folder (None
    for an image directly in the folder)."""

    probe: Any  # builder.probe.ProbeSet
    labels: tuple[str | None, ...]
    classes: tuple[str, ...]

    @classmethod
    def scan(cls, images_dir: str | Path) -> LabelledImages:
        """Read ``images_dir`` recursively; raises BuildError (one line) when it is
        missing, holds no image or fewer than two class folders."""
        from builder.probe import ProbeSet

        root = Path(images_dir).expanduser()
        if not root.is_dir():
            raise BuildError(f"image folder {str(images_dir)!r} does not exist or is not a folder")
        try:
            probe = ProbeSet.scan(root)
        except BuildError:
            raise BuildError(f"image folder {str(images_dir)!r} holds no image files") from None
        labels = tuple(f.split("/", 1)[0] if "/" in f else None for f in probe.files)
        classes = tuple(sorted({c for c in labels if c is not None}))
        if len(classes) < 2:
            raise BuildError(
                f"image folder {str(images_dir)!r} needs one sub-folder per class and at least two "
                f"classes; found {len(classes)}" + (f" ({classes[0]})" if classes else "")
            )
        return cls(probe, labels, classes)

    def match(self, concept: str) -> tuple[str, ...]:
        """The class folders that ``concept`` names; QueryError listing the classes if none."""
        want = normalize_name(concept)
        found = tuple(c for c in self.classes if normalize_name(c) == want)
        if not found:
            raise QueryError(
                f"no class folder matches {concept!r} in {self.probe.root}; classes: {_choices(self.classes)}"
            )
        return found


# -- ranking by description -----------------------------------------------------------


def _check_scope(atlas: Any, model: str | None, layer: str | None) -> None:
    """QueryError naming the valid choices for an unknown model or layer."""
    layers = atlas.layers()
    models = sorted({li.model for li in layers} | {m.model for m in atlas.models()})
    if model is not None and model not in models:
        raise QueryError(f"unknown model {model!r}; valid models: {_choices(models)}")
    if layer is not None:
        valid = [li.layer for li in layers if model is None or li.model == model]
        if layer not in valid:
            where = f" in model {model!r}" if model is not None else ""
            raise QueryError(f"unknown layer {layer!r}{where}; valid layers: {_choices(dict.fromkeys(valid))}")


class LabelSpace:
    """Every label of the atlas's 'ok' neurons (optionally one model / layer)
    with one vector per label and embedder, so that any number of concepts
    are ranked with one matrix product.

    The atlas's own embedder reuses the stored ``label_vectors`` and embeds
    concepts as search does (its ONNX embedder when the atlas carries one);
    any other embedder of an ensemble embeds the distinct label texts once.
    """

    def __init__(self, atlas: Any, model: str | None, layer: str | None,
                 text_embedders: Sequence[str] | None = None) -> None:
        from query.bulk import ok_label_vectors, ok_labels

        own = atlas.meta.get("embedder")
        if not own:
            raise QueryError("the atlas meta has no 'embedder'; rebuild the atlas")
        self.embedders: tuple[str, ...] = tuple(text_embedders) if text_embedders else (str(own),)
        rows = ok_labels(atlas, model, layer)
        if not rows:
            scope = "/".join(x for x in (model, layer) if x) or "the atlas"
            raise QueryError(f"no labelled neuron in {scope} (nothing built yet?)")
        self.texts = [r["text"] for r in rows]
        keys = [(r["model"], r["layer"], int(r["unit"])) for r in rows]
        # neurons in order; label i belongs to neuron self.owner[i]
        self.neurons: list[tuple[str, str, int]] = list(dict.fromkeys(keys))
        pos = {k: i for i, k in enumerate(self.neurons)}
        self.owner = np.array([pos[k] for k in keys], dtype=np.int64)
        self.starts = np.flatnonzero(np.r_[True, self.owner[1:] != self.owner[:-1]])
        self.neuron_labels: list[tuple[str, ...]] = [()] * len(self.neurons)
        for text, o in zip(self.texts, self.owner.tolist()):
            self.neuron_labels[o] = (*self.neuron_labels[o], text)

        from query.embedder import get_embedder
        from query.onnx_embedder import query_embedder

        # the atlas's own embedder as search embeds queries (its ONNX export when it carries one)
        self._embedders = [query_embedder(atlas.path, name) if name == own else get_embedder(name)
                           for name in self.embedders]
        self.vectors: list[np.ndarray] = []
        for name, emb in zip(self.embedders, self._embedders):
            if name == own:
                ids, vecs = ok_label_vectors(atlas, model, layer)
                by_id = {int(i): j for j, i in enumerate(ids.tolist())}
                missing = [r["label_id"] for r in rows if int(r["label_id"]) not in by_id]
                if missing:
                    raise QueryError(f"{len(missing)} labels have no vector; rebuild the atlas")
                self.vectors.append(vecs[[by_id[int(r["label_id"])] for r in rows]])
            else:
                distinct = list(dict.fromkeys(self.texts))
                emb_vecs = emb.embed(distinct)
                at = {t: j for j, t in enumerate(distinct)}
                self.vectors.append(emb_vecs[[at[t] for t in self.texts]])

    def rank(self, concepts: Sequence[str], k: int) -> list[list[RankedNeuron]]:
        """Per concept: the ``k`` closest neurons, plus every neuron tied with
        the first beyond ``k``; best first (ties in model/layer/unit order)."""
        sims = np.zeros((len(self.texts), len(concepts)), dtype=np.float64)
        for emb, vecs in zip(self._embedders, self.vectors):
            q = emb.embed(list(concepts)).astype(np.float64)
            if q.shape[1] != vecs.shape[1]:
                raise QueryError(
                    f"label vectors have {vecs.shape[1]} dimensions but embedder {emb.name!r} gives "
                    f"{q.shape[1]}; rebuild the atlas"
                )
            sims += vecs.astype(np.float64) @ q.T
        sims /= len(self._embedders)
        # per neuron: its best label (labels of a neuron are contiguous)
        best = np.maximum.reduceat(sims, self.starts, axis=0)  # (neurons, concepts)
        out = []
        for j in range(len(concepts)):
            col = best[:, j]
            order = _tie_order(col)
            top = col[order[0]]
            n_tied = int(np.sum(col >= top - TIE_EPS))
            chosen = order[: max(k, n_tied)]
            ranked = []
            for o in chosen.tolist():
                lo = self.starts[o]
                hi = self.starts[o + 1] if o + 1 < len(self.starts) else len(self.texts)
                matched = self.texts[lo + int(np.argmax(sims[lo:hi, j]))]
                m, lay, u = self.neurons[o]
                ranked.append(RankedNeuron(m, lay, u, float(col[o]), matched, self.neuron_labels[o]))
            out.append(ranked)
        return out


def _tie_order(col: np.ndarray) -> np.ndarray:
    """Indices of ``col`` best first; a run of values each within
    :data:`TIE_EPS` of the next is one tie, kept in index order (two embedders
    or two batches can give equal descriptions similarities a few ulp apart)."""
    order = np.argsort(-col, kind="stable")
    tie_group = np.concatenate([[0], np.cumsum(np.diff(-col[order]) > TIE_EPS)])
    return order[np.lexsort((order, tie_group))]


def rank_neurons(
    atlas_path: str | Path, concept: str, k: int = DEFAULT_K, model: str | None = None,
    layer: str | None = None, text_embedders: Sequence[str] | None = None,
) -> list[RankedNeuron]:
    """The ``k`` neurons whose descriptions (any of their labels) are closest
    to ``concept``, best first, plus any tied with the best beyond ``k``.
    Text only: no image is read."""
    from query.atlas import Atlas

    concept = _check_concept(concept)
    _check_k(k)
    with Atlas.open(atlas_path) as atlas:
        _check_scope(atlas, model, layer)
        return LabelSpace(atlas, model, layer, text_embedders).rank([concept], k)[0]


def _check_concept(concept: str) -> str:
    if not isinstance(concept, str) or not concept.strip():
        raise QueryError("empty concept: give a class name, e.g. \"dog\"")
    return concept.strip()


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise QueryError(f"k must be a positive integer, got {k!r}")


# -- recording the candidates -------------------------------------------------------


def record_units(
    atlas: Any,
    units: dict[str, dict[str, list[int]]],
    images: LabelledImages,
    device: str = "auto",
    batch_size: int = BATCH_SIZE,
) -> tuple[dict[tuple[str, str, int], np.ndarray], np.ndarray, float]:
    """Run each model once over the labelled images with hooks on every layer
    in ``units`` ({model: {layer: [unit, ...]}}); per neuron its summary
    activation on every image, NaN where the file was unreadable.

    Returns (activations by (model, layer, unit), readable mask, seconds).
    The summary (mean/max, ViT tokens) is the one the atlas was built with.
    """
    import torch

    from builder.backends.layers import hooked, summarize
    from builder.backends.targets import load_target, resolve_device
    from builder.progress import progress

    infos = {m.model: m for m in atlas.models()}
    dev = resolve_device(device)
    probe = images.probe
    n = len(probe)
    readable = np.ones(n, dtype=bool)
    acts: dict[tuple[str, str, int], np.ndarray] = {}
    t0 = time.perf_counter()
    for model, layer_units in units.items():
        info = infos.get(model)
        if info is None:
            raise QueryError(f"model {model!r} has no target spec in the atlas's models table; cannot run it")
        cfg = info.config or {}
        spec = cfg.get("target") or info.target
        target = load_target(model, spec, dict(cfg.get("target_options") or {}), dev)
        layers = list(layer_units)
        target.check_layers(layers)
        summary, vit_tokens = cfg.get("summary") or "mean", cfg.get("vit_tokens") or "cls"
        cols = {lay: torch.tensor(sorted(us), dtype=torch.long) for lay, us in layer_units.items()}
        out = {lay: np.full((n, len(us)), np.nan, dtype=np.float32) for lay, us in layer_units.items()}
        current: dict[str, torch.Tensor] = {}
        bar = progress(total=n, desc=f"classify {model}", unit="img")
        try:
            with hooked(target.module, layers, current.__setitem__), torch.inference_mode():
                for start in range(0, n, batch_size):
                    idx, tensors = [], []
                    for i in range(start, min(n, start + batch_size)):
                        if not readable[i]:
                            continue
                        # a corrupt file (or one the preprocessing refuses) is skipped and counted
                        try:
                            tensors.append(target.preprocess(probe.open(i)))
                            idx.append(i)
                        except (BuildError, OSError, ValueError, TypeError, RuntimeError) as exc:
                            log.warning("skipping %s: %s", probe.files[i], exc)
                            readable[i] = False
                    # images of several sizes (a preprocessing that does not resize)
                    # go through the model one size group at a time
                    groups: dict[tuple[int, ...], list[int]] = {}
                    for j, t in enumerate(tensors):
                        groups.setdefault(tuple(t.shape), []).append(j)
                    for members in groups.values():
                        batch = torch.stack([tensors[j] for j in members]).to(dev, target.dtype)
                        current.clear()
                        target.module(batch)
                        rows = [idx[j] for j in members]
                        for lay in layers:
                            s = summarize(current[lay], summary, vit_tokens)
                            out[lay][rows] = s[:, cols[lay].to(s.device)].float().cpu().numpy()
                    bar.update(min(n, start + batch_size) - start)
        finally:
            bar.close()
        for lay, us in layer_units.items():
            for c, u in enumerate(sorted(us)):
                acts[(model, lay, u)] = out[lay][:, c]
    return acts, readable, time.perf_counter() - t0


# -- scoring --------------------------------------------------------------------------


def score_concept(
    concept: str, classes: Sequence[str], ranked: Sequence[RankedNeuron],
    acts: dict[tuple[str, str, int], np.ndarray], labels: Sequence[str | None], readable: np.ndarray,
) -> ClassScore:
    """AUROC of each ranked neuron on positives (images of ``classes``) vs
    negatives (every other labelled image), the protocol's tie-averaged AUROC
    and the oracle's best."""
    from builder.pipeline.scoring import auc

    lab = np.array([c is not None for c in labels]) & readable
    pos = lab & np.array([c in classes for c in labels])
    neg = lab & ~pos
    top = ranked[0].similarity
    scores = []
    for r, rn in enumerate(ranked, 1):
        a = acts[rn.key]
        scores.append(NeuronScore(
            rank=r, model=rn.model, layer=rn.layer, unit=rn.unit, similarity=rn.similarity,
            matched_label=rn.matched_label, labels=rn.labels, auroc=auc(a[pos], a[neg]),
            tied_top=rn.similarity >= top - TIE_EPS,
        ))
    return summarize_scores(concept, " + ".join(classes), int(pos.sum()), int(neg.sum()), scores)


def summarize_scores(
    concept: str, class_name: str, n_pos: int, n_neg: int, scores: Sequence[NeuronScore]
) -> ClassScore:
    """The protocol AUROC (mean over the neurons tied at the top similarity)
    and the oracle (best AUROC among all candidates) of scored candidates."""
    tied = [s for s in scores if s.tied_top]
    tied_aucs = [s.auroc for s in tied if not math.isnan(s.auroc)]
    protocol = float(np.mean(tied_aucs)) if tied_aucs else float("nan")
    defined = [s for s in scores if not math.isnan(s.auroc)]
    oracle = max(defined, key=lambda s: s.auroc) if defined else None
    return ClassScore(
        concept=concept, class_name=class_name, n_positives=n_pos, n_negatives=n_neg,
        top_similarity=scores[0].similarity if scores else float("nan"), n_tied=len(tied),
        protocol_auroc=protocol, oracle_auroc=oracle.auroc if oracle else float("nan"),
        oracle_neuron=oracle.name if oracle else "", candidates=tuple(scores),
    )


# -- the two entry points --------------------------------------------------------------


def _run(
    atlas_path: str | Path, images_dir: str | Path, concepts: list[tuple[str, tuple[str, ...]]] | None,
    model: str | None, layer: str | None, k: int, text_embedders: Sequence[str] | None,
    device: str, batch_size: int,
) -> tuple[RunInfo, list[ClassScore]]:
    from query.atlas import Atlas

    t0 = time.perf_counter()
    _check_k(k)
    if text_embedders is not None:
        text_embedders = [e.strip() for e in text_embedders if e.strip()]
        if not text_embedders:
            raise QueryError("--text-embedders is empty; give names such as minilm,mpnet")
    with Atlas.open(atlas_path) as atlas:
        _check_scope(atlas, model, layer)
        images = LabelledImages.scan(images_dir)
        if concepts is None:  # batch mode: every class, named by its folder
            concepts = [(normalize_name(c), (c,)) for c in images.classes]
        else:
            concepts = [(c, images.match(c)) for c, _ in concepts]
        space = LabelSpace(atlas, model, layer, text_embedders)
        ranked = space.rank([c for c, _ in concepts], k)
        wanted: dict[str, dict[str, set[int]]] = {}
        for rs in ranked:
            for rn in rs:
                wanted.setdefault(rn.model, {}).setdefault(rn.layer, set()).add(rn.unit)
        units = {m: {lay: sorted(us) for lay, us in ls.items()} for m, ls in wanted.items()}
        acts, readable, rec_s = record_units(atlas, units, images, device, batch_size)
    labelled = np.array([c is not None for c in images.labels])
    if not (readable & labelled).any():
        raise BuildError(f"no readable labelled image in {images.probe.root} ({int((~readable).sum())} skipped)")
    scores = [score_concept(c, cls, rs, acts, images.labels, readable) for (c, cls), rs in zip(concepts, ranked)]
    run = RunInfo(
        atlas=str(atlas_path), images=str(images.probe.root), text_embedders=space.embedders, k=k,
        classes=images.classes, n_images=int((readable & labelled).sum()), n_skipped=int((~readable).sum()),
        n_unlabelled=int((~labelled).sum()), record_seconds=rec_s, seconds=time.perf_counter() - t0,
    )
    if run.n_skipped:
        log.warning("%d files in %s were not readable images and were skipped", run.n_skipped, run.images)
    return run, scores


def classify(
    atlas_path: str | Path,
    concept: str,
    images_dir: str | Path,
    model: str | None = None,
    layer: str | None = None,
    k: int = DEFAULT_K,
    text_embedders: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = BATCH_SIZE,
) -> ClassifyResult:
    """Find a classifier for ``concept`` among the atlas's neurons by description
    and measure it on the labelled folder ``images_dir``.

    Positives are the images of the class folder named ``concept``, negatives
    every other class's. Returns the ``k`` candidates with their AUROCs, the
    protocol AUROC (mean over the neurons tied at the top similarity) and the
    oracle AUROC (best of the ``k``). ``text_embedders`` (e.g. ``["minilm",
    "mpnet"]``) ranks by the mean cosine over several embedders instead of the
    atlas's own. Raises an :class:`~query.errors.AtlasError` subclass with a
    one-line message for any bad input.
    """
    concept = _check_concept(concept)
    run, scores = _run(atlas_path, images_dir, [(concept, ())], model, layer, k, text_embedders,
                       device, batch_size)
    return ClassifyResult(run, scores[0])


def classify_all(
    atlas_path: str | Path,
    images_dir: str | Path,
    model: str | None = None,
    layer: str | None = None,
    k: int = DEFAULT_K,
    text_embedders: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int = BATCH_SIZE,
) -> ClassifyBatchResult:
    """Run the protocol for every class folder of ``images_dir`` (its name,
    ``_``/``-`` as spaces, is the concept) and average: the paper's
    CIFAR-10/100 experiment on any labelled folder. The target runs once per
    model for all classes together."""
    run, scores = _run(atlas_path, images_dir, None, model, layer, k, text_embedders, device, batch_size)

    def mean(values: list[float]) -> float:
        ok = [v for v in values if not math.isnan(v)]
        return float(np.mean(ok)) if ok else float("nan")

    return ClassifyBatchResult(
        run, tuple(scores),
        mean_protocol_auroc=mean([s.protocol_auroc for s in scores]),
        mean_oracle_auroc=mean([s.oracle_auroc for s in scores]),
    )
