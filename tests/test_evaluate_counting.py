"""What ``platemask evaluate`` counts: every labelled plate once, every photo once, false masks
wherever they fall, and halves and choices that do not depend on the order of the files.

The detector is replaced by a stand-in that returns set plates per photo (a photo is told by the
value of its first pixel), so the counting is checked end to end through ``evaluate`` on small
generated COCO folders, without the model's pass."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from platemask.detections import Plate


def _box(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


class _Seg:
    """Stands in for ``Segmenter``: the plates of a photo are ``DETS[first pixel]``."""

    DETS: dict[int, list[tuple[float, np.ndarray]]] = {}

    def __init__(self, *a, **k):
        from types import SimpleNamespace

        self.cfg = SimpleNamespace(input_max_side=896, onnx={}, weights_sha256="w", architecture="a", coarse_side=0,
                                   tile_above=0, tile_overlap=0, mask_threshold=0.4)
        self.runtime, self.min_score = "torch", 0.05
        self.model_info = {"name": "stand-in"}

    def detect(self, rgbs):
        return [[Plate(float(s), np.asarray(p, np.float32)) for s, p in self.DETS.get(int(rgb[0, 0, 0]), [])]
                for rgb in rgbs]

    def verify_plates(self, rgb, found):
        return found

    def with_turned_view(self, rgbs, plates):
        return plates


def write_coco(root: Path, photos: list[dict], annotations: list[dict] | None = None) -> Path:
    """``photos``: dicts with ``key`` (first-pixel value, also the file's name), optional ``boxes``
    (COCO bboxes), ``dets`` ([(score, polygon)]), ``size`` (w, h) and extra image fields."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], list(annotations or [])
    for i, ph in enumerate(photos):
        w, h = ph.get("size", (120, 100))
        img = np.full((h, w, 3), 128, np.uint8)
        img[0, 0] = ph["key"]
        name = f"images/{ph['key']}.png"
        cv2.imwrite(str(root / name), img)
        _Seg.DETS[ph["key"]] = ph.get("dets", [])
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h, "sha1": f"s{ph['key']}",
                       **ph.get("fields", {})})
        for b in ph.get("boxes", []):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0, "bbox": list(b)})
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "plate"}]}))
    return root


@pytest.fixture
def run_eval(monkeypatch):
    import platemask.segment

    monkeypatch.setattr(platemask.segment, "Segmenter", _Seg)

    def run(data, **kw):
        from platemask.training.evaluate import evaluate

        kw.setdefault("val_fraction", 1.0)
        kw.setdefault("ocr", False)
        rep = evaluate("unused", data, log=lambda m: None, **kw)
        rep.pop("seconds")
        return json.loads(json.dumps(rep, default=str))

    return run


def _at(rep, t):
    return next(m for m in rep["pr_curve"] if m["threshold"] == t)


def test_precision_counts_false_masks_on_photos_without_plates(run_eval, tmp_path):
    """A mask on an odometer photo is a detection that overlaps no labelled plate: precision must
    count it (it counted detections on photos with plates only, so masking every negative left
    precision at 1.0)."""
    root = write_coco(tmp_path / "d", [
        {"key": 1, "boxes": [[20, 20, 40, 20]], "dets": [(0.9, _box(20, 20, 60, 40))]},
        {"key": 2, "fields": {"negative": True, "negative_kind": "odometer_digital"},
         "dets": [(0.9, _box(10, 10, 50, 30))]},
    ])
    m = _at(run_eval(root), 0.5)
    assert m["recall"] == 1.0
    assert m["fp_by_category"]["odometer_digital"]["masked"] == 1
    assert m["precision"] == 0.5


def test_a_labelled_plate_on_a_negative_photo_counts_in_recall_and_its_mask_is_no_false_mask(run_eval, tmp_path):
    """Label noise: a photo of a negative set that carries a plate label. Its plate must be hidden
    like any other (it was left out of recall, so missing it cost nothing), and the mask that hides
    it is not a false mask (it counted as one); a mask elsewhere on it still is."""
    neg = {"negative": True, "negative_kind": "odometer_analog"}
    root = write_coco(tmp_path / "d", [
        {"key": 1, "boxes": [[20, 20, 40, 20]], "dets": [(0.9, _box(20, 20, 60, 40))]},
        {"key": 2, "fields": neg, "boxes": [[20, 60, 40, 20]], "dets": [(0.9, _box(20, 60, 60, 80))]},
        {"key": 3, "fields": neg, "boxes": [[20, 60, 40, 20]], "dets": []},  # its plate missed
        {"key": 4, "fields": neg, "dets": []},
    ])
    rep = run_eval(root)
    m = _at(rep, 0.5)
    assert m["plates"] == 3 and m["recall"] == pytest.approx(2 / 3)
    assert m["fp_by_category"]["odometer_analog"] == {"images": 3, "masked": 0, "rate": 0.0}
    assert m["precision"] == 1.0
    assert rep["data"]["plates"] == 3


