"""Masking: a pure function from (pixels, plates, mode) to pixels where no plate can be read.

Each plate's fail-safe polygon is grown by a margin proportional to its height (characters at
the edge stay covered), filled to full strength inside, and feathered *outward* only, so the
blend never weakens the core. Strength is tied to plate size: the blur sigma and the pixel block
follow the character height, not a fixed kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .constants import DEFAULT_MASK_MODE, MASK_MODES
from .constants import MaskMode as Mode
from .detections import Plate
from .geometry import grow_polygon, plate_height
from .rows import row_bands

CHAR_HEIGHT = 0.6  # characters are ~60% of plate height


@dataclass(frozen=True)
class MaskStyle:
    mode: Mode = DEFAULT_MASK_MODE
    margin: float = 0.2  # growth, as a fraction of plate height (at least min_margin px)
    min_margin: float = 2.0
    feather: float = 0.25  # outward blend band, fraction of plate height
    blur_sigma: float = 0.5  # gaussian sigma, fraction of plate height (>= 0.8 char height)
    pixel_block: float = 1.0  # pixelate block edge, multiples of character height

    def __post_init__(self):
        if self.mode not in MASK_MODES:
            raise ValueError(f"mode must be one of {MASK_MODES}, got {self.mode!r}")
        for name in ("margin", "min_margin", "feather", "blur_sigma", "pixel_block"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def masked_region(plate: Plate, style: MaskStyle) -> tuple[np.ndarray, float]:
    """The polygon that is fully obscured, and the plate height it was sized from."""
    h = max(plate_height(plate.polygon), 1.0)
    return grow_polygon(plate.polygon, max(style.min_margin, style.margin * h)), h


def _stored(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float pixels rounded back to ``dtype`` (uint8 or uint16)."""
    return np.clip(np.rint(a), 0, np.iinfo(dtype).max).astype(dtype)


