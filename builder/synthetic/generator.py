"""The procedural text-to-image generator: renders scenes showing what a
prompt names, standing in for Stable Diffusion in the synthetic world."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from builder.backends.interfaces import Generator
from builder.synthetic.world import (
    BACKGROUNDS,
    COLORS,
    PATTERNS,
    SHAPES,
    Scene,
    concept_terms,
    place_objects,
    render,
    sample_object,
)

GENERATOR_VERSION = 1


def normalize_prompt(prompt: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: prompts that
    differ only in these render the same images."""
    return " ".join(re.findall(r"[a-z0-9]+", prompt.lower()))


def _rng_for(prompt: str, i: int, seed: int, size: int) -> np.random.Generator:
    key = f"procedural-v{GENERATOR_VERSION}|{normalize_prompt(prompt)}|{i}|{seed}|{size}"
    digest = hashlib.sha256(key.encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


class ProceduralGenerator(Generator):
    """Renders ``n`` scenes per prompt. The prominent object (``objects[0]``,
    medium or large, never overlapped by another object) has every shape,
    color and pattern the prompt names (``concept_terms``); a named background
    sets the background. When the prompt names several values of one kind
    ("red or blue"), each image picks one of them. Everything not named is
    random, unknown words are ignored, and a prompt naming nothing gives
    random scenes. Image ``i`` depends only on (normalized prompt, i, seed,
    size)."""

    name = "procedural"

    def __init__(self, size: int = 64) -> None:
        self.size = int(size)

    def config_key(self) -> dict[str, Any]:
        """Name, renderer version and image size."""
        return {"name": self.name, "version": GENERATOR_VERSION, "size": self.size}

    def scene_for(self, prompt: str, i: int, seed: int) -> Scene:
        """The scene of image ``i`` of ``prompt``."""
        rng = _rng_for(prompt, i, seed, self.size)
        terms = concept_terms(prompt)

        def pick(values: Sequence[str]) -> str | None:
            named = [v for v in values if v in terms]
            return named[int(rng.integers(len(named)))] if named else None

        shape, color, pattern = pick(SHAPES), pick(list(COLORS)), pick(PATTERNS)
        background = pick(BACKGROUNDS)
        size_class = ("medium", "large")[int(rng.integers(2))]
        first = sample_object(
            rng, self.size, shape=shape, color=color, pattern=pattern, size_class=size_class
        )
        n_others = int(rng.integers(0, 3))
        others = [sample_object(rng, self.size, size_class="small") for _ in range(n_others)]
        objects = place_objects(rng, [first, *others], self.size)
        if background is None:
            background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        return Scene(objects, background, int(rng.integers(0, 2**31 - 1)), self.size)

    def generate_with_scenes(
        self, prompts: Sequence[str], n: int, seed: int
    ) -> list[list[tuple[Image.Image, Scene]]]:
        """Like ``generate`` but each image comes with the scene it shows."""
        out = []
        for prompt in prompts:
            row = []
            for i in range(n):
                scene = self.scene_for(prompt, i, seed)
                row.append((render(scene)[0], scene))
            out.append(row)
        return out

    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[list[Image.Image]]:
        """``n`` RGB images per prompt (see the class docstring)."""
        return [[img for img, _ in row] for row in self.generate_with_scenes(prompts, n, seed)]

