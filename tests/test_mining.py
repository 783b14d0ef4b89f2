"""Hard-negative mining: sampling weights, the RoI sampler, and scoring negatives with the real model."""
import cv2
import numpy as np
import pytest
import torch

from platemask.training.augment import AugmentConfig, SampleMaker
from platemask.training.coco import Record
from platemask.training.mining import HardNegativeSampler, hardness_weights, score_negatives
from platemask.model import load_model


def test_hardness_weights_grow_with_score():
    w = hardness_weights([0.0, 0.3, 0.9, 1.7, -1.0], gain=8.0)
    assert w[0] == 1.0 and w[4] == 1.0  # nothing detected (or nonsense below 0): the base weight
    assert w[0] < w[1] < w[2] <= w[3] == 9.0  # clipped at a score of 1
    assert np.all(hardness_weights([0.5, 0.9], gain=0.0) == 1.0)  # gain 0: uniform


def test_sampler_takes_the_top_proposals_on_a_negative_image():
    torch.manual_seed(0)
    sampler = HardNegativeSampler(batch_size_per_image=16, positive_fraction=0.25, hard_fraction=0.5)
    labels = torch.zeros(100, dtype=torch.int64)  # no plate: every proposal is background
    _, neg = sampler([labels])
    chosen = torch.where(neg[0] == 1)[0]
    assert len(chosen) == 16
    assert set(range(8)) <= set(chosen.tolist())  # the 8 most plate-like proposals, always
    assert len(set(chosen.tolist()) - set(range(8))) == 8  # and 8 others at random


def test_sampler_leaves_images_with_plates_random():
    torch.manual_seed(0)
    sampler = HardNegativeSampler(batch_size_per_image=16, positive_fraction=0.25, hard_fraction=1.0)
    labels = torch.zeros(200, dtype=torch.int64)
    labels[150:160] = 1
    tops = 0
    for _ in range(20):
        pos, neg = sampler([labels])
        assert int(pos[0].sum()) == 4 and int(neg[0].sum()) == 12
        assert bool((labels[pos[0].bool()] == 1).all()) and bool((labels[neg[0].bool()] == 0).all())
        tops += int(neg[0][:12].sum() == 12)
    assert tops == 0  # a hard-only sampler would pick proposals 0..11 every time
    with pytest.raises(ValueError):
        HardNegativeSampler(16, 0.25, 1.5)


def test_weighted_negatives_follow_their_weights(tmp_path):
    recs = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), np.full((64, 64, 3), 40 * i, np.uint8))
        recs.append(Record(path=p, width=64, height=64, polygons=[] if i else [np.array([[5, 5], [40, 5], [40, 20], [5, 20]], np.float32)],
                           negative=bool(i)))
    maker = SampleMaker(recs[:1], recs[1:], AugmentConfig(crop=64), negative_weights=[0.0, 1.0])
    rng = np.random.default_rng(0)
    assert {maker._negative(rng).path.name for _ in range(50)} == {"2.png"}
    uniform = SampleMaker(recs[:1], recs[1:], AugmentConfig(crop=64))
    assert {uniform._negative(rng).path.name for _ in range(50)} == {"1.png", "2.png"}
    with pytest.raises(ValueError, match="negative_weights"):
        SampleMaker(recs[:1], recs[1:], negative_weights=[1.0])


def test_score_negatives_ranks_a_plate_above_an_empty_wall(model_dir, scene, tmp_path):
    img, _, _ = scene
    paths = [tmp_path / "plate.png", tmp_path / "wall.png"]
    cv2.imwrite(str(paths[0]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(paths[1]), np.full((300, 400, 3), 128, np.uint8))
    model, cfg = load_model(model_dir)
    model.train()
    scores = score_negatives(model, [Record(path=p, width=0, height=0, negative=True) for p in paths],
                             max_side=cfg.input_max_side)
    assert scores[0] > cfg.score_threshold and scores[1] < 0.1
    assert model.training  # left as it was found
