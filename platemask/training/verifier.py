"""Training of the second-look verifier (the inference side is :mod:`platemask.verify`).

Training uses only the training split: labelled plates (with the box jitter a detector makes) as
positives; the detector's own detections on negative photos (VIN stickers, instrument clusters,
any negative category), plus random plate-shaped windows on negatives and away from plates, as
negatives. ``platemask train-verifier`` writes ``verifier.pt`` into a model folder and records it
in ``config.json``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from ..geometry import box_iou, polygon_box
from ..verify import CONTEXT, DEFAULT_FUSION, INPUT_HW, build_verifier, fit_input, to_batch, window, window_crop, window_cut
from .synth import paste_overlay, paste_plate, random_quad, render_overlay, render_plate
@dataclass
class Example:
    image: int  # index into the image list
    box: tuple[float, float, float, float]
    label: int  # 1 plate, 0 not a plate
    kind: str  # "plate", "detection", "random", "synthetic" (a rendered plate pasted into the photo; box unused),
    # "overlay" (a rendered watermark pasted into the photo away from its plates; box unused)


def covers(box: Sequence[float], plate: Sequence[float]) -> float:
    """Share of ``plate``'s area inside ``box``."""
    ix = max(0.0, min(box[2], plate[2]) - max(box[0], plate[0]))
    iy = max(0.0, min(box[3], plate[3]) - max(box[1], plate[1]))
    area = (plate[2] - plate[0]) * (plate[3] - plate[1])
    return ix * iy / area if area > 0 else 0.0


def examples_from(images: Sequence[dict], *, min_side: float = 4.0, hides: float = 0.8) -> list[Example]:
    """Labelled examples from per-image records ``{"negative", "gt": [boxes], "plates": [detections]}``.

    Positives: every labelled plate, and every detection that covers ``hides`` of one (however
    loose its box: masking it hides the plate, so the verifier must keep it). Negatives: every
    detection on a negative photo. Other detections on photos with plates are left out: labels
    there are not exhaustive, and teaching the verifier that an unlabelled real plate is "not a
    plate" would cost recall.
    """
    out: list[Example] = []
    for i, im in enumerate(images):
        for b in im["gt"]:
            if min(b[2] - b[0], b[3] - b[1]) >= min_side * 0.5 and max(b[2] - b[0], b[3] - b[1]) >= min_side:
                out.append(Example(i, tuple(b), 1, "plate"))
        for p in im["plates"]:
            if im["negative"]:
                out.append(Example(i, tuple(p["box"]), 0, "detection"))
            elif any(covers(p["box"], g) >= hides for g in im["gt"]):
                out.append(Example(i, tuple(p["box"]), 1, "detection"))
    return out


