"""Attention crops: Otsu threshold, contours, area order, IoU filters."""

import numpy as np

from builder.pipeline.crops import attention_boxes, iou


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == 50 / 150


def test_boxes_are_sorted_by_area_and_in_image_coordinates():
    m = np.zeros((16, 16), np.float32)
    m[1:5, 1:5] = 1.0  # small blob
    m[8:15, 6:15] = 1.0  # large blob
    boxes, dropped = attention_boxes(m, 64, 64)
    assert len(boxes) == 2 and dropped == 0
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
    assert (ax1 - ax0) * (ay1 - ay0) > (bx1 - bx0) * (by1 - by0)
    # the large blob covers x 6..15, y 8..15 of a 16-grid -> roughly x 24..60, y 32..60 at 64 px
    assert 18 <= ax0 <= 26 and 28 <= ay0 <= 34 and 56 <= ax1 <= 64 and 56 <= ay1 <= 64


def test_whole_image_box_and_flat_maps_are_dropped():
    assert attention_boxes(np.zeros((8, 8)), 64, 64) == ([], 0)
    m = np.ones((8, 8), np.float32)
    m[0, 0] = 0.0  # nearly everything above threshold: box ~ whole image, IoU >= 0.8
    assert attention_boxes(m, 64, 64) == ([], 0)


def test_at_most_max_boxes_and_overlap_filter():
    m = np.zeros((32, 32), np.float32)
    for k in range(6):
        m[2 + 5 * k : 5 + 5 * k, 2 + 5 * k : 5 + 5 * k] = 1.0 + k
    boxes, _ = attention_boxes(m, 32, 32, max_boxes=4)
    assert len(boxes) <= 4
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert iou(a, b) <= 0.5
