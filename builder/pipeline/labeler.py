"""What a labeler plugs into the run loop (``builder.pipeline.run``).

The loop owns everything labelers share: opening the atlas and refusing a
resume with other settings, the meta, each model's loading, its row and
layers, the neurons still to do (this shard's, not yet written), the dead
ones, the progress bar, embedding label vectors, writing each neuron in its
own transaction, stage times and the FAISS index. A labeler supplies the
rest: its build-wide backends, step 0 (a ``Recording``) and, for a list of
live neurons, their results chunk by chunk.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any

import numpy as np

from builder.cache import ContentCache
from builder.pipeline.fidelity import FidelitySample
from builder.pipeline.records import ModelRun, ModelSummary, NeuronKey
from query.writer import NeuronResult


class Recording(abc.ABC):
    """Step 0's result as the loop reads it."""

    layers: list[tuple[str, str, int]]  # (layer, kind, n_units), in config order
    n_images: int  # readable probe images
    n_skipped: int  # probe files that were not readable images
    images_per_s: float

    @abc.abstractmethod
    def extremes(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """Per unit of ``layer``: its maximum and minimum activation over the probe set."""

    def sample_acts(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The fidelity sample's readable probe indices and, per layer, every
        unit's activation on them ((images, units)); empty without a sample."""
        return np.zeros(0, np.int64), {}


class Labeler(abc.ABC):
    """One way of labelling neurons (``labeler`` in the config)."""

    name: str
    write_stage: str = "write"  # the stage the loop's embedding and writing are timed under

    def check_resume(self, meta: dict[str, Any]) -> None:
        """Refuse (BuildError) to resume an atlas this labeler cannot continue."""

    @abc.abstractmethod
    def open(self, cache: ContentCache) -> dict[str, Any]:
        """Load the build-wide backends; returns the labeler's meta entries."""

    def model_config(self) -> dict[str, Any]:
        """Entries this labeler adds to each model's row config."""
        return {}

    @abc.abstractmethod
    def record(self, run: ModelRun, stats: ModelSummary) -> Recording:
        """Step 0 over the model's probe set."""

    def fidelity_sample(self, run: ModelRun, rec: Recording) -> FidelitySample | None:
        """The model's fidelity sample (concept presence from this labeler's
        captioner or joint image-text space), or None when it has none."""
        return None

    @abc.abstractmethod
    def label(
        self, run: ModelRun, rec: Recording, neurons: list[NeuronKey], stats: ModelSummary,
        fid: FidelitySample | None = None,
    ) -> Iterator[list[NeuronResult]]:
        """The results of ``neurons`` (all live), one chunk at a time, each
        label's fidelity scored on ``fid``; label vectors are left empty (the
        loop embeds them)."""

    def close(self) -> None:
        """Release what ``open`` loaded."""