def jitter(box: Sequence[float], rng: np.random.Generator, amount: float = 0.15,
           loose: float = 0.0) -> tuple[float, float, float, float]:
    """A box as a detector might draw it around the same object: scaled and shifted a little, and
    with probability ``loose`` up to 3x larger with the object still inside (merged or coarse-view
    detections are loose like that)."""
    x0, y0, x1, y1 = box
    w, h = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    cx = (x0 + x1) / 2 + rng.uniform(-amount, amount) * w
    cy = (y0 + y1) / 2 + rng.uniform(-amount, amount) * h
    w *= math.exp(rng.uniform(-amount, amount) * 1.5)
    h *= math.exp(rng.uniform(-amount, amount) * 1.5)
    if loose and rng.random() < loose:
        gw, gh = math.exp(rng.uniform(0, math.log(3))), math.exp(rng.uniform(0, math.log(3)))
        cx += rng.uniform(-0.5, 0.5) * (gw - 1) * w / 2
        cy += rng.uniform(-0.5, 0.5) * (gh - 1) * h / 2
        w, h = w * gw, h * gh
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def edge_density(rgb: np.ndarray, cell: int = 8) -> np.ndarray:
    """Where the photo has text-like detail: blurred gradient magnitude on a ``cell``-pixel grid,
    normalised to a sampling distribution (labels, stickers, watermarks and plates all score high)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mag = np.abs(cv2.Sobel(gray, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    h, w = gray.shape
    grid = cv2.resize(mag, (max(1, w // cell), max(1, h // cell)), interpolation=cv2.INTER_AREA)
    grid = cv2.GaussianBlur(grid, (0, 0), 1.5) + 1e-6
    return grid / grid.sum()


def random_box(width: int, height: int, rng: np.random.Generator, avoid: Sequence[Sequence[float]] = (),
               density: np.ndarray | None = None) -> tuple | None:
    """A plate-shaped box that does not touch ``avoid`` (None if none fits): anywhere, or centred
    where ``density`` (see :func:`edge_density`) puts its weight."""
    for _ in range(20):
        bw = math.exp(rng.uniform(math.log(12), math.log(max(13.0, 0.8 * width))))
        bh = bw / rng.uniform(1.5, 5.0)
        if density is None:
            x0, y0 = rng.uniform(0, max(1.0, width - bw)), rng.uniform(0, max(1.0, height - bh))
        else:
            k = int(rng.choice(density.size, p=density.ravel()))
            gy, gx = divmod(k, density.shape[1])
            cx = (gx + rng.random()) * width / density.shape[1]
            cy = (gy + rng.random()) * height / density.shape[0]
            x0, y0 = cx - bw / 2, cy - bh / 2
        b = (x0, y0, x0 + bw, y0 + bh)
        if all(box_iou(b, a) == 0.0 for a in avoid):
            return b
    return None


def synthetic_plate_crop(rgb: np.ndarray, rng: np.random.Generator,
                         width: tuple[float, float] = (16.0, 400.0)) -> np.ndarray:
    """The verifier's input for a rendered plate (any of the renderer's colour schemes, tilted and in
    perspective) pasted anywhere into ``rgb``, its box jittered as a detector draws one.

    The real training plates are mostly dark text on white: a verifier that saw only them vetoed a
    clear yellow plate the detector was sure of (0.999 → fused 0.055). Only the window is cut (at
    full resolution, edges replicated) and pasted into, not the whole photo.
    """
    h, w = rgb.shape[:2]
    plate, _ = render_plate(rng, height=64)
    aspect = plate.shape[1] / plate.shape[0]
    pw = float(np.exp(rng.uniform(np.log(width[0]), np.log(min(width[1], 0.8 * w)))))
    quad = random_quad(rng, pw, aspect, (rng.uniform(0, w), rng.uniform(0, h)))
    box = jitter((*quad.min(0), *quad.max(0)), rng, loose=0.3)
    # the plate's centre is inside the photo, so the window is never wholly outside it
    region, x0, y0 = window_cut(rgb, window(box))
    region = region.copy()  # a view of the photo where no edge was replicated: never paste into the photo
    paste_plate(region, plate, quad - np.array([x0, y0], np.float32), rng)
    return fit_input(region)


def overlay_position(width: int, height: int, ow: int, oh: int, rng: np.random.Generator,
                     avoid: Sequence[Sequence[float]] = (), tries: int = 10) -> tuple[int, int] | None:
    """Top-left corner of an ``ow`` x ``oh`` watermark in a ``width`` x ``height`` photo, touching no
    box in ``avoid``: along an edge (a corner most often) six times in ten, else anywhere; None when
    ``tries`` draws all touch one."""
    for _ in range(tries):
        if rng.random() < 0.6:
            m = rng.uniform(0, 0.06)
            x = int(rng.choice([m * width, width - ow - m * width, rng.uniform(0, max(1, width - ow))], p=[0.4, 0.4, 0.2]))
            y = int(rng.choice([m * height, height - oh - m * height, rng.uniform(0, max(1, height - oh))], p=[0.3, 0.5, 0.2]))
        else:
            x, y = int(rng.uniform(0, max(1, width - ow))), int(rng.uniform(0, max(1, height - oh)))
        box = (float(x), float(y), float(x + ow), float(y + oh))
        if all(box_iou(box, a) == 0.0 for a in avoid):
            return x, y
    return None


def synthetic_overlay_crop(rgb: np.ndarray, rng: np.random.Generator, avoid: Sequence[Sequence[float]] = (),
                           width: tuple[float, float] = (16.0, 300.0), style: str = "any") -> np.ndarray | None:
    """The verifier's input for a rendered watermark (:func:`~platemask.training.synth.render_overlay`)
    pasted into ``rgb`` clear of the boxes in ``avoid`` (its plates), mostly along an edge or in a
    corner where sites print them; its box jittered as a detector draws one. None if it fits nowhere."""
    h, w = rgb.shape[:2]
    overlay, alpha = render_overlay(rng, height=48, style=style)
    pw = float(np.exp(rng.uniform(np.log(width[0]), np.log(max(width[0] + 1, min(width[1], 0.6 * w))))))
    f = pw / overlay.shape[1]
    oh, ow = max(3, int(round(overlay.shape[0] * f))), max(4, int(round(pw)))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    overlay, alpha = cv2.resize(overlay, (ow, oh), interpolation=interp), cv2.resize(alpha, (ow, oh), interpolation=interp)
    at = overlay_position(w, h, ow, oh, rng, avoid)
    if at is None:
        return None
    x, y = at
    win = window(jitter((x, y, x + ow, y + oh), rng, loose=0.3))
    cut = window_cut(rgb, win)
    if cut is None:
        return None
    region, x0, y0 = cut
    region = region.copy()  # never paste into the photo itself
    paste_overlay(region, overlay, alpha, x - x0, y - y0)
    return fit_input(region)


def photometric(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness/contrast, blur and JPEG, as cameras and uploads vary them; and polarity and
    colour order, for both classes alike: plates come dark-on-light and light-on-dark, white,
    yellow, blue or green, and the real photos show mostly the first (a verifier that learnt
    "dark text on white" would veto a black plate the detector found)."""
    if rng.random() < 0.25:
        crop = 255 - crop
    if rng.random() < 0.3:
        crop = crop[:, :, rng.permutation(3)]
    x = crop.astype(np.float32)
    x = (x - 128) * rng.uniform(0.7, 1.3) + 128 + rng.uniform(-30, 30)
    x = np.clip(x, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.2))
    if rng.random() < 0.3:
        ok, enc = cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 90))])
        x = cv2.imdecode(enc, cv2.IMREAD_UNCHANGED)
    return x


