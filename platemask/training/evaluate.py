"""Held-out evaluation: recall first, at an explicit operating threshold.

A plate counts as *hidden* at threshold t when the masked region (grown fail-safe polygons of the
detections scoring >= t) covers at least ``cover`` of its labelled box: that is what the product
promises, and it credits a mask that hides a plate even when its box would fail an IoU test.
Precision counts a detection as correct when it overlaps a labelled plate, on every photo (a mask
on a photo without plates is a wrong detection too); unlabelled real plates therefore count against
it (labels are not exhaustive), so it is a lower bound.

Every labelled plate counts, on whichever photo it is: a plate labelled on a photo of a negative set
(label noise) must be hidden like any other, and the mask that hides it is not a false mask. A box
running past the photo's edge is measured on the part the photo shows (nothing can mask the rest).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .coco import Record, load_datasets, split_records
from ..detections import Plate
from ..geometry import box_iou, polygon_area, polygon_box
from ..imageio import decode
from ..mask import MaskStyle, apply_mask, masked_region

THRESHOLDS = [round(x, 2) for x in np.arange(0.05, 0.96, 0.05)]
SIZE_BUCKETS = ((0, 16), (16, 32), (32, 64), (64, 1e9))
# a mask hides a plate for recall only when its masked area is at most this many times the plate's
# box (and at least the floor, in px, for tiny plates): one mask over the whole photo "hid" every
# plate on it, rewarding over-masking. On the real held-out photos the smallest mask hiding a
# plate is at most 15 times its box (tiny plates, where the fixed margin dominates).
OVERSIZED_MASK = 25.0
OVERSIZED_MASK_FLOOR = 1024.0


@dataclass
class ImageResult:
    record: Record
    plates: list[Plate]  # every detection at min_score or above
    # per GT plate: list of (score, coverage of the GT box by the union of detections >= score)
    cover_curves: list[list[tuple[float, float]]] = field(default_factory=list)
    # per detection: fraction of its masked region inside labelled boxes
    det_on_plate: list[bool] = field(default_factory=list)
    det_outside_px: list[float] = field(default_factory=list)
    det_region_px: list[float] = field(default_factory=list)
    gt_iou_best: list[list[tuple[float, float]]] = field(default_factory=list)


def analyse(record: Record, plates: list[Plate], width: int, height: int, style: MaskStyle) -> ImageResult:
    res = ImageResult(record, plates)
    gt_boxes = [polygon_box(p) for p in record.polygons]
    regions = [masked_region(p, style)[0] for p in plates]
    region_areas = [polygon_area(r) for r in regions]
    order = sorted(range(len(plates)), key=lambda i: -plates[i].score)
    for gb in gt_boxes:
        # the part of the box inside the photo: what a mask can cover
        x0, y0 = max(int(np.floor(gb[0])), 0), max(int(np.floor(gb[1])), 0)
        x1, y1 = min(int(np.ceil(gb[2])), width), min(int(np.ceil(gb[3])), height)
        w, h = max(x1 - x0, 1), max(y1 - y0, 1)
        union = np.zeros((h, w), np.uint8)
        curve, ious = [], []
        largest = max(OVERSIZED_MASK * (x1 - x0) * (y1 - y0), OVERSIZED_MASK_FLOOR)
        for i in order:
            r = regions[i]
            rb = polygon_box(r)
            if rb[2] < x0 or rb[0] > x1 or rb[3] < y0 or rb[1] > y1:
                continue
            ious.append((plates[i].score, box_iou(polygon_box(plates[i].polygon), gb)))
            if region_areas[i] > largest:
                continue  # out of all proportion to the plate: over-masking, not a plate hidden
            cv2.fillPoly(union, [np.round((r - [x0, y0]) * 4).astype(np.int32)], 1, shift=2)
            curve.append((plates[i].score, float(union.mean())))
        res.cover_curves.append(curve)
        res.gt_iou_best.append(ious)
    gt_mask = np.zeros((height, width), np.uint8)
    for gb in gt_boxes:
        cv2.rectangle(gt_mask, (int(gb[0]), int(gb[1])), (int(np.ceil(gb[2])), int(np.ceil(gb[3]))), 1, -1)
    for p, r in zip(plates, regions):
        m = np.zeros((height, width), np.uint8)
        cv2.fillPoly(m, [np.round(r * 4).astype(np.int32)], 1, shift=2)
        area = float(m.sum())
        inside = float((m & gt_mask).sum())
        db = polygon_box(p.polygon)
        on_plate = any(box_iou(db, gb) >= 0.3 for gb in gt_boxes) or (area > 0 and inside / area >= 0.5)
        res.det_on_plate.append(on_plate)
        res.det_region_px.append(area)
        res.det_outside_px.append(area - inside)
    return res


def plate_width(poly: np.ndarray, record: Record) -> float:
    """A labelled plate's width in the photo: the part of its box the photo shows (a plate cut by the
    photo's edge is as small as what is left of it, for the size limits of recall)."""
    return float(max(0.0, min(float(poly[:, 0].max()), record.width) - max(float(poly[:, 0].min()), 0.0)))


