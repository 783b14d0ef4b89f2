"""Training of the orientation classifier (the inference side is :mod:`platemask.orientation`).

Self-supervised: every training photo is upright (the data sets' pixels carry no EXIF turn), so
turning one by k quarters makes a labelled example of class k. Each example is a crop of random
shape (wide, square or tall, 40-100 % of the photo) turned a random number of quarters, so the
outline of the letterboxed photo says nothing about its orientation; colour, blur and greyscale
are jittered. Training uses only the training split; a stable tenth of it (hashed apart from the
held-out split) is kept back to choose the threshold: the highest one at which
``target_catch`` of those photos turned on their side (whole, and as tall crops laid on their
side: what an EXIF-stripped portrait photo is) are caught. The held-out split then reports how
many sideways photos the threshold catches and how many upright photos it turns for nothing
(each costs one more detector pass).

``platemask train-orientation`` writes ``orientation.pt`` into a model folder and records it in
``config.json``; the run checkpoints every epoch and resumes from its work folder.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

from ..orientation import INPUT_SIDE, build_orientation_net, letterbox, sideways_probability, to_batch
from .coco import Record, load_datasets, split_records

THUMB_SIDE = 320  # photos are kept in memory at this long side; crops are cut from them


def thumbnail(path: Path, side: int = THUMB_SIDE) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read {path}")
    h, w = bgr.shape[:2]
    s = min(1.0, side / max(h, w))
    if s < 1:
        bgr = cv2.resize(bgr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def thumbnails(records: Sequence[Record], cache: Path | None = None) -> list[np.ndarray]:
    """Each record's photo at ``THUMB_SIDE``, cached in ``cache`` (an .npz keyed by the file list)."""
    key = hashlib.sha256("\n".join(str(r.path) for r in records).encode()).hexdigest()[:16]
    if cache is not None and cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if str(z["key"]) == key:
            return [z[f"t{i}"] for i in range(len(records))]
    t0 = time.time()
    out = []
    for i, r in enumerate(records):
        out.append(thumbnail(r.path))
        if (i + 1) % 500 == 0:
            print(f"  thumbnails {i + 1}/{len(records)} ({(i + 1) / (time.time() - t0):.0f}/s)", flush=True)
    if cache is not None:
        np.savez(cache, key=key, **{f"t{i}": t for i, t in enumerate(out)})
    return out


