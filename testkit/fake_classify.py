"""A stand-in for the builder's classify service (``builder.evaluation.classifier:classify``),
for the server tests: the server runs it in its classify child process as
``testkit.fake_classify:classify``, so no target model runs.

It appends each call (and the child's pid) to the JSON-lines file named by
``$DND_ATLAS_FAKE_CLASSIFY_LOG``, answers like the real one (absolute paths
included, which the server must not pass on), and by concept:
``"no such class"`` raises the builder's error naming the folder,
``"spin"`` burns CPU (holding the GIL) until killed, ``"slow"`` burns it for
``$DND_ATLAS_FAKE_CLASSIFY_SLOW_S`` seconds (default 4) then answers.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from query.errors import AtlasError, QueryError

LOG_ENV = "DND_ATLAS_FAKE_CLASSIFY_LOG"
SLOW_ENV = "DND_ATLAS_FAKE_CLASSIFY_SLOW_S"


class _Result:
    def __init__(self, data: dict) -> None:
        self.data = data

    def to_dict(self) -> dict:
        return self.data


def _burn(seconds: float) -> None:
    """Keep a core busy in long C calls that hold the GIL (~0.1 s each): run in
    the server's own process, this would stall every other request."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        math.factorial(40_000)


def classify(atlas_path, concept, images_dir, model=None, layer=None, k=5):
    """Record the call; answer, fail or burn CPU as the concept says."""
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "atlas": str(atlas_path), "concept": concept,
                                "images": str(images_dir), "model": model, "layer": layer,
                                "k": k}) + "\n")
    if model is not None and model not in ("cnn", "vit"):
        raise QueryError(f"unknown model {model!r}; valid models: cnn, vit")
    if concept == "no such class":
        classes = sorted(p.name for p in Path(images_dir).iterdir() if p.is_dir())
        raise AtlasError(f"no class folder matches {concept!r} in {images_dir}; classes: "
                         + ", ".join(classes))
    if concept == "spin":
        _burn(float("inf"))
    if concept == "slow":
        _burn(float(os.environ.get(SLOW_ENV, "4")))
    return _Result({
        "atlas": str(atlas_path), "images": str(Path(images_dir).resolve()), "concept": concept,
        "protocol_auroc": 0.75, "oracle_auroc": None, "k": k,
        "note": f"read {Path(images_dir) / 'dog'} and the atlas at {atlas_path}",
        "candidates": [{"rank": i + 1, "auroc": float("nan")} for i in range(k)],
    })
