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
from dataclasses import dataclass, field

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
    min_fraction: float = 0.0,
) -> tuple[list[Box], int]:
    """Crop boxes for one image, largest first (at most ``max_boxes``), and how
    many boxes were dropped for being smaller than ``min_fraction`` of the
    image's side (a few pixels of a large image are no evidence: no captioner
    can say what they show). ``([], 0)`` for a flat map (nothing to threshold)."""
    up = upsample(act_map, width, height)
    lo, hi = float(up.min()), float(up.max())
    if not np.isfinite(hi - lo) or hi - lo <= 1e-12:
        return [], 0
    gray = np.round((up - lo) / (hi - lo) * 255.0).astype(np.uint8)
    _, mask = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    boxes: list[Box] = []
    small = 0
    for c in contours:
        x, y, w, h = cv2.boundingRect(c)
        if w < min_size or h < min_size:
            continue  # contour noise
        if w < min_fraction * width or h < min_fraction * height:
            small += 1
            continue
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
    return kept, small


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


@dataclass
class ChunkEvidence:
    """Step 1's result for some neurons: each one's final top-K evidence, its
    (calls, cached) target forwards of crops, the crops it dropped (too small,
    or over the per-image cap) and the heatmap of each of its evidence images
    (a ``data:`` URL of its activation map on the source image)."""

    evidence: dict[NeuronKey, list[EvidenceItem]] = field(default_factory=dict)
    forwards: dict[NeuronKey, tuple[int, int]] = field(default_factory=dict)
    dropped: dict[NeuronKey, int] = field(default_factory=dict)
    heatmaps: dict[NeuronKey, dict[int, str]] = field(default_factory=dict)


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
) -> ChunkEvidence:
    """Final top-K evidence of each neuron (its top images and their crops,
    re-ranked; at most ``cfg.max_per_image`` items of one image), forwards
    per neuron (a crop shared by several neurons is recorded once), dropped
    crops and heatmaps."""
    out = ChunkEvidence()
    mapped = [n for n in neurons if records[n[0]].has_maps and (cfg.enabled or cfg.heatmaps)]
    mapped_set = set(mapped)
    for n in neurons:
        if n not in mapped_set:
            out.evidence[n], out.dropped[n] = _top_k(top_originals(records[n[0]], n[1]), top_k, cfg.max_per_image)
            out.forwards[n] = (0, 0)
    if not mapped:
        return out
    wanted: dict[int, list[NeuronKey]] = defaultdict(list)  # image -> neurons needing its map
    for n in mapped:
        for item in top_originals(records[n[0]], n[1], top_k):
            wanted[item.image].append(n)
    layers = sorted({n[0] for n in mapped})
    recorder = _CropRecorder(target, layers, summary, vit_tokens, batch_size)
    maps: dict[NeuronKey, dict[int, np.ndarray]] = defaultdict(dict)
    small: dict[NeuronKey, int] = defaultdict(int)
    for crops, batch_maps, batch_small in _attention_crops(target, probe, wanted, layers, cfg, batch_size):
        recorder.add(crops)
        for (n, image), amap in batch_maps.items():
            maps[n][image] = amap
        for n, k in batch_small.items():
            small[n] += k
    recorder.flush()
    for n in mapped:
        pool = top_originals(records[n[0]], n[1]) + recorder.acts.get(n, [])
        pool.sort(key=lambda e: (-e.activation, e.image, e.box or (-1, -1, -1, -1)))
        out.evidence[n], over_cap = _top_k(pool, top_k, cfg.max_per_image)
        out.dropped[n] = small[n] + over_cap
        out.forwards[n] = (recorder.calls[n][0], recorder.calls[n][1])
        if cfg.heatmaps:
            out.heatmaps[n] = heatmap_urls(maps[n])
    return out


def _top_k(pool: list[EvidenceItem], k: int, per_image: int) -> tuple[list[EvidenceItem], int]:
    """The first ``k`` items of a ranked pool with at most ``per_image`` from
    one probe image, and how many were passed over for that cap."""
    kept: list[EvidenceItem] = []
    count: dict[int, int] = defaultdict(int)
    skipped = 0
    for e in pool:
        if len(kept) >= k:
            break
        if count[e.image] >= per_image:
            skipped += 1
            continue
        count[e.image] += 1
        kept.append(e)
    return kept, skipped