def _obscure(roi: np.ndarray, h: float, style: MaskStyle, core: np.ndarray | None) -> np.ndarray:
    """``roi`` obscured (``roi``'s shape, its dtype or float32; the solid mode's a read-only broadcast);
    ``core`` (the covered pixels of ``roi``) is read by the solid mode only. No full-size float copy
    of ``roi`` is made where it is large: a close-up whose plate fills an 80 MP photo took 4 GB more
    to mask (17 times the photo), beyond the pixel budget the job reserves, with several in flight."""
    if style.mode == "gaussian":
        sigma = max(3.0, style.blur_sigma * h)
        # two passes of a wide box-like blur on a downscaled copy: same look, a fraction of the cost
        # of a huge kernel, and no high-frequency residue a deblurring tool could invert
        small = max(1, int(sigma / 3))
        if small > 1:
            ds = cv2.resize(roi, (max(1, roi.shape[1] // small), max(1, roi.shape[0] // small)),
                            interpolation=cv2.INTER_AREA).astype(np.float32)
            ds = cv2.GaussianBlur(ds, (0, 0), sigma / small)
            ds = cv2.GaussianBlur(ds, (0, 0), sigma / small)
            out = cv2.resize(_stored(ds, roi.dtype), (roi.shape[1], roi.shape[0]), interpolation=cv2.INTER_LINEAR)
        else:
            f = roi.astype(np.float32)
            out = cv2.GaussianBlur(cv2.GaussianBlur(f, (0, 0), sigma), (0, 0), sigma)
        return out.reshape(roi.shape)
    if style.mode == "pixelate":
        b = max(4, int(round(style.pixel_block * CHAR_HEIGHT * h)))
        small = cv2.resize(roi, (max(1, roi.shape[1] // b), max(1, roi.shape[0] // b)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (roi.shape[1], roi.shape[0]), interpolation=cv2.INTER_NEAREST).reshape(roi.shape)
    # solid: the mean colour of what is covered
    if core.any():
        mean = np.asarray(cv2.mean(roi, mask=core.astype(np.uint8))[:roi.shape[2] if roi.ndim == 3 else 1], np.float32)
    else:
        mean = np.asarray(cv2.mean(roi)[:roi.shape[2] if roi.ndim == 3 else 1], np.float32)
    return np.broadcast_to(mean if roi.ndim == 3 else mean[0], roi.shape)


def colour_channels(out: np.ndarray) -> np.ndarray:
    """The view of ``out`` (H×W, H×W×C) that masking writes: its colour or grey channels, never alpha."""
    color = out if out.ndim == 2 else out[..., : (3 if out.shape[2] >= 3 else 1)]
    return color[..., 0] if color.ndim == 3 and color.shape[2] == 1 else color


def _grown_box(region: np.ndarray, reach: float, limits: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """The pixel box of ``region`` grown by ``reach`` on every side, clipped to ``limits``; None if empty."""
    x0 = max(int(np.floor(region[:, 0].min() - reach)), limits[0])
    y0 = max(int(np.floor(region[:, 1].min() - reach)), limits[1])
    x1 = min(int(np.ceil(region[:, 0].max() + reach)) + 1, limits[2])
    y1 = min(int(np.ceil(region[:, 1].max() + reach)) + 1, limits[3])
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def blur_window(region: np.ndarray, h: float, style: MaskStyle, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The window a plate's blur reads (its grown outline, feather band and twice the blur's
    sigma around it), clipped to the photo; None when nothing of it is in the photo."""
    pad = int(np.ceil(style.feather * h + max(3.0, style.blur_sigma * h) * 2 + 2))
    x0 = max(int(np.floor(region[:, 0].min())) - pad, 0)
    y0 = max(int(np.floor(region[:, 1].min())) - pad, 0)
    x1 = min(int(np.ceil(region[:, 0].max())) + pad + 1, width)
    y1 = min(int(np.ceil(region[:, 1].max())) + pad + 1, height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def clip_convex(poly: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The convex polygon ``poly`` cut to ``box`` (x0, y0, x1, y1), in float64 (Sutherland-Hodgman);
    empty (0 x 2) when they do not meet."""
    pts = np.asarray(poly, np.float64).reshape(-1, 2)
    for axis, bound, keep_below in ((0, box[0], False), (0, box[2], True), (1, box[1], False), (1, box[3], True)):
        if not len(pts):
            break
        d = (pts[:, axis] - bound) * (-1 if keep_below else 1)  # >= 0: inside this edge
        out = []
        for i in range(len(pts)):
            p, q, dp, dq = pts[i], pts[(i + 1) % len(pts)], d[i], d[(i + 1) % len(pts)]
            if dp >= 0:
                out.append(p)
            if (dp >= 0) != (dq >= 0):
                out.append(p + (q - p) * (dp / (dp - dq)))
        pts = np.asarray(out, np.float64).reshape(-1, 2)
    return pts


def outline_core(region: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """1 where ``region`` covers a pixel of ``box`` (with 4x sub-pixel precision, so the core covers
    every partly covered pixel), else 0. ``region`` is cut to ``box`` first: a vertex far outside the
    photo (a polygon from a damaged detections file) overflowed the rasteriser's int32 coordinates
    and the plate was left uncovered."""
    x0, y0, x1, y1 = box
    core = np.zeros((y1 - y0, x1 - x0), np.uint8)
    region = clip_convex(region, (x0 - 2, y0 - 2, x1 + 2, y1 + 2))
    if not len(region):
        return core
    shift = 2
    pts = np.round((region - [x0, y0]) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(core, [pts], 1, lineType=cv2.LINE_8, shift=shift)
    cv2.polylines(core, [pts], True, 1, thickness=1, lineType=cv2.LINE_8, shift=shift)
    return core


def feather_alpha(core: np.ndarray, band: float) -> np.ndarray:
    """1 on the core, falling to 0 over ``band`` px outside it (float32, computed in place)."""
    if band >= 0.5:
        alpha = cv2.distanceTransform((1 - core).astype(np.uint8), cv2.DIST_L2, 5)
        alpha *= np.float32(-1.0 / band)
        alpha += np.float32(1.0)
        np.clip(alpha, 0.0, 1.0, out=alpha)
    else:
        alpha = core.astype(np.float32)
    alpha[core > 0] = 1.0
    return alpha


_BLEND_STRIP = 1 << 19  # values blended at a time: the float copies are a band's size, not the box's


def blend_into(color: np.ndarray, box: tuple[int, int, int, int], alpha: np.ndarray, obscured: np.ndarray) -> None:
    """``color``'s ``box`` becomes ``obscured`` where ``alpha`` is 1, blended where it is between."""
    x0, y0, x1, y1 = box
    roi = color[y0:y1, x0:x1]
    maxval = np.iinfo(roi.dtype).max if np.issubdtype(roi.dtype, np.integer) else 1.0
    for band in row_bands(roi.shape[0], roi[:1].size, _BLEND_STRIP):
        a = alpha[band] if roi.ndim == 2 else alpha[band, :, None]
        blended = roi[band].astype(np.float32) * (1 - a) + obscured[band] * a
        roi[band] = np.clip(np.rint(blended), 0, maxval).astype(roi.dtype)


def apply_mask(pixels: np.ndarray, plates: list[Plate], style: MaskStyle = MaskStyle(), *,
               copy: bool = True) -> np.ndarray:
    """Return a copy of ``pixels`` (H×W, H×W×C; uint8 or uint16) with every plate obscured.

    An alpha channel (4th or 2nd channel) is obscured like the colour: characters cut out of it
    (transparent) read as the background's colour through an untouched alpha, whatever the colour
    under them; an opaque plate stays opaque. Colour under transparent pixels is masked too, since
    a viewer can drop the alpha. ``copy=False`` masks ``pixels`` itself and
    returns it, for a caller that owns them and needs the original no more (a full-size copy of a
    79 MP photo is 237 MB).
    """
    out = pixels.copy() if copy else pixels
    if not plates:
        return out
    H, W = pixels.shape[:2]
    color = colour_channels(out)
    channels = (color, out[..., -1]) if out.ndim == 3 and out.shape[2] in (2, 4) else (color,)
    for plate in plates:
        region, h = masked_region(plate, style)
        window = blur_window(region, h, style, W, H)
        if window is None:
            continue
        band = style.feather * h
        # the blend changes only the grown polygon and its feather band: the alpha is built there
        # alone; the blur still reads the whole padded window, for its context. The 5x5 distance
        # transform is never under the chessboard distance, so alpha is 0 beyond band + 1 px
        box = _grown_box(region, band + 2, window)
        if box is None:  # the polygon and its band lie outside the photo
            continue
        core = outline_core(region, box)
        if not core.any():  # the outline lies outside the photo: no pixel of it to cover
            continue
        ax0, ay0, ax1, ay1 = box
        weights = feather_alpha(core, band)
        for ch in channels:
            if style.mode == "solid":
                obscured = _obscure(ch[ay0:ay1, ax0:ax1], h, style, core)
            else:
                x0, y0, x1, y1 = window
                obscured = _obscure(ch[y0:y1, x0:x1], h, style, None)[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0]
            blend_into(ch, box, weights, obscured)
    return out
