"""The plate_masking DAG: parsing, params, and full runs with dag.test() against moto's S3 server."""
from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import uuid
from datetime import datetime, timezone

import numpy as np
import pytest

from conftest import ROOT, jpeg_bytes

DAG_FILE = ROOT / "dags" / "plate_masking.py"


def load_dag(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    spec = importlib.util.spec_from_file_location(f"plate_masking_{uuid.uuid4().hex}", DAG_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.plate_masking_dag


def merged_params(dag, conf: dict) -> dict:
    """The run's params as Airflow builds them: DAG defaults updated with the conf, validated."""
    params = copy.deepcopy(dag.params)
    for k, v in conf.items():
        params[k] = v
    return params.validate()


def test_parsing_touches_no_heavy_imports():
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); "
            "bad = [m for m in ('torch', 'torchvision', 'cv2', 'platemask.segment', 'platemask.runs') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code, str(DAG_FILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_dagbag_has_no_import_errors():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert "plate_masking" in bag.dag_ids


def test_structure_queue_pool_deadline(monkeypatch):
    dag = load_dag(monkeypatch, PLATEMASK_QUEUE="gpu", PLATEMASK_POOL="platemask_gpu", PLATEMASK_DEADLINE_HOURS="5")
    assert set(dag.task_ids) == {"plan", "collect", "shard", "process.transform_submit", "process.transform_wait",
                                 "process.mask", "qa", "check"}
    mask = dag.get_task("process.mask")
    assert mask.queue == "gpu" and mask.pool == "platemask_gpu"
    assert dag.get_task("qa").trigger_rule == "all_done"
    assert dag.deadline, "deadline alert missing"
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert {o.name for o in dag.get_task("check").outlets} == {"s3://inspection-photos/masked/", "s3://inspection-photos/qa/"}
    assert load_dag(monkeypatch, PLATEMASK_DEADLINE_HOURS="0").deadline in (None, [])


@pytest.mark.parametrize("conf", [
    {"region": "XX"}, {"threshold": 1.5}, {"backend": "gpu"}, {"max_images": 0}, {"mode": "swirl"},
    {"max_failure_rate": -0.1}, {"reprocess": "yes"},
])
def test_params_refuse_bad_values(monkeypatch, conf):
    from airflow.sdk.exceptions import ParamValidationError

    dag = load_dag(monkeypatch)
    with pytest.raises(ParamValidationError):
        merged_params(dag, conf)
    assert merged_params(dag, {"region": "DE", "threshold": 0.4})["threshold"] == 0.4


def test_plan_refuses_bad_windows_with_a_clear_message():
    from platemask.runs import RunError, plan_runs
    from platemask.settings import Settings

    s = Settings()
    with pytest.raises(RunError, match="before its end"):
        plan_runs(s, {"region": "DE", "window_start": "2026-11-21", "window_end": "2026-11-20"}, run_id="r",
                  data_interval_start=None, data_interval_end=None)
    specs = plan_runs(s, {"region": "ALL"}, run_id="r", data_interval_start=None,
                      data_interval_end=datetime(2026, 11, 21, 1, tzinfo=timezone.utc))
    assert [x.region for x in specs] == list(s.regions)


# ------------------------------------------------------------------ runs against S3

DAY = ("2026", "11", "20")


@pytest.fixture
def bucket_env(aws_conn, monkeypatch, airflow_db):
    s3 = aws_conn
    bucket = f"photos-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    monkeypatch.setenv("PLATEMASK_BUCKET", bucket)
    monkeypatch.setenv("PLATEMASK_DEADLINE_HOURS", "0")
    monkeypatch.setenv("PLATEMASK_SHARD_SIZE", "2")
    from platemask.training.synth import synth_car_scene

    rng = np.random.default_rng(11)
    keys = {}
    for region, day, n in (("DE", "19", 1), ("DE", "20", 3), ("DE", "21", 1), ("PL", "20", 1)):
        for i in range(n):
            img, _, _ = synth_car_scene(rng, plate_width=(120, 160))
            key = f"raw/{region}/2026/11/{day}/car{i}.jpg"
            s3.put_object(Bucket=bucket, Key=key, Body=jpeg_bytes(img))
            keys.setdefault((region, day), []).append(key)
    return s3, bucket, keys


def _objects(s3, bucket, prefix):
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["ETag"], o["LastModified"])
    return out


