"""Synthetic licence plates with true corners.

The real data only has axis-aligned boxes; rendered plates warped by a known homography give
the mask head exact quadrilaterals to learn tight, tilted polygons from. Used as extra training
data and to generate test and demo photos (no real photo can be shipped in the repository).
"""
from __future__ import annotations

import cv2
import numpy as np

from ..constants import OVERLAY_STYLES

_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"
_FONTS = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_PLAIN)
# (aspect w/h, probability): EU-long, US/JP-like, square-ish two-line (motorbike, rear of some cars)
_ASPECTS = ((4.6, 0.45), (2.0, 0.4), (1.4, 0.15))


def plate_text(rng: np.random.Generator, n: int | None = None) -> str:
    n = n or int(rng.integers(5, 9))
    s = "".join(rng.choice(list(_CHARS), size=n))
    if n >= 6 and rng.random() < 0.5:
        k = int(rng.integers(2, n - 2))
        s = s[:k] + rng.choice([" ", "-"]) + s[k:]
    return s


def render_plate(rng: np.random.Generator, text: str | None = None, height: int = 64) -> tuple[np.ndarray, str]:
    """Return an RGB plate image (h, w, 3) uint8 filling its whole rectangle, and its text."""
    aspects, probs = zip(*_ASPECTS)
    aspect = float(rng.choice(aspects, p=np.array(probs) / sum(probs))) * rng.uniform(0.9, 1.1)
    h, w = height, int(round(height * aspect))
    kind = rng.random()
    if kind < 0.55:
        bg, fg = (rng.integers(225, 256),) * 3, (rng.integers(0, 40),) * 3
    elif kind < 0.8:
        bg, fg = (rng.integers(220, 256), rng.integers(190, 230), rng.integers(0, 60)), (20, 20, 20)
    elif kind < 0.92:
        bg, fg = (rng.integers(0, 40),) * 3, (rng.integers(215, 256),) * 3
    else:
        bg = tuple(int(c) for c in rng.integers(120, 256, size=3))
        fg = tuple(int(c) for c in rng.integers(0, 90, size=3))
    img = np.empty((h, w, 3), np.uint8)
    img[:] = np.array(bg, dtype=np.uint8)
    x0 = 0
    if aspect > 3 and rng.random() < 0.4:  # EU band
        band = max(2, int(w * 0.08))
        img[:, :band] = (0, 51, 153)
        x0 = band
    cv2.rectangle(img, (1, 1), (w - 2, h - 2), tuple(int(c) for c in fg), max(1, h // 24))
    text = text or plate_text(rng, n=int(rng.integers(5, 9)) if aspect > 2.5 else int(rng.integers(4, 7)))
    font = int(rng.choice(_FONTS))
    thick = int(rng.integers(max(1, h // 20), max(2, h // 9) + 1))
    lines = [text] if aspect > 1.7 else [text[: len(text) // 2], text[len(text) // 2 :]]
    line_h = (h * 0.72) / len(lines)
    for i, line in enumerate(lines):
        (tw, th), _ = cv2.getTextSize(line, font, 1.0, thick)
        scale = min(line_h / max(th, 1), (w - x0) * 0.88 / max(tw, 1))
        (tw, th), _ = cv2.getTextSize(line, font, scale, thick)
        x = x0 + ((w - x0) - tw) // 2
        y = int(h * 0.14 + line_h * (i + 1) - (line_h - th) / 2)
        cv2.putText(img, line, (int(x), y), font, scale, tuple(int(c) for c in fg), thick, cv2.LINE_AA)
    return img, text


def random_quad(rng: np.random.Generator, width: float, aspect: float, center: tuple[float, float],
                max_rot_deg: float = 18.0, max_persp: float = 0.18) -> np.ndarray:
    """Corners (tl, tr, br, bl) of a plate of ``width`` px, rotated and seen in perspective."""
    h = width / aspect
    pts = np.array([[-width / 2, -h / 2], [width / 2, -h / 2], [width / 2, h / 2], [-width / 2, h / 2]], np.float32)
    # foreshortening: one vertical edge shorter (plate turned away), plus small shear
    f = rng.uniform(-max_persp, max_persp)
    pts[[0, 3], 1] *= 1 + f
    pts[[1, 2], 1] *= 1 - f
    pts[:, 0] += pts[:, 1] * rng.uniform(-0.15, 0.15)
    a = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], np.float32)
    return (pts @ rot.T + np.asarray(center, np.float32)).astype(np.float32)


def paste_plate(image: np.ndarray, plate: np.ndarray, quad: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Warp ``plate`` onto ``quad`` in ``image`` (in place) with lighting matched to the spot."""
    ph, pw = plate.shape[:2]
    src = np.array([[0, 0], [pw, 0], [pw, ph], [0, ph]], np.float32)
    H = cv2.getPerspectiveTransform(src, quad.astype(np.float32))
    h, w = image.shape[:2]
    warped = cv2.warpPerspective(plate, H, (w, h), flags=cv2.INTER_AREA if pw > 64 else cv2.INTER_LINEAR)
    alpha = cv2.warpPerspective(np.full((ph, pw), 255, np.uint8), H, (w, h), flags=cv2.INTER_LINEAR)
    x0, y0 = np.floor(quad.min(0)).astype(int)
    x1, y1 = np.ceil(quad.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1 + 1, w), min(y1 + 1, h)
    if x1 <= x0 or y1 <= y0:
        return image
    roi = image[y0:y1, x0:x1].astype(np.float32)
    a = alpha[y0:y1, x0:x1, None].astype(np.float32) / 255.0
    p = warped[y0:y1, x0:x1].astype(np.float32)
    if rng is not None:
        light = np.clip(roi.mean() / 128.0, 0.35, 1.15) * rng.uniform(0.8, 1.1)
        p = np.clip(p * light, 0, 255)
    image[y0:y1, x0:x1] = (roi * (1 - a) + p * a).astype(np.uint8)
    return image


def synth_car_scene(rng: np.random.Generator, size: tuple[int, int] = (720, 1280), n_plates: int = 1,
                    plate_width: tuple[float, float] = (60, 160)) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """A crude car-like scene with plates, for tests and the demo. Returns image, quads, texts."""
    h, w = size
    img = np.empty((h, w, 3), np.uint8)
    sky = np.linspace(200, 120, h // 2)[:, None, None] * np.array([0.9, 0.95, 1.0])
    img[: h // 2] = sky.astype(np.uint8)
    img[h // 2 :] = rng.integers(70, 110)
    noise = rng.normal(0, 6, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    body = tuple(int(c) for c in rng.integers(20, 230, size=3))
    cx, cy = w // 2 + int(rng.integers(-w // 10, w // 10)), int(h * 0.58)
    bw, bh = int(w * 0.55), int(h * 0.42)
    cv2.rectangle(img, (cx - bw // 2, cy - bh // 2), (cx + bw // 2, cy + bh // 2), body, -1)
    cv2.rectangle(img, (cx - bw // 3, cy - bh // 2 - bh // 3), (cx + bw // 3, cy - bh // 2), body, -1)
    cv2.rectangle(img, (cx - bw // 3 + 15, cy - bh // 2 - bh // 3 + 12), (cx + bw // 3 - 15, cy - bh // 2), (60, 70, 80), -1)
    for sx in (-1, 1):
        cv2.circle(img, (cx + sx * bw // 3, cy + bh // 2), bh // 4, (25, 25, 25), -1)
        cv2.rectangle(img, (cx + sx * bw // 2 - (40 if sx > 0 else 0), cy - bh // 4), (cx + sx * bw // 2 + (0 if sx > 0 else 40), cy - bh // 4 + 25), (230, 230, 200), -1)
    quads, texts = [], []
    for i in range(n_plates):
        pw = rng.uniform(*plate_width)
        plate, text = render_plate(rng)
        aspect = plate.shape[1] / plate.shape[0]
        px = cx + (i - (n_plates - 1) / 2) * bw / max(n_plates, 1)
        quad = random_quad(rng, pw, aspect, (px, cy + bh // 5), max_rot_deg=8, max_persp=0.1)
        paste_plate(img, plate, quad)
        quads.append(quad)
        texts.append(text)
    return img, quads, texts


# Overlays that are not plates: the watermarks, dealer logos and web addresses that sellers and
# photo sites print over car photos (a white box with dark text in a corner, coloured lettering, a
# small logo beside it). They share a plate's outline and contrast, so a verifier that never saw
# one passes it (an unseen site's watermark got 0.995); the lower-case letters, the dots, the
# logo and the missing plate border are what tells them apart.
_TLDS = (".ru", ".com", ".de", ".pl", ".com.br", ".ua", ".net", ".es", ".it", ".fr", ".co.uk", ".by", ".kz")
_LOWER = "abcdefghijklmnopqrstuvwxyz"


def overlay_text(rng: np.random.Generator) -> str:
    """A web address or a brand name as a watermark spells it, in lower case: never a plate-like
    code (capitals and digits on a light box are what a plate is; teaching those as "not a plate"
    would cost recall)."""
    word = "".join(rng.choice(list(_LOWER), size=int(rng.integers(4, 11))))
    if rng.random() < 0.65:
        return ("www." if rng.random() < 0.3 else "") + word + str(rng.choice(_TLDS))
    return word.capitalize() + (str(rng.choice(["", " auto", " Motors", " Cars", "-auto", " Group", ".pro"])))


def render_overlay(rng: np.random.Generator, height: int = 48, style: str = "any") -> tuple[np.ndarray, np.ndarray]:
    """An RGB watermark (h, w, 3) and its opacity (h, w) in [0, 1]: lettering, a logo sometimes, on
    a box (light or dark, translucent) or on nothing. ``style`` "plain": dark lettering on a light
    box or light on a dark one only, never coloured lettering (which real plates carry: a state name
    in red over the characters); "light": dark lettering on a light box only (light lettering on a
    dark box is what an old black plate looks like)."""
    if style not in OVERLAY_STYLES:
        raise ValueError(f"overlay style {style!r}: expected one of {', '.join(OVERLAY_STYLES)}")
    plain = style != "any"
    text = overlay_text(rng)
    font = int(rng.choice(_FONTS)) | (cv2.FONT_ITALIC if rng.random() < 0.25 else 0)
    thick = int(rng.integers(1, max(2, height // 12) + 1))
    (tw, th), base = cv2.getTextSize(text, font, 1.0, thick)
    scale = height * 0.55 / max(th, 1)
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    logo = rng.random() < 0.5
    pad = int(height * rng.uniform(0.1, 0.3))
    lw = int(height * 0.7) if logo else 0
    h, w = height, tw + lw + 2 * pad + (pad if logo else 0)
    box = rng.random() * {"any": 1.0, "plain": 0.7, "light": 0.5}[style]
    img = np.zeros((h, w, 3), np.uint8)
    alpha = np.zeros((h, w), np.float32)
    if box < 0.5:  # light box, dark or coloured lettering
        img[:] = rng.integers(220, 256)
        alpha[:] = rng.uniform(0.55, 1.0)
        fg = tuple(int(c) for c in (rng.integers(0, 60, size=3) if plain or rng.random() < 0.6 else rng.integers(0, 256, size=3)))
    elif box < 0.7:  # dark translucent box, light lettering
        img[:] = rng.integers(0, 50)
        alpha[:] = rng.uniform(0.3, 0.8)
        fg = tuple(int(c) for c in rng.integers(200, 256, size=3))
    else:  # lettering alone, saturated colour or white
        fg = tuple(int(c) for c in (rng.permutation([int(rng.integers(180, 256)), int(rng.integers(0, 80)), int(rng.integers(0, 120))])
                                    if rng.random() < 0.7 else (255, 255, 255)))
    text_alpha = np.zeros((h, w), np.uint8)
    x = pad + lw + (pad if logo else 0)
    y = (h + th) // 2
    cv2.putText(img, text, (x, y), font, scale, fg, thick, cv2.LINE_AA)
    cv2.putText(text_alpha, text, (x, y), font, scale, 255, thick, cv2.LINE_AA)
    if logo:
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        cx, cy, r = pad + lw // 2, h // 2, max(2, lw // 2 - 1)
        shape = rng.random()
        if shape < 0.5:
            cv2.circle(img, (cx, cy), r, colour, -1, cv2.LINE_AA)
            cv2.circle(text_alpha, (cx, cy), r, 255, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
            cv2.rectangle(text_alpha, (cx - r, cy - r), (cx + r, cy + r), 255, -1)
    alpha = np.maximum(alpha, text_alpha.astype(np.float32) / 255.0 * rng.uniform(0.6, 1.0))
    return img, alpha


def paste_overlay(image: np.ndarray, overlay: np.ndarray, alpha: np.ndarray, x: int, y: int) -> tuple[int, int, int, int]:
    """Blend ``overlay`` into ``image`` (in place) with its top-left corner at (x, y), clipped to the
    image; returns the box it covers."""
    h, w = image.shape[:2]
    oh, ow = overlay.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + ow, w), min(y + oh, h)
    if x1 <= x0 or y1 <= y0:
        return x0, y0, x0, y0
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
    roi = image[y0:y1, x0:x1].astype(np.float32)
    image[y0:y1, x0:x1] = (roi * (1 - a) + overlay[y0 - y : y1 - y, x0 - x : x1 - x].astype(np.float32) * a).astype(np.uint8)
    return x0, y0, x1, y1
