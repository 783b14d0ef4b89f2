"""The shipped model: it loads without training extras and finds plates (generated and real)."""
import json
import shutil

import numpy as np
import pytest
import torch

from platemask.model import Architecture, build_model, load_config, load_model
from platemask.segment import Segmenter, merge_plates, plan_views
from platemask.detections import Plate
from platemask.geometry import box_polygon


def test_config_is_complete(model_dir):
    cfg = load_config(model_dir)
    assert cfg.classes == ("__background__", "plate")
    assert 0 < cfg.score_threshold < 1 and cfg.review_low <= cfg.score_threshold
    assert cfg.input_max_side >= 512 and len(cfg.weights_sha256) == 64
    assert (model_dir / "MODEL_CARD.md").is_file()
    assert (model_dir / cfg.weights).stat().st_size < 40e6


def test_corrupt_weights_are_refused(model_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    with open(bad / "weights.pt", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 16)
    with pytest.raises(ValueError, match="SHA-256"):
        load_model(bad)


@pytest.mark.parametrize("recorded", ["", None, "abc123"])
def test_a_config_without_the_weights_sha256_is_refused(model_dir, tmp_path, recorded):
    """An emptied (or dropped, or truncated) weights_sha256 turned the check off: tampered weights
    loaded. Now the folder is refused, with what is missing and how to fix it."""
    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    state = torch.load(bad / "weights.pt", weights_only=True)  # other weights that load: nothing checks them
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1
    torch.save(state, bad / "weights.pt")
    cfg = json.loads((bad / "config.json").read_text())
    if recorded is None:
        del cfg["weights_sha256"]
    else:
        cfg["weights_sha256"] = recorded
    cfg["onnx"] = {}  # the trunk graph is tied to the hash: the PyTorch path alone decides
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"records no SHA-256 for its weights .*weights\.pt.*re-export") as err:
        load_model(bad)
    assert str(bad / "config.json") in str(err.value)
    with pytest.raises(ValueError, match="records no SHA-256"):
        Segmenter(bad, runtime="torch")


def test_builder_rejects_conflicting_arguments():
    with pytest.raises(ValueError, match="anchor_sizes"):
        build_model(arch=Architecture(anchor_sizes=((16,), (32,), (64,))))
    with pytest.raises(ValueError, match="backbone"):
        build_model(arch=Architecture(backbone="resnet50"))
    with pytest.raises(ValueError, match="unknown"):
        Architecture.from_dict({"bogus": 1})


def test_finds_plate_in_generated_photo(model_dir, scene):
    img, quads, _ = scene
    seg = Segmenter(model_dir)
    plates = [p for p in seg([img])[0] if p.score >= seg.cfg.score_threshold]
    assert plates, "no plate found in the generated photo"
    import cv2
    best = max(plates, key=lambda p: p.score)
    poly = best.polygon.reshape(-1, 1, 2)
    assert all(cv2.pointPolygonTest(poly, (float(x), float(y)), True) > -4 for x, y in quads[0])


def test_empty_image_gives_empty_list(model_dir):
    seg = Segmenter(model_dir)
    assert seg([np.full((300, 400, 3), 128, np.uint8)]) == [[]]


def test_large_photo_is_tiled_and_mapped_back(model_dir):
    from platemask.training.synth import synth_car_scene

    cfg = load_config(model_dir)
    views = plan_views(4000, 3000, cfg)
    assert len(views) > 1 and views[0].scale < views[1].scale
    # tiles cover the whole photo
    cover = np.zeros((3000, 4000), bool)
    for v in views[1:]:
        cover[v.y0:v.y1, v.x0:v.x1] = True
    assert cover.all()
    rng = np.random.default_rng(5)
    img, quads, _ = synth_car_scene(rng, size=(3000, 4000), plate_width=(150, 170))
    plates = [p for p in Segmenter(model_dir)([img])[0] if p.score >= cfg.score_threshold]
    assert plates
    centre = quads[0].mean(0)
    assert any(p.polygon[:, 0].min() <= centre[0] <= p.polygon[:, 0].max() and
               p.polygon[:, 1].min() <= centre[1] <= p.polygon[:, 1].max() for p in plates)


def test_coarse_view_for_close_ups(model_dir):
    from dataclasses import replace

    cfg = load_config(model_dir)
    cfg = replace(cfg, coarse_side=448)
    views = plan_views(1024, 683, cfg)
    assert [round(v.scale, 3) for v in views] == [round(896 / 1024, 3), round(448 / 1024, 3)]
    assert views[0].min_box == 0 and views[1].min_box > 0  # the coarse view only keeps big plates
    assert len(plan_views(500, 300, cfg)) == 1  # a small photo needs no coarse view
    assert len(plan_views(1024, 683, replace(cfg, coarse_side=0))) == 1


