"""Which neurons a build describes: the selected units of each layer, this
shard's share of them, the ones not written yet, and the dead ones."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

from builder.config import ModelConfig, shard_of
from builder.errors import ConfigError
from builder.pipeline.records import NeuronKey

log = logging.getLogger(__name__)


def selected_units(m: ModelConfig, n_units: int) -> list[int]:
    """The units of a layer to describe: ``m.units`` that exist, or all."""
    return [u for u in m.units if u < n_units] if m.units else list(range(n_units))


def check_units(m: ModelConfig, counts: Mapping[str, int]) -> None:
    """Refuse ``m.units`` that select no unit of some layer (``counts``: each
    layer's neuron count), since that build would describe nothing there;
    warn when some of them exist in a layer and others do not."""
    if not m.units:
        return
    for layer, n in counts.items():
        missing = [u for u in m.units if u >= n]
        if len(missing) == len(m.units):
            raise ConfigError(
                f"model {m.name!r}: units {_listed(m.units)} select no unit of layer {layer!r}, "
                f"which has {n} units (0-{n - 1})"
            )
        if missing:
            log.warning("model %r: layer %r has %d units; units %s are skipped there",
                        m.name, layer, n, _listed(missing))


def _listed(units: Sequence[int], shown: int = 8) -> str:
    text = ", ".join(map(str, units[:shown]))
    return f"[{text}{', ...' if len(units) > shown else ''}]"


def shard_neurons(neurons: list[NeuronKey], shard: str) -> list[NeuronKey]:
    """The neurons of shard ``I/N``: every N-th neuron of the model's ordered
    list starting at I, so shards are balanced across layers and any
    process computes the same split."""
    if not shard:
        return neurons
    i, n = shard_of(shard)
    return neurons[i::n]


def todo_neurons(
    m: ModelConfig, layers: Sequence[tuple[str, int]], shard: str, done: set[NeuronKey]
) -> list[NeuronKey]:
    """This run's neurons of model ``m`` in layer order: its selected units
    (``layers`` gives each layer's unit count), this shard's share, minus the
    ones the atlas already holds."""
    selected = [(lay, u) for lay, n in layers for u in selected_units(m, n)]
    return [k for k in shard_neurons(selected, shard) if k not in done]


def is_dead(hi: float, lo: float) -> bool:
    """A neuron whose activation never varies over the probe set (max ==
    min, e.g. a ReLU that is always 0) has nothing to describe."""
    hi, lo = float(hi), float(lo)
    return not math.isfinite(hi) or hi - lo <= 1e-6 * max(1.0, abs(hi))
