"""CLIP similarity backends: ``clip`` and ``sentence``.

``clip``: image and text embeddings from a transformers ``CLIPModel`` (its
projected, L2-normalized features), the paper's Image-Products metric and
CLIP text cosine. ``sentence``: the same CLIP image embeddings, with text
embeddings from a sentence-transformers embedder (all-mpnet-base-v2 by
default: the paper's MPNet text metric); it is ``clip`` with
``text_embedder="mpnet"``, registered under its own name so a config can
say what it means. Any ``clip`` instance can also take
``text_embedder="minilm"`` / ``"mpnet"`` / ``"sentence:<path>"``.

Text-text similarity is what the builder uses text embeddings for (label
deduplication); image-text similarity needs ``text_embedder="clip"``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from builder.backends.hf import dtype_kwarg, load_pretrained, resolve_device_dtype
from builder.backends.interfaces import Similarity
from builder.errors import BackendError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "openai/clip-vit-base-patch16"


class ClipSimilarity(Similarity):
    """CLIP image embeddings; CLIP or sentence-transformers text embeddings.

    Options: ``model`` (hub id or local folder), ``revision``, ``device``
    ("auto"), ``dtype`` ("auto": fp16 on CUDA, fp32 on CPU), ``batch_size``
    (64), ``text_embedder`` ("clip", or an atlas embedder name: "minilm",
    "mpnet", "sentence:<path>")."""

    name = "clip"
    default_text_embedder = "clip"

    def __init__(
        self,
        model: str | None = None,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 64,
        text_embedder: str | None = None,
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.model_id = str(model or DEFAULT_MODEL)
        self.revision = revision or None
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise BackendError(f"{self.name} similarity: batch_size must be >= 1")
        self.text_embedder = str(text_embedder or self.default_text_embedder)
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.model = load_pretrained(
            CLIPModel.from_pretrained, self.model_id, self.revision, "CLIP",
            **dtype_kwarg("transformers", self.dtype),
        ).to(self.device).eval()
        self.processor = load_pretrained(CLIPProcessor.from_pretrained, self.model_id, self.revision, "CLIP")
        self._embedder: Any = None
        if self.text_embedder != "clip":
            self._embedder = self._load_embedder()

    def _load_embedder(self) -> Any:
        from query.embedder import get_embedder
        from query.errors import AtlasError

        try:
            return get_embedder(self.text_embedder)
        except AtlasError as exc:
            raise BackendError(
                f"{self.name} similarity: text_embedder {self.text_embedder!r}: {exc}"
            ) from exc

    def config_key(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_id, "revision": self.revision,
                "dtype": str(self.dtype).removeprefix("torch."), "text_embedder": self.text_embedder}

    def describe(self) -> str:
        """One line for the atlas meta: which models embed images and texts."""
        rev = f"@{self.revision}" if self.revision else ""
        texts = (f"CLIP text tower of {self.model_id}{rev}" if self.text_embedder == "clip"
                 else f"sentence embedder {self.text_embedder!r}")
        return f"image similarity from CLIP {self.model_id}{rev}; text similarity from {texts}"

    @property
    def joint(self) -> bool:
        """Images and texts share one space (CLIP's own text tower): concept
        presence in an image is then the cosine of the two."""
        return self.text_embedder == "clip"

    @property
    def image_dim(self) -> int:
        """Size of the image embeddings (CLIP's projection size)."""
        return int(self.model.config.projection_dim)

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalized float32 CLIP image embeddings, shape (len(images), d)."""
        out = [self._image_batch([im.convert("RGB") for im in images[s : s + self.batch_size]])
               for s in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.image_dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized float32 text embeddings (CLIP's, or the sentence
        embedder's), shape (len(texts), d)."""
        if self._embedder is not None:
            return np.asarray(self._embedder.embed(list(texts)), dtype=np.float32)
        out = [self._text_batch(list(texts[s : s + self.batch_size]))
               for s in range(0, len(texts), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.image_dim), np.float32)

    @torch.inference_mode()
    def _image_batch(self, images: list[Image.Image]) -> np.ndarray:
        inputs = self.processor(images=images, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        return _normalized(self.model.get_image_features(pixel_values=pixels))

    @torch.inference_mode()
    def _text_batch(self, texts: list[str]) -> np.ndarray:
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return _normalized(self.model.get_text_features(**inputs))


class SentenceSimilarity(ClipSimilarity):
    """``sentence``: CLIP image embeddings, sentence-transformers text
    embeddings (``text_embedder``, "mpnet" by default). Same options as
    ``clip``."""

    name = "sentence"
    default_text_embedder = "mpnet"

    def __init__(
        self,
        text_embedder: str = "mpnet",
        model: str | None = None,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 64,
    ) -> None:
        if text_embedder == "clip":
            raise BackendError("sentence similarity: text_embedder must be a sentence embedder; "
                               "use the 'clip' similarity for CLIP text embeddings")
        super().__init__(model=model, revision=revision, device=device, dtype=dtype,
                         batch_size=batch_size, text_embedder=text_embedder)


def _normalized(features: Any) -> np.ndarray:
    # transformers 5.x returns an output object whose pooler_output is the
    # projected embedding; 4.x returns that tensor itself
    if not isinstance(features, torch.Tensor):
        features = getattr(features, "pooler_output", None)
        if features is None:
            raise BackendError("CLIP returned no projected features (no pooler_output)")
    x = features.float()
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy().astype(np.float32)
