"""Training samples: crops around plates at random scales, tilt, light, blur and JPEG damage.

Every sample is (RGB uint8 crop, list of polygons in crop pixels). Negatives are first-class:
negative images are sampled on their own and also pasted into positive crops, so the model
learns "VIN plate / sticker / screen is not a plate" without a fake second class.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from .coco import Record
from .synth import paste_plate, random_quad, render_plate


@dataclass(frozen=True)
class AugmentConfig:
    crop: int = 448
    long_side: tuple[float, float] = (480.0, 1400.0)  # image long side after random rescale
    plate_focus: float = 0.85  # crop centred near a plate this often (positives)
    synth_prob: float = 0.45  # paste synthetic plates into the crop
    negative_paste_prob: float = 0.3  # paste a hard-negative patch into a positive crop
    tilt_prob: float = 0.5
    min_visible: float = 0.45  # keep a plate cut by the crop only if this much of it is inside
    min_side: float = 3.0
    negative_fraction: float = 0.3  # share of samples drawn from negative images alone
    # negative image's long side after rescale, in crop sizes: below 1 keeps the small native scale
    # the detector sees at inference (a 256-px sticker photo is never enlarged there)
    negative_scale: tuple[float, float] = (0.45, 2.2)
    # zoom out: the whole photo shrunk to fit inside the crop (long side in crop sizes), so a
    # close-up plate that fills the frame is learnt as one plate (the detector's coarse view)
    zoom_out_prob: float = 0.12
    zoom_out_side: tuple[float, float] = (0.5, 1.0)


def read_rgb(path: str | Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot decode training image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _poly_area(p: np.ndarray) -> float:
    return float(abs(cv2.contourArea(p.astype(np.float32))))


def _clip_poly(p: np.ndarray, w: int, h: int) -> np.ndarray:
    """Sutherland–Hodgman clip of a polygon to [0,w]x[0,h]."""
    def clip(pts, inside, inter):
        out = []
        for i in range(len(pts)):
            a, b = pts[i - 1], pts[i]
            ia, ib = inside(a), inside(b)
            if ib:
                if not ia:
                    out.append(inter(a, b))
                out.append(b)
            elif ia:
                out.append(inter(a, b))
        return out

    pts = [tuple(map(float, q)) for q in p]
    for axis, bound, keep_less in ((0, 0.0, False), (0, float(w), True), (1, 0.0, False), (1, float(h), True)):
        if not pts:
            break
        def inside(q, axis=axis, bound=bound, keep_less=keep_less):
            return q[axis] <= bound if keep_less else q[axis] >= bound

        def inter(a, b, axis=axis, bound=bound):
            t = (bound - a[axis]) / ((b[axis] - a[axis]) or 1e-9)
            return (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]))

        pts = clip(pts, inside, inter)
    return np.asarray(pts, np.float32).reshape(-1, 2)


def _crop_polys(polys: list[np.ndarray], x0: int, y0: int, size: int, min_visible: float) -> list[np.ndarray]:
    kept = []
    for p in polys:
        q = p - np.array([x0, y0], np.float32)
        area = _poly_area(q)
        c = _clip_poly(q, size, size)
        if len(c) >= 3 and area > 0 and _poly_area(c) / area >= min_visible:
            kept.append(c)
    return kept


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    f = img.astype(np.float32)
    r = rng.random()
    if r < 0.15:  # night: dark, noisy, bluish
        f = f * rng.uniform(0.15, 0.45) + rng.normal(0, rng.uniform(2, 8), f.shape)
        f[..., 2] *= 1.1
    elif r < 0.6:
        f = (f - 128) * rng.uniform(0.6, 1.4) + 128 + rng.uniform(-40, 40)
    if rng.random() < 0.3:
        g = rng.uniform(0.6, 1.6)
        f = 255.0 * (np.clip(f, 0, 255) / 255.0) ** g
    if rng.random() < 0.15:  # glare
        h, w = f.shape[:2]
        glare = np.zeros((h, w), np.float32)
        cv2.ellipse(glare, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                    (int(rng.integers(w // 10, w // 3)), int(rng.integers(h // 10, h // 3))),
                    float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(80, 220)), -1)
        f += cv2.GaussianBlur(glare, (0, 0), w / 12)[..., None]
    if rng.random() < 0.1:
        f[:] = f.mean(axis=2, keepdims=True)
    img = np.clip(f, 0, 255).astype(np.uint8)
    r = rng.random()
    if r < 0.2:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.8))
    elif r < 0.3:
        k = int(rng.integers(3, 8))
        kern = np.zeros((k, k), np.float32)
        kern[k // 2] = 1.0 / k
        M = cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
        kern = cv2.warpAffine(kern, M, (k, k))
        img = cv2.filter2D(img, -1, kern / max(kern.sum(), 1e-6))
    if rng.random() < 0.4:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(20, 90))])
        if ok:
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return img


def _free_spot(rng, size, box_wh, taken, tries=8):
    bw, bh = box_wh
    for _ in range(tries):
        cx = rng.uniform(bw / 2, max(bw / 2 + 1, size - bw / 2))
        cy = rng.uniform(bh / 2, max(bh / 2 + 1, size - bh / 2))
        b = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
        if all(b[2] < t[0] or b[0] > t[2] or b[3] < t[1] or b[1] > t[3] for t in taken):
            return (cx, cy), b
    return None, None


class SampleMaker:
    """Makes (crop, polygons) training samples from records; deterministic given the RNG."""

    def __init__(self, positives: list[Record], negatives: list[Record], cfg: AugmentConfig = AugmentConfig(),
                 negative_weights: Sequence[float] | None = None):
        if not positives:
            raise ValueError("training needs at least one image with a plate")
        self.pos, self.neg, self.cfg = positives, negatives, cfg
        self.neg_p = None  # uniform unless hard-negative weights are given (see platemask.mining)
        if negative_weights is not None:
            w = np.asarray(negative_weights, np.float64)
            if w.shape != (len(negatives),) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"negative_weights needs {len(negatives)} non-negative weights, not all zero")
            self.neg_p = w / w.sum()

    def _negative(self, rng) -> Record:
        return self.neg[int(rng.choice(len(self.neg), p=self.neg_p))]

    def _rescaled(self, rec: Record, rng, zoom_out: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        img = read_rgb(rec.path)
        h, w = img.shape[:2]
        if zoom_out:
            target = rng.uniform(*self.cfg.zoom_out_side) * self.cfg.crop
        else:
            lo, hi = self.cfg.long_side
            target = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        s = target / max(h, w)
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))),
                         interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        return img, [p * s for p in rec.polygons]

    def _crop(self, img, polys, rng, focus: bool):
        c = self.cfg.crop
        h, w = img.shape[:2]
        if h < c or w < c:  # pad with grey (reflection would mirror unlabelled plates in), image at a random place
            top, left = int(rng.integers(0, max(0, c - h) + 1)), int(rng.integers(0, max(0, c - w) + 1))
            img = cv2.copyMakeBorder(img, top, max(0, c - h) - top, left, max(0, c - w) - left,
                                     cv2.BORDER_CONSTANT, value=(114, 114, 114))
            polys = [p + np.array([left, top], np.float32) for p in polys]
            h, w = img.shape[:2]
        if focus and polys:
            p = polys[int(rng.integers(len(polys)))]
            cx, cy = p.mean(0)
            x0 = int(np.clip(cx - rng.uniform(0.15, 0.85) * c, 0, w - c))
            y0 = int(np.clip(cy - rng.uniform(0.15, 0.85) * c, 0, h - c))
        else:
            x0, y0 = int(rng.integers(0, w - c + 1)), int(rng.integers(0, h - c + 1))
        crop = np.ascontiguousarray(img[y0 : y0 + c, x0 : x0 + c])
        return crop, _crop_polys(polys, x0, y0, c, self.cfg.min_visible)

    def _paste_negative(self, crop, polys, rng):
        rec = self._negative(rng)
        patch = read_rgb(rec.path)
        side = int(rng.uniform(0.2, 0.6) * self.cfg.crop)
        patch = cv2.resize(patch, (side, int(side * rng.uniform(0.6, 1.2))), interpolation=cv2.INTER_AREA)
        taken = [(*p.min(0), *p.max(0)) for p in polys]
        ph, pw = patch.shape[:2]
        centre, box = _free_spot(rng, self.cfg.crop, (pw, ph), taken)
        if centre is None:
            return
        x0, y0 = int(box[0]), int(box[1])
        x1, y1 = min(x0 + pw, crop.shape[1]), min(y0 + ph, crop.shape[0])
        crop[y0:y1, x0:x1] = patch[: y1 - y0, : x1 - x0]

    def _paste_synthetic(self, crop, polys, rng):
        for _ in range(int(rng.integers(1, 3))):
            plate, _ = render_plate(rng, height=int(rng.integers(40, 90)))
            aspect = plate.shape[1] / plate.shape[0]
            width = float(np.exp(rng.uniform(np.log(18), np.log(self.cfg.crop * 0.5))))
            taken = [(*p.min(0), *p.max(0)) for p in polys]
            centre, _ = _free_spot(rng, self.cfg.crop, (width * 1.2, width / aspect * 1.6), taken)
            if centre is None:
                continue
            quad = random_quad(rng, width, aspect, centre)
            paste_plate(crop, plate, quad, rng)
            polys.append(quad)

    def _tilt(self, crop, polys, rng):
        c = self.cfg.crop
        src = np.array([[0, 0], [c, 0], [c, c], [0, c]], np.float32)
        dst = src + rng.uniform(-0.08, 0.08, size=(4, 2)).astype(np.float32) * c
        a = np.deg2rad(rng.uniform(-10, 10))
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], np.float32)
        dst = (dst - c / 2) @ rot.T + c / 2
        H = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
        crop = cv2.warpPerspective(crop, H, (c, c), borderMode=cv2.BORDER_CONSTANT, borderValue=(114, 114, 114))
        out = []
        for p in polys:
            q = cv2.perspectiveTransform(p.reshape(-1, 1, 2).astype(np.float32), H).reshape(-1, 2)
            out.extend(_crop_polys([q], 0, 0, c, self.cfg.min_visible))
        return crop, out

    def sample(self, rng: np.random.Generator, negative: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        cfg = self.cfg
        if negative and self.neg:
            rec = self._negative(rng)
            img = read_rgb(rec.path)
            s = rng.uniform(*cfg.negative_scale) * cfg.crop / max(img.shape[:2])
            img = cv2.resize(img, (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))),
                             interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
            crop, polys = self._crop(img, [], rng, focus=False)
        else:
            rec = self.pos[int(rng.integers(len(self.pos)))]
            img, polys = self._rescaled(rec, rng, zoom_out=rng.random() < cfg.zoom_out_prob)
            crop, polys = self._crop(img, polys, rng, focus=rng.random() < cfg.plate_focus)
            if self.neg and rng.random() < cfg.negative_paste_prob:
                self._paste_negative(crop, polys, rng)
        # negatives mostly stay pure: what they teach is the absence of a plate
        if rng.random() < (cfg.synth_prob / 3 if negative else cfg.synth_prob):
            self._paste_synthetic(crop, polys, rng)
        if rng.random() < cfg.tilt_prob:
            crop, polys = self._tilt(crop, polys, rng)
        if rng.random() < 0.5:
            crop = np.ascontiguousarray(crop[:, ::-1])
            polys = [np.stack([cfg.crop - p[:, 0], p[:, 1]], 1) for p in polys]
        crop = _photometric(crop, rng)
        polys = [p for p in polys if np.ptp(p[:, 0]) >= cfg.min_side and np.ptp(p[:, 1]) >= cfg.min_side]
        return crop, polys


def to_target(crop: np.ndarray, polys: list[np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Tensors in torchvision's detection format; an empty target is a valid negative."""
    h, w = crop.shape[:2]
    image = torch.from_numpy(crop).permute(2, 0, 1).float().div_(255.0)
    if not polys:
        return image, {
            "boxes": torch.zeros((0, 4)),
            "labels": torch.zeros((0,), dtype=torch.int64),
            "masks": torch.zeros((0, h, w), dtype=torch.uint8),
        }
    masks = np.zeros((len(polys), h, w), np.uint8)
    boxes = []
    for i, p in enumerate(polys):
        cv2.fillPoly(masks[i], [np.round(p).astype(np.int32)], 1)
        boxes.append([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()])
    return image, {
        "boxes": torch.tensor(boxes, dtype=torch.float32),
        "labels": torch.ones((len(polys),), dtype=torch.int64),
        "masks": torch.from_numpy(masks),
    }


class SampleStream(torch.utils.data.IterableDataset):
    """Endless stream of samples; each worker gets its own seed so workers never repeat."""

    def __init__(self, maker: SampleMaker, seed: int):
        self.maker, self.seed = maker, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        rng = np.random.default_rng([self.seed, wid])
        random.seed(self.seed + wid)
        cv2.setNumThreads(1)
        while True:
            try:
                crop, polys = self.maker.sample(rng, negative=rng.random() < self.maker.cfg.negative_fraction)
            except ValueError as exc:  # an undecodable file: skip it, say so
                print(f"skipping sample: {exc}", flush=True)
                continue
            yield to_target(crop, polys)