def test_every_labelled_plate_and_every_photo_is_counted_once(run_eval, tmp_path):
    """An annotation exported twice, a box of zero width, a box wholly outside the photo, the same
    photo listed twice in annotations.json and the same folder given twice: one plate per plate,
    one photo per photo."""
    root = write_coco(tmp_path / "d", [
        {"key": 1, "boxes": [[20, 20, 40, 20], [20, 20, 40, 20], [70, 20, 0, 10], [300, 20, 30, 10]],
         "dets": [(0.9, _box(20, 20, 60, 40))]},
        {"key": 2, "boxes": [[20, 60, 40, 20]], "dets": []},  # missed
    ])
    doc = json.loads((root / "annotations.json").read_text())
    doc["images"].append({**doc["images"][1], "id": 99})  # photo 2 listed again
    doc["annotations"].append({**doc["annotations"][-1], "id": 99, "image_id": 99})
    (root / "annotations.json").write_text(json.dumps(doc))
    for data in (root, [root, root]):
        rep = run_eval(data)
        assert rep["data"]["images"] == 2 and rep["data"]["plates"] == 2
        m = _at(rep, 0.5)
        assert m["plates"] == 2 and m["recall"] == 0.5
        all_sizes = rep["at_operating_threshold_all_sizes"]
        assert all_sizes["plates"] == 2 and all_sizes["recall"] == 0.5
        assert sum(b["plates"] for b in rep["recall_by_plate_width"].values()) == 2


def test_a_plate_cut_by_the_photo_edge_is_hidden_by_a_mask_over_what_the_photo_shows(run_eval, tmp_path):
    """A box that runs past the photo's edge (exports clip differently) can only be masked where the
    photo has pixels: coverage is measured on that part (the part outside counted as uncovered, so a
    plate masked whole was a miss)."""
    root = write_coco(tmp_path / "d", [
        {"key": 1, "boxes": [[80, 40, 60, 20]], "dets": [(0.9, _box(80, 40, 119, 60))]},
    ])
    m = _at(run_eval(root), 0.5)
    assert m["plates"] == 1 and m["recall"] == 1.0


def test_halves_and_choices_do_not_depend_on_the_order_of_the_photos(run_eval, tmp_path):
    """The calibration is fitted on one half of the held-out photos and shown on the other: the
    halves were every other photo in file order, so reordering annotations.json (or adding a photo,
    or another data set before it) changed the reported reliability. The halves are now a function
    of each photo's split group (a day of the interior set stays on one side)."""
    rng = np.random.default_rng(5)
    photos = []
    for k in range(1, 41):
        s = round(float(rng.uniform(0.1, 0.95)), 3)
        if k % 3:
            photos.append({"key": k, "boxes": [[20, 20, 40, 20]],
                           "dets": [(s, _box(20, 20, 60, 40))] + ([(s, _box(70, 60, 110, 80))] if k % 4 == 0 else [])})
        else:
            photos.append({"key": k, "fields": {"negative": True, "negative_kind": "odometer_digital",
                                                "date": f"2020-11-{k % 5 + 10}", "source": "trodo"},
                           "dets": [(s, _box(70, 60, 110, 80))] if k % 2 else []})
    a = run_eval(write_coco(tmp_path / "a", photos))
    b = run_eval(write_coco(tmp_path / "b", photos[::-1]))
    assert a["calibration"]["reliability_other_half"] == b["calibration"]["reliability_other_half"]
    assert a["calibration"]["knots"] == b["calibration"]["knots"]
    assert a["review"] == b["review"] and a["operating_threshold"] == b["operating_threshold"]


def _fake_ocr(monkeypatch, reads):
    """RapidOCR replaced: call i returns ``reads[i]`` (text, confidence) as one line over the whole
    crop, or nothing (None) - what an engine whose models did not load gives back."""
    import sys
    import types

    calls = []

    class Engine:
        def __call__(self, crop):
            calls.append(1)
            got = reads[len(calls) - 1] if len(calls) <= len(reads) else None
            if got is None:
                return None, 0.01
            h, w = crop.shape[:2]
            return [[[[0, 0], [w, 0], [w, h], [0, h]], got[0], got[1]]], 0.01

    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", types.SimpleNamespace(RapidOCR=Engine))
    return calls


