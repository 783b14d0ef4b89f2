"""Is a photo lying on its side? A small classifier that decides which landscape photos also get the
detector's turned view.

A phone stores a portrait photo as landscape pixels with an EXIF Orientation that says "turn me";
an upload tool that strips the metadata without turning the pixels leaves a wider-than-tall photo
whose scene, and every plate in it, lies on end. The detector was trained upright (small tilts
only) and finds plates upright or upside down, not on end: on portrait crops of the held-out
street photos laid on their side it hid 20 and 12 of 254 plates, against 220 upright (the model
card). Turning every photo would double the detector's time, so a landscape photo is turned when
this classifier gives it a probability of lying on its side at or above the model's threshold
(``config.json``'s ``orientation.threshold``, chosen in training to let almost no sideways photo
through); portrait photos are always turned (``ModelConfig.turned_view``).

The network is MobileNetV2's features, global average pooling and four logits: the photo as it
was taken, turned a quarter clockwise (``np.rot90(rgb, -1)`` of it), upside down, turned a quarter
anticlockwise. P(on its side) is the sum of the two quarter turns. It sees the whole photo shrunk
to ``INPUT_SIDE`` on its long side and padded to a square with the mean colour, so the photo's
shape is not a clue it could learn (training crops have every shape in every orientation).

This module is the inference side only; training lives in :mod:`platemask.training.orientation`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import nn

INPUT_SIDE = 160
N_CLASSES = 4  # upright, a quarter clockwise, upside down, a quarter anticlockwise
SIDEWAYS = (1, 3)
PAD_RGB = (124, 116, 104)  # ImageNet's mean colour: 0 after normalisation
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def letterbox(rgb: np.ndarray, side: int = INPUT_SIDE) -> np.ndarray:
    """The whole photo shrunk (never enlarged past ``side``) to ``side`` on its long side, centred on
    a ``side`` x ``side`` square of the mean colour. A large photo is first subsampled to about twice
    the size (a 79 MP photo would otherwise cost ~100 ms of area averaging)."""
    h, w = rgb.shape[:2]
    step = max(1, max(h, w) // (2 * side))
    if step > 1:
        rgb = rgb[::step, ::step]
        h, w = rgb.shape[:2]
    scale = side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(np.ascontiguousarray(rgb), (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = PAD_RGB
    y0, x0 = (side - nh) // 2, (side - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = small
    return out


def to_batch(squares: Sequence[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - _MEAN) / _STD


def build_orientation_net(imagenet_weights: str | Path | None = None, trainable_from: int = 4) -> nn.Module:
    """MobileNetV2 features (frozen batch norm, stem frozen) -> global average -> four logits."""
    from .model import mobilenet_v2_features

    return nn.Sequential(mobilenet_v2_features(imagenet_weights, trainable_from), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(320, N_CLASSES))


def sideways_probability(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.float(), dim=1)
    return p[:, SIDEWAYS[0]] + p[:, SIDEWAYS[1]]


class OrientationClassifier:
    """``classifier.p_sideways(images) -> [P(on its side), ...]``; ``threshold`` from config.json.

    ``onnx_path``: run the network on ONNX Runtime (CPU) from that exported graph instead of PyTorch."""

    def __init__(self, path: str | Path, *, threshold: float, device: torch.device | str = "cpu", batch_size: int = 32,
                 onnx_path: str | Path | None = None, threads: int | None = None):
        from .onnx_runtime import load_classifier_net

        self.threshold = float(threshold)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.net, self.runtime = load_classifier_net(build_orientation_net, path, device=self.device,
                                                     onnx_path=onnx_path, threads=threads)

    @torch.inference_mode()
    def p_sideways(self, images: Sequence[np.ndarray]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(images), self.batch_size):
            x = to_batch([letterbox(rgb) for rgb in images[i:i + self.batch_size]]).to(self.device)
            out.extend(sideways_probability(torch.as_tensor(self.net(x))).cpu().tolist())
        return out

    def sideways(self, images: Sequence[np.ndarray]) -> list[bool]:
        return [p >= self.threshold for p in self.p_sideways(images)]


def load_orientation(model_dir: str | Path, spec: dict, *, device: torch.device | str = "cpu", runtime: str = "torch",
                     onnx: dict | None = None, threads: int | None = None) -> OrientationClassifier:
    """The orientation classifier a model folder's ``config.json`` names (``orientation``), checked
    against its recorded SHA-256."""
    from .model import require_sha256, sha256_file

    path = Path(model_dir) / spec.get("weights", "orientation.pt")
    fix = "re-run 'platemask train-orientation' (it records it) or remove the 'orientation' entry from config.json"
    if not path.is_file():
        raise FileNotFoundError(f"orientation classifier weights {path} are missing (config.json names them); {fix}")
    want = require_sha256(spec.get("weights_sha256"), path, model_dir, what="orientation classifier weights",
                          field="orientation.weights_sha256", fix=fix)
    if sha256_file(path) != want:
        raise ValueError(f"orientation classifier weights {path} do not match the SHA-256 in config.json: the model "
                         "folder is corrupt or mixed; re-export it")
    if int(spec.get("input_side", INPUT_SIDE)) != INPUT_SIDE:
        raise ValueError(f"{path}: orientation input {spec.get('input_side')} differs from this version's {INPUT_SIDE}; retrain it")
    threshold = spec.get("threshold")
    if not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"{path}: config.json's orientation.threshold {threshold!r} is not a probability; {fix}")
    onnx_path = None
    if runtime == "onnx" and onnx:  # config.json's onnx.orientation
        from .onnx_runtime import ORIENTATION_FILE, checked_path

        onnx_path = checked_path(model_dir, onnx, part="orientation", default_file=ORIENTATION_FILE,
                                 weights_sha256=spec.get("weights_sha256", ""))
    return OrientationClassifier(path, threshold=float(threshold), device=device, onnx_path=onnx_path, threads=threads)
