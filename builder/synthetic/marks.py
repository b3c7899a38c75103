"""The marks world: a second synthetic scene family, harder than the shapes
world and with a vocabulary of its own.

Scenes are 128 px: 1-3 anti-aliased objects whose extent spans 15% to 45% of
the image side, most of them carrying a few small *marks* (tiny plus signs,
slashes, ticks or loops of a few pixels, in white or black ink) scattered on
them; the background (sand, water, snow, wood, night) may carry marks too.
Everything is procedural and deterministic, and every pixel's ground truth
is known: which object it shows (visible masks) and whether it is mark ink,
of which kind and ink (mark masks).

Rendering contract (the planted detectors of ``planted_marks.py`` rely on it):

* Objects are rasterized at ``SUPERSAMPLE`` x and box filtered (anti-aliased
  edges); a pixel fully covered by one object shows that object's fill color
  ``COLORS[color]`` exactly, unless it is mark ink.
* Marks are pixel glyphs on the output grid (``GLYPHS``), placed where their
  box plus a 1-px margin lies fully inside their owner (an object, before
  occlusion, or the pure background), at least 1 px apart. A visible ink
  pixel shows ``ink_rgb(ink, kind)`` exactly: the two inks look white and
  black, and the mark kind is coded in the last bits of blue.
* No other pixel (background texture, anti-aliased blend) equals any fill or
  ink color: such pixels are nudged by one unit of blue. So a pixel's exact
  RGB says whether it is a pure pixel of an object of some color, or mark ink
  of some kind and ink, everywhere in the image.

Captions (``marks_captions.py``) follow the crop rule of ``world.caption``
and name marks only where a captioner could see them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

WORLD_NAME = "marks"
IMAGE_SIZE = 128
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("hexagon", "diamond", "crescent", "heart", "arrow", "oval")
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "teal": (0, 128, 128),
    "maroon": (128, 20, 40),
    "olive": (120, 120, 10),
    "navy": (20, 30, 110),
    "lime": (150, 230, 40),
    "coral": (250, 120, 90),
    "gold": (230, 180, 20),
    "lavender": (180, 160, 230),
}
# Base inks; ``ink_rgb`` adds the mark kind's index to blue.
INK_COLORS: dict[str, tuple[int, int, int]] = {"white": (246, 246, 236), "black": (24, 22, 26)}
COLORS: dict[str, tuple[int, int, int]] = {**OBJECT_COLORS, **INK_COLORS}
MARKS: tuple[str, ...] = ("plus", "slash", "tick", "loop")
BACKGROUNDS: tuple[str, ...] = ("sand", "water", "snow", "wood", "night")

EXTENT_RANGE = (0.15, 0.45)  # object extent (diameter) / image side
P_MARKED = 0.7  # an object carries marks
P_BACKGROUND_MARKS = 0.4  # the background carries marks
N_MARKS = (3, 8)  # marks per carrier, inclusive (fewer when they do not fit)
MIN_BACKGROUND_MARKS = 3  # fewer fit: the background gets none


def _glyph(*rows: str) -> np.ndarray:
    return np.array([[c == "#" for c in r] for r in rows], dtype=bool)


# Every glyph box is at least 4 px a side, the smallest attention crop kept.
GLYPHS: dict[str, np.ndarray] = {
    "plus": _glyph("..#..", "..#..", "#####", "..#..", "..#.."),
    "slash": _glyph("....#", "...#.", "..#..", ".#...", "#...."),
    "tick": _glyph("....#", "...#.", "#.#..", ".#..."),
    "loop": _glyph(".##.", "#..#", "#..#", ".##."),
}

# Words (lower case) -> the vocabulary term they name. Disjoint from the
# shapes world's words (tests check it), so the worlds cannot be confused.
_SYNONYMS: dict[str, str] = {
    **{s: s for s in SHAPES},
    **{s + "s": s for s in SHAPES},
    "hexagonal": "hexagon",
    "rhombus": "diamond",
    "rhombuses": "diamond",
    "lozenge": "diamond",
    "moon": "crescent",
    "hearts": "heart",
    "ellipse": "oval",
    "ellipses": "oval",
    "elliptical": "oval",
    **{c: c for c in COLORS},
    "teals": "teal",
    "golden": "gold",
    "plus": "plus",
    "pluses": "plus",
    "plusses": "plus",
    "pluse": "plus",  # what a light singularizer makes of "pluses"
    "slash": "slash",
    "slashes": "slash",
    "tick": "tick",
    "ticks": "tick",
    "checkmark": "tick",
    "checkmarks": "tick",
    "loop": "loop",
    "loops": "loop",
    "hoop": "loop",
    "hoops": "loop",
    "sand": "sand",
    "sandy": "sand",
    "beach": "sand",
    "water": "water",
    "waters": "water",
    "sea": "water",
    "ocean": "water",
    "snow": "snow",
    "snowy": "snow",
    "wood": "wood",
    "wooden": "wood",
    "plank": "wood",
    "planks": "wood",
    "night": "night",
    "nighttime": "night",
}


def concept_kind(term: str) -> str | None:
    """The kind of a vocabulary term: "shape", "color", "mark",
    "background", or None when ``term`` is not in the vocabulary."""
    if term in SHAPES:
        return "shape"
    if term in COLORS:
        return "color"
    if term in MARKS:
        return "mark"
    if term in BACKGROUNDS:
        return "background"
    return None


def concept_terms(text: str) -> set[str]:
    """The vocabulary terms (shapes, colors, marks, backgrounds) that free
    ``text`` names, case-insensitively and with plural/adjective forms folded
    ("white plus signs on sandy ground" -> {"white", "plus", "sand"}).
    Sizes are not returned."""
    words = re.findall(r"[a-z]+", text.lower())
    return {_SYNONYMS[w] for w in words if w in _SYNONYMS}


def ink_rgb(ink: str, kind: str) -> tuple[int, int, int]:
    """The exact RGB of ``kind`` marks in ``ink``: the base ink with the
    kind's index added to blue (invisible, but exact detectors can tell)."""
    r, g, b = INK_COLORS[ink]
    return (r, g, b + MARKS.index(kind))