def heatmap_urls(maps: dict[int, np.ndarray]) -> dict[int, str]:
    """Per source image, its activation map as a ``data:`` URL of an 8-bit
    grayscale PNG at the map's own resolution (a reader upsamples it), scaled
    by the neuron's largest activation over these maps so the overlays of its
    evidence compare; negative activations show as 0."""
    import base64
    import io

    top = max((float(np.max(m)) for m in maps.values()), default=0.0)
    out: dict[int, str] = {}
    for image, m in maps.items():
        scaled = np.clip(np.asarray(m, np.float64) / top, 0.0, 1.0) if top > 0 else np.zeros_like(m)
        buf = io.BytesIO()
        Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L").save(buf, format="PNG", optimize=True)
        out[image] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return out


Crop = tuple[int, Box, Image.Image, list[NeuronKey]]  # source image, box, pixels, neurons using it


def _attention_crops(
    target: Target, probe: ProbeSet, wanted: dict[int, list[NeuronKey]], layers: list[str],
    cfg: CropConfig, batch_size: int,
) -> Iterator[tuple[list[Crop], dict[tuple[NeuronKey, int], np.ndarray], dict[NeuronKey, int]]]:
    """For each batch of wanted images: one forward pass for their activation
    maps, then every crop box of every neuron that wants the image (a box
    several neurons find is one crop), each (neuron, image)'s map and the
    boxes each neuron dropped for being too small."""
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
                got: dict[tuple[NeuronKey, int], np.ndarray] = {}
                small: dict[NeuronKey, int] = defaultdict(int)
                for b, i in enumerate(chunk):
                    w, h = pil[b].size
                    boxes_of: dict[Box, list[NeuronKey]] = defaultdict(list)
                    for n in wanted[i]:
                        amap = maps[n[0]][b, n[1]].float().cpu().numpy()
                        got[(n, i)] = amap
                        if not cfg.enabled:
                            continue
                        boxes, dropped = attention_boxes(amap, w, h, cfg.max_crops, cfg.iou_keep,
                                                                 cfg.iou_image, cfg.min_size, cfg.min_fraction)
                        small[n] += dropped
                        for box in boxes:
                            boxes_of[box].append(n)
                    for box in sorted(boxes_of):
                        crops.append((i, box, crop_image(pil[b], box, target.input_size), boxes_of[box]))
                yield crops, got, small
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


def chunk_evidence(run: ModelRun, records: dict[str, LayerRecord], chunk: Sequence[NeuronKey]) -> ChunkEvidence:
    """Step 1 for a chunk of neurons (see :class:`ChunkEvidence`), cached per neuron."""
    cfg = run.cfg
    rkey = record_key(run)
    keys = {n: content_key("crops", rkey, cfg.crop.__dict__, cfg.record.top_k, n[0], n[1]) for n in chunk}

    def compute(neurons: list[NeuronKey]) -> list[dict]:
        got = crop_stage(run.target, run.probe, records, neurons, cfg.record.top_k, cfg.crop, run.summary,
                         run.model.vit_tokens, cfg.record.batch_size)
        return [{"evidence": [[e.image, list(e.box) if e.box else None, e.activation] for e in got.evidence[n]],
                 "calls": list(got.forwards[n]), "dropped": got.dropped[n],
                 "heatmaps": {str(i): u for i, u in got.heatmaps.get(n, {}).items()}} for n in neurons]

    cached, _ = run.cache.fetch("crops", keys, compute, encode=lambda v: json.dumps(v).encode(), decode=json.loads)
    out = ChunkEvidence()
    for n in chunk:
        v = cached[n]
        out.evidence[n] = [EvidenceItem(int(i), tuple(b) if b else None, float(a)) for i, b, a in v["evidence"]]
        out.forwards[n] = (int(v["calls"][0]), int(v["calls"][1]))
        out.dropped[n] = int(v["dropped"])
        out.heatmaps[n] = {int(i): u for i, u in v["heatmaps"].items()}
    return out