def _report(s3, bucket, region, window):
    return json.loads(s3.get_object(Bucket=bucket, Key=f"qa/{region}/{window}/report.json")["Body"].read())


DE_20 = "20261119T2300Z-20261120T2300Z"  # 2026-11-20 in Europe/Berlin, in UTC


def test_full_run_masks_the_window_then_rerun_changes_nothing(monkeypatch, bucket_env):
    s3, bucket, keys = bucket_env
    s3.put_object(Bucket=bucket, Key="raw/DE/2026/11/20/corrupt.jpg", Body=b"\xff\xd8\xff\xe0 not really a jpeg")
    dag = load_dag(monkeypatch)
    conf = {"region": "DE", "window_start": "2026-11-20", "window_end": "2026-11-21", "max_failure_rate": 0.5}
    dr = dag.test(run_conf=conf)
    assert dr.state == "success"
    masked = _objects(s3, bucket, "masked/")
    assert sorted(masked) == sorted(k.replace("raw/", "masked/", 1) for k in keys[("DE", "20")])  # not 19/21/PL, not corrupt
    audits = _objects(s3, bucket, "audit/")
    assert len(audits) == 4  # 3 photos + the corrupt one, each accounted for
    corrupt = json.loads(s3.get_object(Bucket=bucket, Key="audit/DE/2026/11/20/corrupt.jpg.json")["Body"].read())
    assert corrupt["status"] == "failed" and corrupt["reason"] and corrupt["masked_key"] is None
    good = json.loads(s3.get_object(Bucket=bucket, Key="audit/DE/2026/11/20/car0.jpg.json")["Body"].read())
    assert good["status"] == "masked" and good["source_etag"] and good["model"]["weights_sha256"]
    rep = _report(s3, bucket, "DE", DE_20)
    assert rep["by_status"] == {"masked": 3, "no_plate": 0, "failed": 1}
    assert rep["failures_by_reason"] and any(i["key"].endswith("corrupt.jpg")
                                             for f in rep["failures_by_reason"].values() for i in f["items"])
    assert rep["photos_in_window"] == 4 and rep["not_accounted_for"] == 0 and len(rep["shards"]) == 2
    assert dag.get_task("process.transform_wait").mode == "reschedule"
    assert rep["processed_this_run"] == 4 and rep["mask_images_per_second"] > 0
    html = s3.get_object(Bucket=bucket, Key=f"qa/DE/{DE_20}/report.html")["Body"].read().decode()
    assert "unmasked originals" in html and "data:image/jpeg;base64" in html
    manifest = s3.get_object(Bucket=bucket, Key=f"runs/DE/{DE_20}/manifest.jsonl")["Body"].read().decode().splitlines()
    assert {json.loads(line)["key"] for line in manifest} == set(keys[("DE", "20")]) | {"raw/DE/2026/11/20/corrupt.jpg"}
    raw_before = _objects(s3, bucket, "raw/")

    # the same window again: nothing redone, nothing changed, no duplicates
    dr2 = dag.test(run_conf=conf)
    assert dr2.state == "success"
    assert _objects(s3, bucket, "masked/") == masked
    assert {k: v for k, v in _objects(s3, bucket, "audit/").items() if "corrupt" not in k} == \
        {k: v for k, v in audits.items() if "corrupt" not in k}
    rep2 = _report(s3, bucket, "DE", DE_20)
    assert rep2["skipped_already_masked"] == 3 and rep2["processed_this_run"] == 1  # only the failed one is retried
    assert rep2["by_status"] == rep["by_status"]
    assert _objects(s3, bucket, "raw/") == raw_before  # originals never touched


