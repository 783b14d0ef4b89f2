"""train-verifier: a cache or a verifier cut short by a kill or a full disk leaves a usable state."""
import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from conftest import torch_save_then_disk_full
from platemask.training.coco import Record


def test_a_half_written_detections_cache_is_detected_again(model_dir, tmp_path):
    from platemask.training.verifier import collect_detections

    recs = []
    for i in range(2):
        path = tmp_path / f"{i}.jpg"
        cv2.imwrite(str(path), np.full((64, 96, 3), 90 + 40 * i, np.uint8))
        recs.append(Record(path=path, width=96, height=64, negative=True, category="negative"))
    cache = tmp_path / "work" / "detections.jsonl"
    cache.parent.mkdir()
    row = {"path": str(recs[0].path), "negative": True, "gt": [], "plates": []}
    cache.write_text(json.dumps(row) + "\n" + json.dumps(row)[:15])  # the second line cut short
    rows = collect_detections(model_dir, recs, cache=cache, log=lambda *_: None)
    assert [r["path"] for r in rows] == [str(r.path) for r in recs]
    assert [json.loads(line)["path"] for line in cache.read_text().splitlines()] == [str(r.path) for r in recs]


def test_a_verifier_write_cut_short_leaves_the_model_folder_loadable(model_dir, tmp_path, monkeypatch):
    from platemask.model import load_config
    from platemask.training import verifier as V
    from platemask.verify import load_verifier

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    before = load_config(folder).verifier
    net = V.build_verifier()

    monkeypatch.setattr(V.torch, "save", torch_save_then_disk_full)
    with pytest.raises(OSError):
        V.save_verifier(net, folder, {})
    monkeypatch.undo()
    assert load_config(folder).verifier["weights_sha256"] == before["weights_sha256"]
    load_verifier(folder, load_config(folder).verifier)  # the old verifier still matches its recorded hash
    assert not list(folder.glob("*.tmp"))


def test_train_verifier_refuses_a_missing_photo_before_the_detector_pass(model_dir, tmp_path, monkeypatch):
    from platemask.training import verifier as V

    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    images = []
    for i in range(3):
        cv2.imwrite(str(root / f"images/{i}.jpg"), np.full((64, 96, 3), 80, np.uint8))
        images.append({"id": i + 1, "file_name": f"images/{i}.jpg", "width": 96, "height": 64, "sha1": f"v{i}",
                       "negative": True})
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": [], "categories": [{"id": 1, "name": "plate"}]}))
    (root / "images" / "2.jpg").unlink()

    def never(*a, **k):
        raise AssertionError("the detector pass started before the photos were checked")

    monkeypatch.setattr(V, "collect_detections", never)
    with pytest.raises(FileNotFoundError, match=r"2\.jpg"):
        V.train_for_model(model_dir, root, tmp_path / "work", val_fraction=0.0, log=lambda *_: None)