def test_batching_views_of_mixed_sizes_keeps_each_image_its_own_plates(model_dir, scene):
    """Views are batched by size (padding); every image must still get exactly its own detections."""
    import cv2
    from dataclasses import replace

    img, quads, _ = scene
    small = cv2.resize(img, (640, 360), interpolation=cv2.INTER_AREA)
    seg = Segmenter(model_dir, batch_size=3)
    seg.cfg = replace(seg.cfg, coarse_side=448)  # 1280-px photo: full view + coarse view
    blank = np.full((500, 700, 3), 128, np.uint8)
    together = seg([blank, img, small])
    alone = [seg([x])[0] for x in (blank, img, small)]
    assert together[0] == [] and alone[0] == []
    for t, a in zip(together[1:], alone[1:]):
        assert len(t) == len(a) >= 1
        for p, q in zip(sorted(t, key=lambda p: p.score), sorted(a, key=lambda p: p.score)):
            assert abs(p.score - q.score) < 0.05
            assert np.abs(p.polygon.mean(axis=0) - q.polygon.mean(axis=0)).max() < 4


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1), (1, 7)])
def test_a_view_of_a_photo_turned_a_quarter_is_a_tensor_whatever_its_size(shape):
    """np.rot90 turns a photo as a view with a negative stride; numpy takes an array with a side of one
    pixel for contiguous whatever its strides, so ``view_pixels`` passed that view on and torch
    refused it: a 1 x 2 photo the orientation classifier sent through the turned view failed its
    whole batch (the CLI: every photo read with it failed detector_error)."""
    from platemask.segment import prepare

    rgb = np.arange(shape[0] * shape[1] * 3, dtype=np.uint8).reshape(*shape, 3)
    turned = np.rot90(rgb, -1)
    t = prepare(turned, 0, 0, turned.shape[1], turned.shape[0], 1.0)
    assert tuple(t.shape) == (3, *turned.shape[:2])
    assert np.array_equal((t.permute(1, 2, 0) * 255).round().byte().numpy(), turned)


def test_photos_of_a_pixel_or_two_are_their_own_results_not_their_batchs_failure(model_dir, scene):
    """Tiny photos beside a real one, through the whole Segmenter (the turned view included): each gets
    its own result; the real one keeps its plates."""
    img, _, _ = scene
    seg = Segmenter(model_dir, batch_size=4)
    tiny = [np.full(s + (3,), 90, np.uint8) for s in ((1, 1), (1, 2), (2, 1), (3, 3))]
    out = seg(tiny + [img])
    assert [o for o in out[:4]] == [[], [], [], []]
    assert len(out[4]) == len(seg([img])[0]) >= 1


def test_fusing_batch_norm_keeps_the_outputs(model_dir):
    import copy

    import torch
    from torchvision.ops import FrozenBatchNorm2d

    from platemask.model import fuse_frozen_bn

    model, _ = load_model(model_dir)
    fused = fuse_frozen_bn(copy.deepcopy(model))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fused.modules())
    x = torch.rand(1, 3, 256, 320)
    with torch.inference_mode():
        a, b = model.backbone(x), fused.backbone(x)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-3 * float(a[k].abs().max())), k


def test_merge_unites_overlapping_detections():
    a = Plate(0.9, box_polygon([100, 100, 160, 120]))
    b = Plate(0.6, box_polygon([140, 100, 200, 121]))  # the same plate cut by a tile edge
    c = Plate(0.7, box_polygon([400, 100, 460, 120]))
    merged = merge_plates([a, b, c])
    assert len(merged) == 2
    top = max(merged, key=lambda p: p.score)
    assert top.score == 0.9 and top.polygon[:, 0].max() == 200 and top.polygon[:, 0].min() == 100


@pytest.mark.realdata
def test_finds_plates_in_real_photos(model_dir, real_data):
    """Held-out real photos whose plates are all >= 60 px wide: the model must hide nearly all of them.

    24 photos rather than a handful: the labels carry some noise (a shop sign boxed as a plate),
    and one such label must not decide the outcome; the full split is `platemask evaluate`'s job.
    """
    from platemask.training.coco import load_coco, split_records
    from platemask.training.evaluate import analyse, metrics_at
    from platemask.imageio import decode
    from platemask.mask import MaskStyle

    _, val = split_records(load_coco(real_data))
    picks = [r for r in val if not r.negative and r.polygons and min(np.ptp(p[:, 0]) for p in r.polygons) >= 60][:24]
    assert len(picks) >= 20
    seg = Segmenter(model_dir)
    cfg = seg.cfg
    results = []
    for r in picks:
        dec = decode(r.path.read_bytes())
        results.append(analyse(r, seg([dec.rgb])[0], dec.width, dec.height, MaskStyle()))
    m = metrics_at(results, cfg.score_threshold)
    assert m["recall"] >= 0.9, json.dumps(m)


