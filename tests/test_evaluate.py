"""The operating threshold rule: recall first, then the false-positive budget."""
from pathlib import Path

import numpy as np

from platemask.training.evaluate import choose_threshold


def _curve(rows):
    return [{"threshold": t, "recall": r, "false_positive_image_rate": fp} for t, r, fp in rows]


def test_highest_recall_within_both_targets():
    curve = _curve([(0.2, 0.97, 0.08), (0.3, 0.96, 0.015), (0.4, 0.96, 0.015), (0.5, 0.952, 0.015), (0.6, 0.94, 0.0)])
    t, why = choose_threshold(curve, 0.95, 0.03)
    assert t == 0.4 and "highest recall" in why  # 0.2 breaks the FP budget; 0.3 and 0.4 tie on recall


def test_recall_is_kept_when_no_threshold_meets_the_fp_budget():
    curve = _curve([(0.3, 0.96, 0.09), (0.5, 0.952, 0.077), (0.7, 0.91, 0.031)])
    t, why = choose_threshold(curve, 0.95, 0.03)
    assert t == 0.5 and "no threshold meets the FP limit" in why


def test_best_recall_first_when_the_recall_target_is_out_of_reach():
    # recall is not traded for the FP budget: 0.3 keeps more plates hidden than 0.5
    curve = _curve([(0.3, 0.93, 0.05), (0.5, 0.92, 0.02), (0.7, 0.90, 0.0)])
    t, why = choose_threshold(curve, 0.95, 0.03)
    assert t == 0.3 and "no threshold reaches recall" in why and "above the FP limit" in why


def test_ties_on_the_best_recall_go_to_the_fewest_false_masks():
    # detector stage 5: 0.05-0.15 share the best recall; 0.15 masks the fewest negatives among them
    curve = _curve([(0.05, 0.966, 0.062), (0.1, 0.966, 0.021), (0.15, 0.966, 0.021), (0.2, 0.957, 0.015),
                    (0.8, 0.92, 0.0)])
    t, why = choose_threshold(curve, 0.97, 0.01)
    assert t == 0.15


def test_fp_limit_holds_per_negative_category():
    # overall 1 of 200 negatives (0.5 %), but that one is 1 of 20 odometer photos (5 %): the limit must see it
    curve = [{"threshold": 0.3, "recall": 0.98, "false_positive_image_rate": 0.005, "worst_category_fp_rate": 0.05},
             {"threshold": 0.5, "recall": 0.975, "false_positive_image_rate": 0.0, "worst_category_fp_rate": 0.0}]
    t, _ = choose_threshold(curve, 0.97, 0.01)
    assert t == 0.5


def _result(category, negative, dets, gt_cover=None, size=(100, 100)):
    """An ImageResult with detections ``[(score, on_plate)]`` and per labelled plate a coverage curve."""
    from platemask.detections import Plate
    from platemask.training.coco import Record
    from platemask.training.evaluate import ImageResult

    rec = Record(path=Path("x.jpg"), width=size[0], height=size[1], negative=negative, category=category,
                 polygons=[np.zeros((4, 2), np.float32)] * len(gt_cover or []))
    r = ImageResult(rec, [Plate(s, np.array([[0, 0], [10, 0], [10, 5], [0, 5]], np.float32)) for s, _ in dets])
    r.det_on_plate = [ok for _, ok in dets]
    r.det_region_px = [50.0] * len(dets)
    r.det_outside_px = [0.0] * len(dets)
    r.cover_curves = [c for c in gt_cover or []]
    r.gt_iou_best = [[] for _ in gt_cover or []]
    return r


def test_metrics_report_false_positives_per_category():
    from platemask.training.evaluate import metrics_at

    results = [_result("odometer_digital", True, [(0.6, False)]), _result("odometer_digital", True, []),
               _result("vin_plate_closeup", True, [(0.2, False)]), _result("plate", False, [(0.9, True)], [[(0.9, 1.0)]])]
    m = metrics_at(results, 0.5)
    assert m["fp_by_category"]["odometer_digital"] == {"images": 2, "masked": 1, "rate": 0.5}
    assert m["fp_by_category"]["vin_plate_closeup"]["masked"] == 0
    assert m["worst_category_fp_rate"] == 0.5 and m["false_positive_image_rate"] == 1 / 3


def test_isotonic_calibration_is_monotone_and_matches_frequencies():
    from platemask.review import calibrate
    from platemask.training.evaluate import isotonic

    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 4000)
    labels = (rng.uniform(0, 1, 4000) < scores ** 2).astype(float)  # true probability = score^2
    knots = isotonic(scores, labels)
    ps = [calibrate(s, knots) for s in np.linspace(0, 1, 50)]
    assert all(b >= a for a, b in zip(ps, ps[1:]))
    assert abs(calibrate(0.5, knots) - 0.25) < 0.08 and abs(calibrate(0.9, knots) - 0.81) < 0.08
    assert calibrate(0.5, []) is None


def test_review_reasons_cover_near_misses_weak_masks_and_unusual_results():
    from platemask.review import review_band, review_reasons

    band = review_band(0.3, 0.2, 0.5)
    assert review_reasons([0.9, 0.1], band) == []
    assert "just below" in review_reasons([0.25], band)[0]
    assert "low confidence" in review_reasons([0.4], band)[0]
    assert any("masks (more than" in w for w in review_reasons([0.95] * 7, band))
    assert any("of the photo" in w for w in review_reasons([0.95], band, masked_fraction=0.5))
    # a run above the model's band still reviews what it masks with low confidence
    assert review_band(0.6, 0.2, 0.5).high == 0.6 and review_band(0.1, 0.2, 0.5).low == 0.1