def _coverage_at(curve: list[tuple[float, float]], t: float) -> float:
    cov = 0.0
    for score, c in curve:  # sorted by score, descending; coverage is cumulative
        if score >= t:
            cov = c
    return cov


def _false_mask(r: ImageResult, t: float) -> bool:
    """Whether the photo has a mask at ``t`` that covers no labelled plate."""
    return any(p.score >= t and not ok for p, ok in zip(r.plates, r.det_on_plate))


def metrics_at(results: list[ImageResult], t: float, cover: float = 0.8, min_width: float = 0.0) -> dict[str, Any]:
    neg = [r for r in results if r.record.negative]
    hidden = total = iou_hits = 0
    cov_vals = []
    for r in results:  # every labelled plate, a negative photo's too (label noise)
        for poly, curve, ious in zip(r.record.polygons, r.cover_curves, r.gt_iou_best):
            if plate_width(poly, r.record) < min_width:
                continue
            total += 1
            c = _coverage_at(curve, t)
            hidden += c >= cover
            cov_vals.append(c)
            iou_hits += any(s >= t and iou >= 0.5 for s, iou in ious)
    tp = fp = 0
    outside, region = 0.0, 0.0
    for r in results:  # a detection on a photo without plates is a wrong one too
        for p, ok, out_px, reg_px in zip(r.plates, r.det_on_plate, r.det_outside_px, r.det_region_px):
            if p.score >= t:
                tp += ok
                fp += not ok
                if ok:
                    outside += out_px
                    region += reg_px
    fp_neg = sum(_false_mask(r, t) for r in neg)
    by_cat: dict[str, dict[str, Any]] = {}
    for r in neg:
        c = by_cat.setdefault(r.record.category, {"images": 0, "masked": 0})
        c["images"] += 1
        c["masked"] += _false_mask(r, t)
    for c in by_cat.values():
        c["rate"] = c["masked"] / c["images"]
    return {
        "threshold": t,
        "plates": total,
        "recall": hidden / total if total else None,
        "recall_iou50": iou_hits / total if total else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "false_positive_image_rate": fp_neg / len(neg) if neg else None,
        # the FP target holds per kind of negative: a rare kind must not hide behind a common one
        "worst_category_fp_rate": max((c["rate"] for c in by_cat.values()), default=None),
        "fp_by_category": dict(sorted(by_cat.items())),
        "negatives": len(neg),
        "mean_box_coverage": float(np.mean(cov_vals)) if cov_vals else None,
        "over_masking": outside / region if region else None,
    }


