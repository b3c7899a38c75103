"""The synthetic worlds by name: ``shapes`` (world.py, the demo's) and
``marks`` (marks.py). A ``World`` bundles what the rest of the product needs
from a world: its vocabulary, ``concept_terms`` / ``concept_kind`` (to score
labels against ground truth), scene sampling, rendering with ground truth,
captioning and the procedural generator's rule.

Probe folders and targets name their world (``world.json``'s ``"world"``,
a ground-truth entry's ``"world"``); where none is named it is ``shapes``, so
everything written before the marks world existed reads as it did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from builder.errors import ConfigError
from builder.synthetic import marks, marks_captions, world

DEFAULT_WORLD = "shapes"
Box = tuple[int, int, int, int]
Truth = Mapping[str, np.ndarray]  # the arrays of a probe folder's masks/*.npz


@dataclass(frozen=True)
class World:
    """One synthetic world. ``render(scene)`` gives (RGB uint8 (H, W, 3),
    ground-truth arrays by name, as stored in masks/*.npz, ``"masks"`` the
    visible object masks); ``caption(scene, truth, box)`` the exact caption
    of the image or of a crop (truth rendered when None);
    ``scene_for_terms(rng, terms, size)`` a scene showing what ``terms``
    name (the procedural generator's rule)."""

    name: str
    default_size: int
    vocabulary: Mapping[str, tuple[str, ...]]  # kind -> terms
    concept_terms: Callable[[str], set[str]]
    concept_kind: Callable[[str], str | None]
    sample_scene: Callable[[np.random.Generator, int], Any]
    render: Callable[[Any], tuple[np.ndarray, dict[str, np.ndarray]]]
    caption: Callable[[Any, Truth | None, Box | None], str]
    scene_to_dict: Callable[[Any], dict[str, Any]]
    scene_from_dict: Callable[[dict[str, Any]], Any]
    scene_for_terms: Callable[[np.random.Generator, set[str], int], Any]

    def render_image(self, scene: Any) -> Image.Image:
        """The RGB PIL image of ``scene``."""
        return Image.fromarray(self.render(scene)[0], "RGB")


_WORLDS: dict[str, World] = {}


def register_world(w: World) -> World:
    """Add ``w`` to the registry; refuses a name already taken."""
    if w.name in _WORLDS:
        raise ConfigError(f"synthetic world {w.name!r} is already registered")
    _WORLDS[w.name] = w
    return w


def world_names() -> list[str]:
    """Registered world names, sorted."""
    return sorted(_WORLDS)


def get_world(name: str | None = None) -> World:
    """The world called ``name`` (None or "" = ``shapes``)."""
    key = name or DEFAULT_WORLD
    if key not in _WORLDS:
        raise ConfigError(
            f"unknown synthetic world {key!r}; choose one of {', '.join(world_names())}"
        )
    return _WORLDS[key]


# ---------------------------------------------------------------- shapes


def _shapes_render(scene: world.Scene) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    r = world.render_full(scene)
    return r.image, {"masks": r.masks}


def _shapes_caption(scene: world.Scene, truth: Truth | None, box: Box | None) -> str:
    return world.caption(scene, None if truth is None else truth["masks"], box)


def _shapes_scene_for_terms(rng: np.random.Generator, terms: set[str], size: int) -> world.Scene:
    """The procedural generator's rule in the shapes world (see
    ``generator.ProceduralGenerator``); the order of random draws is fixed,
    so images stay the same as long as this function does."""

    def pick(values: Any) -> str | None:
        named = [v for v in values if v in terms]
        return named[int(rng.integers(len(named)))] if named else None

    shape, color, pattern = pick(world.SHAPES), pick(list(world.COLORS)), pick(world.PATTERNS)
    background = pick(world.BACKGROUNDS)
    size_class = ("medium", "large")[int(rng.integers(2))]
    first = world.sample_object(
        rng, size, shape=shape, color=color, pattern=pattern, size_class=size_class
    )
    n_others = int(rng.integers(0, 3))
    others = [world.sample_object(rng, size, size_class="small") for _ in range(n_others)]
    objects = world.place_objects(rng, [first, *others], size)
    if background is None:
        background = world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))]
    return world.Scene(objects, background, int(rng.integers(0, 2**31 - 1)), size)


SHAPES_WORLD = register_world(
    World(
        name="shapes",
        default_size=64,
        vocabulary={
            "shape": world.SHAPES,
            "color": tuple(world.COLORS),
            "pattern": world.PATTERNS,
            "background": world.BACKGROUNDS,
        },
        concept_terms=world.concept_terms,
        concept_kind=world.concept_kind,
        sample_scene=lambda rng, size: world.sample_scene(rng, size=size),
        render=_shapes_render,
        caption=_shapes_caption,
        scene_to_dict=world.scene_to_dict,
        scene_from_dict=world.scene_from_dict,
        scene_for_terms=_shapes_scene_for_terms,
    )
)


# ---------------------------------------------------------------- marks


def _marks_render(scene: marks.MarksScene) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    r = marks.render_full(scene)
    return r.image, r.truth.arrays()


def _marks_caption(scene: marks.MarksScene, truth: Truth | None, box: Box | None) -> str:
    t = None if truth is None else marks.MarksTruth.from_arrays(dict(truth))
    return marks_captions.caption(scene, t, box)


MARKS_WORLD = register_world(
    World(
        name=marks.WORLD_NAME,
        default_size=marks.IMAGE_SIZE,
        vocabulary={
            "shape": marks.SHAPES,
            "color": tuple(marks.COLORS),
            "mark": marks.MARKS,
            "background": marks.BACKGROUNDS,
        },
        concept_terms=marks.concept_terms,
        concept_kind=marks.concept_kind,
        sample_scene=lambda rng, size: marks.sample_scene(rng, size=size),
        render=_marks_render,
        caption=_marks_caption,
        scene_to_dict=marks.scene_to_dict,
        scene_from_dict=marks.scene_from_dict,
        scene_for_terms=marks.scene_for_terms,
    )
)