def collect_detections(model_dir: str | Path, records, *, min_score: float = 0.05, cache: Path | None = None,
                       log=print) -> list[dict]:
    """Run the detector (without a verifier) over ``records``; one dict per image, cached as JSON lines."""
    from ..imageio import decode
    from ..segment import Segmenter

    if cache is not None and cache.is_file():
        try:  # a cache cut short (killed, disk full) is detected again, not a run that fails from now on
            rows = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            rows = []
        if rows and all(isinstance(r, dict) for r in rows) and [r.get("path") for r in rows] == [str(r.path) for r in records]:
            log(f"verifier: reusing detections in {cache}")
            return rows
    seg = Segmenter(model_dir, min_score=min_score, batch_size=2, verify=False)
    rows, t0 = [], time.time()
    for i, rec in enumerate(records):
        dec = decode(Path(rec.path).read_bytes())
        plates = seg([dec.rgb])[0]
        rows.append({"path": str(rec.path), "negative": rec.negative,
                     "gt": [[float(v) for v in polygon_box(p)] for p in rec.polygons],
                     "plates": [p.to_json() for p in plates]})
        if (i + 1) % 100 == 0:
            rate = (i + 1) / (time.time() - t0)
            log(f"verifier: detected {i + 1}/{len(records)} images, {rate:.2f} images/s, ETA {(len(records) - i - 1) / rate:.0f} s")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(cache)
    return rows


