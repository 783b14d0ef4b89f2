"""Packing the training split for a remote GPU: held-out photos stay behind, labels follow their photo."""
import json

import cv2
import numpy as np
import pytest

from platemask.training.coco import load_coco, split_of, split_records
from platemask.training.pack import pack, photo_scale


def _held_out_name(start: int) -> str:
    i = start
    while split_of(f"held{i}", 0.15) != "val":
        i += 1
    return f"held{i}"


@pytest.fixture()
def coco(tmp_path):
    """Nine 600 x 800 photos: 6 with plates (3 large, 3 one small), 2 negatives, 1 held out."""
    root = tmp_path / "cars"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [i for i in (f"train{n}" for n in range(40)) if split_of(i, 0.15) == "train"][:8] + [_held_out_name(0)]
    images, anns = [], []
    for n, ident in enumerate(ids):
        img = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
        name = f"images/{ident}.jpg"
        cv2.imwrite(str(root / name), img)
        rec = {"id": n + 1, "file_name": name, "width": 800, "height": 600, "sha1": ident}
        negative = ident.startswith("train") and n in (6, 7)
        if negative:
            rec["negative"] = True
        else:
            width = 20.0 if n % 2 else 200.0  # one small plate, or a large one
            anns.append({"id": len(anns) + 1, "image_id": n + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [100.0, 300.0, width, width / 2],
                         "segmentation": [[100.0, 300.0, 100 + width, 300.0, 100 + width, 300 + width / 2,
                                           100.0, 300 + width / 2]]})
        images.append(rec)
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "plate"}]}))
    return root


def test_packed_parts_hold_the_training_split_once_with_scaled_labels(coco, tmp_path):
    out = tmp_path / "pack"
    stats = pack(coco, out, parts=2, min_plate_px=40, min_scale=0.55, negative_side=400)
    original = {r.identity: r for r in load_coco(coco)}
    train, held = split_records(list(original.values()))
    assert len(held) == 1
    parts = [load_coco(out / f"part-{k}" / "cars") for k in (1, 2)]
    seen_positive: list[str] = []
    for recs, s in zip(parts, stats["parts"]):
        assert len(recs) == s["images"]
        assert held[0].identity not in {r.identity for r in recs}, "a held-out photo was packed"
        # what training splits off the packed folder is all training: nothing is lost to its own split
        assert len(split_records(recs)[1]) == 0
        assert {r.identity for r in recs if r.negative} == {r.identity for r in train if r.negative}
        for r in recs:
            img = cv2.imread(str(r.path), cv2.IMREAD_COLOR)
            assert img is not None and r.path.suffix == ".webp"
            assert img.shape[:2] == (r.height, r.width)
            src = original[r.identity]
            sx, sy = r.width / src.width, r.height / src.height
            if r.negative:
                assert max(r.width, r.height) == 400
                continue
            seen_positive.append(r.identity)
            np.testing.assert_allclose(r.polygons[0], src.polygons[0] * [sx, sy], atol=1e-3)
            small = np.ptp(src.polygons[0][:, 0]) < 40
            # a small plate keeps its pixels; a large one lets its photo shrink, but not below min_scale
            assert sx == pytest.approx(1.0) if small else sx == pytest.approx(0.55, abs=0.01)
    assert sorted(seen_positive) == sorted(r.identity for r in train if not r.negative)


def test_photo_scale_keeps_the_smallest_plate_wide_enough():
    assert photo_scale([{"bbox": [0, 0, 80, 20]}, {"bbox": [0, 0, 400, 100]}], min_plate_px=40, min_scale=0.2) == 0.5
    assert photo_scale([{"bbox": [0, 0, 30, 10]}], min_plate_px=40, min_scale=0.2) == 1.0
    assert photo_scale([{"bbox": [0, 0, 1000, 10]}], min_plate_px=40, min_scale=0.3) == 0.3


def test_photos_named_by_their_file_keep_identity_and_their_own_labels(tmp_path):
    """No sha1 or Open Images id: the file name is the identity. a.jpg and a.png must stay two photos,
    each with its own plate, and stay on the training side of the split they were on."""
    stem = next(f"p{i}" for i in range(200)
                if all(split_of(f"images/p{i}.{ext}", 0.15) == "train" for ext in ("jpg", "png"))
                and split_of(f"images/p{i}.jpg.webp", 0.15) == "val")  # a renamed identity would be held out
    root = tmp_path / "cars"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    images, anns = [], []
    for n, (ext, x) in enumerate((("jpg", 50.0), ("png", 400.0)), start=1):
        name = f"images/{stem}.{ext}"
        cv2.imwrite(str(root / name), rng.integers(0, 255, (300, 600, 3), dtype=np.uint8))
        images.append({"id": n, "file_name": name, "width": 600, "height": 300})
        seg = [x, 100.0, x + 120, 100.0, x + 120, 140.0, x, 140.0]
        # the second label has an outline only: COCO allows it, and so must the packer
        anns.append({"id": n, "image_id": n, "category_id": 1, "iscrowd": 0, "segmentation": [seg],
                     **({"bbox": [x, 100.0, 120.0, 40.0]} if n == 1 else {})})
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "plate"}]}))
    pack(root, tmp_path / "pack", min_plate_px=60, min_scale=0.5)
    packed = load_coco(tmp_path / "pack" / "part-1" / "cars")
    assert sorted(r.identity for r in packed) == sorted(r.identity for r in load_coco(root))
    assert len({r.path for r in packed}) == 2 and all(r.path.is_file() for r in packed)
    assert len(split_records(packed)[1]) == 0
    for r in packed:
        left = 50.0 if r.identity.endswith(".jpg") else 400.0
        assert r.polygons[0][:, 0].min() == pytest.approx(left * r.width / 600, abs=1e-3)
