"""Step 1: attention crops, and each neuron's final top-K evidence.

For each of a neuron's top images: upsample its activation map to the image
size, Otsu-threshold it, take the bounding boxes of the external contours,
largest first, and keep a box when it overlaps every kept box by IoU <=
``iou_keep`` and the whole image by IoU < ``iou_image`` (a crop that is
nearly the whole image adds nothing). The crops are recorded and re-ranked
with the originals into the neuron's top-K.

Activation maps are recomputed only for the images in some neuron's top-K;
each image is loaded once, its crops are cut right away, and each unique
crop is recorded once for every neuron of the chunk that needs it. Each
neuron's evidence is cached, so a resumed build pays for none twice.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from builder.backends.layers import activation_maps, hooked
from builder.backends.targets import Target
from builder.cache import content_key
from builder.config import CropConfig
from builder.pipeline.record import LayerRecord, forward_summaries, record_key
from builder.pipeline.records import EvidenceItem, ModelRun, NeuronKey
from builder.probe import ProbeSet
from builder.progress import progress

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), image pixels


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def upsample(act_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear upsampling of a (h, w) activation map to the image size."""
    m = np.asarray(act_map, dtype=np.float32)
    return cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)


def attention_boxes(
    act_map: np.ndarray,
    width: int,
    height: int,
    max_boxes: int = 4,
    iou_keep: float = 0.5,
    iou_image: float = 0.8,
    min_size: int = 4,
) -> list[Box]:
    """Crop boxes for one image, largest first (at most ``max_boxes``).

    Returns [] for a flat map (nothing to threshold)."""
    up = upsample(act_map, width, height)
    lo, hi = float(up.min()), float(up.max())
    if not np.isfinite(hi - lo) or hi - lo <= 1e-12:
        return []
    gray = np.round((up - lo) / (hi - lo) * 255.0).astype(np.uint8)
    _, mask = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    boxes: list[Box] = []
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        if w >= min_size and h >= min_size:
            boxes.append((int(x), int(y), int(x + w), int(y + h)))
    # Largest first; ties by position so the order is deterministic.
    boxes.sort(key=lambda b: (-(b[2] - b[0]) * (b[3] - b[1]), b[1], b[0]))
    whole: Box = (0, 0, width, height)
    kept: list[Box] = []
    for b in boxes:
        if iou(b, whole) >= iou_image:
            continue
        if all(iou(b, k) <= iou_keep for k in kept):
            kept.append(b)
        if len(kept) >= max_boxes:
            break
    return kept


def crop_image(image: Image.Image, box: Box | None, size: tuple[int, int] | None) -> Image.Image:
    """The crop ``box`` of ``image`` resized to the model input size (or to
    the source image's size when the model takes any size)."""
    if box is None:
        return image
    out_size = size or image.size
    return image.crop(box).resize(out_size, Image.BICUBIC)


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
    for n in neurons:
        if not (cfg.enabled and records[n[0]].has_maps):
            evidence[n] = top_originals(records[n[0]], n[1], top_k)
            forwards[n] = (0, 0)
    if not croppable:
        return evidence, forwards
    wanted: dict[int, list[NeuronKey]] = defaultdict(list)  # image -> neurons cropping it
    for n in croppable:
        for item in top_originals(records[n[0]], n[1], top_k):
            wanted[item.image].append(n)
    layers = sorted({n[0] for n in croppable})
    recorder = _CropRecorder(target, layers, summary, vit_tokens, batch_size)
    for crops in _attention_crops(target, probe, wanted, layers, cfg, batch_size):
        recorder.add(crops)
    recorder.flush()
    for n in croppable:
        pool = top_originals(records[n[0]], n[1]) + recorder.acts.get(n, [])
        pool.sort(key=lambda e: (-e.activation, e.image, e.box or (-1, -1, -1, -1)))
        evidence[n] = pool[:top_k]
        forwards[n] = (recorder.calls[n][0], recorder.calls[n][1])
    return evidence, forwards


Crop = tuple[int, Box, Image.Image, list[NeuronKey]]  # source image, box, pixels, neurons using it