def test_review_band_is_chosen_within_the_budget_and_catches_misses():
    from platemask.training.evaluate import choose_review_band

    # 30 photos (budget: 3): one plate missed at 0.5 with a near miss at 0.42, a stray detection at 0.45 on
    # another photo, one odometer masked at 0.55, one plate masked at 0.6; the rest clean
    results = [_result("plate", False, [(0.9, True)], [[(0.9, 1.0)]]) for _ in range(26)]
    results += [_result("plate", False, [(0.42, True)], [[(0.42, 1.0)]]),
                _result("odometer_digital", True, [(0.55, False)]),
                _result("plate", False, [(0.45, False)], [[(0.95, 1.0)]]),
                _result("plate", False, [(0.6, True)], [[(0.6, 1.0)]])]
    band = choose_review_band(results, 0.5, max_rate=0.10)
    assert band["flagged_rate"] <= 0.10
    assert band["missed_plates"] == 1 and band["missed_plates_flagged"] == 1
    assert band["negatives_masked_flagged"] == 1  # the odometer: masked at 0.55, inside [0.5, high)
    assert band["review_high"] <= 0.6  # flagging the confident 0.6 mask too would exceed the budget
    tight = choose_review_band(results, 0.5, max_rate=0.05)  # budget 1 photo: catching the miss would take 2
    assert tight["flagged_images"] <= 1


def test_unusual_result_limits_are_fitted_with_the_band():
    """Street photos with many plates must not fill the review list: the limits of a usual result
    (mask count, masked share) are chosen with the band, within the budget, and still flag what
    is truly unusual (a photo blurred almost whole)."""
    from platemask.review import review_band, review_reasons
    from platemask.training.evaluate import choose_review_band, review_outcome

    many = [(0.9, True)] * 8  # a parking lot: 8 plates, all masked
    results = [_result("plate", False, many, [[(0.9, 1.0)]] * 8) for _ in range(6)]
    results += [_result("plate", False, [(0.9, True)], [[(0.9, 1.0)]]) for _ in range(23)]
    blurred = _result("odometer_digital", True, [(0.95, False)])
    blurred.det_region_px = [9000.0]  # 90 % of the 100 x 100 photo
    results.append(blurred)
    assert review_outcome(results, 0.5, 0.5, 0.5)["flagged_images"] == 7  # the fixed limits: 6 masks, 20 %
    band = choose_review_band(results, 0.5, max_rate=0.10)
    assert band["flagged_images"] == 1 and band["negatives_masked_flagged"] == 1  # only the blurred photo
    assert band["review_max_masks"] >= 8 and band["review_max_masked_fraction"] < 0.9
    b = review_band(0.5, 0.5, 0.5, max_masks=band["review_max_masks"],
                    max_masked_fraction=band["review_max_masked_fraction"])
    assert review_reasons([0.9] * 8, b) == [] and review_reasons([0.95], b, masked_fraction=0.9)


def test_detector_cache_gives_the_same_report_without_the_detector_pass(model_dir, tmp_path, monkeypatch):
    """``evaluate --cache-dir``: the detector's plates are kept per photo; a second evaluation (e.g.
    of a new verifier) re-applies the verifier to them and reports exactly what a full pass reports."""
    import json

    import cv2
    import numpy as np

    from platemask.segment import Segmenter
    from platemask.training.evaluate import evaluate
    from platemask.training.synth import synth_car_scene

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    images, anns = [], []
    for i in range(6):
        img, quads, _ = synth_car_scene(rng, size=(240, 320), n_plates=0 if i >= 4 else 1, plate_width=(50, 70))
        cv2.imwrite(str(root / f"images/{i}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        images.append({"id": i + 1, "file_name": f"images/{i}.jpg", "width": 320, "height": 240, "sha1": f"e{i}",
                       **({"negative": True} if i >= 4 else {})})
        for q in quads:
            (x0, y0), (x1, y1) = q.min(0), q.max(0)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                         "segmentation": [q.reshape(-1).tolist()]})
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "plate"}]}))

    def run(**kw):
        rep = evaluate(model_dir, root, val_fraction=1.0, ocr=False, log=lambda m: None, **kw)
        rep.pop("seconds")
        return json.loads(json.dumps(rep, default=str))

    full = run()
    assert full["data"]["images"] == 6
    assert run(cache_dir=tmp_path / "cache") == full  # fills the cache
    (cache,) = (tmp_path / "cache").glob("detections-*.jsonl")
    assert len(cache.read_text().splitlines()) == 6

    def no_detector(*a, **k):
        raise AssertionError("the detector ran although its plates were cached")

    monkeypatch.setattr(Segmenter, "_run", no_detector)
    assert run(cache_dir=tmp_path / "cache") == full


def test_detector_cache_is_kept_per_trunk_graph(model_dir, tmp_path):
    """A cache filled by one trunk is not read for another: an int8 graph swapped into a model folder
    (same weights, same views) would have been scored with the fp32 graph's detections. The graph's
    SHA-256, or PyTorch, names the file."""
    from platemask.segment import Segmenter
    from platemask.training.evaluate import DetectorCache

    onnx = DetectorCache(tmp_path, Segmenter(model_dir, runtime="onnx", verify=False))
    torch_ = DetectorCache(tmp_path, Segmenter(model_dir, runtime="torch", verify=False))
    again = DetectorCache(tmp_path, Segmenter(model_dir, runtime="onnx", verify=False))
    assert onnx.path != torch_.path and onnx.path == again.path