def choose_threshold(curve: list[dict], target_recall: float, max_fp_rate: float) -> tuple[float, str]:
    """Recall first.

    1. Among thresholds that meet both targets (recall >= ``target_recall``, false-positive image
       rate <= ``max_fp_rate`` in every negative category), the one with the highest recall (ties: the higher threshold);
    2. else the highest threshold that keeps recall >= target (recall is not traded for precision);
    3. else (the recall target is out of reach) the best recall there is; among thresholds that tie on
       it, the one with the fewest false masks in the worst category, then the higher threshold.
       Recall is not traded for precision here either: the FP limit only breaks ties (a rule that
       kept the FP limit first picked 0.80 for detector stage 5, recall 0.93 instead of 0.966, to
       spare one VIN photo).
    """
    def fp(m):  # the worst negative category, so every category meets the limit
        return m.get("worst_category_fp_rate", m["false_positive_image_rate"]) or 0.0

    both = [m for m in curve if m["recall"] is not None and m["recall"] >= target_recall and fp(m) <= max_fp_rate]
    if both:
        m = max(both, key=lambda m: (m["recall"], m["threshold"]))
        return m["threshold"], (f"highest recall among thresholds with recall >= {target_recall} and false-positive "
                                f"image rate <= {max_fp_rate}")
    ok = [m for m in curve if m["recall"] is not None and m["recall"] >= target_recall]
    if ok:
        m = max(ok, key=lambda m: m["threshold"])
        return m["threshold"], f"highest threshold with recall >= {target_recall} (no threshold meets the FP limit too)"
    m = max(curve, key=lambda m: (m["recall"] or 0, -fp(m), m["threshold"]))
    return m["threshold"], (f"no threshold reaches recall {target_recall}: the best recall, then the fewest false "
                            f"masks in the worst category" + ("" if fp(m) <= max_fp_rate else
                                                               f" (above the FP limit {max_fp_rate})"))


def isotonic(scores: np.ndarray, labels: np.ndarray) -> list[list[float]]:
    """Isotonic regression (pool adjacent violators) of ``labels`` (1 = plate) on ``scores``:
    knots ``[[score, probability], ...]``, ascending, for :func:`platemask.review.calibrate`."""
    # tied scores are one point (their share of plates): a detection's probability depends on its
    # score alone, never on where among equal scores it happened to be sorted
    xs, inverse = np.unique(np.asarray(scores, np.float64), return_inverse=True)
    sums = np.bincount(inverse.reshape(-1), weights=np.asarray(labels, np.float64).reshape(-1), minlength=len(xs))
    counts = np.bincount(inverse.reshape(-1), minlength=len(xs)).astype(np.float64)
    blocks: list[list[float]] = []  # [sum of labels, count, min score, max score]
    for x, y, n in zip(xs, sums, counts):
        blocks.append([y, n, x, x])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            s_, n_, lo, hi = blocks.pop()
            blocks[-1][0] += s_
            blocks[-1][1] += n_
            blocks[-1][3] = hi
    knots = []
    for s_, n_, lo, hi in blocks:
        p = round(s_ / n_, 4)
        knots.append([round(float(lo), 4), p])
        if hi > lo:
            knots.append([round(float(hi), 4), p])
    return knots


def detection_labels(results: list[ImageResult]) -> tuple[np.ndarray, np.ndarray]:
    """Every detection's fused score and whether it is a plate (overlaps a labelled one). Unlabelled
    real plates count as not plates, so calibrated probabilities err low."""
    scores, labels = [], []
    for r in results:
        for p, ok in zip(r.plates, r.det_on_plate):
            scores.append(p.score)
            labels.append(int(ok))  # no labelled plate on the photo: not ok
    # in (score, label) order, not the photos': the fit and the table do not change with the files' order
    order = np.lexsort((labels, scores))
    return np.asarray(scores, np.float64)[order], np.asarray(labels, np.float64)[order]


