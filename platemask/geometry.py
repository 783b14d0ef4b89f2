"""Plate polygons: from a soft instance mask to a fail-safe outline, and outward growth.

All functions are pure and work in pixel coordinates (x right, y down).
"""
from __future__ import annotations

import cv2
import numpy as np


def box_polygon(box) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


def box_iou(a, b) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / u if u > 0 else 0.0


def polygon_area(poly: np.ndarray) -> float:
    return float(abs(cv2.contourArea(np.asarray(poly, np.float32).reshape(-1, 1, 2))))


def plate_height(poly: np.ndarray) -> float:
    """Short side of the minimum-area rectangle: the plate's height whatever its tilt."""
    (_, _), (w, h), _ = cv2.minAreaRect(np.asarray(poly, np.float32).reshape(-1, 1, 2))
    return float(min(w, h))


def failsafe_polygon(mask: np.ndarray, box, *, threshold: float = 0.4, ragged: float = 0.85,
                     min_fill: float = 0.25, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Outline of one instance, biased to cover the plate rather than hug it.

    ``mask`` is the instance's probability (or binary) map in image coordinates. The outline is the
    convex hull of the pixels above ``threshold`` (plates are convex); where that hull fills less
    than ``ragged`` of its minimum-area rectangle the rectangle is used instead (the union of the
    two, since the rectangle contains the hull). A mask that covers less than ``min_fill`` of the
    detection box, or is empty, is not trusted: the box itself is returned.

    ``mask`` may be a window of the image whose top-left pixel is ``origin`` (x, y) in it (the
    pixels outside the window count as zero); ``box`` and the outline are in image coordinates.
    """
    bx = box_polygon(box)
    x0, y0, x1, y1 = (int(np.floor(v)) for v in box)
    h, w = mask.shape[:2]
    ox, oy = int(origin[0]), int(origin[1])
    x0, y0 = max(x0 - 2, ox), max(y0 - 2, oy)
    x1, y1 = min(x1 + 3, ox + w), min(y1 + 3, oy + h)
    if x1 <= x0 or y1 <= y0:
        return bx
    sub = mask[y0 - oy:y1 - oy, x0 - ox:x1 - ox] >= threshold
    box_area = max(polygon_area(bx), 1.0)
    count = int(np.count_nonzero(sub))
    if count < 3 or count < min_fill * box_area:
        return bx
    # the hull of a pixel set is the hull of each row's leftmost and rightmost pixels: 2 points a
    # row instead of every pixel (a 300 x 100 px plate: 200 points, not 30,000)
    rows = np.flatnonzero(sub.any(axis=1))
    left = np.argmax(sub[rows], axis=1)
    right = sub.shape[1] - 1 - np.argmax(sub[rows, ::-1], axis=1)
    xs, ys = np.concatenate([left, right]), np.concatenate([rows, rows])
    pts = np.stack([xs + x0, ys + y0], 1).astype(np.float32)
    # pixel centres → pixel extents: grow each point to its pixel's corners
    corners = np.concatenate([pts + d for d in ((0, 0), (1, 0), (1, 1), (0, 1))]).astype(np.float32)
    hull = cv2.convexHull(corners).reshape(-1, 2)
    rect = cv2.boxPoints(cv2.minAreaRect(hull)).astype(np.float32)
    if polygon_area(hull) < ragged * max(polygon_area(rect), 1.0):
        return rect
    return hull.astype(np.float32)


def grow_polygon(poly: np.ndarray, margin: float, directions: int = 24) -> np.ndarray:
    """Convex outline grown outward by ``margin`` px in every direction (Minkowski sum with a disc)."""
    poly = np.asarray(poly, np.float32).reshape(-1, 2)
    if margin <= 0:
        return cv2.convexHull(poly).reshape(-1, 2).astype(np.float32)
    a = np.linspace(0, 2 * np.pi, directions, endpoint=False)
    # circumscribe the disc so the polygonal approximation is never inside it
    r = margin / np.cos(np.pi / directions)
    ring = np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32) * r
    pts = (poly[:, None, :] + ring[None]).reshape(-1, 2).astype(np.float32)
    return cv2.convexHull(pts).reshape(-1, 2).astype(np.float32)


def polygon_box(poly: np.ndarray) -> list[float]:
    p = np.asarray(poly, np.float32).reshape(-1, 2)
    return [float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())]


def intersection_over_smaller(a: np.ndarray, b: np.ndarray) -> float:
    """Area shared by two convex polygons over the smaller one's area."""
    inter, _ = cv2.intersectConvexConvex(np.asarray(a, np.float32), np.asarray(b, np.float32))
    small = min(polygon_area(a), polygon_area(b))
    return float(inter) / small if small > 0 else 0.0
