"""The procedural text-to-image generator: renders scenes showing what a
prompt names, standing in for Stable Diffusion in a synthetic world
(``world = "shapes"``, the default, or ``"marks"``)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from builder.backends.interfaces import Generator
from builder.synthetic.worlds import DEFAULT_WORLD, get_world

GENERATOR_VERSION = 1


def normalize_prompt(prompt: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: prompts that
    differ only in these render the same images."""
    return " ".join(re.findall(r"[a-z0-9]+", prompt.lower()))


def _rng_for(prompt: str, i: int, seed: int, size: int, world: str) -> np.random.Generator:
    where = "" if world == DEFAULT_WORLD else f"{world}|"  # the shapes world keeps its old keys
    key = f"procedural-v{GENERATOR_VERSION}|{where}{normalize_prompt(prompt)}|{i}|{seed}|{size}"
    digest = hashlib.sha256(key.encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "big"))


class ProceduralGenerator(Generator):
    """Renders ``n`` scenes per prompt in ``world``. The prominent object
    (``objects[0]``, never overlapped by another object) has every shape,
    color and pattern (shapes world) or mark kind and ink (marks world) the
    prompt names (the world's ``concept_terms``); a named background sets the
    background. When the prompt names several values of one kind ("red or
    blue"), each image picks one of them. Everything not named is random,
    unknown words are ignored, and a prompt naming nothing gives random
    scenes. Image ``i`` depends only on (world, normalized prompt, i, seed,
    size). ``size`` defaults to the world's (64 or 128 px)."""

    name = "procedural"

    def __init__(self, size: int | None = None, world: str = DEFAULT_WORLD) -> None:
        self.world = get_world(world)
        self.size = self.world.default_size if size is None else int(size)

    def config_key(self) -> dict[str, Any]:
        """Name, renderer version, image size and (other than shapes) world."""
        key: dict[str, Any] = {"name": self.name, "version": GENERATOR_VERSION, "size": self.size}
        if self.world.name != DEFAULT_WORLD:
            key["world"] = self.world.name
        return key

    def scene_for(self, prompt: str, i: int, seed: int) -> Any:
        """The scene of image ``i`` of ``prompt``."""
        rng = _rng_for(prompt, i, seed, self.size, self.world.name)
        return self.world.scene_for_terms(rng, self.world.concept_terms(prompt), self.size)

    def generate_with_scenes(
        self, prompts: Sequence[str], n: int, seed: int
    ) -> list[list[tuple[Image.Image, Any]]]:
        """Like ``generate`` but each image comes with the scene it shows."""
        out = []
        for prompt in prompts:
            row = []
            for i in range(n):
                scene = self.scene_for(prompt, i, seed)
                row.append((self.world.render_image(scene), scene))
            out.append(row)
        return out

    def generate(self, prompts: Sequence[str], n: int, seed: int) -> list[list[Image.Image]]:
        """``n`` RGB images per prompt (see the class docstring)."""
        return [[img for img, _ in row] for row in self.generate_with_scenes(prompts, n, seed)]

