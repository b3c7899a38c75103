"""Image and text similarity backends.

``target-features``: image embeddings from a vision model's penultimate
features (the input of its last linear layer, or a named layer, spatially
averaged), text embeddings from the atlas embedder. It stands in for CLIP
where no CLIP weights exist (the synthetic world); the atlas meta says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from builder.backends.interfaces import Similarity
from builder.backends.layers import hooked, summarize
from builder.backends.targets import load_target, resolve_device
from builder.errors import BackendError


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class TargetFeatureSimilarity(Similarity):
    """Penultimate features of a target model for images; a sentence
    embedder for texts."""

    name = "target-features"

    def __init__(
        self,
        target: str = "demo-cnn",
        layer: str = "",
        target_options: dict[str, Any] | None = None,
        text_embedder: str = "minilm",
        device: str = "auto",
        batch_size: int = 64,
    ) -> None:
        self.spec = target
        self.options = dict(target_options or {})
        self.text_embedder = text_embedder
        self.batch_size = int(batch_size)
        self.target = load_target(f"similarity:{target}", target, self.options, resolve_device(device))
        self.layer = layer or _last_linear(self.target.module)
        self.target.check_layers([self.layer])
        # the last linear's *input* is the penultimate feature vector
        self._use_input = not layer

    def config_key(self) -> dict:
        return {"name": self.name, "target": self.spec, "options": self.options, "layer": self.layer,
                "text_embedder": self.text_embedder}

    def describe(self) -> str:
        what = f"input of {self.layer!r}" if self._use_input else f"output of {self.layer!r}"
        return f"image similarity from the {what} of {self.spec!r}; text similarity from {self.text_embedder!r}"

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        feats: list[np.ndarray] = []
        module = dict(self.target.module.named_modules())[self.layer]
        grabbed: list[torch.Tensor] = []

        def pre_hook(_m, inputs):
            grabbed.append(inputs[0])

        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack([self.target.preprocess(im) for im in images[start : start + self.batch_size]])
                grabbed.clear()
                if self._use_input:
                    h = module.register_forward_pre_hook(pre_hook)
                    try:
                        self.target.module(batch.to(self.target.device))
                    finally:
                        h.remove()
                    x = grabbed[0]
                    x = x.flatten(1) if x.dim() > 2 else x
                else:
                    out: dict[str, torch.Tensor] = {}
                    with hooked(self.target.module, [self.layer], out.__setitem__):
                        self.target.module(batch.to(self.target.device))
                    x = summarize(out[self.layer], "mean")
                feats.append(x.float().cpu().numpy())
        if not feats:
            return np.zeros((0, 1), np.float32)
        return _normalize(np.concatenate(feats))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        from query.embedder import get_embedder

        return get_embedder(self.text_embedder).embed(list(texts))


def _last_linear(module: torch.nn.Module) -> str:
    name = ""
    for n, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            name = n
    if not name:
        raise BackendError("target-features similarity: the model has no Linear layer; set similarity_options.layer")
    return name
