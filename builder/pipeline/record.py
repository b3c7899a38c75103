"""Step 0: record activations with forward hooks, keeping a streaming top-K.

One pass over the probe set records every selected layer at once. Each
batch's per-channel summaries are merged into a running top-M (M = margin x
K) per neuron, so memory is O(neurons x M), never O(images x neurons).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from builder.backends.layers import activation_maps, hooked, layer_kind, summarize
from builder.backends.targets import Target
from builder.cache import content_key
from builder.errors import BuildError
from builder.pipeline.records import ModelRun, NeuronKey
from builder.probe import ProbeSet
from builder.progress import progress

log = logging.getLogger(__name__)


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
    sample_vals: np.ndarray | None = None  # (S, C) on the fidelity sample, NaN rows for unreadable images

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
            **({f"{prefix}sample": self.sample_vals} if self.sample_vals is not None else {}),
        }

    @classmethod
    def from_arrays(cls, layer: str, arrays: dict[str, np.ndarray], prefix: str) -> LayerRecord:
        kind, has_maps = (str(x) for x in arrays[f"{prefix}meta"])
        return cls(
            layer, kind, arrays[f"{prefix}vals"], arrays[f"{prefix}idx"],
            arrays[f"{prefix}max"], arrays[f"{prefix}min"], has_maps == "1", arrays.get(f"{prefix}sample"),
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
        except Exception as exc:  # a corrupt, oversized or vanished file is skipped, never fatal
            log.warning("skipping %s: %s", self.probe.files[i], exc)
            return i, None


def _collate(batch):
    good = [(i, t) for i, t in batch if t is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0, dtype=torch.long), None, skipped
    shapes = {tuple(t.shape) for _, t in good}
    if len(shapes) > 1:  # load_target / fit_to_probe fit images for a preprocess that keeps sizes
        raise BuildError(
            "the target's preprocessing gives tensors of different shapes for probe images "
            f"({', '.join(map(str, sorted(shapes)[:2]))}); its preprocess must give one size for any image"
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


def probe_pass(
    target: Target, probe: ProbeSet, layers: Sequence[str], batch_size: int = 64, num_workers: int = 0,
    desc: str = "record",
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor] | None, int]]:
    """One pass over the probe set with hooks on ``layers`` (removed at the
    end, whatever happens): per batch, the probe indices, every layer's
    output (None for a batch with no readable image) and the files skipped."""
    target.check_layers(layers)
    loader = probe_loader(target, probe, batch_size, num_workers)
    current: dict[str, torch.Tensor] = {}
    with hooked(target.module, layers, current.__setitem__), torch.inference_mode():
        bar = progress(total=len(probe), desc=f"{desc} {target.name}", unit="img")
        try:
            for indices, batch, n_skipped in loader:
                bar.update(len(indices) + n_skipped)
                if batch is None:
                    yield indices, None, n_skipped
                    continue
                current.clear()
                target.module(batch.to(target.device, target.dtype))
                yield indices, dict(current), n_skipped
        finally:
            bar.close()


def record_topk(
    target: Target,
    probe: ProbeSet,
    layers: Sequence[str],
    top_m: int,
    summary: str = "mean",
    vit_tokens: str = "cls",
    batch_size: int = 64,
    num_workers: int = 0,
    sample: np.ndarray | None = None,
) -> tuple[dict[str, LayerRecord], RecordStats]:
    """One pass over ``probe`` recording every layer in ``layers``: each
    unit's streaming top-M and, for the probe indices ``sample`` (the
    fidelity sample), every unit's activation on each of them."""
    state = {name: TopK(top_m) for name in layers}
    row_of = {int(i): j for j, i in enumerate(sample)} if sample is not None else {}
    sample_vals: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    has_maps: dict[str, bool] = {}
    seen = peak = 0
    skipped = len(probe.rejected)  # entries the scan skipped (FIFOs, broken links) count as skipped images
    t0 = time.perf_counter()
    for indices, outs, n_skipped in probe_pass(target, probe, layers, batch_size, num_workers):
        skipped += n_skipped
        if outs is None:
            continue
        picked = [(b, row_of[i]) for b, i in enumerate(indices.tolist()) if i in row_of]
        for name in layers:
            if name not in kinds:
                kinds[name] = layer_kind(outs[name])
                has_maps[name] = activation_maps(outs[name][:1]) is not None
            summ = summarize(outs[name], summary, vit_tokens)
            state[name].update(summ, indices)
            if picked:
                vals = sample_vals.setdefault(name, np.full((len(row_of), summ.shape[1]), np.nan, np.float32))
                vals[[r for _, r in picked]] = summ[[b for b, _ in picked]].float().cpu().numpy()
        seen += len(indices)
        peak = max(peak, sum(s.nbytes() for s in state.values()))
    if seen == 0:
        raise BuildError(f"no readable image in the probe folder {probe.root} ({skipped} skipped)")
    result = {}
    for name in layers:
        st = state[name]
        result[name] = LayerRecord(
            name, kinds[name], st.vals.numpy().astype(np.float32), st.idx.numpy(),
            st.max.numpy().astype(np.float32), st.min.numpy().astype(np.float32), has_maps[name],
            _sample_of(sample_vals, name, len(row_of), st.vals.shape[0]) if sample is not None else None,
        )
    stats = RecordStats(seen, skipped, time.perf_counter() - t0, peak)
    log.info("recorded %d images (%d skipped) at %.1f images/s", seen, skipped, stats.images_per_s)
    return result, stats


