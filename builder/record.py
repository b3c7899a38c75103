"""Step 0: record activations with forward hooks, keeping a streaming top-K.

One pass over the probe set records every selected layer at once. Each
batch's per-channel summaries are merged into a running top-M (M = margin x
K) per neuron, so memory is O(neurons x M), never O(images x neurons).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from builder.errors import BuildError, LayerError
from builder.probe import ProbeSet
from builder.progress import progress
from builder.targets import Target

log = logging.getLogger(__name__)


@contextlib.contextmanager
def hooked(module: torch.nn.Module, layers: Sequence[str], sink: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Forward hooks calling ``sink(layer, output)`` on every named layer;
    always removed on exit, even when the forward pass raises."""
    modules = dict(module.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise LayerError(f"no layer {missing[0]!r}; valid layers: {', '.join(n for n in modules if n)}")
    handles = []
    try:
        for name in layers:
            def hook(_m, _inp, out, name=name):
                sink(name, _first_tensor(out))

            handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state  # type: ignore[no-any-return]
    raise BuildError(f"a hooked layer returned {type(out).__name__}, not a tensor")


def layer_kind(out: torch.Tensor) -> str:
    """conv for (B, C, H, W), linear for (B, C), vit for (B, tokens, C)."""
    return {4: "conv", 2: "linear", 3: "vit"}.get(out.dim(), "other")


def summarize(out: torch.Tensor, summary: str, vit_tokens: str = "cls") -> torch.Tensor:
    """One number per channel and image, shape (B, C)."""
    kind = layer_kind(out)
    if kind == "conv":
        return out.mean(dim=(2, 3)) if summary == "mean" else out.amax(dim=(2, 3))
    if kind == "linear":
        return out
    if kind == "vit":
        if vit_tokens == "cls":
            return out[:, 0, :]
        patches = _patch_tokens(out)
        return patches.mean(dim=1) if summary == "mean" else patches.amax(dim=1)
    raise BuildError(f"cannot summarize a layer output of shape {tuple(out.shape)}")


def _patch_tokens(out: torch.Tensor) -> torch.Tensor:
    t = out.shape[1]
    return out[:, 1:, :] if _is_square(t - 1) and not _is_square(t) else out


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def activation_maps(out: torch.Tensor) -> torch.Tensor | None:
    """Spatial maps (B, C, h, w) for cropping; None for a linear layer."""
    kind = layer_kind(out)
    if kind == "conv":
        return out
    if kind == "vit":
        p = _patch_tokens(out)
        side = math.isqrt(p.shape[1])
        if side * side != p.shape[1]:
            return None
        return p.transpose(1, 2).reshape(p.shape[0], p.shape[2], side, side)
    return None


@dataclass
class LayerRecord:
    """Streaming top-M of one layer over the probe set."""

    layer: str
    kind: str
    top_vals: np.ndarray  # (C, M) float32, descending
    top_idx: np.ndarray  # (C, M) int64 probe image indices, -1 = empty
    max_act: np.ndarray  # (C,)
    min_act: np.ndarray  # (C,)
    has_maps: bool

    @property
    def n_units(self) -> int:
        return int(self.top_vals.shape[0])

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {
            f"{prefix}vals": self.top_vals,
            f"{prefix}idx": self.top_idx,
            f"{prefix}max": self.max_act,
            f"{prefix}min": self.min_act,
            f"{prefix}meta": np.array([self.kind, str(int(self.has_maps))]),
        }

    @classmethod
    def from_arrays(cls, layer: str, arrays: dict[str, np.ndarray], prefix: str) -> LayerRecord:
        kind, has_maps = (str(x) for x in arrays[f"{prefix}meta"])
        return cls(
            layer, kind, arrays[f"{prefix}vals"], arrays[f"{prefix}idx"],
            arrays[f"{prefix}max"], arrays[f"{prefix}min"], has_maps == "1",
        )


@dataclass
class RecordStats:
    images: int
    skipped: int
    seconds: float
    peak_state_bytes: int  # what the streaming top-M state holds

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


class _ProbeDataset(torch.utils.data.Dataset):
    def __init__(self, probe: ProbeSet, preprocess: Callable[[Image.Image], torch.Tensor]) -> None:
        self.probe = probe
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.probe)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(self.probe.open(i))
        except Exception as exc:  # a corrupt file is skipped, never fatal
            log.warning("skipping %s: %s", self.probe.files[i], exc)
            return i, None


