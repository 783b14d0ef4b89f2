"""What a colour-managed viewer shows: the detector looks at that, not at the stored numbers.

A photo's ICC profile (or a PNG's gAMA chunk) tells viewers how to turn its stored values into
colours: browsers and photo viewers apply it. A profile whose tone curve stretches three dark
levels over the full range shows a readable plate where the stored pixels are nearly black, and a
detector fed the stored pixels finds nothing: the photo was published as "no plate", profile kept,
plate readable. So the detector's view is the photo as shown on an sRGB screen; the masks are
painted into the stored pixels at the same places (the conversion changes colours, never geometry),
and the written photo keeps its profile, so it shows as the original did. Transparency is shown
too: a plate drawn in the alpha channel alone (colours all black) shows on a white page; one whose
colours are white shows on a dark page (a dark-mode page, a browser's own image view), so a photo
with transparency is looked at over both.

Profiles that show the stored values as they are (within a few levels: the sRGB profiles cameras
and phones embed) are recognised once per distinct profile and cost nothing after; any other
(Display P3, Adobe RGB, a crafted one) converts the view, about 25 ms a megapixel on one core.
"""
from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict

import numpy as np
from PIL import Image, ImageCms

from .rows import row_bands

# the most a probe colour may move for a profile to count as showing the stored values as they are
IDENTITY_TOLERANCE = 3
# a PNG gAMA within this of the sRGB-like 1/2.2 (as Pillow reads it: 0.45455) is shown as stored
GAMMA_TOLERANCE = 0.03
# What a transparent pixel is shown over: a white page (``shown``'s default), and a dark one (a
# dark-mode page, a browser's own view of an image). A single backdrop can be matched: a photo drawn
# in the alpha alone over colours of mid-grey, the backdrop before, was flat grey to the detector and
# to tools that drop the alpha, and showed its plate on any page (a real held-out photo: no_plate,
# published as it was; Chromium showed its plate, which the model found at 1.0 there).
BACKDROP = 255
DARK_BACKDROP = 0
# A view whose greys stay within TONE_GREY and whose every probe colour's luma within TONE_LUMA levels
# of the stored values' only moves the gamut (Display P3, Adobe RGB: greys 0 and 9, luma 41 and 49):
# what the stored values show, it shows. Beyond, the stored values are looked at too (may_hide).
TONE_GREY = 12
TONE_LUMA = 64
_LUMA = np.array([0.299, 0.587, 0.114])
_CACHE_SIZE = 32  # distinct profiles remembered (a fleet of phones embeds a handful)

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_MODES = {"RGB": "RGB", "GRAY": "L"}  # the profile's colour space -> the view's PIL mode it converts
_lock = threading.Lock()
_transforms: OrderedDict[bytes, tuple[ImageCms.ImageCmsTransform, str] | None] = OrderedDict()


def _probe(mode: str) -> Image.Image:
    """Every level of each channel and of grey, and a 17-step cube of colours (for RGB)."""
    levels = np.arange(256, dtype=np.uint8)
    if mode == "L":
        return Image.fromarray(levels[None, :])
    zero = np.zeros(256, np.uint8)
    ramps = [np.stack([levels, zero, zero], 1), np.stack([zero, levels, zero], 1),
             np.stack([zero, zero, levels], 1), np.stack([levels, levels, levels], 1)]
    steps = np.minimum(np.arange(0, 257, 16), 255).astype(np.uint8)
    cube = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    return Image.fromarray(np.concatenate([*ramps, cube])[None, :, :], "RGB")


def _tone_kept(shown: np.ndarray, stored: np.ndarray, mode: str) -> bool:
    """Whether a view (of the probe) keeps the stored values' tones (see TONE_GREY)."""
    greys = slice(768, 1024) if mode == "RGB" else slice(None)
    luma = np.abs((shown.astype(np.float32) - stored) @ _LUMA)
    return bool(np.abs(shown[greys] - stored[greys]).max() <= TONE_GREY and luma.max() <= TONE_LUMA)


