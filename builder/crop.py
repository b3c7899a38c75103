"""Step 1: attention crops from a neuron's activation map.

Upsample the map to the image size, Otsu-threshold it, take the bounding
boxes of the external contours, largest first, and keep a box when it
overlaps every kept box by IoU <= ``iou_keep`` and the whole image by IoU <
``iou_image`` (a crop that is nearly the whole image adds nothing).
"""

from __future__ import annotations

import cv2
import numpy as np

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