def test_ocr_that_reads_nothing_before_masking_reports_no_result_not_zero_leaks(run_eval, tmp_path, monkeypatch):
    """An OCR that ran but read nothing (models missing, a broken install) reported 0 plates with
    a character read after masking: the project's headline "0 / N" with N = 0, read as success.
    With nothing readable before masking the check now says it is inconclusive and gives no count;
    where it read plates, it counts them."""
    root = write_coco(tmp_path / "d", [
        {"key": 1, "boxes": [[20, 20, 60, 20]], "dets": [(0.9, _box(20, 20, 80, 40))]},
        {"key": 2, "boxes": [[20, 60, 60, 20]], "dets": [(0.9, _box(20, 60, 80, 80))]},
    ])
    _fake_ocr(monkeypatch, [])
    ocr = run_eval(root, ocr=True)["ocr"]
    assert ocr["readable_before"] == 0
    assert ocr["any_char_read_after"] is None and ocr["three_char_run_after"] is None  # was 0 and 0
    assert ocr["conclusive"] is False and ocr["plates_tried"] == 2

    _fake_ocr(monkeypatch, [("AB1234", 0.9), None, None])  # plate 1 read before, not after; plate 2 not read
    ocr = run_eval(root, ocr=True)["ocr"]
    assert ocr["conclusive"] is True and ocr["plates_tried"] == 2
    assert ocr["readable_before"] == 1 and ocr["any_char_read_after"] == 0 and ocr["three_char_run_after"] == 0


def test_the_threshold_and_review_list_are_also_reported_on_photos_they_were_not_chosen_on(run_eval, tmp_path):
    """The operating threshold, the review band and its limits are chosen on the held-out photos and
    then reported on the same photos: the recall, false-mask rates and "misses the review list
    catches" at the operating point are optimistic by construction. The report now also gives each
    chosen on one half and shown on the other (both ways, pooled); here, where scores are noise,
    the in-sample recall meets the target and the honest figure does not."""
    from platemask.training.coco import load_datasets

    rng = np.random.default_rng(12)
    photos = []
    for k in range(1, 61):
        s = round(float(rng.uniform(0.05, 0.99)), 3)
        if k <= 40:
            photos.append({"key": k, "boxes": [[20, 20, 40, 20]], "dets": [(s, _box(20, 20, 60, 40))]})
        else:
            photos.append({"key": k, "fields": {"negative": True, "negative_kind": "vin_plate_closeup"},
                           "dets": [(s, _box(70, 60, 110, 80))]})
    rep = run_eval(write_coco(tmp_path / "d", photos), target_recall=0.5, max_fp_rate=0.2)
    honest = rep["chosen_on_the_other_half"]
    assert [h["chosen_on"] for h in honest["halves"]] == ["a", "b"]
    assert rep["at_operating_threshold"]["recall"] >= 0.5
    # recomputed here from the halves: each half's threshold, applied to the other half
    from platemask.training.evaluate import calibration_halves, choose_threshold, metrics_at, THRESHOLDS
    from platemask.training.evaluate import analyse
    from platemask.mask import MaskStyle

    results = [analyse(r, _Seg().detect([cv2.cvtColor(cv2.imread(str(r.path)), cv2.COLOR_BGR2RGB)])[0],
                       r.width, r.height, MaskStyle()) for r in load_datasets(tmp_path / "d")]
    a, b = calibration_halves(results)
    hidden = total = 0
    for fit, shown, row in ((a, b, honest["halves"][0]), (b, a, honest["halves"][1])):
        t, _ = choose_threshold([metrics_at(fit, x, 0.8, 16.0) for x in THRESHOLDS], 0.5, 0.2)
        m = metrics_at(shown, t, 0.8, 16.0)
        assert row["threshold"] == t and row["recall"] == m["recall"] and row["photos_shown_on"] == len(shown)
        hidden += round(m["recall"] * m["plates"])
        total += m["plates"]
    assert honest["recall"] == hidden / total and total == 40
    assert honest["recall"] < 0.5 <= rep["at_operating_threshold"]["recall"]  # 0.475 against 0.525 in-sample
    assert sum(c["images"] for c in honest["fp_by_category"].values()) == 20


def test_one_mask_over_the_whole_photo_does_not_count_as_hiding_its_plates(run_eval, tmp_path):
    """Over-masking was rewarded: a single detection over the whole photo "hid" every plate on it
    (recall 1.0 for blurring everything). A mask now hides a plate for recall only when it is not
    out of all proportion to it (its masked area at most OVERSIZED_MASK times the plate's box, at
    least OVERSIZED_MASK_FLOOR px); a loose but plate-sized mask still counts (on the real held-out
    photos the smallest mask hiding a plate is at most 15 times its box)."""
    root = write_coco(tmp_path / "d", [
        {"key": 1, "size": (400, 300), "boxes": [[100, 100, 40, 20]], "dets": [(0.9, _box(0, 0, 399, 299))]},
        {"key": 2, "size": (400, 300), "boxes": [[100, 100, 40, 20]], "dets": [(0.9, _box(85, 92, 155, 128))]},
    ])
    m = _at(run_eval(root), 0.5)
    assert m["plates"] == 2 and m["recall"] == 0.5  # the loose mask hides its plate, the whole-photo one does not