def train_verifier(images: Sequence[dict], rgbs: Sequence[np.ndarray], *, epochs: int = 8, batch_size: int = 64,
                   lr: float = 3e-4, randoms_per_image: float = 0.5, randoms_per_negative: float = 8.0,
                   hard_repeats: int = 3, synthetic_per_epoch: int = 0, overlays_per_epoch: int = 0,
                   overlay_style: str = "any", seed: int = 0,
                   imagenet_weights: str | Path | None = None, device: str = "cpu", log=print) -> nn.Module:
    """Fit the verifier on ``images`` (see :func:`examples_from`) whose pixels are ``rgbs``.

    Each epoch sees every example once with fresh jitter and photometric noise, plus
    random plate-shaped windows as negatives: ``randoms_per_image`` per photo with plates (away
    from them), and ``randoms_per_negative`` per negative photo, centred where it has text-like
    detail (:func:`edge_density`): every window on a negative photo is a true negative, and the
    detector alone finds too few of them for the verifier to generalise. The detector's own false
    plates come ``hard_repeats`` times. ``synthetic_per_epoch`` rendered plates pasted into random
    training photos (:func:`synthetic_plate_crop`) join the positives, ``overlays_per_epoch``
    rendered watermarks pasted clear of the plates (:func:`synthetic_overlay_crop`) the negatives;
    ``overlay_style`` other than "any" (see :func:`~platemask.training.synth.render_overlay`): those
    only, and only on photos without plates, so no window around one shows part of a plate.
    Classes are balanced in the loss.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    base = examples_from(images)
    n_pos = sum(e.label for e in base)
    if n_pos == 0 or n_pos == len(base) and not (randoms_per_image or randoms_per_negative):
        raise ValueError("the verifier needs labelled plates and negatives to learn from")
    density = {i: edge_density(rgbs[i]) for i, im in enumerate(images) if im["negative"]}
    net = build_verifier(imagenet_weights).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    negatives = [i for i, im in enumerate(images) if im["negative"]]

    def crop_of(e: Example, box) -> np.ndarray:
        if e.kind == "synthetic":
            return synthetic_plate_crop(rgbs[e.image], rng)
        if e.kind == "overlay":
            on = int(rng.choice(negatives)) if overlay_style != "any" and negatives else e.image
            crop = synthetic_overlay_crop(rgbs[on], rng, avoid=images[on]["gt"], style=overlay_style)
            while crop is None and negatives:  # no room clear of the plates: a photo without any
                crop = synthetic_overlay_crop(rgbs[int(rng.choice(negatives))], rng, style=overlay_style)
            return crop if crop is not None else window_crop(rgbs[e.image], window(box))
        return window_crop(rgbs[e.image], window(box))

    step = 0
    t0 = time.time()
    for epoch in range(epochs):
        ex = [e for e in base for _ in range(1 if e.label else hard_repeats)]
        for i, im in enumerate(images):
            h, w = rgbs[i].shape[:2]
            n = randoms_per_negative if im["negative"] else randoms_per_image
            for _ in range(int(n) + (rng.random() < n % 1)):
                b = random_box(w, h, rng, avoid=im["gt"], density=density.get(i))
                if b is not None:
                    ex.append(Example(i, b, 0, "random"))
        ex.extend(Example(int(rng.integers(len(images))), (0.0, 0.0, 1.0, 1.0), 1, "synthetic")
                  for _ in range(synthetic_per_epoch))
        ex.extend(Example(int(rng.integers(len(images))), (0.0, 0.0, 1.0, 1.0), 0, "overlay")
                  for _ in range(overlays_per_epoch))
        order = rng.permutation(len(ex))
        pos = sum(e.label for e in ex)
        pos_weight = torch.tensor((len(ex) - pos) / max(pos, 1))
        steps_per_epoch = math.ceil(len(ex) / batch_size)
        total = steps_per_epoch * epochs
        net.train()
        seen = correct = 0
        loss_sum = 0.0
        for s in range(steps_per_epoch):
            batch = [ex[j] for j in order[s * batch_size : (s + 1) * batch_size]]
            boxes = [e.box if e.kind in ("random", "synthetic", "overlay") else jitter(e.box, rng, loose=0.3 if e.kind == "plate" else 0.0)
                     for e in batch]
            crops = [photometric(crop_of(e, b), rng) for e, b in zip(batch, boxes)]
            x = to_batch(crops).to(device)
            y = torch.tensor([float(e.label) for e in batch], device=device)
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / total))
            logits = net(x)[:, 0]
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight.to(device))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            step += 1
            seen += len(batch)
            correct += int(((logits > 0).float() == y).sum())
            loss_sum += loss.item() * len(batch)
        rate = seen / (time.time() - t0)
        log(f"verifier: epoch {epoch + 1}/{epochs}, {len(ex)} crops ({pos} plates), loss {loss_sum / seen:.4f}, "
            f"train accuracy {correct / seen:.4f}, {rate:.0f} crops/s")
        t0 = time.time()
    return net.eval()


@torch.inference_mode()
def predict(net: nn.Module, rgbs: Sequence[np.ndarray], examples: Sequence[Example], batch_size: int = 128) -> np.ndarray:
    net.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        out.append(torch.sigmoid(net(to_batch([window_crop(rgbs[e.image], window(e.box)) for e in chunk]))[:, 0]))
    return torch.cat(out).numpy() if out else np.zeros(0)


def save_verifier(net: nn.Module, model_dir: str | Path, info: dict) -> dict:
    """Write ``verifier.pt`` (fp16) into ``model_dir`` and record it in its ``config.json``."""
    from .parts import save_part

    return save_part(net, model_dir, field="verifier", file="verifier.pt",
                     spec={"input_hw": list(INPUT_HW), "context": CONTEXT, "fusion": DEFAULT_FUSION, **info})


def train_for_model(model_dir: str | Path, data: str | Path, workdir: str | Path, *, epochs: int = 8,
                    val_fraction: float = 0.15, seed: int = 0, imagenet_weights: str | Path | None = None,
                    device: str = "cpu", positive_fraction: float = 1.0, synthetic_per_epoch: int = 0,
                    overlays_per_epoch: int = 0, overlay_style: str = "any", log=print) -> dict:
    """Train a verifier for the detector in ``model_dir`` on the training split of ``data`` and add it there.

    The detector's detections on the training photos are cached in ``workdir`` (re-used while the
    detector and the split are unchanged), so a second run only pays for the classifier.
    """
    from ..model import load_config
    from .augment import read_rgb
    from .coco import load_datasets, split_of, split_records

    cfg = load_config(model_dir)
    train_recs, _ = split_records(load_datasets(data), val_fraction)
    if positive_fraction < 1.0:
        # a stable subset of the photos with plates (by identity), every negative: the detector pass over
        # the training photos dominates the cost on a CPU, and negatives are what the verifier is for
        keep = [r for r in train_recs if r.negative or split_of(r.identity + ":verifier", 1.0 - positive_fraction) == "train"]
        log(f"verifier: {sum(not r.negative for r in keep)} of {sum(not r.negative for r in train_recs)} photos with "
            f"plates (positive_fraction {positive_fraction}), all {sum(r.negative for r in keep)} negatives")
        train_recs = keep
    missing = [r.path for r in train_recs if not Path(r.path).is_file()]
    if missing:  # found now, not when the detector pass (tens of minutes on a CPU) reaches it
        raise FileNotFoundError(
            f"{len(missing)} training photo(s) listed in the annotations are not there, e.g. {missing[0]}: "
            "fix the data set's annotations.json or its images")
    workdir = Path(workdir)
    cache = workdir / f"detections-{cfg.weights_sha256[:12]}-{len(train_recs)}.jsonl"
    images = collect_detections(model_dir, train_recs, cache=cache, log=log)
    t0 = time.time()
    rgbs = [read_rgb(r["path"]) for r in images]
    log(f"verifier: {len(rgbs)} training photos in memory ({time.time() - t0:.0f} s)")
    net = train_verifier(images, rgbs, epochs=epochs, seed=seed, imagenet_weights=imagenet_weights,
                         device=device, synthetic_per_epoch=synthetic_per_epoch,
                         overlays_per_epoch=overlays_per_epoch, overlay_style=overlay_style, log=log).cpu()
    ex = examples_from(images)
    info = {"trained_on": [Path(d).name for d in ([data] if isinstance(data, (str, Path)) else data)],
            "val_fraction": val_fraction, "epochs": epochs, "seed": seed, "positive_fraction": positive_fraction,
            "synthetic_per_epoch": synthetic_per_epoch, "overlays_per_epoch": overlays_per_epoch,
            "overlay_style": overlay_style,
            "detector_weights_sha256": cfg.weights_sha256,
            "plates": sum(e.label for e in ex), "negative_detections": sum(1 - e.label for e in ex)}
    return save_verifier(net, model_dir, info)