def test_warm_up_runs_the_detector_and_the_verifier_once_and_changes_no_result(model_dir, scene):
    """The CLI, the DAG's mask task and the inference server warm the runtimes up while loading, so
    the first real batch does not pay their set-up: one detector pass and one verifier call on a
    generated photo, whose results go nowhere (a photo's plates are the same before and after)."""
    rgb = scene[0]
    seg = Segmenter(model_dir)
    before = seg([rgb])[0]
    calls = {"detect": 0, "verify": 0}
    detect, verifier = seg.detect, seg.verifier

    def counting_detect(images):
        calls["detect"] += 1
        assert [im.shape for im in images] == [(720, 1280, 3)]
        return detect(images)

    def counting_verifier(image, boxes):
        calls["verify"] += 1
        return verifier(image, boxes)

    seg.detect, seg.verifier = counting_detect, counting_verifier
    assert seg.warm_up() > 0
    assert calls == {"detect": 1, "verify": 1}
    seg.detect, seg.verifier = detect, verifier
    after = seg([rgb])[0]
    assert [(p.score, p.box) for p in after] == [(p.score, p.box) for p in before]


def test_unturn_maps_a_polygon_of_the_turned_photo_back_onto_the_photo():
    from platemask.segment import unturn

    rgb = np.zeros((50, 30, 3), np.uint8)  # portrait, 30 wide and 50 tall
    rgb[10:14, 5:25] = 255  # a bright bar: x 5..25, y 10..14
    turned = np.rot90(rgb, -1)  # 50 wide, 30 tall
    ys, xs = np.nonzero(turned[..., 0])
    box = np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.max() + 1, ys.max() + 1], [xs.min(), ys.max() + 1]],
                   np.float32)
    back = unturn(box, rgb.shape[0])
    assert back[:, 0].min() == 5 and back[:, 0].max() == 25 and back[:, 1].min() == 10 and back[:, 1].max() == 14


@pytest.mark.parametrize("quarter", [1, 3])
def test_a_photo_lying_sideways_without_exif_has_its_plate_found_as_upright(model_dir, scene, quarter):
    """A landscape photo whose pixels lie sideways with no EXIF Orientation left (an upload tool
    stripped it) shows its plate on end: the shipped detector gave the generated plate 0.05 and 0.13
    that way (1.0 upright), a hair over the threshold; on 30 real held-out photos turned either way
    a third got no mask at all. A portrait photo also runs turned a quarter, mapped back."""
    import dataclasses

    from platemask.geometry import polygon_box

    rgb, quads, _ = scene
    side = np.ascontiguousarray(np.rot90(rgb, quarter))
    h, w = rgb.shape[:2]
    # where the plate lies in the sideways photo
    x, y = quads[0][:, 0], quads[0][:, 1]
    pts = np.stack([y, w - x], 1) if quarter == 1 else np.stack([h - y, x], 1)
    want = polygon_box(pts)
    seg = Segmenter(model_dir)
    upright = max(p.score for p in seg([rgb])[0])
    found = [p for p in seg([side])[0] if p.score >= 0.5]
    assert found, "the sideways plate is found with an upright plate's confidence"
    got = found[0].box
    inter = max(0, min(got[2], want[2]) - max(got[0], want[0])) * max(0, min(got[3], want[3]) - max(got[1], want[1]))
    assert inter >= 0.8 * (want[2] - want[0]) * (want[3] - want[1]) and upright >= 0.5
    seg.cfg = dataclasses.replace(seg.cfg, turned_view=False)  # the model's config can switch it off
    assert [p.box for p in seg([side])[0]] == [p.box for p in seg.verify_many([side], seg.detect([side]))[0]]


@pytest.mark.parametrize("text, why", [
    ('{"name": "m", "weights": "weights.pt",', "Expecting"),  # cut short
    ('["not", "an", "object"]', "not an object"),
    ('{"name": "m", "architecture": {"fpn_channel": 96}}', "unknown architecture keys"),
    ('{"name": "m", "no_such_field": 1}', "no_such_field"),
])
def test_a_damaged_config_json_is_refused_naming_its_path(tmp_path, text, why):
    """A damaged config.json said only "Expecting property name ..." or "__init__() got an unexpected
    keyword argument": no path, nothing to do. Now the path, what was wrong and what to do."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError) as exc:
        load_config(tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "config.json") in msg and why in msg and "re-export" in msg, msg


def test_a_missing_model_folder_says_where_each_entry_point_names_it(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        load_config(tmp_path / "nowhere")
    msg = str(exc.value)
    assert str(tmp_path / "nowhere") in msg and "PLATEMASK_MODEL_DIR" in msg and "--model" in msg, msg
