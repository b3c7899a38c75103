"""Exact captions of marks-world scenes and of crops of them.

The crop rule is the shapes world's (``world.caption``), plus marks: a
captioner names marks only where it could see several of them, so a tiny
crop around one mark is "a patch of sand", as a real captioner given a
6-pixel crop would say.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np

from builder.synthetic.marks import (
    INK_COLORS,
    MARKS,
    MarkedObject,
    MarksScene,
    MarksTruth,
    render_full,
    size_word,
)

Box = tuple[int, int, int, int]

_PLURAL = {"plus": "plus signs", "slash": "slashes", "tick": "ticks", "loop": "loops"}
_CARRY = ("with", "covered in", "marked with")
_BG_ON = {
    "sand": "on sand",
    "water": "on water",
    "snow": "on snow",
    "wood": "on a wooden floor",
    "night": "at night",
}
_BG_NOUN = {
    "sand": "sand",
    "water": "water",
    "snow": "snow",
    "wood": "a wooden floor",
    "night": "the night",
}
_BG_PATCH = {
    "sand": "a patch of sand",
    "water": "a patch of water",
    "snow": "a patch of snow",
    "wood": "a patch of wood",
    "night": "a dark patch of night",
}
_COUNT = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class SeenInBox:
    """What a caption of a box may name: the objects kept (indices), which
    of them have their marks named, the background, its marks."""

    objects: tuple[int, ...]
    object_marks: frozenset[int]
    background: bool
    background_marks: bool


def _clip(box: Box, size: int) -> Box:
    x0, y0, x1, y1 = (int(v) for v in box)
    return max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)


def seen_in(scene: MarksScene, truth: MarksTruth, box: Box | None) -> SeenInBox:
    """Apply the crop rule (see ``caption``) to ``box`` (None = whole image)."""
    masks, ink = truth.masks, truth.mark_pixels()
    objects = [k for k in range(len(masks)) if masks[k].any()]
    own_ink = [int((ink & masks[k]).sum()) for k in range(len(masks))]
    bg_ink = int((ink & ~masks.any(axis=0)).sum()) if len(masks) else int(ink.sum())
    if box is None:
        marked = frozenset(k for k in objects if own_ink[k] > 0)
        return SeenInBox(tuple(objects), marked, True, bg_ink > 0)
    x0, y0, x1, y1 = _clip(box, scene.size)
    if x1 <= x0 or y1 <= y0:
        return SeenInBox((), frozenset(), True, False)
    sub_masks, sub_ink = masks[:, y0:y1, x0:x1], ink[y0:y1, x0:x1]
    kept = tuple(k for k in objects if 2 * int(sub_masks[k].sum()) >= int(masks[k].sum()))
    marked = frozenset(
        k for k in kept if own_ink[k] > 0 and 2 * int((sub_ink & sub_masks[k]).sum()) >= own_ink[k]
    )
    area = (y1 - y0) * (x1 - x0)
    covered = sub_masks.any(axis=0) if len(masks) else np.zeros(sub_ink.shape, dtype=bool)
    background = 2 * (area - int(covered.sum())) >= area
    bg_in = int((sub_ink & ~covered).sum())
    return SeenInBox(kept, marked, background, background and bg_ink > 0 and 2 * bg_in >= bg_ink)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _marks_phrase(kind: str, ink: str) -> str:
    return f"{ink} {_PLURAL[kind]}"


def _describe(obj: MarkedObject, size: int, marks: bool, with_size: bool, carry: str) -> str:
    words = []
    word = size_word(obj, size)
    if with_size and word != "medium":
        words.append(word)
    words += [obj.color, obj.shape]
    text = _with_article(" ".join(words))
    if marks and obj.mark and obj.ink:
        text += f" {carry} {_marks_phrase(obj.mark, obj.ink)}"
    return text


def _relation(a: MarkedObject, b: MarkedObject) -> str:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dy) > 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    if abs(dx) > 1.5 * abs(dy):
        return "left of" if dx < 0 else "right of"
    return "next to"


def _template_rng(scene: MarksScene, box: Box | None) -> random.Random:
    key = f"marks|{scene.seed}|{box}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def _background_marks(scene: MarksScene, truth: MarksTruth) -> str:
    """ "strewn with black ticks" for the background's marks (from the truth,
    so that hidden or unplaced marks are never named)."""
    bg = truth.mark_pixels() & ~truth.masks.any(axis=0) if len(truth.masks) else truth.mark_pixels()
    kind, ink = int(truth.mark_kind[bg][0]), int(truth.mark_ink[bg][0])
    return f"strewn with {_marks_phrase(MARKS[kind], list(INK_COLORS)[ink])}"


def caption(scene: MarksScene, truth: MarksTruth | None = None, box: Box | None = None) -> str:
    """An exact caption of ``scene`` (or of the crop ``box`` = (x0, y0, x1,
    y1), x1/y1 exclusive), in one of several templates chosen from the scene
    seed and the box.

    Rules (the shapes world's, plus marks):
    * an object is named (size word sometimes, color, shape) when at least 50%
      of its visible mask lies inside the box; objects with no visible pixel
      never are; two or more get a spatial relation between the first two;
    * a named object's marks ("with white plus signs") are named when the box
      holds at least 50% of that object's visible mark pixels;
    * the background is named when at least 50% of the box is background;
      its marks ("strewn with black ticks") when it is named and the box holds
      at least 50% of its mark pixels (it carries 3 or more marks, so never
      for a crop of a single one);
    * with no object named the caption is a background patch ("a patch of
      sand", with its marks when they are named).
    The whole image names everything visible. ``truth`` is rendered when omitted.
    """
    truth = truth if truth is not None else render_full(scene).truth
    seen = seen_in(scene, truth, box)
    rng = _template_rng(scene, box)
    bg_marks = f" {_background_marks(scene, truth)}" if seen.background_marks else ""
    if not seen.objects:
        return _BG_PATCH[scene.background] + bg_marks
    objs = [scene.objects[k] for k in seen.objects]
    with_size, carry = rng.random() < 0.5, rng.choice(_CARRY)
    descs = [
        _describe(scene.objects[k], scene.size, k in seen.object_marks, with_size, carry)
        for k in seen.objects
    ]
    body = descs[0]
    if len(objs) > 1:
        body = f"{descs[0]} {_relation(objs[0], objs[1])} {descs[1]}"
        if len(objs) > 2:
            body += ", and " + ", ".join(descs[2:])
    n = len(objs)
    noun = "object" if n == 1 else "objects"
    if not seen.background:
        templates = [body, f"a close-up of {body}", f"{_COUNT.get(n, str(n))} {noun}: {body}"]
    else:
        on = _BG_ON[scene.background] + bg_marks
        templates = [
            f"{body} {on}",
            f"{_COUNT.get(n, str(n))} {noun} {on}: {body}",
            f"a picture of {body} {on}",
            f"{_BG_NOUN[scene.background]}{bg_marks} with {body}",
        ]
    return rng.choice(templates)
