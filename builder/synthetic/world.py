"""The synthetic world: a fixed vocabulary, a scene sampler, an exact renderer
and exact captions.

Everything here is procedural and deterministic, so the ground truth of every
pixel is known: which object covers it, and that object's shape, color and
pattern. The rest of the pipeline (oracle captioner, procedural generator,
planted-neuron model, demo CNN) is built on top of it so that the whole
Describe-and-Dissect method can run and be *measured* offline.

Rendering rules that the planted model relies on (see ``planted.py``):

* Shapes are rasterized at ``SUPERSAMPLE`` x the output resolution and box
  filtered, so edges are anti-aliased.
* Patterns are laid out on the *output* pixel grid, so a pixel fully covered
  by one object has exactly one of that object's fill colors: its main color
  (``COLORS[color]``) or its pattern ink (``pattern_ink(color, pattern)``).
* Background pixels never exactly equal any object fill color (they are
  nudged by one unit of blue when they would).
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 210, 30),
    "green": (40, 170, 60),
    "cyan": (30, 190, 210),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 120, 200),
}
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS: tuple[str, ...] = ("plain", "sky", "grass", "brick")
SIZES: tuple[str, ...] = ("small", "medium", "large")

SUPERSAMPLE = 4
# Radius ranges in pixels for a 64 px image; scaled linearly for other sizes.
_RADIUS = {"small": (6.0, 8.5), "medium": (10.0, 13.0), "large": (15.0, 19.0)}

# Words (lower case) -> the vocabulary term they name.
_SYNONYMS: dict[str, str] = {
    **{s: s for s in SHAPES},
    **{s + "s": s for s in SHAPES},
    "crosses": "cross",
    "circular": "circle",
    "triangular": "triangle",
    "squared": "square",
    **{c: c for c in COLORS},
    "violet": "purple",
    "magenta": "pink",
    "turquoise": "cyan",
    "solid": "solid",
    "stripe": "striped",
    "stripes": "striped",
    "striped": "striped",
    "stripy": "striped",
    "dot": "dotted",
    "dots": "dotted",
    "dotted": "dotted",
    "spotted": "dotted",
    "polka": "dotted",
    "checker": "checkered",
    "checkers": "checkered",
    "checkered": "checkered",
    "chequered": "checkered",
    "checked": "checkered",
    "checkerboard": "checkered",
    "checkerboards": "checkered",
    "plain": "plain",
    "sky": "sky",
    "skies": "sky",
    "grass": "grass",
    "grassy": "grass",
    "lawn": "grass",
    "brick": "brick",
    "bricks": "brick",
}


def concept_kind(term: str) -> str | None:
    """The kind of a vocabulary term: "shape", "color", "pattern",
    "background", or None when ``term`` is not in the vocabulary."""
    if term in SHAPES:
        return "shape"
    if term in COLORS:
        return "color"
    if term in PATTERNS:
        return "pattern"
    if term in BACKGROUNDS:
        return "background"
    return None


def concept_terms(text: str) -> set[str]:
    """The vocabulary terms (shapes, colors, patterns, backgrounds) that free
    ``text`` names, case-insensitively and with plural/adjective forms folded
    ("red circles" -> {"red", "circle"}, "checkerboard" -> {"checkered"}).

    Used to compare a neuron label with a planted concept and by the
    procedural generator to decide what to render. Sizes are not returned."""
    words = re.findall(r"[a-z]+", text.lower())
    return {_SYNONYMS[w] for w in words if w in _SYNONYMS}


def pattern_ink(color: str, pattern: str) -> tuple[int, int, int]:
    """The secondary ink of ``pattern`` on an object of ``color``: a tint of
    the color (light stripes, dark dots, pale checkers); for "solid" the main
    color itself. Every (color, pattern) ink is distinct from every other
    fill, which is what makes the planted detectors exact."""
    rgb = np.array(COLORS[color], dtype=np.float64)
    if pattern == "solid":
        out = rgb
    elif pattern == "striped":
        out = rgb + 0.5 * (255.0 - rgb)
    elif pattern == "dotted":
        out = 0.45 * rgb
    elif pattern == "checkered":
        out = rgb + 0.75 * (255.0 - rgb)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return tuple(int(v) for v in np.rint(out))  # type: ignore[return-value]


def fill_colors() -> dict[tuple[int, int, int], tuple[str, str]]:
    """Every exact RGB a fully covered object pixel can take -> (color,
    pattern) it belongs to; the main color maps to (color, "solid")."""
    out: dict[tuple[int, int, int], tuple[str, str]] = {}
    for c in COLORS:
        for p in PATTERNS:
            out[pattern_ink(c, p)] = (c, p)
    assert len(out) == len(COLORS) * (len(PATTERNS)), "fill colors must be distinct"
    return out


_FILL_CODES = np.array(
    sorted((r << 16) | (g << 8) | b for (r, g, b) in fill_colors()), dtype=np.int64
)


@dataclass(frozen=True)
class SceneObject:
    """One shape: attributes, center (cx, cy) and radius in output pixels,
    rotation ``angle`` in radians."""

    shape: str
    color: str
    pattern: str
    size: str
    cx: float
    cy: float
    radius: float
    angle: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")

    def concepts(self) -> set[str]:
        """The vocabulary terms that describe this object."""
        return {self.shape, self.color, self.pattern}


@dataclass(frozen=True)
class Scene:
    """Objects in drawing order (later ones cover earlier ones), the
    background kind, the seed of the background texture and caption
    template, and the square image size in pixels."""

    objects: tuple[SceneObject, ...]
    background: str
    seed: int
    size: int = 64

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    """A JSON-able dict of ``scene`` (inverse of ``scene_from_dict``)."""
    return {
        "objects": [asdict(o) for o in scene.objects],
        "background": scene.background,
        "seed": scene.seed,
        "size": scene.size,
    }


def scene_from_dict(d: dict[str, Any]) -> Scene:
    """Rebuild a Scene from ``scene_to_dict`` output."""
    return Scene(
        objects=tuple(SceneObject(**o) for o in d["objects"]),
        background=d["background"],
        seed=int(d["seed"]),
        size=int(d["size"]),
    )


def sample_object(
    rng: np.random.Generator,
    size: int = 64,
    *,
    shape: str | None = None,
    color: str | None = None,
    pattern: str | None = None,
    size_class: str | None = None,
) -> SceneObject:
    """A random object (any attribute may be fixed), centered at the image
    center; ``sample_scene`` places it."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    color = color or list(COLORS)[rng.integers(len(COLORS))]
    pattern = pattern or PATTERNS[rng.integers(len(PATTERNS))]
    size_class = size_class or SIZES[rng.integers(len(SIZES))]
    lo, hi = _RADIUS[size_class]
    radius = float(rng.uniform(lo, hi)) * size / 64.0
    angle = float(rng.uniform(0.0, 2.0 * np.pi))
    return SceneObject(shape, color, pattern, size_class, size / 2, size / 2, radius, angle)


