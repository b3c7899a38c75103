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

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from builder.backends.extractive import singular, stopwords

PRESENCE_MODES = ("auto", "joint", "words", "embedding", "words+embedding")
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


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two vectors; 0 when either is constant."""
    x = np.asarray(x, np.float64) - np.mean(x)
    y = np.asarray(y, np.float64) - np.mean(y)
    d = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / d) if d > 1e-12 else 0.0


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
    scores = np.asarray(scores, np.float64)
    order = np.lexsort((pos, -scores))  # among equal scores, negatives first
    hits = pos[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / n_pos)


def fidelity(presence: np.ndarray, acts: np.ndarray, pos: np.ndarray) -> Fidelity:
    """The fidelity of one presence vector (over the sample) to one neuron."""
    return Fidelity(pearson(presence, acts), average_precision(presence, pos))


def content_words(text: str) -> list[str]:
    """The words of a label or caption that carry its concept (singular,
    lower case, stop words dropped)."""
    stop = stopwords()
    return [singular(w) for w in _WORD.findall(text.lower()) if w not in stop]


def word_presence(labels: Sequence[str], captions: Sequence[str]) -> np.ndarray:
    """(labels, images): the fraction of each label's content words that the
    image's caption contains."""
    cap_words = [set(content_words(c)) for c in captions]
    out = np.zeros((len(labels), len(captions)), dtype=np.float32)
    for i, label in enumerate(labels):
        words = list(dict.fromkeys(content_words(label)))
        if words:
            out[i] = [sum(w in cw for w in words) / len(words) for cw in cap_words]
    return out


class Presence:
    """Concept presence over one model's fidelity sample."""

    def __init__(self, mode: str, captions: Sequence[str] | None = None, caption_vectors: np.ndarray | None = None,
                 image_vectors: np.ndarray | None = None, embed_texts=None) -> None:
        self.mode = mode
        self.captions = list(captions or [])
        self.caption_vectors = caption_vectors
        self.image_vectors = image_vectors
        self.embed_texts = embed_texts  # texts -> unit vectors (the joint space's, or the text embedder's)

    def of(self, labels: Sequence[str]) -> np.ndarray:
        """(labels, sample images) presence scores."""
        labels = list(labels)
        if not labels:
            return np.zeros((0, self.size), np.float32)
        if self.mode == "joint":
            return np.asarray(self.embed_texts(labels), np.float32) @ self.image_vectors.T
        parts = []
        if "words" in self.mode:
            parts.append(word_presence(labels, self.captions))
        if "embedding" in self.mode:
            parts.append(np.asarray(self.embed_texts(labels), np.float32) @ self.caption_vectors.T)
        return np.mean(parts, axis=0).astype(np.float32)

    @property
    def size(self) -> int:
        return len(self.image_vectors) if self.mode == "joint" else len(self.captions)


def set_presence(rows: np.ndarray) -> np.ndarray:
    """Presence of a set of concepts: an image shows the set where it shows any."""
    return np.max(np.asarray(rows), axis=0)