def test_labels_made_for_another_size_of_the_photo_stop_the_evaluation(run_eval, tmp_path):
    """A labelled photo whose pixels are not the size its record gives (an EXIF-turned phone photo,
    labels drawn on a resized export) has its boxes in other coordinates: every plate on it was
    silently measured against the wrong place (a miss, and its masks false). It now stops the
    evaluation with the photo named; a negative photo without labels is not affected."""
    root = write_coco(tmp_path / "d", [
        {"key": 1, "boxes": [[20, 20, 40, 20]], "dets": [(0.9, _box(20, 20, 60, 40))]},
        {"key": 2, "fields": {"negative": True, "negative_kind": "odometer_digital"}, "dets": []},
    ])
    doc = json.loads((root / "annotations.json").read_text())
    doc["images"][1]["width"], doc["images"][1]["height"] = 100, 120  # no labels: harmless
    (root / "annotations.json").write_text(json.dumps(doc))
    assert run_eval(root)["data"]["images"] == 2
    doc["images"][0]["width"], doc["images"][0]["height"] = 100, 120
    (root / "annotations.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="1.png"):
        run_eval(root)


def test_the_detector_cache_is_not_read_for_a_photo_replaced_at_the_same_path(run_eval, tmp_path):
    """``--cache-dir`` kept the detector's plates per file path only: a photo replaced at the same
    path (a data set refreshed, "other photos of the same sources") was scored with the old photo's
    detections, silently. The cache now names each entry by the photo's pixels too."""
    cache = tmp_path / "cache"
    root = write_coco(tmp_path / "d", [{"key": 1, "boxes": [[20, 20, 40, 20]], "dets": []}])
    assert _at(run_eval(root, cache_dir=cache), 0.5)["recall"] == 0.0
    # the same file name, another photo (its plate is found)
    img = np.full((100, 120, 3), 128, np.uint8)
    img[0, 0] = 7
    cv2.imwrite(str(root / "images/1.png"), img)
    _Seg.DETS[7] = [(0.9, _box(20, 20, 60, 40))]
    assert _at(run_eval(root), 0.5)["recall"] == 1.0  # without the cache
    assert _at(run_eval(root, cache_dir=cache), 0.5)["recall"] == 1.0


def test_a_plate_cut_by_the_photo_edge_is_as_wide_as_what_the_photo_shows(run_eval, tmp_path):
    """The size limits of recall (plates >= 16 px wide; recall of plates < 16 px) read the labelled
    box's width, also the part outside the photo: 8 px of a plate at the edge counted as a 30-px plate."""
    root = write_coco(tmp_path / "d", [
        {"key": 1, "boxes": [[112, 40, 30, 10]], "dets": []},  # 8 px of it in the photo
        {"key": 2, "boxes": [[20, 40, 30, 10]], "dets": [(0.9, _box(20, 40, 50, 50))]},
    ])
    rep = run_eval(root)
    assert _at(rep, 0.5)["plates"] == 1 and _at(rep, 0.5)["recall"] == 1.0
    assert rep["recall_by_plate_width"]["0-16px"] == {"plates": 1, "recall": 0.0}


def test_isotonic_calibration_gives_tied_scores_one_probability():
    """Detections with the same fused score must get one calibrated probability, the share of plates
    among them: the fit kept tied scores in separate blocks (two knots at one score), so four
    detections at 0.5 of which two are plates were calibrated to 0.67 (and 0.0 just below)."""
    from platemask.review import calibrate
    from platemask.training.evaluate import isotonic

    knots = isotonic(np.array([0.2, 0.5, 0.5, 0.5, 0.5, 0.8]), np.array([0, 0, 1, 1, 0, 1.0]))
    xs = [k[0] for k in knots]
    assert len(xs) == len(set(xs))
    assert calibrate(0.5, knots) == 0.5


def test_the_review_list_counts_misses_with_the_evaluations_own_cover(run_eval, tmp_path):
    """``evaluate(cover=...)`` set what "hidden" means for recall, but the review list was chosen and
    reported with 0.8 always: at cover 0.5 a plate 60 % covered is hidden for recall and was still a
    "missed plate" of the review list."""
    root = write_coco(tmp_path / "d", [
        {"key": 1, "size": (300, 200), "boxes": [[100, 100, 100, 20]], "dets": [(0.9, _box(100, 100, 155, 120))]},
    ])
    rep = run_eval(root, cover=0.5)
    assert rep["at_operating_threshold"]["recall"] == 1.0
    assert rep["review"]["missed_plates"] == 0
    assert run_eval(root)["review"]["missed_plates"] == 1  # at the default 0.8 it is a miss