def _build(icc: bytes) -> tuple[ImageCms.ImageCmsTransform, str, bool] | None:
    """The transform to sRGB for ``icc`` and whether it keeps the stored tones, or None when the view
    needs none: a profile that shows the stored values as they are, or one that cannot be read
    (viewers then show the stored values too)."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        mode = _MODES.get(profile.profile.xcolor_space.strip())
        if mode is None:  # a CMYK or Lab profile: the view is made from converted pixels, not these values
            return None
        transform = ImageCms.buildTransform(profile, _SRGB, mode, "RGB", flags=ImageCms.Flags.NOCACHE)
        probe = _probe(mode)
        shown = np.asarray(ImageCms.applyTransform(probe, transform), np.int16)
        stored = np.asarray(probe.convert("RGB"), np.int16)
    except Exception:  # noqa: BLE001 - lcms refuses what it cannot read: the viewer's fallback is the stored values
        return None
    if np.abs(shown - stored).max() <= IDENTITY_TOLERANCE:
        return None
    return transform, mode, _tone_kept(shown[0], stored[0], mode)


def _transform(icc: bytes) -> tuple[ImageCms.ImageCmsTransform, str, bool] | None:
    key = hashlib.sha256(icc).digest()  # not the profile itself: one may be megabytes
    with _lock:
        if key in _transforms:
            _transforms.move_to_end(key)
            return _transforms[key]
    built = _build(icc)
    with _lock:
        _transforms[key] = built
        while len(_transforms) > _CACHE_SIZE:
            _transforms.popitem(last=False)
    return built


def _gamma_lut(gamma: float) -> np.ndarray | None:
    """The 8-bit table a viewer applies for a PNG's gAMA (stored = linear ** gamma; the screen is
    sRGB-like, ~2.2), or None when it is within GAMMA_TOLERANCE of 1/2.2 or not a usable number."""
    try:
        gamma = float(gamma)
    except (TypeError, ValueError):
        return None
    if not (0.01 <= gamma <= 100.0) or abs(gamma - 1 / 2.2) <= GAMMA_TOLERANCE:
        return None
    x = np.arange(256, dtype=np.float64) / 255.0
    return np.round(255.0 * x ** (1.0 / (gamma * 2.2))).astype(np.uint8)


def shown(rgb: np.ndarray, icc: bytes | None = None, png_gamma: float | None = None,
          alpha: np.ndarray | None = None, backdrop: int = BACKDROP) -> np.ndarray:
    """The uint8 RGB photo ``rgb`` as a colour-managed viewer shows it on an sRGB screen.

    ``icc``: the photo's ICC profile; ``png_gamma``: a PNG's gAMA (which viewers apply only without an
    ICC profile or sRGB chunk: pass None then); ``alpha``: its uint8 alpha channel, composited over
    ``backdrop`` (a grey level: the page; a photo with transparency is looked at over BACKDROP and
    DARK_BACKDROP). Returns ``rgb`` itself when the view is the stored values (no profile, an
    sRGB-like one, one that cannot be read; opaque), else a new array.
    """
    rgb = _colours(rgb, icc, png_gamma)
    if alpha is None or alpha.min() == 255:
        return rgb
    out = np.empty_like(rgb)
    for band in row_bands(rgb.shape[0], rgb.shape[1] * 6):  # no full-size transients
        a = alpha[band, :, None].astype(np.uint16)
        out[band] = (rgb[band] * a + backdrop * (255 - a) + 127) // 255
    return out


def may_hide(icc: bytes | None = None, png_gamma: float | None = None, alpha: np.ndarray | None = None) -> bool:
    """Whether the view ``shown`` makes of a photo may hide what its stored values show: transparency
    (a plate under alpha 0 shows as the page), a profile or gamma that changes its tones (one can show
    a plate as flat grey). Tools that ignore them (converters, thumbnailers, pipelines reading RGB)
    show the stored values, so the detector looks at those too. A profile that only moves the gamut
    (every iPhone's Display P3) does not: its photos are detected once."""
    if alpha is not None and alpha.min() < 255:
        return True
    if icc:
        built = _transform(icc)
        return built is not None and not built[2]
    if png_gamma is not None:
        lut = _gamma_lut(png_gamma)
        return lut is not None and int(np.abs(lut.astype(np.int16) - np.arange(256)).max()) > TONE_GREY
    return False


def _colours(rgb: np.ndarray, icc: bytes | None, png_gamma: float | None) -> np.ndarray:
    if icc:
        built = _transform(icc)
        if built is None:
            return rgb
        transform, mode, _ = built
        out = np.empty((*rgb.shape[:2], 3), np.uint8)
        try:
            for band in row_bands(rgb.shape[0], rgb.shape[1] * 3):  # no full-size transients
                part = rgb[band]
                src = Image.fromarray(np.ascontiguousarray(part[..., 0] if mode == "L" else part), mode)
                out[band] = np.asarray(ImageCms.applyTransform(src, transform))
        except Exception:  # noqa: BLE001 - the probe ran through this transform: a failure here is the pixels'
            return rgb
        return out
    if png_gamma is not None:
        lut = _gamma_lut(png_gamma)
        if lut is not None:
            return lut[rgb]
    return rgb