def _attention_crops(
    target: Target, probe: ProbeSet, wanted: dict[int, list[NeuronKey]], layers: list[str],
    cfg: CropConfig, batch_size: int,
) -> Iterator[list[Crop]]:
    """For each batch of wanted images: one forward pass for their activation
    maps, then every crop box of every neuron that wants the image (a box
    several neurons find is one crop)."""
    images = sorted(wanted)
    current: dict = {}
    bar = progress(total=len(images), desc=f"crops {target.name}", unit="img")
    try:
        with hooked(target.module, layers, current.__setitem__), torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                pil = [probe.open(i) for i in chunk]
                batch = torch.stack([target.preprocess(im) for im in pil]).to(target.device, target.dtype)
                current.clear()
                target.module(batch)
                maps = {lay: activation_maps(current[lay]) for lay in layers}
                crops: list[Crop] = []
                for b, i in enumerate(chunk):
                    w, h = pil[b].size
                    boxes_of: dict[Box, list[NeuronKey]] = defaultdict(list)
                    for n in wanted[i]:
                        amap = maps[n[0]][b, n[1]].float().cpu().numpy()
                        for box in attention_boxes(amap, w, h, cfg.max_crops, cfg.iou_keep, cfg.iou_image, cfg.min_size):
                            boxes_of[box].append(n)
                    for box in sorted(boxes_of):
                        crops.append((i, box, crop_image(pil[b], box, target.input_size), boxes_of[box]))
                yield crops
                bar.update(len(chunk))
    finally:
        bar.close()


class _CropRecorder:
    """Records crops in batches (one forward for every neuron of the chunk)
    and keeps each neuron's crop activations and its (calls, cached) counts:
    the first neuron using a crop pays for it, the others find it recorded."""

    def __init__(self, target: Target, layers: list[str], summary: str, vit_tokens: str, batch_size: int) -> None:
        self.target, self.layers, self.summary, self.vit_tokens = target, layers, summary, vit_tokens
        self.batch_size = batch_size
        self.pending: list[Crop] = []
        self.acts: dict[NeuronKey, list[EvidenceItem]] = defaultdict(list)
        self.calls: dict[NeuronKey, list[int]] = defaultdict(lambda: [0, 0])

    def add(self, crops: list[Crop]) -> None:
        self.pending += crops
        if len(self.pending) >= 4 * self.batch_size:
            self.flush()

    def flush(self) -> None:
        # Group by size: crops of models that take any size keep their source's size.
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for j, (_, _, im, _) in enumerate(self.pending):
            by_size[im.size].append(j)
        for idxs in by_size.values():
            summ = forward_summaries(self.target, [self.pending[j][2] for j in idxs], self.layers, self.summary,
                                     self.vit_tokens, self.batch_size)
            for row, j in enumerate(idxs):
                image, box, _, users = self.pending[j]
                for k, n in enumerate(users):
                    self.acts[n].append(EvidenceItem(image, box, float(summ[n[0]][row, n[1]])))
                    self.calls[n][0 if k == 0 else 1] += 1
        self.pending.clear()


def chunk_evidence(
    run: ModelRun, records: dict[str, LayerRecord], chunk: Sequence[NeuronKey]
) -> tuple[dict[NeuronKey, list[EvidenceItem]], dict[NeuronKey, tuple[int, int]]]:
    """Step 1 for a chunk of neurons: each one's final top-K evidence and its
    (calls, cached) target forwards of crops; cached per neuron."""
    cfg = run.cfg
    rkey = record_key(run)
    keys = {n: content_key("crops", rkey, cfg.crop.__dict__, cfg.record.top_k, n[0], n[1]) for n in chunk}

    def compute(neurons: list[NeuronKey]) -> list[dict]:
        evidence, calls = crop_stage(run.target, run.probe, records, neurons, cfg.record.top_k, cfg.crop,
                                     run.summary, run.model.vit_tokens, cfg.record.batch_size)
        return [{"evidence": [[e.image, list(e.box) if e.box else None, e.activation] for e in evidence[n]],
                 "calls": list(calls[n])} for n in neurons]

    got, _ = run.cache.fetch("crops", keys, compute, encode=lambda v: json.dumps(v).encode(),
                             decode=json.loads)
    evidence = {n: [EvidenceItem(int(i), tuple(b) if b else None, float(a)) for i, b, a in got[n]["evidence"]]
                for n in chunk}
    return evidence, {n: (int(got[n]["calls"][0]), int(got[n]["calls"][1])) for n in chunk}

