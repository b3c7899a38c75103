"""How true a label is: its fidelity over the whole activation range.

A label is a claim about a neuron. Following Linear Explanations (simulation
correlation) and NeuronEval (correlation and AUPRC pass its sanity checks),
a label is scored by how well the presence of its concept in images predicts
the neuron's activation on a seeded sample of probe images that spans the
activation range (a uniform sample of the probe set, shared by every neuron
of the model), not on the neuron's top images alone:

- **correlation**: Pearson correlation of presence and activation over the
  sample (simulation correlation; 0 when either is constant);
- **AUPRC**: average precision of presence ranking the neuron's most active
  images of the sample (the top ``positive_fraction``; chance = that fraction).

Presence of a concept in an image comes from the similarity backend's joint
image-text space when it has one (CLIP: cosine of the image and the text),
else from captions of the sample (made once per model by the build's
captioner, shared by every neuron), compared with the label by its content
words, by the text embedder, or both (``fidelity.presence``). A set of labels
is present where any of them is (the maximum), which is how labels 2-3 are
judged: by the activation they explain beyond the labels already kept.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from builder.backends.extractive import singular, stopwords

log = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Fidelity:
    """A label's (or a label set's) fidelity to one neuron."""

    correlation: float
    auprc: float


def choose_sample(n_images: int, size: int, seed: int, exclude: Sequence[int] = ()) -> np.ndarray:
    """Sorted probe indices of a uniform sample of ``size`` images (all when
    fewer), seeded by (seed, probe size); ``exclude`` keeps a held-out sample
    disjoint from another one."""
    pool = np.setdiff1d(np.arange(n_images), np.asarray(exclude, dtype=np.int64))
    if len(pool) <= size:
        return pool
    rng = np.random.default_rng([seed, n_images])
    return np.sort(rng.choice(pool, size=size, replace=False))


def correlations(presence: np.ndarray, acts: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``presence`` (labels, images) with
    ``acts`` (images,); 0 where either is constant."""
    p = np.asarray(presence, np.float64)
    p = p - p.mean(axis=1, keepdims=True)
    a = np.asarray(acts, np.float64) - np.mean(acts)
    den = np.sqrt((p * p).sum(axis=1) * (a * a).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (p @ a) / den
    return np.where(den > 1e-12, out, 0.0)


def positives(acts: np.ndarray, fraction: float) -> np.ndarray:
    """The neuron's most active images of the sample: the top ``fraction``
    (at least one), and only images above its minimum activation (a ReLU unit
    silent on most images has fewer positives, not arbitrary ones)."""
    acts = np.asarray(acts, np.float64)
    mask = np.zeros(len(acts), dtype=bool)
    if len(acts) == 0 or acts.max() <= acts.min() + 1e-12:
        return mask
    k = max(1, int(round(fraction * len(acts))))
    mask[np.lexsort((np.arange(len(acts)), -acts))[:k]] = True
    return mask & (acts > acts.min() + 1e-12)


def average_precision(scores: np.ndarray, pos: np.ndarray) -> float:
    """Average precision of ``scores`` ranking the ``pos`` images (ties
    broken pessimistically, so a constant score earns the chance rate)."""
    pos = np.asarray(pos, bool)
    n_pos = int(pos.sum())
    if n_pos == 0:
        return float("nan")
    order = np.lexsort((pos, -np.asarray(scores, np.float64)))  # among equal scores, negatives first
    hits = pos[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / n_pos)


def content_words(text: str) -> list[str]:
    """The words of a label or caption that carry its concept (singular,
    lower case, stop words dropped), in order, each once."""
    stop = stopwords()
    return list(dict.fromkeys(singular(w) for w in _WORD.findall(text.lower()) if w not in stop))


class Presence:
    """Concept presence over one model's fidelity sample: ``of(labels)`` is a
    (labels, images) array. Rows are memoized: labels repeat across neurons.

    ``mode``: ``joint`` (cosine of text and image embeddings in one space),
    ``words`` (the fraction of the label's content words its caption holds),
    ``embedding`` (cosine of the label's and the caption's text embeddings) or
    ``words+embedding`` (their mean)."""

    def __init__(self, mode: str, size: int, captions: Sequence[str] = (),
                 embed_texts: Callable[[list[str]], np.ndarray] | None = None,
                 vectors: np.ndarray | None = None) -> None:
        self.mode = mode
        self.size = size
        self.embed_texts = embed_texts  # texts -> unit vectors in the space of ``vectors``
        self.vectors = vectors  # (images, d): image embeddings (joint) or caption embeddings
        self._word_rows: dict[str, np.ndarray] = {}
        for i, cap in enumerate(captions):
            for w in content_words(cap):
                self._word_rows.setdefault(w, np.zeros(size, np.float32))[i] = 1.0
        self._memo: dict[str, np.ndarray] = {}

    def words(self, labels: Sequence[str]) -> np.ndarray:
        """Word presence alone (cheap: no embedding), for ranking many phrases."""
        out = np.zeros((len(labels), self.size), np.float32)
        for j, label in enumerate(labels):
            words = content_words(label)
            if words:
                out[j] = sum(self._word_rows.get(w, 0.0) for w in words) / len(words)
        return out

    def of(self, labels: Sequence[str]) -> np.ndarray:
        """(labels, images) presence of each label in each sample image."""
        new = [t for t in dict.fromkeys(labels) if t not in self._memo]
        if new:
            parts = []
            if self.mode in ("words", "words+embedding"):
                parts.append(self.words(new))
            if self.mode in ("joint", "embedding", "words+embedding"):
                parts.append(np.asarray(self.embed_texts(new), np.float32) @ self.vectors.T)
            for t, row in zip(new, np.mean(parts, axis=0).astype(np.float32)):
                self._memo[t] = row
        return np.stack([self._memo[t] for t in labels]) if labels else np.zeros((0, self.size), np.float32)


@dataclass(frozen=True)
class FidelitySample:
    """One model's fidelity sample: the probe images, every selected unit's
    activation on them (readable images only) and concept presence on them."""

    images: np.ndarray  # probe indices of the readable sample images
    acts: dict[str, np.ndarray]  # layer -> (images, units)
    presence: Presence
    positive_fraction: float = 0.1
    calls: tuple[int, int] = (0, 0)  # captioner calls made / cached to caption the sample
    _positives: dict = field(default_factory=dict, compare=False, repr=False)

    def activations(self, layer: str, unit: int) -> np.ndarray:
        return self.acts[layer][:, unit]

    def positives(self, layer: str, unit: int) -> np.ndarray:
        key = (layer, unit)
        if key not in self._positives:
            self._positives[key] = positives(self.activations(layer, unit), self.positive_fraction)
        return self._positives[key]

    def score(self, labels: Sequence[str], layer: str, unit: int) -> list[Fidelity]:
        """Each label's fidelity to the neuron."""
        if not labels:
            return []
        rows = self.presence.of(labels)
        return self.score_rows(rows, layer, unit)

    def score_rows(self, rows: np.ndarray, layer: str, unit: int) -> list[Fidelity]:
        """The fidelity of each presence row (labels or label sets) to the neuron."""
        a, pos = self.activations(layer, unit), self.positives(layer, unit)
        corr = correlations(rows, a)
        return [Fidelity(float(c), average_precision(r, pos)) for c, r in zip(corr, rows)]

    def set_score(self, labels: Sequence[str], layer: str, unit: int) -> Fidelity:
        """The fidelity of a set of labels (present where any of them is)."""
        return self.score_rows(np.max(self.presence.of(labels), axis=0, keepdims=True), layer, unit)[0]


def layer_summary(sample: FidelitySample, layer: str, labels: dict[int, str], shuffles: int,
                  seed: int = 0) -> dict[str, float | None]:
    """A layer's label fidelity and its chance level: the mean correlation
    and AUPRC of each unit's label 1, and the same for label 1 texts shuffled
    among the layer's units (``shuffles`` seeded permutations), so a reader
    sees what a label that says nothing about its unit scores."""
    units = sorted(labels)
    out: dict[str, float | None] = {"sample_images": float(len(sample.images)),
                                    "positive_fraction": sample.positive_fraction, "labels": float(len(units))}
    if not units:
        return out
    rows = sample.presence.of([labels[u] for u in units])
    true = [sample.score_rows(rows[i : i + 1], layer, u)[0] for i, u in enumerate(units)]
    out["label_correlation"] = _mean([f.correlation for f in true])
    out["label_auprc"] = _mean([f.auprc for f in true])
    rng = np.random.default_rng([seed, len(units)])
    shuffled: list[Fidelity] = []
    for _ in range(shuffles if len(units) > 1 else 0):
        perm = rng.permutation(len(units))
        shuffled += [sample.score_rows(rows[perm[i] : perm[i] + 1], layer, u)[0] for i, u in enumerate(units)]
    out["shuffled_correlation"] = _mean([f.correlation for f in shuffled])
    out["shuffled_auprc"] = _mean([f.auprc for f in shuffled])
    return out


def _mean(xs: Sequence[float]) -> float | None:
    vals = [x for x in xs if x == x]
    return float(np.mean(vals)) if vals else None


def presence_mode(mode: str, similarity) -> str:
    """The presence a build uses: ``auto`` is the similarity backend's joint
    image-text space when it has one (CLIP), else captions' words and embeddings."""
    if mode == "auto":
        return "joint" if getattr(similarity, "joint", False) else "words+embedding"
    return mode


def build_sample(run, images: np.ndarray, acts: dict[str, np.ndarray], captioner, similarity,
                 embedder) -> FidelitySample | None:
    """The model's fidelity sample from its recorded sample activations:
    presence from the joint space of ``similarity``, or from ``captioner``'s
    captions of the sample images compared by words and/or ``embedder``."""
    from builder.errors import ConfigError
    from builder.pipeline.describe import caption_probe_images
    from builder.pipeline.dissect import embed_images
    from builder.pipeline.records import EvidenceItem

    cfg = run.cfg.fidelity
    mode = presence_mode(cfg.presence, similarity)
    # a sample image that vanished or changed since recording leaves the sample (its pixels are not the ones recorded)
    keep = np.array([not run.probe.changed(int(i)) for i in images], bool)
    if not keep.all():
        images, acts = images[keep], {lay: a[keep] for lay, a in acts.items()}
        if not len(images):
            return None
    items = [EvidenceItem(int(i), None, 0.0) for i in images]
    if mode == "joint":
        if not getattr(similarity, "joint", False):
            raise ConfigError("fidelity.presence = \"joint\" needs a similarity backend with a joint image-text "
                              "space (dissect.similarity = \"clip\" with its own text tower)")
        pix = {run.evidence_key(e): run.probe.open(e.image) for e in items}
        emb = embed_images(run, similarity, pix)
        vectors = np.stack([emb[run.evidence_key(e)] for e in items])
        presence = Presence("joint", len(items), embed_texts=similarity.embed_texts, vectors=vectors)
        return FidelitySample(images, acts, presence, cfg.positive_fraction)
    captions, calls = caption_probe_images(run, captioner, items)
    has = np.array([c is not None for c in captions], bool)
    if not has.all():  # an image the captioner has no caption for leaves the sample, as from a neuron's evidence
        images, acts = images[has], {lay: a[has] for lay, a in acts.items()}
        items = [e for e, h in zip(items, has) if h]
        captions = [c for c in captions if c is not None]
        if not items:
            log.warning("%s: no fidelity sample image has a caption; labels get no fidelity", run.name)
            return None
    vectors = embed_texts_cached(run, embedder, captions) if "embedding" in mode else None
    presence = Presence(mode, len(items), captions, embed_texts=embedder.embed, vectors=vectors)
    return FidelitySample(images, acts, presence, cfg.positive_fraction, calls)


def fidelity_candidates(sample: FidelitySample, candidates: dict[tuple[str, int], list[str]],
                        captions: dict[tuple[str, int], list[str]], cfg
                        ) -> dict[tuple[str, int], list[tuple[str, str]]]:
    """Per neuron of a chunk, phrases of its evidence captions to add to its
    candidates, each with its source: up to ``describe.fidelity_candidates``
    phrases whose fidelity beats every candidate's by
    ``labels.generality_margin`` (``"fidelity"``: the summarizer missed what
    the captions and the activations agree on; "solid" is rarely said, but
    where it is said the unit fires), and up to as many complements of the
    best candidate (``"complement"``, see :func:`_complements`; they may
    become labels 2-3, never label 1). Presence of all the chunk's texts is
    computed in a few batches."""
    from builder.backends.extractive import caption_phrases

    k = cfg.describe.fidelity_candidates
    sample.presence.of(sorted({c for cs in candidates.values() for c in cs}))  # one embedding batch
    if not k:
        return {n: [] for n in candidates}
    phrases_of = {n: caption_phrases(captions[n]) for n in candidates}
    tops: dict[tuple[str, int], list[str]] = {}
    for n, cands in candidates.items():
        have = set(cands)
        phrases = [p for p in phrases_of[n] if p not in have]
        if not phrases:
            tops[n] = []
            continue
        if sample.presence.mode == "joint":
            rough = correlations(sample.presence.of(phrases), sample.activations(*n))
        else:  # word presence first (no embedding); the full presence for the few best
            rough = correlations(sample.presence.words(phrases), sample.activations(*n))
        tops[n] = [phrases[i] for i in np.argsort(-rough, kind="stable")[: 3 * k]]
    sample.presence.of(sorted({p for ps in tops.values() for p in ps}))
    out: dict[tuple[str, int], list[str]] = {}
    for n, top in tops.items():
        best = max((f.correlation for f in sample.score(candidates[n], *n)), default=0.0)
        scored = sorted(zip(top, sample.score(top, *n)), key=lambda t: -t[1].correlation)
        out[n] = [p for p, f in scored if f.correlation > best + cfg.labels.generality_margin][:k]
    pools = {n: _complement_pool(sample, n, candidates[n] + out[n], phrases_of[n], k) for n in candidates}
    sample.presence.of(sorted({p for pool in pools.values() if pool for p in pool[1]}))  # one batch
    complements = {n: _complements(sample, n, pool, k, cfg.labels.generality_margin) if pool else []
                   for n, pool in pools.items()}
    return {n: [(p, "fidelity") for p in out[n]] + [(p, "complement") for p in complements[n]] for n in candidates}


def _complement_pool(sample: FidelitySample, n: tuple[str, int], cands: list[str], phrases: list[str],
                     k: int) -> tuple[str, list[str]] | None:
    """The neuron's best candidate and the ``3k`` caption phrases that, with
    it, best explain the activation by word presence alone (no embedding):
    the phrases worth a full presence as its complements."""
    from builder.pipeline.labels import nested

    fids = sample.score(cands, *n)
    if not fids:
        return None
    base = cands[int(np.argmax([f.correlation for f in fids]))]
    have = set(cands)
    pool = [p for p in phrases if p not in have and not nested(p, base)]
    if not pool:
        return None
    rough_rows = np.maximum(sample.presence.words(pool), sample.presence.words([base]))
    rough = correlations(rough_rows, sample.activations(*n))
    return base, [pool[j] for j in np.argsort(-rough, kind="stable")[: 3 * k]]


def _complements(sample: FidelitySample, n: tuple[str, int], pool: tuple[str, list[str]], k: int,
                 margin: float) -> list[str]:
    """Up to ``k`` phrases of the pool that explain activation the neuron's
    best candidate leaves unexplained: presence of either raises the set's
    fidelity by ``margin`` (a "teal or coral" unit whose summary only said
    "coral")."""
    base, top = pool
    base_fid = sample.score([base], *n)[0].correlation
    rows = np.maximum(sample.presence.of(top), sample.presence.of([base]))
    gains = [(f.correlation - base_fid, p) for p, f in zip(top, sample.score_rows(rows, *n))]
    gains.sort(key=lambda t: -t[0])
    return [p for g, p in gains if g > margin][:k]


def with_fidelity(results: Sequence, sample: FidelitySample) -> list:
    """Neurons' results with the fidelity of their labels and candidates
    filled in (for labelers that choose labels without it)."""
    sample.presence.of(sorted({x.text for r in results for x in r.labels}
                              | {c.concept for r in results for c in r.candidates}))
    return [_with_fidelity(r, sample) for r in results]


def _with_fidelity(result, sample: FidelitySample):
    """A neuron's result with the fidelity of its labels and candidates
    filled in (for labelers that choose labels without it)."""
    import dataclasses

    key = (result.layer, result.unit)
    if not result.labels and not result.candidates:
        return result
    lab = sample.score([x.text for x in result.labels], *key)
    cand = sample.score([c.concept for c in result.candidates], *key)
    return dataclasses.replace(
        result,
        labels=tuple(dataclasses.replace(x, fidelity_correlation=f.correlation, fidelity_auprc=f.auprc)
                     for x, f in zip(result.labels, lab)),
        candidates=tuple(dataclasses.replace(c, fidelity_correlation=f.correlation, fidelity_auprc=f.auprc)
                         for c, f in zip(result.candidates, cand)))


def embed_texts_cached(run, embedder, texts: Sequence[str]) -> np.ndarray:
    """(texts, d) embeddings through the content cache: the sample's captions
    are the same for every model built on one probe set, and across builds."""
    from builder.cache import content_key

    keys = {t: content_key("embed-text", embedder.name, t) for t in dict.fromkeys(texts)}
    got, _ = run.cache.fetch("embed", keys, lambda missing: list(np.asarray(embedder.embed(missing), np.float32)),
                             encode=lambda v: np.asarray(v, np.float32).tobytes(),
                             decode=lambda b: np.frombuffer(b, dtype=np.float32))
    return np.stack([got[t] for t in texts]) if texts else np.zeros((0, embedder.dim), np.float32)
