"""Step 1 as a stage: attention crops for every neuron's top images, recorded
and re-ranked with the originals into each neuron's final top-K evidence.

Activation maps are recomputed only for images that are in some neuron's
top-K; each image is loaded once, its crops are cut right away, and each
unique crop is recorded once for every neuron that needs it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from builder.config import CropConfig
from builder.crop import Box, attention_boxes
from builder.probe import ProbeSet
from builder.progress import progress
from builder.record import LayerRecord, activation_maps, forward_summaries, hooked
from builder.targets import Target

log = logging.getLogger(__name__)

NeuronKey = tuple[str, int]


@dataclass(frozen=True)
class EvidenceItem:
    """One of a neuron's top-K: a probe image, or a crop of it."""

    image: int  # probe image index
    box: Box | None
    activation: float


def crop_image(image: Image.Image, box: Box | None, size: tuple[int, int] | None) -> Image.Image:
    """The crop ``box`` of ``image`` resized to the model input size (or to
    the source image's size when the model takes any size)."""
    if box is None:
        return image
    out_size = size or image.size
    return image.crop(box).resize(out_size, Image.BICUBIC)


def is_dead(rec: LayerRecord, unit: int) -> bool:
    """A neuron that never varies over the probe set (max == min, e.g. a ReLU
    that is always 0) has nothing to describe."""
    hi, lo = float(rec.max_act[unit]), float(rec.min_act[unit])
    return not np.isfinite(hi) or hi - lo <= 1e-6 * max(1.0, abs(hi))


def top_originals(rec: LayerRecord, unit: int, k: int | None = None) -> list[EvidenceItem]:
    """The recorded top images of a unit (valid entries only), best first."""
    items = [
        EvidenceItem(int(i), None, float(v))
        for v, i in zip(rec.top_vals[unit], rec.top_idx[unit])
        if i >= 0 and np.isfinite(v)
    ]
    return items[:k] if k else items


def crop_stage(
    target: Target,
    probe: ProbeSet,
    records: dict[str, LayerRecord],
    neurons: Sequence[NeuronKey],
    top_k: int,
    cfg: CropConfig,
    summary: str,
    vit_tokens: str,
    batch_size: int = 32,
) -> tuple[dict[NeuronKey, list[EvidenceItem]], dict[NeuronKey, tuple[int, int]]]:
    """Final top-K evidence per neuron, and (calls, cached) target forwards of
    crops per neuron (a crop shared by several neurons is recorded once)."""
    evidence: dict[NeuronKey, list[EvidenceItem]] = {}
    forwards: dict[NeuronKey, tuple[int, int]] = {}
    croppable = [n for n in neurons if cfg.enabled and records[n[0]].has_maps]
    croppable_set = set(croppable)
    for n in neurons:
        if n not in croppable_set:
            evidence[n] = top_originals(records[n[0]], n[1], top_k)
            forwards[n] = (0, 0)
    if not croppable:
        return evidence, forwards

    wanted: dict[int, list[NeuronKey]] = defaultdict(list)  # image -> neurons cropping it
    for n in croppable:
        for item in top_originals(records[n[0]], n[1], top_k):
            wanted[item.image].append(n)
    layers = sorted({n[0] for n in croppable})
    crop_acts: dict[NeuronKey, list[EvidenceItem]] = defaultdict(list)
    calls: dict[NeuronKey, list[int]] = defaultdict(lambda: [0, 0])
    pending: list[tuple[int, Box, Image.Image, list[NeuronKey]]] = []

    def flush() -> None:
        if not pending:
            return
        # Group by size: crops of models that take any size keep their source's size.
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for j, (_, _, im, _) in enumerate(pending):
            by_size[im.size].append(j)
        for idxs in by_size.values():
            summ = forward_summaries(target, [pending[j][2] for j in idxs], layers, summary, vit_tokens, batch_size)
            for row, j in enumerate(idxs):
                image, box, _, users = pending[j]
                for k, n in enumerate(users):
                    crop_acts[n].append(EvidenceItem(image, box, float(summ[n[0]][row, n[1]])))
                    calls[n][0 if k == 0 else 1] += 1
        pending.clear()

    images = sorted(wanted)
    current: dict = {}
    bar = progress(total=len(images), desc=f"crops {target.name}", unit="img")
    import torch

    try:
        with hooked(target.module, layers, current.__setitem__), torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                pil: list[Image.Image] = []
                for i in chunk:
                    pil.append(probe.open(i))
                batch = torch.stack([target.preprocess(im) for im in pil]).to(target.device, target.dtype)
                current.clear()
                target.module(batch)
                maps = {lay: activation_maps(current[lay]) for lay in layers}
                for b, i in enumerate(chunk):
                    w, h = pil[b].size
                    boxes_of: dict[Box, list[NeuronKey]] = defaultdict(list)
                    for n in wanted[i]:
                        amap = maps[n[0]][b, n[1]].float().cpu().numpy()
                        for box in attention_boxes(amap, w, h, cfg.max_crops, cfg.iou_keep, cfg.iou_image, cfg.min_size):
                            boxes_of[box].append(n)
                    for box in sorted(boxes_of):
                        pending.append((i, box, crop_image(pil[b], box, target.input_size), boxes_of[box]))
                if len(pending) >= 4 * batch_size:
                    flush()
                bar.update(len(chunk))
        flush()
    finally:
        bar.close()

    for n in croppable:
        pool = top_originals(records[n[0]], n[1]) + crop_acts.get(n, [])
        pool.sort(key=lambda e: (-e.activation, e.image, e.box or (-1, -1, -1, -1)))
        evidence[n] = pool[:top_k]
        forwards[n] = (calls[n][0], calls[n][1])
    return evidence, forwards
