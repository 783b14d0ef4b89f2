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