def place_objects(
    rng: np.random.Generator, objects: list[SceneObject], size: int
) -> tuple[SceneObject, ...]:
    """Give each object a random position inside the image. The first object
    is never overlapped by any other; the others overlap each other at most
    mildly. An object that cannot be placed after a few tries is dropped
    (never the first)."""
    placed: list[SceneObject] = []
    for k, obj in enumerate(objects):
        r = obj.radius
        for _ in range(30):
            cx = float(rng.uniform(r + 1, size - r - 1))
            cy = float(rng.uniform(r + 1, size - r - 1))
            ok = True
            for j, other in enumerate(placed):
                need = (other.radius + r) * (1.0 if j == 0 else 0.8)
                if (cx - other.cx) ** 2 + (cy - other.cy) ** 2 < need**2:
                    ok = False
                    break
            if ok:
                placed.append(_moved(obj, cx, cy))
                break
        else:
            if k == 0:  # cannot happen for an empty image, kept for safety
                placed.append(_moved(obj, size / 2, size / 2))
    return tuple(placed)


def _moved(obj: SceneObject, cx: float, cy: float) -> SceneObject:
    d = asdict(obj)
    d.update(cx=cx, cy=cy)
    return SceneObject(**d)


def sample_scene(rng: np.random.Generator, size: int = 64, n_objects: int | None = None) -> Scene:
    """A random scene of ``n_objects`` (default 1-3) objects with random
    attributes, sizes and positions, on a random background."""
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    objs = [sample_object(rng, size) for _ in range(n)]
    # Place big objects first so that crowded scenes still fit.
    order = sorted(range(n), key=lambda i: -objs[i].radius)
    placed = place_objects(rng, [objs[i] for i in order], size)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return Scene(placed, background, int(rng.integers(0, 2**31 - 1)), size)