def random_crop(rgb: np.ndarray, rng: np.random.Generator, area=(0.4, 1.0), aspect=(0.5, 2.0)) -> np.ndarray:
    """A crop of ``area`` of the photo with width/height log-uniform in ``aspect`` (clamped to fit)."""
    h, w = rgb.shape[:2]
    a = rng.uniform(*area) * h * w
    r = float(np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1]))))
    cw, ch = min(w, max(8, round(np.sqrt(a * r)))), min(h, max(8, round(np.sqrt(a / r))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return rgb[y0:y0 + ch, x0:x0 + cw]


def tall_crop(rgb: np.ndarray, aspect: float = 0.75) -> np.ndarray:
    """The centre of the photo as a tall (portrait) photo: ``aspect`` = width / height."""
    h, w = rgb.shape[:2]
    cw = min(w, max(8, round(h * aspect)))
    x0 = (w - cw) // 2
    return rgb[:, x0:x0 + cw]


def photometric(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = rgb.astype(np.float32)
    out = out * rng.uniform(0.6, 1.4) + rng.uniform(-30, 30)
    if rng.random() < 0.15:
        out[:] = out.mean(axis=2, keepdims=True)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < 0.2:
        k = int(rng.choice([3, 5]))
        out = cv2.GaussianBlur(out, (k, k), 0)
    return out


def example(rgb: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    crop = random_crop(rgb, rng)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return letterbox(photometric(np.ascontiguousarray(np.rot90(crop, -k)), rng))


def part_of(r: Record) -> str:
    """'calib' for a stable tenth of the training split (threshold choice), else 'fit'."""
    h = int(hashlib.sha256(("orientation:" + (r.split_group or r.identity)).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "calib" if h < 0.1 else "fit"


@torch.inference_mode()
def p_sideways_of(net: nn.Module, squares: Sequence[np.ndarray], batch: int = 128) -> np.ndarray:
    net.eval()
    out = [sideways_probability(net(to_batch(squares[i:i + batch]))).numpy() for i in range(0, len(squares), batch)]
    return np.concatenate(out) if out else np.zeros(0)


def probe_sets(thumbs: Sequence[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """What the threshold is chosen and reported on: each photo whole and as a tall crop, upright,
    upside down, and on either side (the photo at ``THUMB_SIDE``: the classifier sees 160 px)."""
    sets: dict[str, list[np.ndarray]] = {"upright": [], "sideways": []}
    for t in thumbs:
        for view in (t, tall_crop(t)):
            for k in range(4):
                sets["sideways" if k % 2 else "upright"].append(letterbox(np.ascontiguousarray(np.rot90(view, -k))))
    return sets


def choose_threshold(p_side: np.ndarray, target_catch: float) -> float:
    """The highest threshold that still catches ``target_catch`` of the sideways examples."""
    if not len(p_side):
        return 0.0
    q = np.sort(p_side)
    i = int(np.floor((1.0 - target_catch) * len(q)))
    return float(max(0.0, min(1.0, q[i])))


def rates(net: nn.Module, sets: dict[str, list[np.ndarray]], threshold: float) -> dict:
    ps = p_sideways_of(net, sets["sideways"])
    pu = p_sideways_of(net, sets["upright"])
    return {"sideways": len(ps), "sideways_caught": int((ps >= threshold).sum()),
            "upright": len(pu), "upright_turned": int((pu >= threshold).sum())}


def save_orientation(net: nn.Module, model_dir: str | Path, info: dict) -> dict:
    """Write ``orientation.pt`` (fp16) into ``model_dir`` and record it in its ``config.json``."""
    from .parts import save_part

    return save_part(net, model_dir, field="orientation", file="orientation.pt", spec={"input_side": INPUT_SIDE, **info})


def train_orientation(model_dir: str | Path, data: Sequence[str | Path], workdir: str | Path, *, epochs: int = 12,
                      batch_size: int = 48, lr: float = 5e-4, per_photo: int = 2, target_catch: float = 0.995,
                      val_fraction: float = 0.15, seed: int = 0, max_minutes: float | None = None,
                      imagenet_weights: str | Path | None = None) -> dict:
    from .train import imagenet_mobilenet_v2

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    train, val = split_records(load_datasets(list(data)), val_fraction)
    fit = [r for r in train if part_of(r) == "fit"]
    calib = [r for r in train if part_of(r) == "calib"]
    print(f"orientation: {len(fit)} photos to fit, {len(calib)} to choose the threshold, {len(val)} held out", flush=True)
    fit_t = thumbnails(fit, workdir / "thumbs-fit.npz")
    calib_t = thumbnails(calib, workdir / "thumbs-calib.npz")

    net = build_orientation_net(imagenet_weights or imagenet_mobilenet_v2())
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(fit_t) * per_photo // batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    ckpt = workdir / "orientation-checkpoint.pt"
    start_epoch = 0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start_epoch = int(state["epoch"])
        print(f"resumed at epoch {start_epoch}", flush=True)
    loss_fn = nn.CrossEntropyLoss()
    t_start = time.time()
    for epoch in range(start_epoch, epochs):
        rng = np.random.default_rng(seed * 1000 + epoch)
        net.train()
        order = np.repeat(np.arange(len(fit_t)), per_photo)
        rng.shuffle(order)
        seen, correct, loss_sum, t0 = 0, 0, 0.0, time.time()
        for s in range(steps_per_epoch):
            idx = order[s * batch_size:(s + 1) * batch_size]
            ks = rng.integers(0, 4, size=len(idx))
            x = to_batch([example(fit_t[i], int(k), rng) for i, k in zip(idx, ks)]).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(ks).long()
            logits = net(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(idx)
            if (s + 1) % 20 == 0:
                print(f"  epoch {epoch + 1}/{epochs} step {s + 1}/{steps_per_epoch} loss {loss_sum / seen:.3f} "
                      f"acc {correct / seen:.3f} ({seen / (time.time() - t0):.0f} photos/s)", flush=True)
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch + 1}, ckpt)
        print(f"epoch {epoch + 1}: loss {loss_sum / seen:.3f} acc {correct / seen:.3f}, {time.time() - t0:.0f} s", flush=True)
        if max_minutes and (time.time() - t_start) / 60 > max_minutes and epoch + 1 < epochs:
            print(f"stopping after {max_minutes} minutes: run the same command again to resume", flush=True)
            return {}

    calib_sets = probe_sets(calib_t)
    threshold = choose_threshold(p_sideways_of(net, calib_sets["sideways"]), target_catch)
    info = {"threshold": round(threshold, 4), "target_catch": target_catch, "epochs": epochs,
            "calibration": rates(net, calib_sets, threshold)}
    val_t = thumbnails(val, workdir / "thumbs-val.npz")
    info["held_out"] = rates(net, probe_sets(val_t), threshold)
    print(json.dumps(info, indent=2), flush=True)
    return save_orientation(net, model_dir, info)