def code_table() -> dict[tuple[int, int, int], tuple[str, str | None]]:
    """Every exact RGB that carries meaning -> (color, mark kind): object
    fills map to (color, None), inks to (ink, kind)."""
    out: dict[tuple[int, int, int], tuple[str, str | None]] = {
        rgb: (c, None) for c, rgb in OBJECT_COLORS.items()
    }
    for ink in INK_COLORS:
        for kind in MARKS:
            out[ink_rgb(ink, kind)] = (ink, kind)
    assert len(out) == len(OBJECT_COLORS) + len(INK_COLORS) * len(MARKS), "codes must be distinct"
    return out


def pack_rgb(img: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) int64 codes r << 16 | g << 8 | b."""
    a = img.astype(np.int64)
    return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]


_CODES = np.array(sorted((r << 16) | (g << 8) | b for (r, g, b) in code_table()), dtype=np.int64)


@dataclass(frozen=True)
class MarkedObject:
    """One object: shape, fill color, the mark kind it carries and its ink
    (both None when unmarked), how many marks to scatter on it, center
    (cx, cy) and radius in output pixels, rotation ``angle`` in radians."""

    shape: str
    color: str
    mark: str | None
    ink: str | None
    n_marks: int
    cx: float
    cy: float
    radius: float
    angle: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.color not in OBJECT_COLORS:
            raise ValueError(f"unknown object color {self.color!r}")
        _check_marks(self.mark, self.ink, self.n_marks)

    def concepts(self) -> set[str]:
        """The vocabulary terms of this object (its marks included)."""
        return {self.shape, self.color} | ({self.mark, self.ink} if self.mark else set())


def _check_marks(mark: str | None, ink: str | None, n: int) -> None:
    if (mark is None) != (ink is None):
        raise ValueError("a mark kind needs an ink and an ink a mark kind")
    if mark is not None and mark not in MARKS:
        raise ValueError(f"unknown mark kind {mark!r}")
    if ink is not None and ink not in INK_COLORS:
        raise ValueError(f"unknown ink {ink!r}")
    if n < 0 or (mark is None and n):
        raise ValueError(f"bad mark count {n}")


@dataclass(frozen=True)
class MarksScene:
    """Objects in drawing order (later ones cover earlier ones), the
    background, the background's marks (kind, ink, count; None, None, 0 when
    unmarked), the seed of textures, mark positions and caption templates,
    and the square image size in pixels."""

    objects: tuple[MarkedObject, ...]
    background: str
    bg_mark: str | None
    bg_ink: str | None
    bg_n_marks: int
    seed: int
    size: int = IMAGE_SIZE

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        _check_marks(self.bg_mark, self.bg_ink, self.bg_n_marks)


def scene_to_dict(scene: MarksScene) -> dict[str, Any]:
    """A JSON-able dict of ``scene`` (inverse of ``scene_from_dict``)."""
    d = asdict(scene)
    d["objects"] = [asdict(o) for o in scene.objects]
    return d


def scene_from_dict(d: dict[str, Any]) -> MarksScene:
    """Rebuild a MarksScene from ``scene_to_dict`` output."""
    rest = {k: v for k, v in d.items() if k != "objects"}
    return MarksScene(objects=tuple(MarkedObject(**o) for o in d["objects"]), **rest)


def size_word(obj: MarkedObject, image_size: int) -> str:
    """The size word of ``obj``: "small", "medium" or "large" by extent / image side."""
    extent = 2.0 * obj.radius / image_size
    return "small" if extent < 0.24 else "large" if extent > 0.36 else "medium"


# ---------------------------------------------------------------- sampling


def sample_object(
    rng: np.random.Generator,
    size: int = IMAGE_SIZE,
    *,
    shape: str | None = None,
    color: str | None = None,
    mark: str | None = None,
    ink: str | None = None,
    marked: bool | None = None,
    extent: tuple[float, float] = EXTENT_RANGE,
) -> MarkedObject:
    """A random object centered in the image (``place_objects`` moves it).
    Any attribute may be fixed; naming a mark kind or an ink makes it marked,
    ``marked`` forces marks on or off, else it is marked with P_MARKED."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    color = color or list(OBJECT_COLORS)[rng.integers(len(OBJECT_COLORS))]
    if marked is None:
        marked = bool(mark or ink) or bool(rng.random() < P_MARKED)
    n = 0
    if marked:
        mark = mark or MARKS[rng.integers(len(MARKS))]
        ink = ink or list(INK_COLORS)[rng.integers(len(INK_COLORS))]
        n = int(rng.integers(N_MARKS[0], N_MARKS[1] + 1))
    else:
        mark = ink = None
    radius = float(rng.uniform(*extent)) * size / 2.0
    angle = float(rng.uniform(0.0, 2.0 * np.pi))
    return MarkedObject(shape, color, mark, ink, n, size / 2, size / 2, radius, angle)