def calibration_halves(results: list[ImageResult]) -> tuple[list[ImageResult], list[ImageResult]]:
    """The held-out photos in two halves, a pure function of each photo's split group (the day for
    the interior set, so one day's photos of the same cluster stay on one side); not of the order of
    the files, the data sets given or the photos added. Hashed apart from the train/val split,
    which holds out a hash range of its own."""
    import hashlib

    a, b = [], []
    for r in results:
        g = r.record.split_group or r.record.identity or str(r.record.path)
        (a if int(hashlib.sha256(f"calibration-half:{g}".encode()).hexdigest()[:8], 16) % 2 == 0 else b).append(r)
    return a, b


def reliability(scores: np.ndarray, labels: np.ndarray, knots, bins=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                                          0.8, 0.9, 1.0001)) -> list[dict]:
    """Reliability table: per score bin, detections, mean fused score, mean calibrated probability
    and the observed share of plates."""
    from ..review import calibrate

    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        sel = (scores >= lo) & (scores < hi)
        n = int(sel.sum())
        cal = [calibrate(float(s), knots) for s in scores[sel]] if knots else []
        rows.append({"bin": [lo, round(min(hi, 1.0), 2)], "detections": n,
                     "mean_score": round(float(scores[sel].mean()), 3) if n else None,
                     "mean_calibrated": round(float(np.mean(cal)), 3) if cal else None,
                     "plate_share": round(float(labels[sel].mean()), 3) if n else None})
    return rows


def review_outcome(results: list[ImageResult], t: float, low: float, high: float, cover: float = 0.8,
                   style: MaskStyle | None = None, max_masks: int | None = None,
                   max_masked_fraction: float | None = None) -> dict[str, Any]:
    """What a review list with band [low, high) around threshold ``t`` flags on ``results``, and
    what it catches: plates left visible (misses) and photos masked without a plate."""
    from ..review import MAX_MASKED_FRACTION, MAX_PLATES, review_band, review_reasons

    max_masks = MAX_PLATES if max_masks is None else max_masks
    max_masked_fraction = MAX_MASKED_FRACTION if max_masked_fraction is None else max_masked_fraction
    band = review_band(t, low, high, max_masks, max_masked_fraction)
    flagged = misses = caught_misses = false_masked = caught_false = 0
    by_reason: dict[str, int] = {}
    for r in results:
        scores = [p.score for p in r.plates]
        masked_px = sum(a for p, a in zip(r.plates, r.det_region_px) if p.score >= t)
        frac = masked_px / max(r.record.width * r.record.height, 1)
        why = review_reasons(scores, band, masked_fraction=frac)
        flagged += bool(why)
        for w in why:  # the reason's kind, without its numbers
            kind = " ".join("".join(c for c in w if not (c.isdigit() or c in "%.()")).split())
            by_reason[kind] = by_reason.get(kind, 0) + 1
        for curve in r.cover_curves:
            if _coverage_at(curve, t) < cover:
                misses += 1
                caught_misses += bool(why)
        if r.record.negative and _false_mask(r, t):
            false_masked += 1
            caught_false += bool(why)
    n = len(results)
    return {"review_low": low, "review_high": high, "review_max_masks": max_masks,
            "review_max_masked_fraction": max_masked_fraction, "flagged_images": flagged,
            "flagged_rate": flagged / n if n else 0.0, "missed_plates": misses, "missed_plates_flagged": caught_misses,
            "negatives_masked": false_masked, "negatives_masked_flagged": caught_false,
            "by_reason": dict(sorted(by_reason.items()))}


# the limits of a usual result tried with each band (more masks than ..., masks over ... of the photo)
REVIEW_MAX_MASKS = (6, 8, 10, 15, 25)
REVIEW_MAX_MASKED_FRACTIONS = (0.2, 0.3, 0.5, 0.8)


