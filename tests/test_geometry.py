import cv2
import numpy as np
import pytest

from platemask.geometry import (box_polygon, failsafe_polygon, grow_polygon, intersection_over_smaller,
                                plate_height, polygon_area)


def _inside(poly, pts, tol=1e-3):
    c = np.asarray(poly, np.float32).reshape(-1, 1, 2)
    return all(cv2.pointPolygonTest(c, (float(x), float(y)), True) >= -tol for x, y in pts)


def test_empty_mask_falls_back_to_box():
    mask = np.zeros((100, 200), np.float32)
    poly = failsafe_polygon(mask, [20, 30, 80, 50])
    assert np.allclose(poly, box_polygon([20, 30, 80, 50]))


def test_sparse_mask_is_not_trusted():
    mask = np.zeros((100, 200), np.float32)
    mask[40, 40:45] = 1.0  # 5 pixels inside a 60x20 box
    poly = failsafe_polygon(mask, [20, 30, 80, 50])
    assert np.allclose(poly, box_polygon([20, 30, 80, 50]))


def test_clean_tilted_mask_gives_tight_hull_covering_every_pixel():
    mask = np.zeros((200, 300), np.uint8)
    quad = np.array([[60, 80], [200, 60], [205, 100], [65, 122]], np.int32)
    cv2.fillPoly(mask, [quad], 1)
    poly = failsafe_polygon(mask.astype(np.float32), [60, 60, 206, 123])
    ys, xs = np.nonzero(mask)
    assert _inside(poly, np.stack([xs + 0.5, ys + 0.5], 1))
    # tight: far smaller than the axis-aligned box
    assert polygon_area(poly) < 0.8 * (146 * 63)
    assert polygon_area(poly) >= mask.sum()


def test_ragged_mask_is_replaced_by_its_min_area_rectangle():
    # a triangular blob: its hull fills only half of its minimum-area rectangle
    mask = np.zeros((100, 200), np.uint8)
    cv2.fillPoly(mask, [np.array([[50, 40], [150, 40], [50, 70]], np.int32)], 1)
    poly = failsafe_polygon(mask.astype(np.float32), [50, 40, 151, 71])
    assert len(poly) == 4
    ys, xs = np.nonzero(mask)
    assert _inside(poly, np.stack([xs + 0.5, ys + 0.5], 1))
    assert polygon_area(poly) > 1.8 * mask.sum()  # the whole rectangle, not the triangle


def test_plate_height_is_tilt_invariant():
    rect = ((100, 100), (120, 30), 25.0)
    poly = cv2.boxPoints(rect)
    assert plate_height(poly) == pytest.approx(30, abs=0.5)


@pytest.mark.parametrize("margin", [1.0, 5.0, 12.5])
def test_grow_polygon_keeps_margin_in_every_direction(margin):
    poly = np.array([[10, 10], [110, 20], [105, 45], [8, 38]], np.float32) + 50
    grown = grow_polygon(poly, margin)
    angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], 1) * margin
    pts = (poly[:, None, :] + ring[None]).reshape(-1, 2)
    assert _inside(grown, pts)
    # and not wildly more than asked: every grown vertex is within ~margin of the original
    c = poly.reshape(-1, 1, 2)
    for x, y in grown:
        assert -cv2.pointPolygonTest(c, (float(x), float(y)), True) <= margin * 1.05


def test_intersection_over_smaller():
    a = box_polygon([0, 0, 10, 10])
    b = box_polygon([5, 0, 8, 10])
    assert intersection_over_smaller(a, b) == pytest.approx(1.0)
    assert intersection_over_smaller(a, box_polygon([20, 20, 30, 30])) == 0.0


def test_box_iou():
    from platemask.geometry import box_iou

    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == 50 / 150
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # degenerate boxes do not divide by zero


def test_failsafe_outline_from_row_ends_is_the_hull_of_every_pixel():
    """The outline is computed from each row's leftmost and rightmost pixels; it must be exactly the
    convex hull of all the mask's pixels (as a set of vertices), for solid, ragged and noisy masks."""
    import cv2

    from platemask.geometry import failsafe_polygon

    rng = np.random.default_rng(5)
    checked = 0
    for i in range(120):
        m = np.zeros((120, 200), np.float32)
        kind = i % 3
        if kind == 0:
            pts = (rng.random((6, 2)) * [200, 120]).astype(np.int32)
            cv2.fillConvexPoly(m, cv2.convexHull(pts), 0.9)
        elif kind == 1:
            m = cv2.GaussianBlur((rng.random((120, 200)) > 0.6).astype(np.float32), (0, 0), 4) * 2
        else:
            m[rng.random((120, 200)) > 0.97] = 1.0
        x0, x1 = sorted(rng.integers(0, 200, 2))
        y0, y1 = sorted(rng.integers(0, 120, 2))
        box = [float(x0), float(y0), float(x1 + 1), float(y1 + 1)]
        got = failsafe_polygon(m, box, ragged=0.0)  # ragged=0: the hull is returned, never its rectangle
        # reference: the hull of every pixel's four corners inside the (grown) box
        bx0, by0, bx1, by1 = max(x0 - 2, 0), max(y0 - 2, 0), min(x1 + 4, 200), min(y1 + 4, 120)
        ys, xs = np.nonzero(m[by0:by1, bx0:bx1] >= 0.4)
        if len(xs) < 3 or len(xs) < 0.25 * (x1 + 1 - x0) * (y1 + 1 - y0):
            continue
        pts = np.stack([xs + bx0, ys + by0], 1).astype(np.float32)
        corners = np.concatenate([pts + d for d in ((0, 0), (1, 0), (1, 1), (0, 1))]).astype(np.float32)
        want = cv2.convexHull(corners).reshape(-1, 2)
        assert {tuple(p) for p in got.tolist()} == {tuple(p) for p in want.tolist()}
        checked += 1
    assert checked > 30


def test_pasting_a_mask_over_its_box_alone_gives_torchvisions_outline():
    """The model leaves masks at 28 x 28 in their box (no view-sized canvas per detection): pasting
    one over its box and reading the outline from that window gives what torchvision's full paste
    gave, also for boxes across the view's edge and boxes under one pixel."""
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from platemask.segment import box_masks

    gen = torch.Generator().manual_seed(3)
    h, w = 120, 200
    masks = torch.rand((7, 28, 28), generator=gen) ** 0.5
    boxes = torch.tensor([[10.3, 20.7, 90.2, 45.1], [-6.0, 30.0, 25.5, 50.2], [180.4, 100.2, 230.0, 130.0],
                          [50.0, 50.0, 50.4, 50.3], [0.0, 0.0, 200.0, 120.0], [150.9, -3.2, 199.9, 10.6],
                          [199.5, 119.5, 215.0, 140.0]])
    full = paste_masks_in_image(masks[:, None], boxes, (h, w))[:, 0].numpy()
    for k, (local, ox, oy) in enumerate(box_masks(masks, boxes, h, w)):
        box = boxes[k].tolist()
        want = failsafe_polygon(full[k], box)
        got = failsafe_polygon(local, box, origin=(ox, oy))
        assert got.shape == want.shape and np.allclose(got, want), k
        window = full[k][oy:oy + local.shape[0], ox:ox + local.shape[1]]
        assert np.array_equal(local, window) and np.count_nonzero(full[k]) == np.count_nonzero(local), k