def place_objects(
    rng: np.random.Generator, objects: list[MarkedObject], size: int
) -> tuple[MarkedObject, ...]:
    """Random positions inside the image. The first object is never
    overlapped; the others overlap each other at most mildly. An object that
    cannot be placed after a few tries is dropped (never the first)."""
    placed: list[MarkedObject] = []
    for k, obj in enumerate(objects):
        r = obj.radius
        for _ in range(30):
            cx = float(rng.uniform(r + 1, size - r - 1))
            cy = float(rng.uniform(r + 1, size - r - 1))
            if all(
                (cx - o.cx) ** 2 + (cy - o.cy) ** 2
                >= ((o.radius + r) * (1.0 if j == 0 else 0.8)) ** 2
                for j, o in enumerate(placed)
            ):
                placed.append(replace(obj, cx=cx, cy=cy))
                break
        else:
            if k == 0:
                placed.append(replace(obj, cx=size / 2, cy=size / 2))
    return tuple(placed)


def sample_background_marks(
    rng: np.random.Generator, mark: str | None = None, ink: str | None = None, force: bool = False
) -> tuple[str | None, str | None, int]:
    """(kind, ink, count) of the background's marks; (None, None, 0) with
    probability 1 - P_BACKGROUND_MARKS unless ``force`` or a kind/ink is named."""
    if not (force or mark or ink) and rng.random() >= P_BACKGROUND_MARKS:
        return None, None, 0
    mark = mark or MARKS[rng.integers(len(MARKS))]
    ink = ink or list(INK_COLORS)[rng.integers(len(INK_COLORS))]
    return mark, ink, int(rng.integers(N_MARKS[0], N_MARKS[1] + 1))


