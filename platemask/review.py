"""The review list: which photos a human should look at, and calibrated plate probabilities.

A photo goes on the review list only where a human can change the outcome:

- a **near miss**: a detection just below the operating threshold (a plate may be left readable);
- a **low-confidence mask**: a masked detection just above it (a dashboard or sticker may be
  blurred for nothing, e.g. the odometer reading);
- an **unusual result**: more masks than photos of cars carry, or masks covering a large share of
  the photo (a close-up detection that blurs the whole photo).

The band ``[review_low, review_high)`` around the threshold is chosen on held-out data by
``platemask evaluate --set-threshold`` so that the list stays short (see
:func:`platemask.training.evaluate.choose_review_band`); it lives in the model's ``config.json``
with the threshold, and this module is its only reader. The calibration map (isotonic, fitted on
held-out detections) turns a fused score into the probability that the detection is a plate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# an unusual result, whatever the scores: more masks than a photo of cars plausibly carries, or
# masks that cover more than this share of the photo
MAX_PLATES = 6
MAX_MASKED_FRACTION = 0.2


@dataclass(frozen=True)
class ReviewBand:
    low: float  # detections in [low, threshold) are near misses
    threshold: float
    high: float  # masked detections in [threshold, high) are low-confidence masks
    max_masks: int = MAX_PLATES  # more masks than this: an unusual result
    max_masked_fraction: float = MAX_MASKED_FRACTION  # masks over this share of the photo: unusual


def review_band(threshold: float, review_low: float, review_high: float, max_masks: int = MAX_PLATES,
                max_masked_fraction: float = MAX_MASKED_FRACTION) -> ReviewBand:
    """The band around ``threshold``: the model's band, widened to include the threshold when a
    run overrides it (a run at 0.5 still reviews what it masks with 0.5 to ``review_high``), and the
    model's limits of a usual result."""
    return ReviewBand(low=min(review_low, threshold), threshold=threshold, high=max(review_high, threshold),
                      max_masks=int(max_masks), max_masked_fraction=float(max_masked_fraction))


def review_reasons(scores: Sequence[float], band: ReviewBand, *, masked_fraction: float = 0.0) -> list[str]:
    """Why a photo whose detections scored ``scores`` goes on the review list ([] = it does not).

    ``masked_fraction`` is the share of the photo the masks cover."""
    near = sum(band.low <= s < band.threshold for s in scores)
    masked = [s for s in scores if s >= band.threshold]
    why = []
    if near:
        why.append(f"{near} detection(s) just below the threshold")
    if any(s < band.high for s in masked):
        why.append("masked plate(s) with low confidence")
    if len(masked) > band.max_masks:
        why.append(f"{len(masked)} masks (more than {band.max_masks})")
    if masked_fraction > band.max_masked_fraction:
        why.append(f"masks cover {masked_fraction:.0%} of the photo")
    return why


def calibrate(score: float, knots: Sequence[Sequence[float]] | None) -> float | None:
    """Probability that a detection with fused ``score`` is a plate, from the model's isotonic map
    (``[[score, probability], ...]`` ascending); None when the model has no calibration."""
    if not knots:
        return None
    xs, ys = np.asarray(knots, np.float64).T
    return round(float(np.interp(score, xs, ys)), 4)