def choose_review_band(results: list[ImageResult], t: float, max_rate: float = 0.10,
                       cover: float = 0.8) -> dict[str, Any]:
    """The band and the limits of a usual result (mask count, masked share of the photo) that catch
    the most missed plates (then most false masks on negatives) while flagging at most ``max_rate``
    of the photos; ties go to the shorter list, then the stricter limits. When nothing fits, the
    empty band with the most permissive limits (the shortest list there is)."""
    lows = [x for x in THRESHOLDS if x < t] + [t]
    highs = [t] + [x for x in THRESHOLDS if x > t]
    best = None
    for lo in lows:
        for hi in highs:
            for n in REVIEW_MAX_MASKS:
                for f in REVIEW_MAX_MASKED_FRACTIONS:
                    o = review_outcome(results, t, lo, hi, cover=cover, max_masks=n, max_masked_fraction=f)
                    if o["flagged_rate"] > max_rate:
                        continue
                    key = (o["missed_plates_flagged"], o["negatives_masked_flagged"], -o["flagged_images"], -lo, hi,
                           -n, -f)
                    if best is None or key > best[0]:
                        best = (key, o)
    return best[1] if best else review_outcome(results, t, t, t, cover=cover, max_masks=REVIEW_MAX_MASKS[-1],
                                               max_masked_fraction=REVIEW_MAX_MASKED_FRACTIONS[-1])


def chosen_on_the_other_half(results: list[ImageResult], target_recall: float, max_fp_rate: float,
                             cover: float = 0.8, min_width: float = 16.0, max_review_rate: float = 0.10) -> dict[str, Any]:
    """The figures at the operating point are optimistic: the threshold and the review list are
    chosen on the very photos they are then reported on. Here each is chosen on one half of the
    held-out photos (:func:`calibration_halves`) and shown on the other, both ways, and pooled:
    what a threshold chosen this way does on photos it has not seen."""
    halves = calibration_halves(results)
    rows = []
    hidden = total = flagged = images = missed = caught = false_masked = caught_false = 0
    cats: dict[str, dict[str, int]] = {}
    for fit, shown, name in ((halves[0], halves[1], "a"), (halves[1], halves[0], "b")):
        if not fit or not shown:
            continue
        t, _ = choose_threshold([metrics_at(fit, x, cover, min_width) for x in THRESHOLDS], target_recall, max_fp_rate)
        m = metrics_at(shown, t, cover, min_width)
        band = choose_review_band(fit, t, max_review_rate, cover)
        o = review_outcome(shown, t, band["review_low"], band["review_high"], cover=cover,
                           max_masks=band["review_max_masks"], max_masked_fraction=band["review_max_masked_fraction"])
        rows.append({"chosen_on": name, "photos_chosen_on": len(fit), "photos_shown_on": len(shown),
                     "threshold": t, "recall": m["recall"], "plates": m["plates"],
                     "fp_by_category": m["fp_by_category"], "precision": m["precision"],
                     "review": {k: o[k] for k in ("review_low", "review_high", "review_max_masks",
                                                  "review_max_masked_fraction", "flagged_rate", "missed_plates",
                                                  "missed_plates_flagged", "negatives_masked",
                                                  "negatives_masked_flagged")}})
        hidden += round((m["recall"] or 0.0) * m["plates"])
        total += m["plates"]
        for c, v in m["fp_by_category"].items():
            p = cats.setdefault(c, {"images": 0, "masked": 0})
            p["images"] += v["images"]
            p["masked"] += v["masked"]
        flagged += o["flagged_images"]
        images += len(shown)
        missed += o["missed_plates"]
        caught += o["missed_plates_flagged"]
        false_masked += o["negatives_masked"]
        caught_false += o["negatives_masked_flagged"]
    for c in cats.values():
        c["rate"] = c["masked"] / c["images"]
    return {"halves": rows, "recall": hidden / total if total else None, "plates": total,
            "fp_by_category": dict(sorted(cats.items())),
            "worst_category_fp_rate": max((c["rate"] for c in cats.values()), default=None),
            "review_flagged_rate": flagged / images if images else None, "missed_plates": missed,
            "missed_plates_flagged": caught, "negatives_masked": false_masked, "negatives_masked_flagged": caught_false,
            "note": "threshold and review list chosen on one half of the held-out photos, shown on the other, pooled"}