def test_failure_rate_over_the_limit_fails_the_run_after_writing_qa(monkeypatch, bucket_env):
    s3, bucket, _ = bucket_env
    s3.put_object(Bucket=bucket, Key="raw/DE/2026/11/20/zero.jpg", Body=b"")
    dag = load_dag(monkeypatch)
    dr = dag.test(run_conf={"region": "DE", "window_start": "2026-11-20", "window_end": "2026-11-21",
                            "max_failure_rate": 0.0})
    assert dr.state == "failed"
    rep = _report(s3, bucket, "DE", DE_20)
    assert rep["by_status"]["failed"] == 1 and rep["run_id"] == dr.run_id
    assert "masked/DE/2026/11/20/zero.jpg" not in _objects(s3, bucket, "masked/")


def test_nightly_run_takes_the_previous_local_day_and_honours_region_conf(monkeypatch, bucket_env):
    """What a backfill run executes: its conf (region) with its data interval (the night)."""
    s3, bucket, keys = bucket_env
    dag = load_dag(monkeypatch)
    dr = dag.test(logical_date=datetime(2026, 11, 21, 1, tzinfo=timezone.utc), run_conf={"region": "PL", "max_failure_rate": 0.5})
    assert dr.state == "success"
    assert sorted(_objects(s3, bucket, "masked/")) == [k.replace("raw/", "masked/", 1) for k in keys[("PL", "20")]]
    assert _report(s3, bucket, "PL", "20261119T2300Z-20261120T2300Z")["by_status"]["masked"] == 1


def test_backfill_creates_runs_with_the_region_conf(monkeypatch, bucket_env):
    from airflow.models.backfill import InvalidBackfillConf, _create_backfill
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    from platemask.runs import plan_runs
    from platemask.settings import Settings

    dag = load_dag(monkeypatch)
    dag.test(run_conf={"region": "TH", "dry_run": True})  # serialises the DAG into the metadata DB
    with pytest.raises(InvalidBackfillConf):
        _create_backfill(dag_id="plate_masking", from_date=datetime(2026, 11, 10, tzinfo=timezone.utc),
                         to_date=datetime(2026, 11, 12, tzinfo=timezone.utc), max_active_runs=2, reverse=False,
                         dag_run_conf={"region": "MARS"}, triggering_user_name="test")
    bf = _create_backfill(dag_id="plate_masking", from_date=datetime(2026, 11, 10, tzinfo=timezone.utc),
                          to_date=datetime(2026, 11, 12, 23, tzinfo=timezone.utc), max_active_runs=2, reverse=False,
                          dag_run_conf={"region": "TH"}, triggering_user_name="test")
    with create_session() as session:
        runs = session.query(DagRun).filter(DagRun.backfill_id == bf.id).order_by(DagRun.logical_date).all()
        assert len(runs) == 3  # logical dates 11-10, 11-11, 11-12 at 01:00 UTC
        windows = []
        for r in runs:
            assert r.run_type == "backfill" and r.conf == {"region": "TH"}
            params = merged_params(dag, r.conf)
            (spec,) = plan_runs(Settings.load(), params, run_id=r.run_id, data_interval_start=r.data_interval_start,
                                data_interval_end=r.data_interval_end)
            assert spec.region == "TH"
            windows.append(spec.window)
    # one Bangkok day per run (the one that ended before the night's run), consecutive, no gaps
    from zoneinfo import ZoneInfo
    assert [w.start.astimezone(ZoneInfo("Asia/Bangkok")).day for w in windows] == [10, 11, 12]
    assert [w.start for w in windows[1:]] == [w.end for w in windows[:-1]]
    assert all((w.end - w.start).total_seconds() == 86400 for w in windows)
