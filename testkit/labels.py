"""Varied label texts and queries for checking text embedders (the ONNX
export against sentence-transformers; the embedder benchmark)."""

from __future__ import annotations

import random

QUERIES = ("red circle", "dog", "striped pattern", "blue sky", "car wheels", "unicode text",
           "yellow star", "cat face", "green grass", "wood texture")


def make_labels(n: int = 200, seed: int = 0) -> list[str]:
    """~200 varied labels: concepts, phrases, punctuation, unicode, edge cases, a truncated one."""
    fixed = [
        "red circle", "dog faces", "blue sky", "striped square", "green triangle", "cat", "car wheels",
        "text", "water", "grass", "polka dots", "checkerboard pattern", "honeycomb", "yellow star",
        "a red circle on a blue background", "dogs playing in the snow",
        "the texture of wood grain, close up", "faces of people smiling at the camera",
        "Red Circle!!!", "red-circle", "RED CIRCLE", "red circle.", "(red) [circle] {x}", "what's this?",
        "it's a dog's life", "50% off", "#1 item", "C++ code", "e-mail @ home", "tab\tseparated",
        "line\nbreak", "café", "naïve résumé", "Zürich street", "日本の寺", "狗", "ça va",
        "Ελληνικά γράμματα", "привет мир", "emoji 🐶 dog", "🙂", "a", "x", "?", "1", "-", "", " ",
        "  red  circle  ", "zzzzqqqxxj", " ".join(["stripes and dots"] * 120),  # > 256 tokens
    ]
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray", "cyan"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "ring", "cross", "heart", "diamond", "oval"]
    patterns = ["striped", "dotted", "checkered", "plain", "wavy", "gradient"]
    nouns = ["dog", "cat", "bird", "car", "tree", "house", "face", "hand", "boat", "flower", "road", "sky"]
    out = list(fixed)
    while len(out) < n:
        kind = rng.randrange(4)
        if kind == 0:
            text = f"{rng.choice(colors)} {rng.choice(shapes)}"
        elif kind == 1:
            text = f"{rng.choice(patterns)} {rng.choice(colors)} {rng.choice(shapes)}"
        elif kind == 2:
            text = f"{rng.choice(nouns)}s near a {rng.choice(colors)} {rng.choice(nouns)}"
        else:
            words = colors + shapes + patterns + nouns
            text = " ".join(rng.choice(words) for _ in range(rng.randrange(8, 40)))
        if text not in out:
            out.append(text)
    return out


