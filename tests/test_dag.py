"""The plate_masking DAG: parsing, params, and full runs with dag.test() against moto's S3 server."""
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import subprocess
import sys
import uuid
from datetime import datetime, timezone

import numpy as np
import pytest

from conftest import ROOT, jpeg_bytes
from platemask.runspec import run_key

DAG_FILE = ROOT / "dags" / "plate_masking.py"


def load_dag(monkeypatch, dag_id: str = "plate_masking", **env):
    """A DAG of the DAG file, parsed with ``env``: the manual ``plate_masking`` or a region's ``plate_masking_<region>``."""
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    spec = importlib.util.spec_from_file_location(f"plate_masking_{uuid.uuid4().hex}", DAG_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.plate_masking_dag if dag_id == "plate_masking" else getattr(mod, dag_id)


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
    assert set(bag.dag_ids) == {"plate_masking", "plate_masking_de", "plate_masking_pl", "plate_masking_th",
                                "plate_masking_us"}


def test_structure_queue_pool_deadline(monkeypatch):
    from platemask.transform_wait import TransformWaitOperator

    dag = load_dag(monkeypatch, "plate_masking_th", PLATEMASK_QUEUE="gpu", PLATEMASK_POOL="platemask_gpu",
                   PLATEMASK_DEADLINE_HOURS="5")
    assert set(dag.task_ids) == {"plan", "hold", "collect", "shard", "local_shards", "sagemaker_shards", "process.mask",
                                 "sagemaker.submit", "sagemaker.wait", "sagemaker.mask",
                                 "qa", "check", "publish", "release", "watcher"}
    mask = dag.get_task("process.mask")
    assert mask.queue == "gpu" and mask.pool == "platemask_gpu"
    # the SageMaker path's mask step only blurs: the CPU queue and pool, never the GPU pool
    blur = dag.get_task("sagemaker.mask")
    assert (blur.queue, blur.pool) == ("default", "default_pool")
    blur = load_dag(monkeypatch, PLATEMASK_CPU_QUEUE="cpu", PLATEMASK_CPU_POOL="cpu_pool").get_task("sagemaker.mask")
    assert (blur.queue, blur.pool) == ("cpu", "cpu_pool")
    # the job is waited for in the triggerer (deferrable), not by a worker task
    wait = dag.get_task("sagemaker.wait")
    assert isinstance(wait, TransformWaitOperator) and wait.on_failure_callback
    assert {"sagemaker.submit"} == wait.upstream_task_ids and wait.downstream_task_ids == {"sagemaker.mask"}
    assert dag.get_task("qa").trigger_rule == "all_done" and dag.get_task("release").trigger_rule == "all_done"
    assert dag.deadline, "deadline alert missing"
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert (dag.timetable.expression, str(dag.timetable.timezone)) == ("0 0 * * *", "Asia/Bangkok")
    assert dag.params["region"] == "TH"
    manual = load_dag(monkeypatch)  # any region, by hand: no schedule, no deadline
    assert type(manual.timetable).__name__ == "NullTimetable" and not manual.deadline and manual.params["region"] == "ALL"
    assert set(manual.task_ids) == set(dag.task_ids)
    assert {o.name for o in dag.get_task("publish").outlets} == {"s3://inspection-photos/masked/", "s3://inspection-photos/qa/"}
    assert not dag.get_task("check").outlets
    # the run's state is the watcher's: the only leaf, downstream of every task, fails when one failed
    assert [t.task_id for t in dag.leaves] == ["watcher"] and dag.get_task("watcher").trigger_rule == "one_failed"
    assert dag.get_task("watcher").upstream_task_ids >= set(dag.task_ids) - {"watcher", "sagemaker.submit",
                                                                           "sagemaker.wait"}
    assert dag.get_task("hold").mode == "reschedule"
    assert load_dag(monkeypatch, "plate_masking_de", PLATEMASK_DEADLINE_HOURS="0").deadline in (None, [])


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
    from platemask.runspec import RunError, plan_runs
    from platemask.settings import Settings

    s = Settings()
    with pytest.raises(RunError, match="before its end"):
        plan_runs(s, {"region": "DE", "window_start": "2026-11-21", "window_end": "2026-11-20"}, run_id="r",
                  data_interval_end=None)
    specs = plan_runs(s, {"region": "ALL"}, run_id="r",
                      data_interval_end=datetime(2026, 11, 21, 1, tzinfo=timezone.utc))
    assert [x.region for x in specs] == list(s.regions)
    # a window inside one day covers no day partition: it masked nothing and reported success
    within = {"region": "DE", "window_start": "2026-11-20T06:00", "window_end": "2026-11-20T18:00"}
    with pytest.raises(RunError, match="contains no local midnight.*last_modified"):
        plan_runs(s, within, run_id="r", data_interval_end=None)
    assert plan_runs(dataclasses.replace(s, time_source="last_modified"), within, run_id="r", data_interval_end=None)


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
    monkeypatch.setenv("PLATEMASK_LATE_DAYS", "0")  # the 19th's photo stays out of the 20th's runs
    monkeypatch.setenv("PLATEMASK_RETRIES", "0")  # a failure here is meant to be permanent: no waiting for retries
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
    assert _ti_states(dr)["sagemaker.mask"] == "skipped"  # backend=local: the SageMaker group maps over no shard
    assert rep["processed_this_run"] == 4 and rep["mask_images_per_second"] > 0
    html = s3.get_object(Bucket=bucket, Key=f"qa/DE/{DE_20}/report.html")["Body"].read().decode()
    assert "unmasked originals" in html and "data:image/jpeg;base64" in html
    manifest = s3.get_object(Bucket=bucket, Key=f"runs/DE/{DE_20}/{run_key(dr.run_id)}/manifest.jsonl")["Body"].read().decode().splitlines()
    assert {json.loads(line)["key"] for line in manifest} == set(keys[("DE", "20")]) | {"raw/DE/2026/11/20/corrupt.jpg"}
    _assert_accounted(s3, bucket, "DE", DE_20, dr.run_id, rep)
    assert [e["region"] for _, e in _asset_events(dr.run_id)] == ["DE", "DE"]
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
    assert _asset_events(dr.run_id) == []  # QA did not pass: no event


def test_nightly_run_takes_the_previous_local_day_and_honours_region_conf(monkeypatch, bucket_env):
    """What a backfill run executes: its conf (region) with its data interval (the night)."""
    s3, bucket, keys = bucket_env
    dag = load_dag(monkeypatch)
    dr = dag.test(logical_date=datetime(2026, 11, 21, 1, tzinfo=timezone.utc), run_conf={"region": "PL", "max_failure_rate": 0.5})
    assert dr.state == "success"
    assert sorted(_objects(s3, bucket, "masked/")) == [k.replace("raw/", "masked/", 1) for k in keys[("PL", "20")]]
    assert _report(s3, bucket, "PL", "20261119T2300Z-20261120T2300Z")["by_status"]["masked"] == 1


def test_backfill_creates_runs_of_the_regions_nightly_dag(monkeypatch, bucket_env):
    from datetime import date

    from airflow.models.backfill import Backfill, InvalidBackfillConf, _create_backfill
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    from platemask.runspec import plan_runs
    from platemask.schedules import backfill_bounds
    from platemask.settings import Settings

    dag = load_dag(monkeypatch, "plate_masking_th")
    load_dag(monkeypatch).test(run_conf={"region": "TH", "dry_run": True})  # writes the DAG folder's DAGs to the DB
    start, end = backfill_bounds(date(2026, 11, 10), date(2026, 11, 12))
    with pytest.raises(InvalidBackfillConf):  # the TH DAG masks TH only
        _create_backfill(dag_id="plate_masking_th", from_date=start, to_date=end, max_active_runs=2, reverse=False,
                         dag_run_conf={"region": "DE"}, triggering_user_name="test")
    bf = _create_backfill(dag_id="plate_masking_th", from_date=start, to_date=end, max_active_runs=2, reverse=False,
                          dag_run_conf={"max_failure_rate": 0.1}, triggering_user_name="test")
    with create_session() as session:
        session.query(Backfill).filter(Backfill.id == bf.id).update({"completed_at": datetime.now(timezone.utc)})
        runs = session.query(DagRun).filter(DagRun.backfill_id == bf.id).order_by(DagRun.logical_date).all()
        assert len(runs) == 3  # the Bangkok days 11-10, 11-11, 11-12
        windows = []
        for r in runs:
            assert r.run_type == "backfill" and r.conf == {"max_failure_rate": 0.1}
            params = merged_params(dag, r.conf)
            (spec,) = plan_runs(Settings.load(), params, run_id=r.run_id,
                                data_interval_end=r.data_interval_end)
            assert spec.region == "TH" and spec.max_failure_rate == 0.1
            assert (spec.window.start, spec.window.end) == (r.data_interval_start, r.data_interval_end)
            windows.append(spec.window)
    # one Bangkok day per run, consecutive, no gaps
    from zoneinfo import ZoneInfo
    assert [w.start.astimezone(ZoneInfo("Asia/Bangkok")).day for w in windows] == [10, 11, 12]
    assert [w.start for w in windows[1:]] == [w.end for w in windows[:-1]]
    assert all((w.end - w.start).total_seconds() == 86400 for w in windows)


# ------------------------------------------------------------------ runs tell the truth (issue 10)

PL_20 = "20261119T2300Z-20261120T2300Z"  # 2026-11-20 in Europe/Warsaw, in UTC
DE_CONF = {"region": "DE", "window_start": "2026-11-20", "window_end": "2026-11-21", "max_failure_rate": 0.5}


def _asset_events(run_id: str) -> list[tuple[str, dict]]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        return sorted(((e.uri, e.extra) for e in session.query(AssetEvent).filter(AssetEvent.source_run_id == run_id)),
                      key=lambda x: (x[1].get("region", ""), x[0]))


def _ti_states(dr) -> dict[str, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dr.dag_id, TaskInstance.run_id == dr.run_id).all()
        out = {}
        for ti in tis:
            out.setdefault(ti.task_id, []).append(str(ti.state))
        return {k: ",".join(sorted(v)) for k, v in out.items()}


def _client_error(op: str, code: str, status: int, message: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def _inject_faults(monkeypatch, fault):
    """The DAG's S3 client, with a botocore hook before each request: S3's 1,024-byte key limit (moto does
    not enforce it) and ``fault(operation, params)``, which returns an error to raise or None."""
    import platemask.airflow_support as support

    real = support.s3_client

    def hook(params, model, **_):
        key = params.get("Key")
        if key is not None and len(key.encode()) > 1024:
            raise _client_error(model.name, "KeyTooLongError", 400, "Your key is too long")
        err = fault(model.name, params)
        if err is not None:
            raise err

    def client(settings):
        c = real(settings)
        c.meta.events.register("before-parameter-build.s3", hook)
        return c

    monkeypatch.setattr(support, "s3_client", client)


def _records(s3, bucket, region, window, rid) -> list[dict]:
    """Every detection record this run wrote for the region-window."""
    prefix = f"runs/{region}/{window}/{run_key(rid)}/detections/"
    out = []
    for key in _objects(s3, bucket, prefix):
        if key.endswith(".jsonl"):
            out += [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()]
    return out


def _manifest(s3, bucket, region, window, rid) -> list[str]:
    body = s3.get_object(Bucket=bucket, Key=f"runs/{region}/{window}/{run_key(rid)}/manifest.jsonl")["Body"].read()
    return [json.loads(x)["key"] for x in body.decode().splitlines()]


def _assert_accounted(s3, bucket, region, window, rid, report):
    """Every input exactly one record; nothing failed published by this run; nothing published without its record;
    QA counts equal the manifest."""
    manifest = _manifest(s3, bucket, region, window, rid)
    recs = _records(s3, bucket, region, window, rid)
    assert sorted(r["key"] for r in recs) == sorted(manifest)
    masked = _objects(s3, bucket, f"masked/{region}/")
    for r in recs:
        out = r["key"].replace("raw/", "masked/", 1)
        if r["status"] == "failed":
            assert out not in masked or r.get("unaudited_masked_copy") == out, r
        else:
            assert out in masked
            audit = json.loads(s3.get_object(Bucket=bucket, Key=r["key"].replace("raw/", "audit/", 1) + ".json")["Body"].read())
            assert audit["status"] == r["status"] and audit["output_sha256"] == r["output_sha256"]
    assert report["images"] == len(manifest) == sum(report["by_status"].values())
    assert report["not_accounted_for"] == 0 and report["duplicate_records"] == 0


def test_a_plan_that_fails_fails_the_run_and_publishes_nothing(monkeypatch, bucket_env):
    dag = load_dag(monkeypatch)
    dr = dag.test(run_conf={"region": "DE", "window_start": "2026-11-21", "window_end": "2026-11-20"})
    assert dr.state == "failed"
    assert _ti_states(dr)["plan"] == "failed" and _ti_states(dr)["watcher"] == "failed"
    # only plan failed: release has no locks to give back and says so without failing (the failure
    # that alerts name is the plan's)
    assert _ti_states(dr)["release"] == "success"
    # and shard and qa (all_done) do not fail with a TypeError of their own beside it: nothing was planned
    assert _ti_states(dr)["shard"] == "skipped" and _ti_states(dr)["qa"] == "skipped"
    assert [t for t, s in _ti_states(dr).items() if s == "failed"] == ["plan", "watcher"]
    assert _asset_events(dr.run_id) == []


def test_one_region_failing_to_collect_fails_the_run_but_the_others_are_masked(monkeypatch, bucket_env):
    s3, bucket, keys = bucket_env
    monkeypatch.setenv("PLATEMASK_REGIONS", "DE,PL")
    _inject_faults(monkeypatch, lambda op, p: _client_error(op, "AccessDenied", 403, "Access Denied")
                   if op == "ListObjectsV2" and p.get("Prefix", "").startswith("raw/PL/") else None)
    dag = load_dag(monkeypatch)
    dr = dag.test(logical_date=datetime(2026, 11, 21, 1, tzinfo=timezone.utc), run_conf={"max_failure_rate": 0.5})
    assert dr.state == "failed"
    states = _ti_states(dr)
    assert states["collect"] == "failed,success" and states["check"] == "failed" and states["watcher"] == "failed"
    # DE, healthy, is masked completely, and reported
    assert sorted(_objects(s3, bucket, "masked/")) == sorted(k.replace("raw/", "masked/", 1) for k in keys[("DE", "20")])
    de = _report(s3, bucket, "DE", DE_20)
    assert de["run_id"] == dr.run_id and de["verdict"] == {"passed": True, "problems": []}
    _assert_accounted(s3, bucket, "DE", DE_20, dr.run_id, de)
    # PL has a report saying it was not collected, and fails the run
    pl = _report(s3, bucket, "PL", PL_20)
    assert pl["collected"] is False and not pl["verdict"]["passed"] and "not collected" in pl["verdict"]["problems"][0]
    # Asset events for DE only, saying what was produced
    events = _asset_events(dr.run_id)
    assert [uri.rstrip("/") for uri, _ in events] == [f"s3://{bucket}/masked", f"s3://{bucket}/qa"]
    for _, extra in events:
        assert extra["region"] == "DE" and extra["window"] == DE_20 and extra["run_id"] == dr.run_id
        assert extra["report"] == f"s3://{bucket}/qa/DE/{DE_20}/runs/{run_key(dr.run_id)}/report.json"
        assert extra["counts"] == {"photos": 3, **de["by_status"]}


def test_a_dry_run_masks_nothing_publishes_nothing_and_leaves_the_latest_report(monkeypatch, bucket_env):
    s3, bucket, _ = bucket_env
    dag = load_dag(monkeypatch)
    dr = dag.test(run_conf={**DE_CONF, "dry_run": True})
    assert dr.state == "success"
    assert _objects(s3, bucket, "masked/") == {} and _objects(s3, bucket, "audit/") == {}
    assert _asset_events(dr.run_id) == []
    assert f"qa/DE/{DE_20}/report.json" not in _objects(s3, bucket, "qa/")  # not the window's latest
    own = json.loads(s3.get_object(Bucket=bucket, Key=f"qa/DE/{DE_20}/runs/{run_key(dr.run_id)}/report.json")["Body"].read())
    assert own["dry_run"] and own["would_process"] == 3
    assert "runs/DE/locks/2026-11-20.json" not in _objects(s3, bucket, "runs/")  # a dry run takes no lock


def _live_run(run_id: str, state: str = "running", dag_id: str = "plate_masking"):
    """A run of ``dag_id`` in the metadata DB (what the scheduler would have created)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        existing = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one_or_none()
        if existing is None:
            session.add(DagRun(dag_id=dag_id, run_id=run_id, run_type="manual", state=state,
                               run_after=datetime(2026, 11, 21, 1, tzinfo=timezone.utc), conf={}))
        else:
            existing.state = state


def test_a_second_run_of_a_window_waits_for_the_first_then_takes_over_a_dead_ones_lock(monkeypatch, bucket_env, capfd):
    s3, bucket, keys = bucket_env
    monkeypatch.setenv("PLATEMASK_LOCK_WAIT_MINUTES", "0")  # fail at once instead of waiting
    dag = load_dag(monkeypatch)
    holder = f"manual__holder-{uuid.uuid4().hex[:6]}"
    _live_run(holder)
    lock = {"state": "held", "run_id": holder, "run_key": run_key(holder), "region": "DE", "window": DE_20,
            "since": "2026-11-21T01:00:00+00:00"}
    s3.put_object(Bucket=bucket, Key="runs/DE/locks/2026-11-20.json", Body=json.dumps(lock).encode())
    dr = dag.test(run_conf={**DE_CONF, "max_images": 1})
    assert dr.state == "failed" and _ti_states(dr)["hold"] == "failed"
    captured = capfd.readouterr()
    assert f"region DE window {DE_20} is being masked by run {holder}" in captured.out + captured.err
    assert _objects(s3, bucket, "masked/") == {} and _asset_events(dr.run_id) == []
    assert json.loads(s3.get_object(Bucket=bucket, Key="runs/DE/locks/2026-11-20.json")["Body"].read()) == lock  # untouched
    assert f"qa/DE/{DE_20}/report.json" not in _objects(s3, bucket, "qa/")  # no latest report from a run without the lock

    _live_run(holder, state="failed")  # the holder died without releasing its lock
    dr2 = load_dag(monkeypatch).test(run_conf=DE_CONF)  # a fresh DAG: dag.test() keeps the last run's conf in its params
    assert dr2.state == "success"
    assert sorted(_objects(s3, bucket, "masked/")) == sorted(k.replace("raw/", "masked/", 1) for k in keys[("DE", "20")])
    released = json.loads(s3.get_object(Bucket=bucket, Key="runs/DE/locks/2026-11-20.json")["Body"].read())
    assert released["run_id"] == dr2.run_id and released["state"] == "released"
    assert _report(s3, bucket, "DE", DE_20)["run_id"] == dr2.run_id


def test_a_manual_run_waits_for_the_regions_nightly_run_of_the_same_window(monkeypatch, bucket_env, capfd):
    """The nightly DAG plate_masking_de and the manual plate_masking share DE's region-window lock: the lock
    names the DAG that holds it, so the manual run sees the nightly run as live (not a dead lock to take over)."""
    from types import SimpleNamespace

    from platemask.airflow_support import hold_locks
    from platemask.runspec import RunSpec
    from platemask.settings import Settings

    s3, bucket, _ = bucket_env
    monkeypatch.setenv("PLATEMASK_LOCK_WAIT_MINUTES", "0")
    nightly = f"scheduled__{uuid.uuid4().hex[:6]}"
    spec = RunSpec(region="DE", window_start="2026-11-20T00:00:00+01:00", window_end="2026-11-21T00:00:00+01:00",
                   run_id=nightly)
    # what the nightly run's hold task does (its DAG's run is live in the DB)
    _live_run(nightly, dag_id="plate_masking_de")
    done, _ = hold_locks({"dag_run": SimpleNamespace(dag_id="plate_masking_de")}, Settings.load(), [spec.as_dict()])
    assert done
    dr = load_dag(monkeypatch).test(run_conf=DE_CONF)
    assert dr.state == "failed" and _ti_states(dr)["hold"] == "failed"
    captured = capfd.readouterr()
    assert f"region DE window {DE_20} is being masked by run {nightly} of plate_masking_de" in captured.out + captured.err
    assert _objects(s3, bucket, "masked/") == {}


def test_one_bad_photo_fails_alone_and_its_shard_goes_on(monkeypatch, bucket_env):
    """A permanent S3 500 on one photo's audit record and a legal 1,020-byte key whose audit key is over
    S3's limit: each gives that photo one failed record; the rest of their shards are masked."""
    s3, bucket, keys = bucket_env
    from platemask.training.synth import synth_car_scene

    img, _, _ = synth_car_scene(np.random.default_rng(3), plate_width=(120, 160))
    long_key = "raw/DE/2026/11/20/" + "x" * 998 + ".jpg"
    assert len(long_key.encode()) == 1020
    s3.put_object(Bucket=bucket, Key=long_key, Body=jpeg_bytes(img))
    bad_audit = "audit/DE/2026/11/20/car1.jpg.json"
    _inject_faults(monkeypatch, lambda op, p: _client_error(op, "InternalError", 500, "We encountered an internal error")
                   if op == "PutObject" and p.get("Key") == bad_audit else None)
    dag = load_dag(monkeypatch)
    dr = dag.test(run_conf=DE_CONF)
    assert dr.state == "success" and _ti_states(dr)["process.mask"] == "success,success"
    recs = {r["key"]: r for r in _records(s3, bucket, "DE", DE_20, dr.run_id)}
    car1 = recs["raw/DE/2026/11/20/car1.jpg"]
    assert car1["status"] == "failed" and car1["reason"] == "audit_write_failed" and bad_audit in car1["error"]
    # never published without its record: the masked copy written before the failure is removed again
    assert car1["unaudited_masked_copy"] is None and "masked/DE/2026/11/20/car1.jpg was removed" in car1["error"]
    assert "masked/DE/2026/11/20/car1.jpg" not in _objects(s3, bucket, "masked/")
    assert recs[long_key]["status"] == "failed" and recs[long_key]["reason"] == "key_too_long"
    assert "1027 bytes" in recs[long_key]["error"]
    assert long_key.replace("raw/", "masked/", 1) not in _objects(s3, bucket, "masked/")  # checked before publishing
    for k in ("raw/DE/2026/11/20/car0.jpg", "raw/DE/2026/11/20/car2.jpg"):  # their shard mates are masked
        assert recs[k]["status"] == "masked"
    rep = _report(s3, bucket, "DE", DE_20)
    assert rep["by_status"] == {"masked": 2, "no_plate": 0, "failed": 2}
    assert set(rep["failures_by_reason"]) == {"audit_write_failed", "key_too_long"}  # none "shard_failed"
    _assert_accounted(s3, bucket, "DE", DE_20, dr.run_id, rep)
    assert [e["region"] for _, e in _asset_events(dr.run_id)] == ["DE", "DE"]


def test_late_photos_of_a_day_whose_lock_a_dead_run_left_held_are_picked_up(monkeypatch, bucket_env):
    """A run that ended without releasing its day lock (its release task failed for good, or never ran) left the
    19th's lock held. Every later night logged "late photos left to run X, which holds that night" and
    skipped the 19th: a photo uploaded there late had no record in any run, and the nights were green.
    A held lock of a run that is no longer queued or running no longer keeps them out."""
    from platemask.runs import collect
    from platemask.runspec import RunSpec
    from platemask.settings import Settings

    s3, bucket, keys = bucket_env
    monkeypatch.setenv("PLATEMASK_LATE_DAYS", "1")
    dead = f"manual__dead-{uuid.uuid4().hex[:6]}"
    _live_run(dead, state="failed")
    lock = {"state": "held", "run_id": dead, "run_key": run_key(dead), "region": "DE", "dag_id": "plate_masking",
            "window": "20261118T2300Z-20261119T2300Z", "since": "2026-11-20T01:00:00+00:00"}
    s3.put_object(Bucket=bucket, Key="runs/DE/locks/2026-11-19.json", Body=json.dumps(lock).encode())
    (late,) = keys[("DE", "19")]  # no audit record: never masked
    night_19 = RunSpec(region="DE", run_id=dead, window_start="2026-11-18T23:00:00+00:00",
                       window_end="2026-11-19T23:00:00+00:00")
    collect(s3, Settings.load(), night_19, log=lambda m: None)  # the dead run collected its day, then died
    dr = load_dag(monkeypatch).test(run_conf=DE_CONF)
    assert dr.state == "success"
    rep = _report(s3, bucket, "DE", DE_20)
    assert rep["late"] == 1 and late in {r["key"] for r in _records(s3, bucket, "DE", DE_20, dr.run_id)}
    assert late.replace("raw/", "masked/", 1) in _objects(s3, bucket, "masked/")
    _assert_accounted(s3, bucket, "DE", DE_20, dr.run_id, rep)
    # the Asset events say that one of the 4 photos counted is a late photo of the 19th, not of the window
    assert [(e["counts"]["photos"], e["late"]) for _, e in _asset_events(dr.run_id)] == [(4, 1), (4, 1)]
    # picked up under the 19th's lock, taken over from the dead run and released with the run's own
    taken = json.loads(s3.get_object(Bucket=bucket, Key="runs/DE/locks/2026-11-19.json")["Body"].read())
    assert (taken["run_id"], taken["state"]) == (dr.run_id, "released")
    # a live holder keeps its day: its late photos stay its own
    s3.put_object(Bucket=bucket, Key="runs/DE/locks/2026-11-19.json", Body=json.dumps(lock).encode())
    s3.delete_object(Bucket=bucket, Key=late.replace("raw/", "audit/", 1) + ".json")
    spec = RunSpec(region="DE", run_id="manual__other", window_start="2026-11-19T23:00:00+00:00",
                   window_end="2026-11-20T23:00:00+00:00")
    got = collect(s3, Settings.load(), spec, log=lambda m: None, is_live=lambda held: held["run_id"] == dead)
    assert got["late"] == 0


def _clear_and_rerun(dag, dr, task_ids: list[str]) -> str:
    """What an operator's "Clear" of ``task_ids`` in a finished run does (airflow tasks clear, the UI's Clear),
    then the scheduler's part, as dag.test() runs it: those task instances run again in the same run, the others
    keep their state and XComs. Returns the run's new state."""
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance, clear_task_instances
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.state import DagRunState, TaskInstanceState

    session = settings.Session()
    tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dr.dag_id, TaskInstance.run_id == dr.run_id,
                                             TaskInstance.task_id.in_(task_ids)).all()
    assert {ti.task_id for ti in tis} == set(task_ids)
    clear_task_instances(tis, session, dag_run_state=DagRunState.QUEUED)
    session.commit()
    run = session.query(DagRun).filter(DagRun.dag_id == dr.dag_id, DagRun.run_id == dr.run_id).one()
    run.dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    run.state = DagRunState.RUNNING
    session.commit()
    while run.state == DagRunState.RUNNING:
        session.expire_all()
        schedulable, _ = run.update_state(session=session)
        for ti in schedulable:
            if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                ti.try_number += 1
            ti.state = TaskInstanceState.SCHEDULED
        session.commit()
        for ti in [t for t in run.get_task_instances(session=session) if t.state == TaskInstanceState.SCHEDULED]:
            _run_task(ti=ti, task=dag.task_dict[ti.task_id], run_triggerer=True)
    state = str(run.state)
    session.close()
    return state


def test_a_qa_or_publish_task_cleared_after_a_newer_run_emits_no_asset_event_for_stale_qa(monkeypatch, bucket_env, capfd):
    """Run A masked the window and published; a day later run B redid it (a photo re-uploaded) and its report became
    the window's latest. An operator then cleared A's qa task (or its publish task): A's report, no longer the
    window's, passed its check and publish emitted masked/qa Asset events for it again, so the Asset's consumers
    acted on stale QA. publish now emits only for the window's current report, else skips saying why and what to
    do (rerun the whole window)."""
    s3, bucket, keys = bucket_env
    dag_a = load_dag(monkeypatch)
    a = dag_a.test(run_conf=DE_CONF)
    assert a.state == "success" and len(_asset_events(a.run_id)) == 2
    s3.put_object(Bucket=bucket, Key=keys[("DE", "20")][0], Body=s3.get_object(
        Bucket=bucket, Key=keys[("DE", "20")][1])["Body"].read())  # re-uploaded, then the window is run again
    b = load_dag(monkeypatch).test(run_conf=DE_CONF)
    assert b.state == "success" and len(_asset_events(b.run_id)) == 2
    latest = _report(s3, bucket, "DE", DE_20)
    assert latest["run_id"] == b.run_id and latest["processed_this_run"] == 1
    capfd.readouterr()

    for cleared in (["qa", "check", "publish", "release", "watcher"], ["publish", "watcher"]):
        assert _clear_and_rerun(dag_a, a, cleared) == "success"
        states = _ti_states(a)
        assert states["publish"] == "skipped" and states["qa"] == "success", states
        assert len(_asset_events(a.run_id)) == 2, "an Asset event for a report that is not the window's"
        out = capfd.readouterr()
        assert f"is not the window's current one: s3://{bucket}/qa/DE/{DE_20}/report.json is now run {b.run_id}'s" \
            in out.out + out.err and "rerun the whole window" in out.out + out.err
        assert _report(s3, bucket, "DE", DE_20) == latest  # B's report stays the window's
    # the window's current run cleared the same way still publishes: its report is the window's
    assert _clear_and_rerun(load_dag(monkeypatch), b, ["publish", "watcher"]) == "success"
    assert len(_asset_events(b.run_id)) == 4


DE_21 = "20261120T2300Z-20261121T2300Z"


def test_in_a_backfill_the_next_days_run_leaves_a_day_to_its_own_run_not_yet_started(monkeypatch, bucket_env):
    """A backfill runs two nights at once (or --reverse). The 21st's run got to collect before the 20th's run
    reached hold: none of the 20th's photos had an audit record, so it masked the whole 20th as its "late"
    photos; the 20th's own run then found every photo done (processed 0) and its QA said nothing of its own day.
    Late pick-up now takes only photos of a day a run of its own has collected (collect marks its whole days);
    a day not collected yet is left to its run (while a later night's late pick-up can still reach it: the 19th,
    the 21st's last late day, never had a run and is picked up) and named in the QA report. A photo uploaded into
    the 20th after its run is still the next night's late photo."""
    s3, bucket, keys = bucket_env
    monkeypatch.setenv("PLATEMASK_LATE_DAYS", "2")
    night_21 = {"region": "DE", "window_start": "2026-11-21", "window_end": "2026-11-22", "max_failure_rate": 0.5}
    first = load_dag(monkeypatch).test(run_conf=night_21)  # the 21st's run first
    assert first.state == "success"
    rep_21 = _report(s3, bucket, "DE", DE_21)
    assert rep_21["late"] == 1 and rep_21["images"] == 2, rep_21["by_status"]  # the 19th's photo, on its last night
    assert rep_21["late_days_not_collected"] == ["2026-11-20"]
    assert _manifest(s3, bucket, "DE", DE_21, first.run_id) == sorted(keys[("DE", "19")] + keys[("DE", "21")])
    own = load_dag(monkeypatch).test(run_conf=DE_CONF)  # then the 20th's own run: its day is its own
    assert own.state == "success"
    rep_20 = _report(s3, bucket, "DE", DE_20)
    assert rep_20["processed_this_run"] == 3 and rep_20["skipped_already_masked"] == 0
    assert rep_20["by_status"]["masked"] == 3 and rep_20["late_days_not_collected"] == ["2026-11-19"]
    for key in keys[("DE", "20")]:
        audit = json.loads(s3.get_object(Bucket=bucket, Key=key.replace("raw/", "audit/", 1) + ".json")["Body"].read())
        assert audit["run_id"] == own.run_id and audit["window"] == DE_20
    # a photo uploaded into the 20th after its run: the 21st's next run picks it up as late
    late = "raw/DE/2026/11/20/after-its-run.jpg"
    s3.put_object(Bucket=bucket, Key=late, Body=s3.get_object(Bucket=bucket, Key=keys[("DE", "21")][0])["Body"].read())
    again = load_dag(monkeypatch).test(run_conf=night_21)
    assert again.state == "success"
    rep = _report(s3, bucket, "DE", DE_21)
    assert rep["late"] == 1 and rep["late_days_not_collected"] == [] and rep["processed_this_run"] == 1
    assert set(_manifest(s3, bucket, "DE", DE_21, again.run_id)) == {late, *keys[("DE", "21")]}
    _assert_accounted(s3, bucket, "DE", DE_21, again.run_id, rep)


def test_a_mask_task_cleared_after_a_newer_run_of_the_window_does_not_undo_that_runs_masking(monkeypatch, bucket_env,
                                                                                              capfd):
    """Run A's mask task of car2's shard failed (run failed, alert). car2 was re-uploaded, and run B masked the window
    again: car2's new upload masked, B's report the window's latest. Days later an operator cleared A's failed mask
    task, as the alert says: it took the free lock again and masked A's stale manifest: car2, pinned to its old
    ETag, failed source_changed, which removed B's masked copy of the new upload and overwrote its audit record
    with a failure; A's report (of the old upload) became the window's latest and publish emitted Asset events
    for it. A mask task now takes the locks again only when no other run has had those days since its own run
    released them; otherwise it refuses, naming that run, and says to rerun the whole window."""
    s3, bucket, keys = bucket_env
    car2 = keys[("DE", "20")][2]  # alone in the second shard (shard_size 2)
    broken = {"on": True}
    _inject_faults(monkeypatch, lambda op, p: _client_error(op, "AccessDenied", 403, "Access Denied")
                   if broken["on"] and op == "GetObject" and p.get("Key", "").endswith("/shards/0001.jsonl") else None)
    dag_a = load_dag(monkeypatch)
    a = dag_a.test(run_conf=DE_CONF)
    assert a.state == "failed" and _ti_states(a)["process.mask"] == "failed,success"
    broken["on"] = False
    s3.put_object(Bucket=bucket, Key=car2, Body=s3.get_object(Bucket=bucket, Key=keys[("DE", "20")][0])["Body"].read())
    b = load_dag(monkeypatch).test(run_conf=DE_CONF)
    assert b.state == "success" and len(_asset_events(b.run_id)) == 2
    masked_b = _objects(s3, bucket, "masked/")
    audit_b = json.loads(s3.get_object(Bucket=bucket, Key=car2.replace("raw/", "audit/", 1) + ".json")["Body"].read())
    assert audit_b["run_id"] == b.run_id and audit_b["status"] == "masked"
    latest = _report(s3, bucket, "DE", DE_20)
    assert latest["run_id"] == b.run_id
    capfd.readouterr()

    state = _clear_and_rerun(dag_a, a, ["process.mask", "qa", "check", "publish", "release", "watcher"])
    assert state == "failed"
    out = capfd.readouterr()
    assert f"run {b.run_id}" in out.out + out.err and "rerun the whole window" in out.out + out.err
    assert _objects(s3, bucket, "masked/") == masked_b  # B's masked copies stay
    assert json.loads(s3.get_object(Bucket=bucket, Key=car2.replace("raw/", "audit/", 1) + ".json")["Body"].read()) \
        == audit_b
    assert _report(s3, bucket, "DE", DE_20) == latest  # B's report stays the window's
    assert _asset_events(a.run_id) == []


def test_a_qa_task_that_failed_and_is_cleared_makes_its_report_the_windows_latest(monkeypatch, bucket_env):
    """A run masked its window, but its qa task failed (S3 refused the report for a while); release (all_done)
    gave the locks back, and the run failed. Clearing qa, as the alert says, wrote the report without the locks:
    it never became the window's latest report, and publish emitted Asset events for a report the window did not
    show. A cleared qa now takes the window's locks again when no other run has had them since, so its report
    is the window's latest and its events are for the window's current report; release gives them back."""
    s3, bucket, keys = bucket_env
    broken = {"on": True}
    _inject_faults(monkeypatch, lambda op, p: _client_error(op, "AccessDenied", 403, "Access Denied")
                   if broken["on"] and op == "PutObject" and p.get("Key", "").startswith(f"qa/DE/{DE_20}/") else None)
    dag = load_dag(monkeypatch)
    dr = dag.test(run_conf=DE_CONF)
    assert dr.state == "failed" and _ti_states(dr)["qa"] == "failed" and _ti_states(dr)["release"] == "success"
    assert f"qa/DE/{DE_20}/report.json" not in _objects(s3, bucket, "qa/") and _asset_events(dr.run_id) == []
    broken["on"] = False
    assert _clear_and_rerun(dag, dr, ["qa", "check", "publish", "release", "watcher"]) == "success"
    rep = _report(s3, bucket, "DE", DE_20)
    assert rep["run_id"] == dr.run_id and rep["verdict"]["passed"] and rep["lock_held"]
    _assert_accounted(s3, bucket, "DE", DE_20, dr.run_id, rep)
    assert [e["report"] for _, e in _asset_events(dr.run_id)] == \
        [f"s3://{bucket}/qa/DE/{DE_20}/runs/{run_key(dr.run_id)}/report.json"] * 2
    lock = json.loads(s3.get_object(Bucket=bucket, Key="runs/DE/locks/2026-11-20.json")["Body"].read())
    assert (lock["run_id"], lock["state"]) == (dr.run_id, "released")