# ---------------------------------------------------------------- rendering


@lru_cache(maxsize=8)
def _subpixel_coords(size: int) -> np.ndarray:
    s = SUPERSAMPLE
    return (np.arange(size * s, dtype=np.float32) + 0.5) / s


@lru_cache(maxsize=8)
def _pixel_index(size: int) -> np.ndarray:
    """Output-pixel index of every subpixel, flattened in subpixel order."""
    s = SUPERSAMPLE
    rows = np.repeat(np.arange(size), s)
    return (rows[:, None] * size + rows[None, :]).ravel()


def _shape_mask(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bool mask of ``obj`` on the subpixel grid xs (W,) x ys (H,)."""
    dx = (xs[None, :] - obj.cx) / obj.radius
    dy = (ys[:, None] - obj.cy) / obj.radius
    ca, sa = np.cos(obj.angle), np.sin(obj.angle)
    u = ca * dx + sa * dy
    v = -sa * dx + ca * dy
    shape = obj.shape
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= 1.0) & (d2 >= 0.55**2)
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.34) & (av <= 1.0)) | ((av <= 0.34) & (au <= 1.0))
    if shape == "triangle":
        m = np.ones(u.shape, dtype=bool)
        for k in range(3):
            t = -np.pi / 2 + k * 2 * np.pi / 3  # vertex direction
            m &= -(np.cos(t) * u + np.sin(t) * v) <= 0.5
        return m
    if shape == "star":
        theta = np.arctan2(v, u) + np.pi / 2
        sector = 2 * np.pi / 5
        t = np.abs(np.mod(theta, sector) / sector * 2 - 1)  # 1 at points, 0 between
        rr = 0.42 + 0.58 * t
        return u * u + v * v <= rr * rr
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_ink_mask(obj: SceneObject, size: int) -> np.ndarray:
    """Bool (H, W) on the output pixel grid: where ``obj``'s pattern uses its
    secondary ink. Anchored at the object's center so that it moves with it."""
    y, x = np.mgrid[0:size, 0:size]
    x = x - int(np.floor(obj.cx))
    y = y - int(np.floor(obj.cy))
    if obj.pattern == "solid":
        return np.zeros((size, size), dtype=bool)
    if obj.pattern == "striped":
        orient = int(obj.angle / (np.pi / 2) * 2) % 4
        t = (y, x, x + y, x - y)[orient]
        return (t // 2) % 2 == 0
    if obj.pattern == "dotted":
        return ((x % 5) < 2) & ((y % 5) < 2)
    if obj.pattern == "checkered":
        return ((x // 3) + (y // 3)) % 2 == 0
    raise ValueError(f"unknown pattern {obj.pattern!r}")


def background_image(kind: str, size: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3) background texture; no pixel equals an object fill."""
    rng = np.random.default_rng(seed)
    if kind == "plain":
        v = int(rng.integers(90, 211))
        img = np.full((size, size, 3), v, dtype=np.float64)
        img += np.array([0, 0, int(rng.integers(0, 12))])
    elif kind == "sky":
        top = np.array([95, 150, 230], dtype=np.float64) + rng.uniform(-10, 10, 3)
        bot = np.array([195, 222, 250], dtype=np.float64) + rng.uniform(-5, 5, 3)
        t = np.linspace(0, 1, size)[:, None, None]
        img = np.broadcast_to(top * (1 - t) + bot * t, (size, size, 3)).copy()
    elif kind == "grass":
        base = np.array([70, 125, 45], dtype=np.float64)
        coarse = rng.normal(0, 1, (size // 8 + 1, size // 8 + 1))
        coarse = np.kron(coarse, np.ones((8, 8)))[:size, :size]
        fine = rng.normal(0, 1, (size, size))
        n = 10 * coarse + 8 * fine
        img = base + n[..., None] * np.array([0.6, 1.0, 0.4])
        img = np.clip(img, [35, 80, 15], [110, 160, 80])
    elif kind == "brick":
        img = np.empty((size, size, 3), dtype=np.float64)
        img[:] = (190, 182, 170)  # mortar
        bh, bw = max(size // 8, 4), max(size // 4, 8)
        for row in range(size // bh + 1):
            off = (row % 2) * (bw // 2)
            for col in range(-1, size // bw + 2):
                c = np.array([150, 62, 45], dtype=np.float64) + rng.uniform(-18, 18) * np.array(
                    [1.0, 0.5, 0.4]
                )
                y0, x0 = row * bh + 1, col * bw + off + 1
                img[
                    max(y0, 0) : max(row * bh + bh, 0), max(x0, 0) : max(col * bw + off + bw, 0)
                ] = c
        img += rng.normal(0, 3, (size, size, 1))
    else:
        raise ValueError(f"unknown background {kind!r}")
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return _avoid_fills(out)


def _avoid_fills(img: np.ndarray) -> np.ndarray:
    """Nudge (blue +-1) any pixel that would exactly equal an object fill."""
    for _ in range(4):
        code = (
            (img[..., 0].astype(np.int64) << 16)
            | (img[..., 1].astype(np.int64) << 8)
            | img[..., 2].astype(np.int64)
        )
        bad = np.isin(code, _FILL_CODES)
        if not bad.any():
            break
        b = img[..., 2]
        b[bad] = np.where(b[bad] < 255, b[bad] + 1, b[bad] - 1)
    return img


@dataclass(frozen=True)
class Rendering:
    """A render with its ground truth: the RGB image (uint8 H,W,3), visible
    masks (n_objects, H, W) and ``pure`` (H, W): pixels covered entirely by a
    single layer (one object or the background), i.e. not anti-aliased."""

    image: np.ndarray
    masks: np.ndarray
    pure: np.ndarray
    coverage: np.ndarray  # (n_objects + 1, H, W) float; index 0 = background


def render_full(scene: Scene) -> Rendering:
    """Render ``scene`` with its full ground truth (see ``Rendering``)."""
    size, s = scene.size, SUPERSAMPLE
    coords = _subpixel_coords(size)
    lab = np.zeros((size * s, size * s), dtype=np.int8)  # 0 = background
    for k, obj in enumerate(scene.objects, start=1):
        x0 = max(int(np.floor(obj.cx - obj.radius)) - 1, 0)
        x1 = min(int(np.ceil(obj.cx + obj.radius)) + 1, size)
        y0 = max(int(np.floor(obj.cy - obj.radius)) - 1, 0)
        y1 = min(int(np.ceil(obj.cy + obj.radius)) + 1, size)
        if x1 <= x0 or y1 <= y0:
            continue
        m = _shape_mask(obj, coords[x0 * s : x1 * s], coords[y0 * s : y1 * s])
        lab[y0 * s : y1 * s, x0 * s : x1 * s][m] = k
    n = len(scene.objects)
    # Count subpixels per (layer, output pixel) in one bincount.
    idx = lab.astype(np.int64).ravel() * (size * size) + _pixel_index(size)
    counts = np.bincount(idx, minlength=(n + 1) * size * size)
    cov = counts.reshape(n + 1, size, size).astype(np.float32) / (s * s)  # 0 = background
    img = (
        background_image(scene.background, size, scene.seed).astype(np.float32) * cov[0][..., None]
    )
    for k, obj in enumerate(scene.objects, start=1):
        ck = cov[k]
        if not ck.any():
            continue
        ink = _pattern_ink_mask(obj, size)
        fill = np.where(
            ink[..., None],
            np.array(pattern_ink(obj.color, obj.pattern), dtype=np.float32),
            np.array(COLORS[obj.color], dtype=np.float32),
        )
        img += fill * ck[..., None]
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    masks = cov[1:] >= 0.5
    # A pixel split exactly in half between two objects goes to the front one.
    taken = np.zeros((size, size), dtype=bool)
    for k in range(n - 1, -1, -1):
        masks[k] &= ~taken
        taken |= masks[k]
    pure = cov.max(axis=0) >= 1.0
    return Rendering(image, masks, pure, cov)


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """Render ``scene`` -> (RGB PIL image, visible masks (n_objects, H, W)
    bool). A mask pixel is set when at least half of that pixel is covered by
    the visible (not occluded) part of the object; masks never overlap (an
    exact half-half split goes to the object in front)."""
    r = render_full(scene)
    return Image.fromarray(r.image, "RGB"), r.masks


# ---------------------------------------------------------------- captions

_COUNT = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_BG_ON = {
    "plain": "on a plain background",
    "sky": "against the sky",
    "grass": "on grass",
    "brick": "on a brick wall",
}
_BG_NOUN = {
    "plain": "a plain background",
    "sky": "the sky",
    "grass": "grass",
    "brick": "a brick wall",
}
_BG_PATCH = {
    "plain": "a plain background",
    "sky": "a patch of sky",
    "grass": "a patch of grass",
    "brick": "a patch of brick wall",
}


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(obj: SceneObject, with_size: bool, with_solid: bool) -> str:
    words = []
    if with_size and obj.size != "medium":
        words.append(obj.size)
    words.append(obj.color)
    if obj.pattern != "solid" or with_solid:
        words.append(obj.pattern)
    words.append(obj.shape)
    return _with_article(" ".join(words))


def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dy) > 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    if abs(dx) > 1.5 * abs(dy):
        return "left of" if dx < 0 else "right of"
    return "next to"


def _template_rng(scene: Scene, box: tuple[int, int, int, int] | None) -> random.Random:
    key = f"{scene.seed}|{box}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def caption(
    scene: Scene,
    masks: np.ndarray | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> str:
    """An exact caption of ``scene`` (or of the crop ``box`` of it), in one
    of several templates chosen deterministically from the scene seed and box.

    Rules:
    * Objects are named in drawing order with their color, pattern (solid is
      usually left out) and shape; size words (small/large) appear in some
      captions; two or more objects get a spatial relation (above, below,
      left of, right of, next to; from the object centers) between the first
      two named. No word of the caption names a concept the named objects
      and the background do not have (the sky is "the sky", not "blue").
    * Objects with no visible pixel are never named.
    * With ``box`` = (x0, y0, x1, y1) in pixels (x1, y1 exclusive): an object
      is named when at least 50% of its visible mask pixels lie inside the
      box. The background is named when at least 50% of the box's pixels are
      background (covered by no object mask). When no object is kept the
      caption describes the background only ("a patch of grass").
    ``masks`` are the visible masks from ``render``; rendered when omitted.
    """
    if masks is None:
        masks = render_full(scene).masks
    rng = _template_rng(scene, box)
    visible = [int(m.sum()) for m in masks]
    keep = [k for k, v in enumerate(visible) if v > 0]
    mention_bg = True
    if box is not None:
        x0, y0, x1, y1 = (int(v) for v in box)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, scene.size), min(y1, scene.size)
        if x1 <= x0 or y1 <= y0:
            return _BG_PATCH[scene.background]
        inside = [int(masks[k, y0:y1, x0:x1].sum()) for k in range(len(masks))]
        keep = [k for k in keep if inside[k] * 2 >= visible[k]]
        area = (y1 - y0) * (x1 - x0)
        bg = area - int(masks[:, y0:y1, x0:x1].any(axis=0).sum()) if len(masks) else area
        mention_bg = bg * 2 >= area
    if not keep:
        return _BG_PATCH[scene.background]
    objs = [scene.objects[k] for k in keep]
    with_size = rng.random() < 0.5
    with_solid = rng.random() < 0.3
    descs = [_describe(o, with_size, with_solid) for o in objs]
    bg_on = _BG_ON[scene.background]
    if len(objs) == 1:
        body = descs[0]
    else:
        body = f"{descs[0]} {_relation(objs[0], objs[1])} {descs[1]}"
        if len(objs) > 2:
            body += ", and " + ", ".join(descs[2:])
    n = len(objs)
    noun = "object" if n == 1 else "objects"
    if not mention_bg:
        templates = [body, f"a close-up of {body}", f"{_COUNT.get(n, str(n))} {noun}: {body}"]
    else:
        templates = [
            f"{body} {bg_on}",
            f"{_COUNT.get(n, str(n))} {noun} {bg_on}: {body}",
            f"a picture of {body} {bg_on}",
            f"{_BG_NOUN[scene.background]} with {body}",
        ]
    return rng.choice(templates)