def sample_scene(
    rng: np.random.Generator, size: int = IMAGE_SIZE, n_objects: int | None = None
) -> MarksScene:
    """A random scene: 1-3 (or ``n_objects``) random objects, a random
    background, background marks with probability P_BACKGROUND_MARKS."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    objs = [sample_object(rng, size) for _ in range(n)]
    order = sorted(range(n), key=lambda i: -objs[i].radius)  # big ones first: crowded scenes fit
    placed = place_objects(rng, [objs[i] for i in order], size)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    bg_mark, bg_ink, bg_n = sample_background_marks(rng)
    return MarksScene(
        placed, background, bg_mark, bg_ink, bg_n, int(rng.integers(0, 2**31 - 1)), size
    )


def scene_for_terms(
    rng: np.random.Generator, terms: set[str], size: int = IMAGE_SIZE
) -> MarksScene:
    """A scene showing what ``terms`` name (the procedural generator's rule):
    the prominent object (first, extent 30-45%, never overlapped) has the
    named shape, object color, mark kind and ink (naming either makes it
    marked); a named background sets it. Several values of one kind: each
    scene picks one. The rest is random, with 0-2 small others."""

    def pick(values: Any) -> str | None:
        named = [v for v in values if v in terms]
        return named[int(rng.integers(len(named)))] if named else None

    shape, color = pick(SHAPES), pick(OBJECT_COLORS)
    mark, ink, background = pick(MARKS), pick(INK_COLORS), pick(BACKGROUNDS)
    first = sample_object(
        rng, size, shape=shape, color=color, mark=mark, ink=ink, extent=(0.30, 0.45)
    )
    others = [sample_object(rng, size, extent=(0.15, 0.25)) for _ in range(int(rng.integers(0, 3)))]
    objects = place_objects(rng, [first, *others], size)
    background = background or BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bg_mark, bg_ink, bg_n = sample_background_marks(rng)
    return MarksScene(
        objects, background, bg_mark, bg_ink, bg_n, int(rng.integers(0, 2**31 - 1)), size
    )


# ---------------------------------------------------------------- shapes


def _shape_mask(obj: MarkedObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bool mask of ``obj`` on the subpixel grid xs (W,) x ys (H,)."""
    dx = (xs[None, :] - obj.cx) / obj.radius
    dy = (ys[:, None] - obj.cy) / obj.radius
    ca, sa = np.cos(obj.angle), np.sin(obj.angle)
    u = ca * dx + sa * dy
    v = -sa * dx + ca * dy
    return _UNIT_SHAPES[obj.shape](u, v)


def _hexagon(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    m = np.ones(u.shape, dtype=bool)
    for k in range(3):
        t = k * np.pi / 3
        m &= np.abs(np.cos(t) * u + np.sin(t) * v) <= np.cos(np.pi / 6)
    return m


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = 1.15 * u, -1.15 * v + 0.15
    a, x2 = x * x + y * y - 1.0, x * x
    return a * a * a - x2 * y * y * y <= 0.0


def _arrow(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    shaft = (u >= -1.0) & (u <= 0.05) & (np.abs(v) <= 0.24)
    head = (u >= 0.05) & (u <= 1.0) & (np.abs(v) <= 0.68 * (1.0 - u) / 0.95)
    return shaft | head


_UNIT_SHAPES = {
    "hexagon": _hexagon,
    "diamond": lambda u, v: np.abs(u) / 0.62 + np.abs(v) <= 1.0,
    "crescent": lambda u, v: (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + v * v >= 0.8**2),
    "heart": _heart,
    "arrow": _arrow,
    "oval": lambda u, v: u * u + (v / 0.58) ** 2 <= 1.0,
}


# ---------------------------------------------------------------- backgrounds


def _noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Blocky normal noise (H, W) with ``cell``-px cells, bilinearly smoothed."""
    n = size // cell + 2
    coarse = rng.normal(0, 1, (n, n))
    img = Image.fromarray(coarse.astype(np.float32), "F").resize(
        (n * cell, n * cell), Image.BILINEAR
    )
    return np.asarray(img, dtype=np.float64)[
        cell // 2 : cell // 2 + size, cell // 2 : cell // 2 + size
    ]


def _sand(rng: np.random.Generator, size: int) -> np.ndarray:
    f = size / IMAGE_SIZE
    base = np.array([212, 186, 138], dtype=np.float64) + rng.uniform(-8, 8, 3)
    n = 9 * _noise(rng, size, max(int(12 * f), 2)) + 5 * rng.normal(0, 1, (size, size))
    img = base + n[..., None] * np.array([1.0, 0.9, 0.7])
    grains = rng.random((size, size)) < 0.03  # dark single-pixel grains
    img[grains] = img[grains] * 0.7
    return img


def _water(rng: np.random.Generator, size: int) -> np.ndarray:
    f = size / IMAGE_SIZE
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, 2)
    t = np.sin(
        2 * np.pi * y / (11 * f) + 0.9 * np.sin(2 * np.pi * x / (45 * f) + phase[0]) + phase[1]
    )
    base = np.array([34, 98, 158], dtype=np.float64) + rng.uniform(-10, 10, 3)
    img = base + (18 * t + 4 * rng.normal(0, 1, (size, size)))[..., None] * np.array(
        [0.5, 0.8, 1.0]
    )
    crest = t > 0.93  # thin bright wave crests
    img[crest] = img[crest] + np.array([60, 60, 50])
    return img


def _snow(rng: np.random.Generator, size: int) -> np.ndarray:
    f = size / IMAGE_SIZE
    shade = _noise(rng, size, max(int(24 * f), 2))
    img = np.array([232, 236, 244], dtype=np.float64) + (6 * shade)[..., None] * np.array(
        [1.0, 0.8, 0.4]
    )
    img += rng.normal(0, 2.5, (size, size, 1))
    return np.minimum(img, 252)


def _wood(rng: np.random.Generator, size: int) -> np.ndarray:
    f = size / IMAGE_SIZE
    ph = max(int(18 * f), 6)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.empty((size, size, 3), dtype=np.float64)
    for row in range(size // ph + 1):
        tone = np.array([150, 100, 60], dtype=np.float64) + rng.uniform(-18, 18) * np.array(
            [1.0, 0.7, 0.5]
        )
        img[row * ph : (row + 1) * ph] = tone
    phase = rng.uniform(0, 2 * np.pi)
    grain = np.sin(2 * np.pi * (y + 3 * np.sin(x / (15 * f) + phase)) / (3.5 * f))
    img += (9 * grain + 3 * rng.normal(0, 1, (size, size)))[..., None] * np.array([1.0, 0.7, 0.5])
    img[(np.arange(size) % ph) == 0] = (80, 50, 30)  # seams between planks
    return img


def _night(rng: np.random.Generator, size: int) -> np.ndarray:
    top = np.array([8, 12, 34], dtype=np.float64) + rng.uniform(-4, 4, 3)
    bot = np.array([26, 30, 64], dtype=np.float64) + rng.uniform(-4, 4, 3)
    t = np.linspace(0, 1, size)[:, None, None]
    img = np.broadcast_to(top * (1 - t) + bot * t, (size, size, 3)).copy()
    img += rng.normal(0, 2, (size, size, 1))
    stars = rng.random((size, size)) < 0.004  # single bright pixels, like tiny marks
    img[stars] = rng.uniform(170, 240, (int(stars.sum()), 1))
    return img


_BACKGROUND_TEXTURES = {
    "sand": _sand,
    "water": _water,
    "snow": _snow,
    "wood": _wood,
    "night": _night,
}


def background_image(kind: str, size: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3) background texture; no pixel equals a fill or ink."""
    if kind not in _BACKGROUND_TEXTURES:
        raise ValueError(f"unknown background {kind!r}")
    img = _BACKGROUND_TEXTURES[kind](np.random.default_rng(seed), size)
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return _avoid_codes(out, np.zeros((size, size), dtype=bool))


def _avoid_codes(img: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Nudge (blue +-1) every pixel outside ``keep`` that exactly equals a
    fill or ink color, in place; returns ``img``."""
    for _ in range(6):
        bad = np.isin(pack_rgb(img), _CODES) & ~keep
        if not bad.any():
            break
        b = img[..., 2]
        b[bad] = np.where(b[bad] < 255, b[bad] + 1, b[bad] - 2)
    return img


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class MarksTruth:
    """Per-pixel ground truth of a render: visible object masks (n, H, W)
    bool, and for mark ink pixels the kind and ink (indices into MARKS and
    INK_COLORS, int8 (H, W), -1 where the pixel is no mark ink). A mark's
    owner is the object whose mask holds it, or the background."""

    masks: np.ndarray
    mark_kind: np.ndarray
    mark_ink: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays, by name, as stored in a probe folder's masks/*.npz."""
        return {"masks": self.masks, "mark_kind": self.mark_kind, "mark_ink": self.mark_ink}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> MarksTruth:
        """Inverse of ``arrays``."""
        return cls(
            np.asarray(arrays["masks"], dtype=bool),
            np.asarray(arrays["mark_kind"], dtype=np.int8),
            np.asarray(arrays["mark_ink"], dtype=np.int8),
        )

    def mark_pixels(self) -> np.ndarray:
        """Bool (H, W): mark ink pixels."""
        return self.mark_kind >= 0


@dataclass(frozen=True)
class MarksRendering:
    """A render: RGB image (uint8 H, W, 3), its ``truth``, ``pure`` (pixels
    covered entirely by one layer: an object or the background) and the
    coverage (n_objects + 1, H, W) float; index 0 = background."""

    image: np.ndarray
    truth: MarksTruth
    pure: np.ndarray
    coverage: np.ndarray

    @property
    def masks(self) -> np.ndarray:
        return self.truth.masks


@dataclass(frozen=True)
class PlacedMark:
    """One glyph: owner layer (0 = background, k = object k-1), kind, ink and
    the output-pixel row/column of its box's top-left corner."""

    layer: int
    kind: str
    ink: str
    y: int
    x: int


@lru_cache(maxsize=8)
def _subpixel_coords(size: int) -> np.ndarray:
    return (np.arange(size * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE


@lru_cache(maxsize=8)
def _pixel_index(size: int) -> np.ndarray:
    """Output-pixel index of every subpixel, flattened in subpixel order."""
    rows = np.repeat(np.arange(size), SUPERSAMPLE)
    return (rows[:, None] * size + rows[None, :]).ravel()


def _box(obj: MarkedObject, size: int) -> tuple[int, int, int, int]:
    """Output-pixel box (x0, y0, x1, y1) holding the object."""
    x0 = max(int(np.floor(obj.cx - obj.radius)) - 1, 0)
    y0 = max(int(np.floor(obj.cy - obj.radius)) - 1, 0)
    x1 = min(int(np.ceil(obj.cx + obj.radius)) + 1, size)
    y1 = min(int(np.ceil(obj.cy + obj.radius)) + 1, size)
    return x0, y0, x1, y1


def _rasterize(scene: MarksScene) -> tuple[np.ndarray, list[np.ndarray]]:
    """(visible coverage (n + 1, H, W) float32 with index 0 = background,
    each object's own coverage (H, W) before occlusion)."""
    size, s = scene.size, SUPERSAMPLE
    coords = _subpixel_coords(size)
    lab = np.zeros((size * s, size * s), dtype=np.int8)  # 0 = background
    own: list[np.ndarray] = []
    for k, obj in enumerate(scene.objects, start=1):
        cov = np.zeros((size, size), dtype=np.float32)
        x0, y0, x1, y1 = _box(obj, size)
        if x1 > x0 and y1 > y0:
            m = _shape_mask(obj, coords[x0 * s : x1 * s], coords[y0 * s : y1 * s])
            lab[y0 * s : y1 * s, x0 * s : x1 * s][m] = k
            cov[y0:y1, x0:x1] = m.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
        own.append(cov)
    n = len(scene.objects)
    # subpixels per (layer, output pixel), counted in one bincount
    idx = lab.astype(np.int64).ravel() * (size * size) + _pixel_index(size)
    counts = np.bincount(idx, minlength=(n + 1) * size * size)
    return counts.reshape(n + 1, size, size).astype(np.float32) / (s * s), own


def _place_glyphs(
    free: np.ndarray, kind: str, n: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Top-left corners of up to ``n`` ``kind`` glyphs whose box plus a 1-px
    margin lies in ``free`` (bool H, W), boxes at least 1 px apart."""
    gh, gw = GLYPHS[kind].shape
    wh, ww = gh + 2, gw + 2  # window = glyph box + margin
    ii = np.pad(free.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    fits = (ii[wh:, ww:] - ii[:-wh, ww:] - ii[wh:, :-ww] + ii[:-wh, :-ww]) == wh * ww
    out: list[tuple[int, int]] = []
    for _ in range(n):
        ys, xs = np.nonzero(fits)
        if len(ys) == 0:
            break
        j = int(rng.integers(len(ys)))
        y, x = int(ys[j]), int(xs[j])
        out.append((y + 1, x + 1))
        # no later window may overlap this one's margin
        fits[max(0, y - wh + 1) : y + wh, max(0, x - ww + 1) : x + ww] = False
    return out


def place_marks(scene: MarksScene, coverage: np.ndarray, own: list[np.ndarray]) -> list[PlacedMark]:
    """Every glyph of the scene. Object k's marks lie inside the object (own
    coverage 1, before occlusion; a front object may hide them); background
    marks on pure background, and only when at least MIN_BACKGROUND_MARKS fit.
    Positions depend only on the scene (seeded by scene.seed and the layer)."""
    marks: list[PlacedMark] = []
    for k, obj in enumerate(scene.objects, start=1):
        if obj.mark and obj.ink:
            rng = np.random.default_rng([scene.seed, k])
            for y, x in _place_glyphs(own[k - 1] >= 1.0, obj.mark, obj.n_marks, rng):
                marks.append(PlacedMark(k, obj.mark, obj.ink, y, x))
    if scene.bg_mark and scene.bg_ink:
        rng = np.random.default_rng([scene.seed, 0])
        spots = _place_glyphs(coverage[0] >= 1.0, scene.bg_mark, scene.bg_n_marks, rng)
        if len(spots) >= MIN_BACKGROUND_MARKS:
            marks.extend(PlacedMark(0, scene.bg_mark, scene.bg_ink, y, x) for y, x in spots)
    return marks


def _layer_colors(scene: MarksScene, marks: list[PlacedMark]) -> list[np.ndarray]:
    """Per layer, the (H, W, 3) float colors it shows where it is visible:
    background texture or object fill, with the layer's glyphs inked in."""
    size = scene.size
    layers = [background_image(scene.background, size, scene.seed).astype(np.float32)]
    for obj in scene.objects:
        layers.append(
            np.broadcast_to(np.array(COLORS[obj.color], np.float32), (size, size, 3)).copy()
        )
    for m in marks:
        g = GLYPHS[m.kind]
        region = layers[m.layer][m.y : m.y + g.shape[0], m.x : m.x + g.shape[1]]
        region[g] = ink_rgb(m.ink, m.kind)
    return layers


def _truth(scene: MarksScene, coverage: np.ndarray, marks: list[PlacedMark]) -> MarksTruth:
    size, n = scene.size, len(scene.objects)
    masks = coverage[1:] >= 0.5
    taken = np.zeros((size, size), dtype=bool)
    for k in range(n - 1, -1, -1):  # an exact half-half split goes to the front object
        masks[k] &= ~taken
        taken |= masks[k]
    kind = np.full((size, size), -1, dtype=np.int8)
    ink = np.full((size, size), -1, dtype=np.int8)
    for m in marks:
        g = GLYPHS[m.kind]
        sl = (slice(m.y, m.y + g.shape[0]), slice(m.x, m.x + g.shape[1]))
        seen = g & (coverage[m.layer][sl] >= 1.0)  # ink shows only where its layer is alone
        kind[sl][seen] = MARKS.index(m.kind)
        ink[sl][seen] = list(INK_COLORS).index(m.ink)
    return MarksTruth(masks, kind, ink)


def render_full(scene: MarksScene) -> MarksRendering:
    """Render ``scene`` with its full ground truth (see ``MarksRendering``)."""
    coverage, own = _rasterize(scene)
    marks = place_marks(scene, coverage, own)
    layers = _layer_colors(scene, marks)
    img = sum(coverage[k][..., None] * layers[k] for k in range(len(layers)))
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    truth = _truth(scene, coverage, marks)
    pure = coverage.max(axis=0) >= 1.0
    meaningful = truth.mark_pixels() | (pure & (coverage[0] < 1.0))  # ink, or a pure object pixel
    _avoid_codes(image, meaningful)
    return MarksRendering(image, truth, pure, coverage)


def render(scene: MarksScene) -> tuple[Image.Image, MarksTruth]:
    """Render ``scene`` -> (RGB PIL image, its ground truth)."""
    r = render_full(scene)
    return Image.fromarray(r.image, "RGB"), r.truth