def ocr_check(results: list[ImageResult], t: float, style: MaskStyle, *, min_width: int = 40,
              limit: int = 200, cover: float = 0.8, log=print) -> dict[str, Any]:
    """Read each labelled plate with RapidOCR before and after masking at threshold ``t``."""
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()

    def read(img: np.ndarray, box) -> tuple[str, float]:
        """Text OCR finds on the plate: lines whose centre lies in the labelled box. The crop has
        context around the plate (OCR needs it), but badges and dealer frames there are not the plate."""
        bx0, by0, bx1, by1 = box
        pw, ph = bx1 - bx0, by1 - by0
        x0, y0 = int(max(0, bx0 - 0.25 * pw)), int(max(0, by0 - 0.4 * ph))
        x1, y1 = int(min(img.shape[1], bx1 + 0.25 * pw)), int(min(img.shape[0], by1 + 0.4 * ph))
        crop = img[y0:y1, x0:x1]
        if crop.size == 0:
            return "", 0.0
        s = max(1.0, 64.0 / max(crop.shape[0], 1))
        crop = cv2.resize(crop, None, fx=s, fy=s, interpolation=cv2.INTER_CUBIC)
        out, _ = engine(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
        lines = []
        for quad, txt, conf in out or []:
            cx, cy = np.asarray(quad, np.float32).mean(axis=0) / s + [x0, y0]
            if bx0 - 0.05 * pw <= cx <= bx1 + 0.05 * pw and by0 - 0.1 * ph <= cy <= by1 + 0.1 * ph:
                lines.append((txt, float(conf)))
        if not lines:
            return "", 0.0
        text = "".join(ch for txt, _ in lines for ch in str(txt) if ch.isalnum()).upper()
        return text, float(np.mean([c for _, c in lines]))

    readable = leaked_chars = leaked_3gram = missed_readable = checked = tried = 0
    examples = []
    for r in results:
        if checked >= limit:  # every photo with a labelled plate (a negative set's too: label noise)
            continue
        boxes = [polygon_box(p) for p in r.record.polygons if plate_width(p, r.record) >= min_width]
        if not boxes:
            continue
        rgb = decode(Path(r.record.path).read_bytes()).rgb
        masked = apply_mask(rgb, [p for p in r.plates if p.score >= t], style)
        for b in boxes:
            tried += 1
            before, conf = read(rgb, b)
            if len(before) < 3 or conf < 0.5:
                continue
            readable += 1
            checked += 1
            after, _ = read(masked, b)
            common = set(after) & set(before)
            grams = {before[i:i + 3] for i in range(len(before) - 2)}
            has3 = any(after[i:i + 3] in grams for i in range(max(0, len(after) - 2)))
            curve = r.cover_curves[[polygon_box(p) for p in r.record.polygons].index(b)]
            hidden = _coverage_at(curve, t) >= cover
            if not hidden:
                missed_readable += 1
            leaked_chars += bool(common)
            leaked_3gram += has3
            if (common or has3) and len(examples) < 20:
                examples.append({"image": str(r.record.path.name), "before": before, "after": after, "hidden": hidden})
    if not readable:
        # nothing read before masking (an engine that did not load its models, no plate wide enough):
        # "0 read after masking" would say nothing, so no count is given
        log(f"OCR: none of {tried} plates >= {min_width} px was readable before masking: the check is inconclusive")
        return {"conclusive": False, "plates_tried": tried, "readable_before": 0, "any_char_read_after": None,
                "three_char_run_after": None, "not_hidden_by_detector": None, "examples": [],
                "min_plate_width_px": min_width}
    log(f"OCR: {readable} readable plates of {tried}; after masking {leaked_chars} share a character, "
        f"{leaked_3gram} share a 3-character run; {missed_readable} were not hidden by the detector")
    return {"conclusive": True, "plates_tried": tried, "readable_before": readable, "any_char_read_after": leaked_chars,
            "three_char_run_after": leaked_3gram, "not_hidden_by_detector": missed_readable, "examples": examples,
            "min_plate_width_px": min_width}


class DetectorCache:
    """The detector's own plates (before the verifier) per held-out photo (its path and the SHA-1 of
    its decoded pixels), in a JSONL file named for
    everything that changes them: the weights, what ran the trunk (the ONNX graph's SHA-256, or
    PyTorch), the views (sizes, tiling), the mask threshold, the score floor. A new verifier or
    threshold rule is then evaluated without the detector pass that dominates the cost on a CPU; a
    changed detector gets a new file."""

    def __init__(self, cache_dir: str | Path, seg):
        import hashlib

        cfg = seg.cfg
        # what computed the trunk counts too: the ONNX graph (its own SHA-256: a re-exported or
        # quantised graph is another detector) or PyTorch
        trunk = cfg.onnx.get("trunk", {}).get("sha256", "") if seg.runtime == "onnx" else "torch"
        key = json.dumps({"weights": cfg.weights_sha256, "trunk": trunk, "architecture": cfg.architecture,
                          "views": [cfg.input_max_side, cfg.coarse_side, cfg.tile_above, cfg.tile_overlap],
                          "mask_threshold": cfg.mask_threshold, "min_score": seg.min_score}, sort_keys=True, default=str)
        self.path = Path(cache_dir) / f"detections-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.seg, self.known = seg, {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    d = json.loads(line)
                except ValueError:
                    continue  # a line cut by an interrupted run: recomputed
                # entries of older caches (no "pixels") never match: recomputed
                self.known[(d["path"], d.get("pixels"))] = d["plates"]

    @staticmethod
    def pixels_key(rgb: np.ndarray) -> str:
        """What names the photo's content: a photo replaced at the same path is another photo."""
        import hashlib

        a = np.ascontiguousarray(rgb)
        return hashlib.sha1(str(a.shape).encode() + str(a.dtype).encode() + a.tobytes()).hexdigest()

    def plates(self, rec: Record, rgb: np.ndarray) -> list[Plate]:
        path, pixels = str(Path(rec.path).resolve()), self.pixels_key(rgb)
        key = (path, pixels)
        if key not in self.known:
            found = self.seg.detect([rgb])[0]
            self.known[key] = [[p.score, p.polygon.tolist()] for p in found]
            with self.path.open("a") as f:
                f.write(json.dumps({"path": path, "pixels": pixels, "plates": self.known[key]}) + "\n")
        return [Plate(score=float(s), polygon=np.asarray(poly, np.float32)) for s, poly in self.known[key]]


def evaluate(model_dir: str | Path, data: str | Path, *, val_fraction: float = 0.15, device: str = "cpu",
             target_recall: float = 0.97, max_fp_rate: float = 0.01, cover: float = 0.8, min_width: float = 16.0,
             limit: int | None = None, ocr: bool = True, max_review_rate: float = 0.10,
             cache_dir: str | Path | None = None, log=print) -> dict[str, Any]:
    from ..segment import Segmenter

    seg = Segmenter(model_dir, device=device, min_score=min(THRESHOLDS), batch_size=2)
    style = MaskStyle()
    _, val = split_records(load_datasets(data), val_fraction)
    if limit:
        val = val[:limit]
    cached = DetectorCache(cache_dir, seg) if cache_dir else None
    results, t0 = [], time.time()
    for i, rec in enumerate(val):
        dec = decode(Path(rec.path).read_bytes())
        if rec.polygons and (dec.width, dec.height) != (rec.width, rec.height):
            # its labels are in another photo's coordinates: every plate would be measured in the wrong place
            raise ValueError(f"{rec.path}: the photo is {dec.width} x {dec.height} px as decoded (EXIF orientation "
                             f"applied) but its labels were made for {rec.width} x {rec.height}: fix its record")
        # the detector's plates (from the cache when there is one), then the verifier's second look
        found = seg.detect([dec.rgb])[0] if cached is None else cached.plates(rec, dec.rgb)
        plates = seg.with_turned_view([dec.rgb], [seg.verify_plates(dec.rgb, found)])[0]
        results.append(analyse(rec, plates, dec.width, dec.height, style))
        if (i + 1) % 25 == 0:
            rate = (i + 1) / (time.time() - t0)
            log(f"evaluated {i + 1}/{len(val)} images, {rate:.2f} images/s, ETA {(len(val) - i - 1) / rate:.0f} s")
    curve = [metrics_at(results, t, cover, min_width) for t in THRESHOLDS]
    curve_all = [metrics_at(results, t, cover, 0.0) for t in THRESHOLDS]
    chosen, why = choose_threshold(curve, target_recall, max_fp_rate)
    at = next(m for m in curve if m["threshold"] == chosen)
    by_size = {}
    for lo, hi in SIZE_BUCKETS:
        sub_total = sub_hidden = 0
        for r in results:
            for poly, c in zip(r.record.polygons, r.cover_curves):
                w = plate_width(poly, r.record)
                if lo <= w < hi:
                    sub_total += 1
                    sub_hidden += _coverage_at(c, chosen) >= cover
        by_size[f"{int(lo)}-{'' if hi > 1e8 else int(hi)}px"] = {
            "plates": sub_total, "recall": sub_hidden / sub_total if sub_total else None}
    report = {
        "model": seg.model_info,
        "data": {"path": [Path(d).name for d in ([data] if isinstance(data, (str, Path)) else data)],
                 "val_fraction": val_fraction,
                 "images": len(val), "positives": sum(not r.negative for r in val),
                 "negatives": sum(r.negative for r in val),
                 "negatives_by_category": {c: sum(r.category == c for r in val if r.negative)
                                           for c in sorted({r.category for r in val if r.negative})},
                 "plates": sum(len(r.polygons) for r in val)},
        "definition": {"hidden_if_box_covered": cover, "recall_counts_plates_wider_than_px": min_width,
                       "input_max_side": seg.cfg.input_max_side},
        "operating_threshold": chosen,
        "threshold_rule": why,
        "at_operating_threshold": at,
        "at_operating_threshold_all_sizes": next(m for m in curve_all if m["threshold"] == chosen),
        "recall_by_plate_width": by_size,
        "pr_curve": curve,
        "seconds": round(time.time() - t0, 1),
    }
    # calibration: fitted on one half of the held-out photos (calibration_halves), its reliability shown on the other, then the
    # shipped map is fitted on all of them
    half_a, half_b = calibration_halves(results)
    sc_a, lb_a = detection_labels(half_a)
    sc_b, lb_b = detection_labels(half_b)
    sc_all, lb_all = detection_labels(results)
    knots = isotonic(sc_all, lb_all) if len(sc_all) else []
    report["calibration"] = {
        "knots": knots,
        "reliability_other_half": reliability(sc_b, lb_b, isotonic(sc_a, lb_a) if len(sc_a) else []),
        "reliability_all": reliability(sc_all, lb_all, knots),
        "note": "a detection is a plate when it overlaps a labelled one; unlabelled plates count against it",
    }
    band = choose_review_band(results, chosen, max_review_rate, cover)
    report["review"] = {**band, "max_rate": max_review_rate,
                        "by_category": {c: review_outcome([r for r in results if r.record.category == c], chosen,
                                                          band["review_low"], band["review_high"], cover=cover,
                                                          max_masks=band["review_max_masks"],
                                                          max_masked_fraction=band["review_max_masked_fraction"]
                                                          )["flagged_rate"]
                                        for c in sorted({r.record.category for r in results})}}
    report["chosen_on_the_other_half"] = chosen_on_the_other_half(results, target_recall, max_fp_rate, cover,
                                                                  min_width, max_review_rate)
    if ocr:
        report["ocr"] = ocr_check(results, chosen, style, cover=cover, log=log)
    return report


def write_report(report: dict, path: str | Path):
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
