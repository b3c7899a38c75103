"""The records the pipeline's stages pass each other.

``ModelRun`` is everything a stage needs about the model being dissected
(frozen: built once per model, after loading). ``ModelSummary`` and
``BuildSummary`` are what a build reports: neurons per status, calls per
stage and wall time per stage. ``Calls`` counts, per neuron and stage, the
expensive calls made and those the content cache answered.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from builder.backends.targets import Target
from builder.cache import ContentCache, content_key
from builder.config import BuildConfig, ModelConfig
from builder.probe import ProbeSet

NeuronKey = tuple[str, int]  # (layer, unit) within one model


@dataclass(frozen=True)
class EvidenceItem:
    """One of a neuron's top-K: a probe image, or a crop box of it."""

    image: int  # probe image index
    box: tuple[int, int, int, int] | None
    activation: float


@dataclass(frozen=True)
class ModelRun:
    """One model of a build, loaded: its config, target, probe set, the
    fingerprint of its weights, its summary (mean / max), the content cache
    and where thumbnails go, and the probe indices of its fidelity sample.
    ``digests`` and ``sizes`` memoize probe files' sha256 and image sizes."""

    cfg: BuildConfig
    model: ModelConfig
    target: Target
    probe: ProbeSet
    fingerprint: str
    summary: str
    cache: ContentCache
    images_dir: Path
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    digests: dict[int, str] = field(default_factory=dict, compare=False, repr=False)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def layers(self) -> list[str]:
        return list(self.model.layers)

    def digest(self, image: int) -> str:
        """sha256 of probe image ``image``'s bytes (read once per build; a
        file that vanished or changed since the scan raises ProbeFileChanged)."""
        if image not in self.digests:
            self.digests[image] = self.probe.digest(image)
        return self.digests[image]

    def image_size(self, image: int) -> tuple[int, int]:
        """(width, height) of probe image ``image`` as the pipeline sees it
        (the frame crop boxes are in)."""
        if image not in self.sizes:
            self.sizes[image] = tuple(self.probe.open(image).size)  # type: ignore[assignment]
        return self.sizes[image]

    def evidence_key(self, e: EvidenceItem) -> str:
        """Content key of an evidence image: the probe file's bytes, the crop
        box and the size the crop is resized to."""
        return content_key("probe-image", self.digest(e.image), list(e.box) if e.box else None,
                           self.target.input_size)


class Calls:
    """Per neuron and stage: [calls made, calls answered from the cache]."""

    def __init__(self, neurons: list[NeuronKey], stages: tuple[str, ...]) -> None:
        self.counts: dict[NeuronKey, dict[str, list[int]]] = {n: {s: [0, 0] for s in stages} for n in neurons}

    def charge(self, n: NeuronKey, stage: str, fresh: bool, k: int = 1) -> None:
        """Count ``k`` calls of ``stage`` for neuron ``n``: made now (``fresh``) or cached."""
        self.counts[n].setdefault(stage, [0, 0])[0 if fresh else 1] += k

    def of(self, n: NeuronKey) -> dict[str, tuple[int, int]]:
        """Neuron ``n``'s counts as the atlas stores them."""
        return {s: (c, h) for s, (c, h) in self.counts[n].items()}


@dataclass
class ModelSummary:
    """What a build did for one model: neurons written this run per status,
    failed neurons of earlier runs redone (``retried``) and how many of them
    failed again (``still_failed``), probe images skipped, recording
    throughput, calls and seconds per stage."""

    model: str
    neurons: int = 0
    ok: int = 0
    dead: int = 0
    failed: int = 0
    retried: int = 0
    still_failed: int = 0
    skipped_images: int = 0
    missing_captions: int = 0  # evidence rows the captioner had no caption for (precomputed, oracle)
    images_per_s: float = float("nan")
    calls: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to the model's ``stage`` total."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t

    def tally(self, calls: dict[str, tuple[int, int]]) -> None:
        """Add one neuron's call counts to the model's totals."""
        for s, (c, h) in calls.items():
            self.calls[s][0] += c
            self.calls[s][1] += h


@dataclass
class BuildSummary:
    """What ``build`` returns and prints."""

    out: str
    models: list[ModelSummary]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "seconds": round(self.seconds, 2),
            "models": [
                {
                    "model": m.model, "neurons": m.neurons, "ok": m.ok, "dead": m.dead, "failed": m.failed,
                    "retried_failed": m.retried, "still_failed": m.still_failed,
                    "skipped_images": m.skipped_images, "missing_captions": m.missing_captions,
                    "record_images_per_s": round(m.images_per_s, 1),
                    "calls_per_neuron": {
                        s: {"calls": round(c / max(1, m.ok), 2), "cached": round(h / max(1, m.ok), 2)}
                        for s, (c, h) in sorted(m.calls.items())
                    },
                    "seconds": {k: round(v, 2) for k, v in m.seconds.items()},
                }
                for m in self.models
            ],
        }

    def text(self) -> str:
        """The human summary printed at the end of a build."""
        lines = [f"atlas written to {self.out} in {self.seconds:.1f} s"]
        for m in self.models:
            lines.append(
                f"  {m.model}: {m.neurons} neurons written this run: {m.ok} ok, {m.dead} dead, "
                f"{m.failed} failed; {m.skipped_images} probe images skipped; "
                + (f"{m.missing_captions} evidence images without a caption; " if m.missing_captions else "")
                + f"recording {m.images_per_s:.1f} images/s"
            )
            if m.retried:
                lines.append(f"    {m.retried} neurons failed in an earlier run and were retried: "
                             f"{m.retried - m.still_failed} now described, {m.still_failed} still failed")
            if m.failed:
                lines.append(f"    {m.failed} failed neurons keep their reason in the atlas "
                             "(dnd-atlas neuron); run the same command again to retry them")
            for s, (c, h) in sorted(m.calls.items()):
                lines.append(f"    {s:<22} {c / max(1, m.ok):8.2f} calls/neuron  ({h / max(1, m.ok):.2f} from cache)")
            for k, v in m.seconds.items():
                lines.append(f"    time {k:<17} {v:8.1f} s")
        return "\n".join(lines)
