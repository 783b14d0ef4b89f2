"""Issue 12: '--threshold 1.0' (and the DAG Param 1.0) published a plate scored 0.998 readable as 'no_plate'.
A threshold well above the model's operating threshold needs an explicit opt-in, and detections at or above
the hard floor are masked whatever the threshold."""
import json

import numpy as np
import pytest
from PIL import Image

from platemask.cli import main
from platemask.detections import Plate
from platemask.geometry import box_polygon
from platemask.model import load_config
from platemask.pipeline import HARD_MASK_SCORE, UNSAFE_THRESHOLD_MARGIN, JobOptions, check_threshold, run_job
from platemask.storage import LocalStore



def _png(rgb):
    import io

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _detector(*scores):
    def detect(keys, decoded):
        return [[Plate(s, box_polygon([20 + 60 * i, 40, 70 + 60 * i, 60])) for i, s in enumerate(scores)] for _ in keys]
    return detect


def test_hard_floor_masks_confident_detections_whatever_the_threshold(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (100, 300, 3), dtype=np.uint8)
    src, dst = LocalStore(tmp_path / "src", create=True), LocalStore(tmp_path / "dst", create=True)
    src.write("p.png", _png(rgb))
    (rec,) = run_job(src, dst, ["p.png"], _detector(0.998, HARD_MASK_SCORE, 0.85), JobOptions(threshold=1.0))
    assert rec["status"] == "masked"
    assert sorted(p["score"] for p in rec["plates"]) == [HARD_MASK_SCORE, 0.998]
    assert [p["score"] for p in rec["near_misses"]] == [0.85] and rec["review"]
    out = np.asarray(Image.open(tmp_path / "dst" / "p.png")).astype(int)
    changed = [np.abs(out[40:60, x0:x0 + 50] - rgb[40:60, x0:x0 + 50]).mean() > 10 for x0 in (20, 80, 140)]
    assert changed == [True, True, False]  # the two confident plates are hidden, the 0.85 one is not


def test_check_threshold():
    check_threshold(None, 0.3)
    check_threshold(0.3 + UNSAFE_THRESHOLD_MARGIN, 0.3)
    check_threshold(0.1, 0.3)
    check_threshold(1.0, 0.3, unsafe=True)
    with pytest.raises(ValueError, match="unsafe"):
        check_threshold(1.0, 0.3)
    with pytest.raises(ValueError, match="unsafe"):
        check_threshold(0.3 + UNSAFE_THRESHOLD_MARGIN + 0.01, 0.3)


def test_cli_needs_an_explicit_opt_in_for_a_high_threshold(scene, tmp_path, model_dir, capsys):
    img, quads, _ = scene
    src = tmp_path / "src"
    src.mkdir()
    (src / "car.png").write_bytes(_png(img))
    limit = load_config(model_dir).score_threshold + UNSAFE_THRESHOLD_MARGIN
    assert main(["mask", str(src), str(tmp_path / "refused"), "--model", str(model_dir), "--threshold", "1.0"]) == 2
    err = capsys.readouterr().err
    assert "--unsafe-threshold" in err and "1" in err
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    assert main(["mask", str(src), str(tmp_path / "refused2"), "--model", str(model_dir),
                 "--threshold", f"{limit + 0.02:.4f}"]) == 2
    # with the opt-in the run goes ahead, and the plate (scored above the hard floor) is still hidden
    rc = main(["mask", str(src), str(tmp_path / "out"), "--model", str(model_dir), "--threshold", "1.0",
               "--unsafe-threshold", "--detections", str(tmp_path / "d.jsonl")])
    assert rc == 0
    (rec,) = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert rec["status"] == "masked" and max(p["score"] for p in rec["plates"]) >= HARD_MASK_SCORE
    x0, y0 = np.floor(quads[0].min(0)).astype(int)
    x1, y1 = np.ceil(quads[0].max(0)).astype(int)
    out = np.asarray(Image.open(tmp_path / "out" / "car.png"))[y0:y1, x0:x1].astype(int)
    assert np.abs(out - img[y0:y1, x0:x1].astype(int)).mean() > 10


def test_dag_params_need_unsafe_threshold(model_dir):
    from platemask.runspec import RunError, plan_runs
    from platemask.settings import Settings

    s = Settings(model_dir=str(model_dir))
    kw = dict(run_id="r", data_interval_end=None)
    base = {"region": "DE", "window_start": "2026-11-20", "window_end": "2026-11-21"}
    with pytest.raises(RunError, match="unsafe_threshold"):
        plan_runs(s, {**base, "threshold": 1.0}, **kw)
    (spec,) = plan_runs(s, {**base, "threshold": 1.0, "unsafe_threshold": True}, **kw)
    assert spec.threshold == 1.0
    limit = load_config(model_dir).score_threshold + UNSAFE_THRESHOLD_MARGIN
    assert plan_runs(s, {**base, "threshold": limit}, **kw)[0].threshold == limit
    assert plan_runs(s, base, **kw)[0].threshold is None


def test_a_model_folder_that_cannot_run_fails_the_plan_not_every_mask_task(model_dir, tmp_path):
    """PLATEMASK_MODEL_DIR (or the model Param) naming no model was only checked with a threshold: plan,
    hold, collect and shard went through, every mask task failed (four times each with retries) and a QA
    report was published as the window's latest. Now plan refuses it, naming the folder."""
    import shutil

    from platemask.runspec import RunError, plan_runs
    from platemask.settings import Settings

    kw = dict(run_id="r", data_interval_end=None)
    base = {"region": "DE", "window_start": "2026-11-20", "window_end": "2026-11-21"}
    with pytest.raises(RunError, match=r"model: no config.json in model directory .*nowhere"):
        plan_runs(Settings(model_dir=str(tmp_path / "nowhere")), base, **kw)
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(model_dir / "config.json", half / "config.json")  # copied without its weights
    with pytest.raises(RunError, match=r"has config.json but not its weights 'weights.pt'"):
        plan_runs(Settings(), {**base, "model": str(half)}, **kw)
    assert plan_runs(Settings(model_dir=str(model_dir)), base, **kw)[0].region == "DE"


def test_a_run_below_the_models_review_low_sees_what_it_masks(model_dir, scene, tmp_path):
    """The detector's floor follows the run's threshold: a run at 0.05 on a model whose review_low
    is higher gets every detection at 0.05 or above (before, those under review_low were dropped
    before masking ever saw them, so a lower threshold masked nothing more)."""
    import json
    import shutil

    from platemask.model import load_config
    from platemask.segment import Segmenter

    # a copy of the shipped model with its operating point and review band at 0.3 (the shipped
    # one's are at 0.05 already, where there is nothing below to see)
    shutil.copytree(model_dir, tmp_path / "m")
    model_dir = tmp_path / "m"
    d = json.loads((model_dir / "config.json").read_text())
    d.update(score_threshold=0.3, review_low=0.3, review_high=0.3)
    (model_dir / "config.json").write_text(json.dumps(d))
    cfg = load_config(model_dir)
    low = 0.05
    assert low < cfg.review_low
    run = Segmenter(model_dir, threshold=low)
    assert run.min_score == low and Segmenter(model_dir).min_score == min(cfg.review_low, cfg.score_threshold)
    ref = Segmenter(model_dir, min_score=low)
    got, want = run([scene[0]])[0], ref([scene[0]])[0]
    assert [round(p.score, 5) for p in got] == [round(p.score, 5) for p in want]