def _sample_of(vals: dict[str, np.ndarray], name: str, rows: int, units: int) -> np.ndarray:
    return vals.get(name, np.full((rows, units), np.nan, np.float32))


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


def changed_sources(
    probe: ProbeSet, records: dict[str, LayerRecord], neurons: Sequence[NeuronKey], top_k: int
) -> dict[NeuronKey, str]:
    """The neurons whose top images (the ``top_k`` recorded ones, and any
    tied with the k-th) vanished or changed since the probe set was scanned,
    with the reason: crops, captions and thumbnails would read other pixels
    than were recorded, so those neurons fail instead of the build."""
    seen: dict[int, str | None] = {}
    out: dict[NeuronKey, str] = {}
    for n in neurons:
        rec = records[n[0]]
        vals, idx = rec.top_vals[n[1]], rec.top_idx[n[1]]
        valid = [(float(v), int(i)) for v, i in zip(vals, idx) if i >= 0 and np.isfinite(v)]
        if not valid:
            continue
        kth = valid[min(top_k, len(valid)) - 1][0]
        for v, i in valid:
            if v < kth:
                break
            if i not in seen:
                seen[i] = probe.changed(i)
            if seen[i]:
                out[n] = f"{seen[i]} after recording"
                break
    return out


def record_key(run: ModelRun) -> str:
    """Content key of the model's streaming top-M recording over its probe
    set: the weights, the probe files, the layers, the summary and M."""
    m, rec = run.model, run.cfg.record
    return content_key("record", run.fingerprint, run.probe.fingerprint(), list(m.layers), run.summary,
                       m.vit_tokens, rec.top_k * rec.margin, run.sample.tolist())


def record_all(
    target: Target,
    probe: ProbeSet,
    layers: Sequence[str],
    path: Path,
    summary: str = "mean",
    vit_tokens: str = "cls",
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[np.ndarray, dict[str, tuple[str, int]], np.ndarray]:
    """Every image's summary of every unit of ``layers``, written to the
    float32 ``.npy`` file ``path`` (temp name, then renamed; reused when it
    exists). Returns (memory-mapped (images, units) array with the layers'
    units side by side in ``layers`` order, {layer: (kind, n_units)}, bool
    mask of the probe images that were readable)."""
    info_path = path.with_suffix(".json")
    if path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        return (np.load(path, mmap_mode="r"), {k: (v[0], int(v[1])) for k, v in info["layers"].items()},
                np.array(info["valid"], bool))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    valid = np.zeros(len(probe), dtype=bool)
    kinds: dict[str, tuple[str, int]] = {}
    out: np.ndarray | None = None
    for indices, outs, _ in probe_pass(target, probe, layers, batch_size, num_workers, "record all"):
        if outs is None:
            continue
        cols = [summarize(outs[name], summary, vit_tokens).float().cpu().numpy() for name in layers]
        for name, c in zip(layers, cols):
            kinds.setdefault(name, (layer_kind(outs[name]), c.shape[1]))
        flat = np.concatenate(cols, axis=1)
        if out is None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(probe), flat.shape[1]))
            out[:] = 0.0
        out[indices.numpy()] = flat
        valid[indices.numpy()] = True
    if out is None:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"no readable image in the probe folder {probe.root}")
    out.flush()
    del out
    os.replace(tmp, path)
    info_tmp = info_path.with_name(f".{info_path.name}.{os.getpid()}.tmp")
    info_tmp.write_text(json.dumps({"layers": {k: list(v) for k, v in kinds.items()}, "valid": valid.tolist()}))
    os.replace(info_tmp, info_path)
    return np.load(path, mmap_mode="r"), kinds, valid


def record_summaries(
    target: Target, probe: ProbeSet, indices: Sequence[int], layers: Sequence[str], summary: str = "mean",
    vit_tokens: str = "cls", batch_size: int = 64,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every unit's summary on the probe images ``indices`` (a sample):
    (the readable ones among them, {layer: (readable images, units)})."""
    sub = ProbeSet(probe.root, tuple(probe.files[int(i)] for i in indices))
    rows: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    got: list[int] = []
    for idx, outs, _ in probe_pass(target, sub, layers, batch_size, 0, "record sample"):
        if outs is None:
            continue
        got += idx.tolist()
        for name in layers:
            rows[name].append(summarize(outs[name], summary, vit_tokens).float().cpu().numpy())
    readable = np.asarray(indices, np.int64)[got]
    return readable, {name: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for name, v in rows.items()}