def _collate(batch):
    good = [(i, t) for i, t in batch if t is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0, dtype=torch.long), None, skipped
    shapes = {tuple(t.shape) for _, t in good}
    if len(shapes) > 1:
        raise BuildError(
            "the target's preprocessing gives images of different sizes "
            f"({sorted(shapes)[:2]}); set target_options.input_size"
        )
    return torch.tensor([i for i, _ in good]), torch.stack([t for _, t in good]), skipped


def probe_loader(
    target: Target, probe: ProbeSet, batch_size: int = 64, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """Batches ``(indices, images or None, n_skipped)`` of the probe set in
    order, streamed from disk by ``num_workers`` reader processes;
    unreadable files are skipped and counted."""
    return torch.utils.data.DataLoader(
        _ProbeDataset(probe, target.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        shuffle=False,
    )


class TopK:
    """Running top-M per channel of one layer (values and image indices)."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.vals: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.min: torch.Tensor | None = None

    def update(self, summ: torch.Tensor, indices: torch.Tensor) -> None:
        s = summ.detach().float().cpu().T  # (C, B)
        ids = indices.view(1, -1).expand_as(s)
        if self.vals is None:
            c = s.shape[0]
            self.vals = torch.full((c, 0), -math.inf)
            self.idx = torch.full((c, 0), -1, dtype=torch.long)
            self.max = torch.full((c,), -math.inf)
            self.min = torch.full((c,), math.inf)
        vals = torch.cat([self.vals, s], dim=1)
        idx = torch.cat([self.idx, ids], dim=1)
        k = min(self.m, vals.shape[1])
        top, pos = torch.topk(vals, k, dim=1)
        self.vals, self.idx = top, torch.gather(idx, 1, pos)
        self.max = torch.maximum(self.max, s.amax(dim=1))
        self.min = torch.minimum(self.min, s.amin(dim=1))

    def nbytes(self) -> int:
        if self.vals is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.vals, self.idx, self.max, self.min))


def record_topk(
    target: Target,
    probe: ProbeSet,
    layers: Sequence[str],
    top_m: int,
    summary: str = "mean",
    vit_tokens: str = "cls",
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[dict[str, LayerRecord], RecordStats]:
    """One pass over ``probe`` recording every layer in ``layers``."""
    target.check_layers(layers)
    loader = probe_loader(target, probe, batch_size, num_workers)
    state = {name: TopK(top_m) for name in layers}
    kinds: dict[str, str] = {}
    has_maps: dict[str, bool] = {}
    current: dict[str, torch.Tensor] = {}
    seen = skipped = 0
    peak = 0
    t0 = time.perf_counter()

    def sink(name: str, out: torch.Tensor) -> None:
        current[name] = out

    with hooked(target.module, layers, sink), torch.inference_mode():
        bar = progress(total=len(probe), desc=f"record {target.name}", unit="img")
        try:
            for indices, batch, n_skipped in loader:
                skipped += n_skipped
                bar.update(len(indices) + n_skipped)
                if batch is None:
                    continue
                current.clear()
                target.module(batch.to(target.device, target.dtype))
                for name in layers:
                    out = current[name]
                    if name not in kinds:
                        kinds[name] = layer_kind(out)
                        has_maps[name] = activation_maps(out[:1]) is not None
                    state[name].update(summarize(out, summary, vit_tokens), indices)
                seen += len(indices)
                peak = max(peak, sum(s.nbytes() for s in state.values()))
        finally:
            bar.close()
    if seen == 0:
        raise BuildError(f"no readable image in the probe folder {probe.root} ({skipped} skipped)")
    result = {}
    for name in layers:
        st = state[name]
        result[name] = LayerRecord(
            name, kinds[name], st.vals.numpy().astype(np.float32), st.idx.numpy(),
            st.max.numpy().astype(np.float32), st.min.numpy().astype(np.float32), has_maps[name],
        )
    stats = RecordStats(seen, skipped, time.perf_counter() - t0, peak)
    log.info("recorded %d images (%d skipped) at %.1f images/s", seen, skipped, stats.images_per_s)
    return result, stats


def forward_summaries(
    target: Target,
    images: Sequence[Image.Image],
    layers: Sequence[str],
    summary: str = "mean",
    vit_tokens: str = "cls",
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Per-layer summaries (n_images, C) of ``images`` (crops, generated
    images): one forward records every neuron of every layer at once."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    current: dict[str, torch.Tensor] = {}
    with hooked(target.module, layers, lambda n, o: current.__setitem__(n, o)), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = torch.stack([target.preprocess(im) for im in chunk]).to(target.device, target.dtype)
            current.clear()
            target.module(batch)
            for name in layers:
                out[name].append(summarize(current[name], summary, vit_tokens).float().cpu().numpy())
    return {name: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for name, v in out.items()}
