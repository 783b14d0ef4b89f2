"""Second look: a small classifier that re-scores each detected plate from a crop with context.

The Mask R-CNN sees a plate through a 7x7 RoI of shared features; what betrays a VIN label, a
dealer watermark or a sticker is often around it (a barcode below, the photo's corner, a door
jamb). The verifier sees each detection's box at a fixed scale with as much context again on
every side, at the photo's own resolution, and answers "is this a plate". Its probability is
fused with the detector's score (their product, never above the detector's score: ``fuse``), so
one threshold still decides what is masked.

This module is the inference side only; training lives in :mod:`platemask.training.verifier`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

# crop the verifier sees: height x width, the box in its central half (context = box size again)
INPUT_HW = (64, 128)
CONTEXT = 2.0
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def window(box: Sequence[float], context: float = CONTEXT, hw: tuple[int, int] = INPUT_HW) -> tuple[float, float, float, float]:
    """The crop window (x0, y0, x1, y1) for a box: its aspect is the input's, and the box spans
    at most ``1/context`` of it on either axis, centred."""
    x0, y0, x1, y1 = map(float, box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    aspect = hw[1] / hw[0]
    ww = max(context * max(x1 - x0, 1.0), context * max(y1 - y0, 1.0) * aspect)
    wh = ww / aspect
    return cx - ww / 2, cy - wh / 2, cx + ww / 2, cy + wh / 2


def window_cut(rgb: np.ndarray, win: Sequence[float]) -> tuple[np.ndarray, int, int] | None:
    """``win`` cut out of the photo at full resolution (edges replicated past the border; a view of
    ``rgb`` where no edge is), with the photo coordinates of its top-left pixel; None when the window
    lies wholly outside the photo."""
    h, w = rgb.shape[:2]
    x0, y0 = int(math.floor(win[0])), int(math.floor(win[1]))
    x1, y1 = max(int(math.ceil(win[2])), x0 + 1), max(int(math.ceil(win[3])), y0 + 1)
    pad = (max(0, -y0), max(0, y1 - h), max(0, -x0), max(0, x1 - w))
    crop = rgb[max(0, y0):min(h, y1), max(0, x0):min(w, x1)]
    if crop.size == 0:
        return None
    if any(pad):
        crop = cv2.copyMakeBorder(crop, *pad, cv2.BORDER_REPLICATE)
    return crop, x0, y0


def fit_input(crop: np.ndarray, hw: tuple[int, int] = INPUT_HW) -> np.ndarray:
    """A cut window resized to the verifier's input."""
    shrink = crop.shape[1] > hw[1]
    return cv2.resize(crop, (hw[1], hw[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def window_crop(rgb: np.ndarray, win: Sequence[float], hw: tuple[int, int] = INPUT_HW) -> np.ndarray:
    """Cut ``win`` out of the photo (edges replicated past the border) and resize it to ``hw``."""
    cut = window_cut(rgb, win)
    if cut is None:  # the window lies wholly outside the photo: nothing to see
        return np.zeros((*hw, 3), np.uint8)
    return fit_input(cut[0], hw)


def to_batch(crops: Sequence[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - _MEAN) / _STD


def build_verifier(imagenet_weights: str | Path | None = None, trainable_from: int = 4) -> nn.Module:
    """MobileNetV2 features (frozen batch norm, stem frozen) -> global average -> one logit."""
    from .model import mobilenet_v2_features

    return nn.Sequential(mobilenet_v2_features(imagenet_weights, trainable_from), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(320, 1))


# How the verifier's probability and the detector's score become one score (config.json's verifier.fusion).
# "product" and "veto" never score a detection above the detector's own score: the verifier can only
# lower it, so a detection the detector scored under a run's threshold is never masked because of
# the verifier, and what the evaluation measures at a threshold (detector floor 0.05) is exactly
# what a run at that threshold (detector floor = its threshold) masks.
#   "product": score * p, both looks as independent evidence (the shipped rule);
#   "veto": the geometric mean sqrt(score * p), capped at the detector's score (a milder veto);
#   "geometric_mean": sqrt(score * p) alone (verifiers v1-v5). A sure verifier lifted a weak
#           detection (0.05 and 0.99 give 0.22), so the result depended on the detector's floor: the
#           evaluation and the runs disagreed. Kept so those folders still load as they were.
FUSIONS = ("product", "veto", "geometric_mean")
DEFAULT_FUSION = "product"
LEGACY_FUSION = "geometric_mean"  # a config.json verifier entry without "fusion" predates the choice


def fuse(det_score: float, plate_prob: float, rule: str = DEFAULT_FUSION) -> float:
    """One score from both looks (see ``FUSIONS``)."""
    d, p = max(det_score, 0.0), max(plate_prob, 0.0)
    if rule == "product":
        return d * p
    if rule == "veto":
        return min(math.sqrt(d * p), d)
    if rule == "geometric_mean":
        return math.sqrt(d * p)
    raise ValueError(f"verifier fusion {rule!r} is not one of {', '.join(FUSIONS)}")


class Verifier:
    """``verifier(rgb, boxes) -> plate probabilities`` for one photo's detections.

    ``onnx_path``: run the network on ONNX Runtime (CPU) from that exported graph instead of PyTorch."""

    def __init__(self, path: str | Path, *, device: torch.device | str = "cpu", batch_size: int = 64,
                 onnx_path: str | Path | None = None, threads: int | None = None):
        from .onnx_runtime import load_classifier_net

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net, self.runtime = load_classifier_net(build_verifier, path, device=self.device, onnx_path=onnx_path,
                                                     threads=threads)

    def __call__(self, rgb: np.ndarray, boxes: Sequence[Sequence[float]]) -> list[float]:
        return self.many([(rgb, boxes)])[0]

    @torch.inference_mode()
    def many(self, photos: Sequence[tuple[np.ndarray, Sequence[Sequence[float]]]]) -> list[list[float]]:
        """Plate probabilities for several photos' boxes, ``[(rgb, boxes), ...]``, in shared batches
        (one network call for a whole GPU batch of photos, not one per photo)."""
        boxes = [(k, b) for k, (_, bs) in enumerate(photos) for b in bs]
        probs: list[list[float]] = [[] for _ in photos]
        for i in range(0, len(boxes), self.batch_size):
            part = boxes[i : i + self.batch_size]  # crops are cut one network batch at a time
            x = to_batch([window_crop(photos[k][0], window(b)) for k, b in part]).to(self.device)
            for (k, _), p in zip(part, torch.sigmoid(self.net(x)[:, 0]).float().cpu().tolist()):
                probs[k].append(p)
        return probs


def load_verifier(model_dir: str | Path, spec: dict, *, device: torch.device | str = "cpu", runtime: str = "torch",
                  onnx: dict | None = None, threads: int | None = None) -> Verifier:
    """The verifier a model folder's ``config.json`` names, checked against its recorded SHA-256.

    ``runtime="onnx"`` runs the exported graph ``onnx`` (config.json's ``onnx.verifier``) when the
    folder has one for these weights; without one the verifier runs on PyTorch."""
    from .model import require_sha256, sha256_file

    path = Path(model_dir) / spec.get("weights", "verifier.pt")
    if not path.is_file():
        raise FileNotFoundError(f"verifier weights {path} are missing (config.json names them); re-run "
                                "'platemask train-verifier' or remove the 'verifier' entry from config.json")
    want = require_sha256(spec.get("weights_sha256"), path, model_dir, what="verifier weights", field="verifier.weights_sha256",
                          fix="re-run 'platemask train-verifier' (it records it) or remove the 'verifier' entry "
                              "from config.json")
    if sha256_file(path) != want:
        raise ValueError(f"verifier weights {path} do not match the SHA-256 in config.json: the model folder is "
                         "corrupt or mixed; re-export it")
    if spec.get("fusion", LEGACY_FUSION) not in FUSIONS:
        raise ValueError(f"{path}: verifier fusion {spec.get('fusion')!r} is not one of {', '.join(FUSIONS)}; "
                         "this version cannot apply it")
    if tuple(spec.get("input_hw", INPUT_HW)) != INPUT_HW or float(spec.get("context", CONTEXT)) != CONTEXT:
        raise ValueError(f"{path}: verifier input {spec.get('input_hw')} / context {spec.get('context')} differ "
                         f"from this version's {INPUT_HW} / {CONTEXT}; retrain it")
    onnx_path = None
    if runtime == "onnx" and onnx:
        from .onnx_runtime import VERIFIER_FILE, checked_path

        onnx_path = checked_path(model_dir, onnx, part="verifier", default_file=VERIFIER_FILE,
                                 weights_sha256=spec.get("weights_sha256", ""))
    return Verifier(path, device=device, onnx_path=onnx_path, threads=threads)
