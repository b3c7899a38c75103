"""The planted-neuron model: a target whose units are exact pixel detectors
of known concepts, so the atlas's labels can be checked against ground truth.

Input: float tensor (B, 3, H, W) in [0, 1], as made by ``ToTensor`` alone (no
normalization). Layers:

* ``detectors`` -> (B, U, H, W): unit u is > 0 on a pixel whose exact RGB is
  a fill of one of ``planted_concepts[u]`` and 0.0 elsewhere (1.0 for a
  color, ``PATTERN_GAIN`` for a pattern's ink). A color unit
  fires on every fully covered pixel of an object of that color (its main
  color and its pattern ink); a pattern unit fires on the pattern-ink pixels
  of objects with that pattern (the stripes, the dots, the checks). Two-concept
  units fire for either concept (planted polysemanticity).
* ``pooled`` -> (B, U): spatial max of ``detectors``.

Exactness holds on pixels covered by a single layer (``Rendering.pure``);
anti-aliased edge pixels blend colors and are almost always 0. Background
pixels are never fills (``world.background_image``), so backgrounds give 0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from builder.synthetic.world import COLORS, PATTERNS, fill_colors

PLANTED_CONCEPTS: list[tuple[str, ...]] = [
    *[(c,) for c in COLORS],
    ("striped",),
    ("dotted",),
    ("checkered",),
    ("red", "checkered"),
    ("blue", "yellow"),
    ("green", "dotted"),
    ("orange", "purple"),
    ("cyan", "striped"),
    ("pink", "green"),
    ("yellow", "checkered"),
]


# A pattern unit sees only ink pixels: about half of a striped or checkered
# object and a sixth of a dotted one (measured on 400 scenes: 0.50, 0.50,
# 0.16). Its response is scaled by the inverse, so a pattern and a color are
# equally strong causes of a two-concept unit (otherwise the color would fill
# every top image and the pattern would never be seen) and the unit's spatial
# mean over an object is ~1 whatever its concept.
PATTERN_GAIN: dict[str, float] = {"striped": 2.0, "dotted": 6.25, "checkered": 2.0}


def _unit_fill_table(concepts: list[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted fill codes (F,), unit x fill incidence (U, F+1); the last
    column is the "no fill" pixel and is all zeros)."""
    fills = fill_colors()
    codes = sorted(fills)
    table = np.zeros((len(concepts), len(codes) + 1), dtype=np.float32)
    for u, concept in enumerate(concepts):
        for j, rgb in enumerate(codes):
            color, pattern = fills[rgb]
            for term in concept:
                # solid has no ink of its own, so "solid" is never detectable
                if term in COLORS and color == term:
                    table[u, j] = max(table[u, j], 1.0)
                elif term in PATTERNS[1:] and pattern == term:
                    table[u, j] = max(table[u, j], PATTERN_GAIN[term])
    packed = np.array([(r << 16) | (g << 8) | b for r, g, b in codes], dtype=np.int64)
    return packed, table


class ExactDetectors(nn.Module):
    """Pixel-exact detectors: (B, 3, H, W) in [0, 1] -> (B, U, H, W), > 0
    exactly on the unit's concept pixels (1 for a color, ``PATTERN_GAIN`` for
    a pattern's ink) and 0 elsewhere."""

    def __init__(self, concepts: list[tuple[str, ...]]) -> None:
        super().__init__()
        for concept in concepts:
            for term in concept:
                if term not in COLORS and term not in PATTERNS[1:]:
                    raise ValueError(f"no exact detector for {term!r}")
        codes, table = _unit_fill_table(concepts)
        self.register_buffer("codes", torch.from_numpy(codes), persistent=False)
        self.register_buffer("table", torch.from_numpy(table), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lookup_codes(x, self.codes, self.table)


def lookup_codes(x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-pixel table lookup by exact RGB: (B, 3, H, W) in [0, 1] -> (B, U, H,
    W) with ``table[:, j]`` where the pixel's code r<<16|g<<8|b is
    ``codes[j]`` (sorted) and ``table[:, -1]`` elsewhere."""
    q = torch.round(x.clamp(0, 1) * 255).to(torch.int64)
    code = (q[:, 0] << 16) | (q[:, 1] << 8) | q[:, 2]  # (B, H, W)
    idx = torch.searchsorted(codes, code).clamp(max=len(codes) - 1)
    found = codes[idx] == code
    idx = torch.where(found, idx, torch.full_like(idx, len(codes)))
    out = table[:, idx]  # (U, B, H, W)
    return out.permute(1, 0, 2, 3).contiguous().to(x.dtype)


class SpatialMax(nn.Module):
    """(B, U, H, W) -> (B, U): max over the spatial dimensions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


class PlantedModel(nn.Module):
    """``detectors`` (exact pixel detectors) then ``pooled`` (spatial max);
    ``planted_concepts[u]`` is the concept tuple of unit ``u``."""

    def __init__(self, concepts: list[tuple[str, ...]] | None = None) -> None:
        super().__init__()
        self.planted_concepts: list[tuple[str, ...]] = list(concepts or PLANTED_CONCEPTS)
        self.detectors = ExactDetectors(self.planted_concepts)
        self.pooled = SpatialMax()
        # what the builder stores in the atlas meta so `dnd-atlas eval` can score labels
        self.ground_truth = {
            layer: {"role": "planted", "concepts": [list(c) for c in self.planted_concepts]}
            for layer in ("detectors", "pooled")
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.detectors(x))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor (3, H, W) in [0, 1] (ToTensor, nothing else)."""
    arr = np.array(image.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float() / 255.0


def planted_model() -> tuple[PlantedModel, Callable[[Image.Image], torch.Tensor]]:
    """Target factory: (the planted-neuron model in eval mode, ToTensor preprocess)."""
    return PlantedModel().eval(), to_tensor
