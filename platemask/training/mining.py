"""Hard negatives: find the negative photos the model still calls plates, and train on them harder.

Two levers, both training-only (the shipped model does not change shape):

* image level: before training (and again on every resume) the current model scores each training
  negative; a negative is then drawn with weight ``1 + gain * its highest plate score``, so the
  VIN labels, stickers and watermarks the model confuses come back more often than the easy ones;
* RoI level: on an image with no plate, torchvision's box head would learn from 96 *random*
  proposals out of ~400, mostly plain background; :class:`HardNegativeSampler` takes a share of
  them from the top of the proposal list (the RPN's most plate-like regions) instead.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from .coco import Record
from ..model import ModelConfig


def hardness_weights(scores: Sequence[float], gain: float = 8.0) -> np.ndarray:
    """Sampling weights for negatives from their highest plate scores (0 = nothing detected)."""
    s = np.clip(np.asarray(scores, np.float64), 0.0, 1.0)
    return 1.0 + gain * s


@torch.no_grad()
def score_negatives(model: torch.nn.Module, records: Sequence[Record], *,
                    max_side: int = ModelConfig.input_max_side,
                    device: str | torch.device = "cpu", batch_size: int = 4) -> list[float]:
    """Highest plate score the model gives each negative photo, seen as inference sees it
    (whole photo, shrunk to ``max_side`` when larger, never enlarged)."""
    from .augment import read_rgb
    from ..segment import prepare

    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for i in range(0, len(records), batch_size):
            batch = []
            for rec in records[i : i + batch_size]:
                rgb = read_rgb(rec.path)
                h, w = rgb.shape[:2]
                batch.append(prepare(rgb, 0, 0, w, h, min(1.0, max_side / max(h, w))).to(device))
            for out in model(batch):
                scores.append(float(out["scores"].max()) if out["scores"].numel() else 0.0)
    finally:
        model.train(was_training)
    return scores


class HardNegativeSampler(BalancedPositiveNegativeSampler):
    """torchvision's RoI sampler, except that on an image with no positive proposal (a negative
    photo) ``hard_fraction`` of the negatives are the first ones in proposal order.

    The RPN hands proposals to the box head sorted by objectness, highest first, so those are
    the regions most likely to become false plates. Images with plates keep random sampling: their
    top background proposals are mostly loose boxes around the plate itself.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float, hard_fraction: float):
        super().__init__(batch_size_per_image, positive_fraction)
        if not 0.0 <= hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction={hard_fraction} must be within 0..1")
        self.hard_fraction = hard_fraction

    def __call__(self, matched_idxs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pos_idx, neg_idx = super().__call__(matched_idxs)
        for k, m in enumerate(matched_idxs):
            if self.hard_fraction == 0.0 or bool((m >= 1).any()):
                continue
            negative = torch.where(m == 0)[0]
            num_neg = min(negative.numel(), self.batch_size_per_image)
            n_hard = int(round(num_neg * self.hard_fraction))
            rest = negative[n_hard:]
            easy = rest[torch.randperm(rest.numel(), device=rest.device)[: num_neg - n_hard]]
            mask = torch.zeros_like(m, dtype=torch.uint8)
            mask[negative[:n_hard]] = 1
            mask[easy] = 1
            neg_idx[k] = mask
        return pos_idx, neg_idx
