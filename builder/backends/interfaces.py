"""The narrow interfaces every backend implements, one per pipeline stage.

Each is batch in, batch out, so a GPU backend can batch and a remote one can
fan out. ``config_key()`` names everything that changes a backend's output:
it goes into the content-hash cache keys, so changing a model, a revision or
a prompt never reuses a stale answer.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CaptionItem:
    """One image to caption: the pixels (already cropped to ``box`` when a box
    is set), the probe file it came from, and the crop box in that file's
    pixel coordinates (x0, y0, x1, y1), or None for the whole image."""

    image: Image.Image
    source: str
    box: tuple[int, int, int, int] | None = None


class Backend(abc.ABC):
    """Common base: a stable identity used in cache keys and the atlas meta."""

    name: str = "backend"

    def config_key(self) -> dict[str, Any]:
        """Everything that changes this backend's output (model id, revision,
        parameters). Used in content-hash cache keys."""
        return {"name": self.name}


class Captioner(Backend):
    """Images (or crops) -> one caption each."""

    @abc.abstractmethod
    def caption(self, items: Sequence[CaptionItem]) -> list[str | None]:
        """Return one caption per item, in order; None for an item the
        backend has no caption for (a file missing from ``captions.jsonl``):
        the pipeline describes the neuron from its other images."""


class Summarizer(Backend):
    """Captions of a neuron's top images -> N distinct candidate concepts."""

    @abc.abstractmethod
    def summarize(self, captions: Sequence[str], n: int) -> list[str]:
        """Return up to ``n`` distinct, normalized 1-5 word concepts covering
        most (not necessarily all) captions, best first."""

    def summarize_many(self, batches: Sequence[Sequence[str]], n: int) -> list[list[str]]:
        """Summarize several neurons' captions; remote backends override this
        to run requests concurrently."""
        return [self.summarize(c, n) for c in batches]


class Generator(Backend):
    """Text prompts -> images."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[list[Image.Image]]:
        """Return ``n`` images per prompt. Image ``i`` of a prompt must depend
        only on (prompt, i, seed, config), never on the other prompts of the
        batch, so images can be cached and shared across neurons."""


class Similarity(Backend):
    """Embeddings for image-image and text-text similarity (CLIP by default).

    ``joint`` is true when images and texts share one space (an image's
    cosine to a text says how present the text's concept is in it)."""

    joint: bool = False

    @abc.abstractmethod
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return L2-normalized image embeddings, shape (len(images), d)."""

    @abc.abstractmethod
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Return L2-normalized text embeddings, shape (len(texts), d)."""
