"""The DAG as an operator or an attacker triggers it: odd params, windows that have not ended, runs without a
logical date, backfill runs side by side. Real dag.test() runs against moto's S3 server (fixtures of test_dag)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from conftest import jpeg_bytes
from test_dag import (_asset_events, _assert_accounted, _objects, _report, _ti_states, bucket_env,  # noqa: F401
                      load_dag)

BERLIN = ZoneInfo("Europe/Berlin")


def _photo(seed: int) -> bytes:
    from platemask.training.synth import synth_car_scene

    img, _, _ = synth_car_scene(np.random.default_rng(seed), plate_width=(120, 160))
    return jpeg_bytes(img)


def test_a_window_that_has_not_ended_is_refused_not_reported_masked(monkeypatch, bucket_env, capfd):
    """A manual run of today's window (or next year's) listed what was there so far, ended green, became the
    window's latest QA report and emitted Asset events saying the window was masked, while photos kept
    arriving in it."""
    s3, bucket, _ = bucket_env
    today = datetime.now(BERLIN).date()
    s3.put_object(Bucket=bucket, Key=f"raw/DE/{today:%Y/%m/%d}/early.jpg", Body=_photo(5))
    conf = {"region": "DE", "window_start": today.isoformat(), "window_end": (today + timedelta(days=1)).isoformat()}
    dr = load_dag(monkeypatch).test(run_conf=conf)
    assert dr.state == "failed" and _ti_states(dr)["plan"] == "failed"
    out = capfd.readouterr()
    assert "has not ended yet" in out.out + out.err and "window_end" in out.out + out.err
    assert _asset_events(dr.run_id) == []
    assert _objects(s3, bucket, "masked/") == {} and _objects(s3, bucket, "qa/") == {}

    from platemask.runspec import RunError, plan_runs
    from platemask.settings import Settings

    now = datetime(2026, 11, 27, 12, tzinfo=timezone.utc)
    for start, end in (("2030-01-01", "2030-01-02"), ("2026-11-27", "2026-11-28"),
                       ("2026-11-27T00:00", "2026-11-27T13:00:01+00:00")):
        with pytest.raises(RunError, match="has not ended yet"):
            plan_runs(Settings(), {"region": "ALL", "window_start": start, "window_end": end}, run_id="r",
                      data_interval_end=None, now=now)
    # a window that ended (to the second) is a window like any other
    assert plan_runs(Settings(), {"region": "DE", "window_start": "2026-11-26T12:00+00:00",
                                  "window_end": "2026-11-27T12:00+00:00"}, run_id="r", data_interval_end=None, now=now)


def test_a_manual_run_without_a_logical_date_masks_the_day_that_ended_before_it(monkeypatch, bucket_env):
    """Airflow 3 lets a manual run have no logical date (the UI's and the API's default for a DAG without a
    schedule), so it has no data interval: the run failed in plan ("no window: the run has no data interval"),
    though the DAG's docs promise the local day that ended before the trigger."""
    from platemask.windows import nightly_window

    s3, bucket, _ = bucket_env
    night = nightly_window(datetime.now(timezone.utc), "Europe/Berlin")
    day = night.start.astimezone(BERLIN).date()
    key = f"raw/DE/{day:%Y/%m/%d}/car.jpg"
    s3.put_object(Bucket=bucket, Key=key, Body=_photo(6))
    dr = load_dag(monkeypatch).test(logical_date=None, run_conf={"region": "DE", "max_failure_rate": 0.5})
    assert dr.logical_date is None and dr.state == "success"
    window = nightly_window(dr.run_after, "Europe/Berlin")
    assert window == night  # (a trigger a few seconds before midnight would make this one day off)
    rep = _report(s3, bucket, "DE", window.id)
    assert rep["run_id"] == dr.run_id and rep["by_status"]["masked"] == 1
    assert key.replace("raw/", "masked/", 1) in _objects(s3, bucket, "masked/")
    _assert_accounted(s3, bucket, "DE", window.id, dr.run_id, rep)
    assert [e["window"] for _, e in _asset_events(dr.run_id)] == [window.id] * 2


def test_a_backfill_whose_conf_names_a_window_is_refused_not_green_for_nights_it_never_masked(monkeypatch, bucket_env):
    """`airflow backfill create --dag-run-conf` may set the other Params (the README's example); with a
    window_start/window_end in it every backfill run planned that one window instead of its own night: a
    backfill of three nights masked one window three times, and each night's run would end green, its night
    unmasked. The plan of a scheduled or backfill run now refuses an explicit window, naming the run's own."""
    from datetime import date

    from airflow.models.backfill import Backfill, _create_backfill
    from airflow.models.dagrun import DagRun
    from airflow.sdk.exceptions import AirflowFailException
    from airflow.utils.session import create_session

    from platemask.airflow_support import plan_from_context
    from platemask.schedules import backfill_bounds
    from platemask.settings import Settings
    from test_dag import merged_params

    dag = load_dag(monkeypatch, "plate_masking_th")
    load_dag(monkeypatch).test(run_conf={"region": "TH", "dry_run": True})  # writes the DAG folder's DAGs to the DB
    start, end = backfill_bounds(date(2026, 10, 10), date(2026, 10, 12))  # nights no other test backfills
    conf = {"window_start": "2026-11-01", "window_end": "2026-11-02", "max_failure_rate": 0.1}
    bf = _create_backfill(dag_id="plate_masking_th", from_date=start, to_date=end, max_active_runs=2, reverse=False,
                          dag_run_conf=conf, triggering_user_name="test")
    with create_session() as session:
        session.query(Backfill).filter(Backfill.id == bf.id).update({"completed_at": datetime.now(timezone.utc)})
        runs = session.query(DagRun).filter(DagRun.backfill_id == bf.id).order_by(DagRun.logical_date).all()
        assert len(runs) == 3
        for r in runs:
            context = {"dag_run": r, "params": merged_params(dag, r.conf), "data_interval_end": r.data_interval_end}
            with pytest.raises(AirflowFailException, match="backfill run of the night .*2026-10-1[012].*window_start"):
                plan_from_context(context, Settings.load())
            # the same run without the window plans its own night
            context["params"] = merged_params(dag, {"max_failure_rate": 0.1})
            (spec,) = plan_from_context(context, Settings.load())
            assert spec["window_end"] == r.data_interval_end.isoformat()


def test_a_manual_run_with_a_logical_date_ahead_is_refused_not_reported_masked(monkeypatch, bucket_env, capfd):
    """Airflow 3 runs a manual trigger with a logical date in the future at once (its run_after is the trigger
    time) with that date's data interval: a manual run dated next year masked the (empty) day before it,
    ended green and emitted Asset events saying that day was masked, a year before it happened."""
    s3, bucket, _ = bucket_env
    ahead = datetime.now(timezone.utc) + timedelta(days=400)
    dr = load_dag(monkeypatch).test(logical_date=ahead, run_conf={"region": "DE"})
    assert dr.state == "failed" and _ti_states(dr)["plan"] == "failed"
    out = capfd.readouterr()
    assert "has not ended yet" in out.out + out.err
    assert _asset_events(dr.run_id) == [] and _objects(s3, bucket, "qa/") == {}

    from platemask.runspec import RunError, plan_runs
    from platemask.settings import Settings

    now = datetime(2026, 11, 27, 12, tzinfo=timezone.utc)
    with pytest.raises(RunError, match="has not ended yet"):
        plan_runs(Settings(), {"region": "DE"}, run_id="r", data_interval_end=now + timedelta(days=2), now=now,
                  run_type="manual")
    (spec,) = plan_runs(Settings(), {"region": "DE"}, run_id="r", data_interval_end=now, now=now, run_type="manual")
    assert spec.window.end <= now


def test_a_run_that_never_got_the_lock_says_so_in_its_qa_report_not_that_collect_failed(monkeypatch, bucket_env):
    """When hold gave up waiting for another run's lock, collect never ran (upstream_failed), yet the run's QA
    report said "not collected: its collect task failed (see the task log)": a reviewer was sent to a log that
    does not exist, and not to the run that holds the window."""
    from test_dag import DE_CONF, _live_run

    from platemask.runspec import run_key

    s3, bucket, _ = bucket_env
    monkeypatch.setenv("PLATEMASK_LOCK_WAIT_MINUTES", "0")
    holder = "manual__holder-of-the-20th"
    _live_run(holder)
    s3.put_object(Bucket=bucket, Key="runs/DE/locks/2026-11-20.json", Body=json.dumps(
        {"state": "held", "run_id": holder, "region": "DE", "dag_id": "plate_masking", "since": "2026-11-21T01:00"}))
    dr = load_dag(monkeypatch).test(run_conf=DE_CONF)
    assert dr.state == "failed" and _ti_states(dr)["hold"] == "failed" and _ti_states(dr)["collect"] == "upstream_failed"
    own = json.loads(s3.get_object(Bucket=bucket, Key=f"qa/DE/20261119T2300Z-20261120T2300Z/runs/{run_key(dr.run_id)}"
                                                      "/report.json")["Body"].read())
    (problem,) = own["verdict"]["problems"]
    assert problem.startswith("not collected") and "hold" in problem and "collect task failed" not in problem
    assert _asset_events(dr.run_id) == []


def test_a_window_in_which_every_photo_failed_never_passes_whatever_max_failure_rate_says(monkeypatch, bucket_env):
    """max_failure_rate is a Param the operator may set up to 1: with it at 1 a window whose every photo failed
    (nothing masked, nothing found plate-free) ended green, became the window's latest report as "passed" and
    emitted Asset events saying the window was masked, though none of its photos was checked."""
    s3, bucket, _ = bucket_env
    for name in ("a.jpg", "b.jpg"):
        s3.put_object(Bucket=bucket, Key=f"raw/DE/2026/11/22/{name}", Body=b"\xff\xd8\xff\xe0 not really a jpeg")
    window = "20261121T2300Z-20261122T2300Z"
    conf = {"region": "DE", "window_start": "2026-11-22", "window_end": "2026-11-23", "max_failure_rate": 1}
    dr = load_dag(monkeypatch).test(run_conf=conf)
    rep = _report(s3, bucket, "DE", window)
    assert rep["run_id"] == dr.run_id and rep["by_status"] == {"masked": 0, "no_plate": 0, "failed": 2}
    assert dr.state == "failed" and _ti_states(dr)["check"] == "failed"
    assert rep["verdict"]["passed"] is False
    (problem,) = rep["verdict"]["problems"]
    assert "every one of the 2 photo(s) failed" in problem and "max_failure_rate" in problem
    assert _asset_events(dr.run_id) == []
    _assert_accounted(s3, bucket, "DE", window, dr.run_id, rep)


def test_with_one_late_day_a_backfills_next_night_leaves_the_day_to_its_queued_run(monkeypatch, bucket_env):
    """late_days=1: the 20th is the 21st's only late day, so its last: a backfill of the 20th and the 21st whose
    21st's night got to collect first must still leave the 20th to the backfill's own run of it, queued (asked of
    Airflow through the real Execution API: the unit tests only stand in for it), instead of masking the whole
    20th as its late photos. Guard: checked against the real backfill, it already held."""
    from datetime import date

    from airflow.models.backfill import Backfill, ReprocessBehavior, _create_backfill
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    from platemask.schedules import backfill_bounds
    from test_dag import DE_20, DE_CONF, _manifest

    s3, bucket, keys = bucket_env
    monkeypatch.setenv("PLATEMASK_LATE_DAYS", "1")
    load_dag(monkeypatch).test(run_conf={"region": "TH", "dry_run": True})  # writes the DAG folder's DAGs to the DB
    start, end = backfill_bounds(date(2026, 11, 20), date(2026, 11, 21))
    bf = _create_backfill(dag_id="plate_masking_de", from_date=start, to_date=end, max_active_runs=2, reverse=True,
                          dag_run_conf={"max_failure_rate": 0.5}, triggering_user_name="test",
                          reprocess_behavior=ReprocessBehavior.FAILED)  # (another test's run of the 20th: again)
    try:
        with create_session() as session:
            runs = session.query(DagRun).filter(DagRun.backfill_id == bf.id).order_by(DagRun.logical_date).all()
            assert [(r.logical_date.astimezone(BERLIN).date().day, str(r.state)) for r in runs] == \
                [(20, "queued"), (21, "queued")]
        night_21 = dict(DE_CONF, window_start="2026-11-21", window_end="2026-11-22")
        dr = load_dag(monkeypatch).test(run_conf=night_21)  # the 21st's night collects before the 20th's run started
        assert dr.state == "success"
        rep = _report(s3, bucket, "DE", "20261120T2300Z-20261121T2300Z")
        assert rep["late"] == 0 and rep["late_days_not_collected"] == ["2026-11-20"], rep["late_days_not_collected"]
        assert _manifest(s3, bucket, "DE", "20261120T2300Z-20261121T2300Z", dr.run_id) == keys[("DE", "21")]
        assert not any(k.startswith("masked/DE/2026/11/20/") for k in _objects(s3, bucket, "masked/"))
        own = load_dag(monkeypatch).test(run_conf=DE_CONF)  # the 20th's own run masks its own day (and the 19th,
        rep_20 = _report(s3, bucket, "DE", DE_20)  # no run of which is queued, on the last night that reaches it)
        assert own.state == "success" and rep_20["processed_this_run"] == 4 and rep_20["late"] == 1
        assert sorted(_manifest(s3, bucket, "DE", DE_20, own.run_id)) == sorted(keys[("DE", "19")] + keys[("DE", "20")])
    finally:
        with create_session() as session:  # no queued run of the 20th left for the next tests' late pick-up
            session.query(Backfill).filter(Backfill.id == bf.id).update({"completed_at": datetime.now(timezone.utc)})
            session.query(DagRun).filter(DagRun.backfill_id == bf.id).update({"state": "failed"})


def test_a_collect_retried_after_it_took_a_late_days_lock_gives_it_back_naming_the_run_that_masked_the_day(
        monkeypatch, bucket_env, capfd):
    """The 21st's collect took the 20th's lock to look for late photos (replacing the released lock of the run
    that masked the 20th), then S3 refused the listing of that day; its retry found the lock already its own,
    found nothing late there and gave the lock back as a bare released lock naming no run: the lock no longer
    said which run masked the 20th, and the log said nothing of it. The retry now puts back the document the
    first try replaced (kept in the lock it took)."""
    from test_dag import DE_CONF, _inject_faults

    s3, bucket, keys = bucket_env
    monkeypatch.setenv("PLATEMASK_LATE_DAYS", "1")
    monkeypatch.setenv("PLATEMASK_RETRIES", "1")
    refused = {"armed": False, "count": 0}

    def fault(op, params):
        if refused["armed"] and op == "ListObjectsV2" and params.get("Prefix") == "raw/DE/2026/11/20/":
            refused["armed"] = False
            refused["count"] += 1
            from test_dag import _client_error
            return _client_error(op, "AccessDenied", 403, "Access Denied")
        return None

    _inject_faults(monkeypatch, fault)
    lock_key = "runs/DE/locks/2026-11-20.json"
    night_20 = load_dag(monkeypatch).test(run_conf=DE_CONF)
    assert night_20.state == "success"
    before = json.loads(s3.get_object(Bucket=bucket, Key=lock_key)["Body"].read())
    assert (before["run_id"], before["state"]) == (night_20.run_id, "released")
    capfd.readouterr()
    refused["armed"] = True
    night_21 = load_dag(monkeypatch).test(run_conf=dict(DE_CONF, window_start="2026-11-21", window_end="2026-11-22"))
    assert refused["count"] == 1 and night_21.state == "success"
    assert _ti_states(night_21)["collect"] == "success"
    rep = _report(s3, bucket, "DE", "20261120T2300Z-20261121T2300Z")
    assert rep["late"] == 0 and rep["run_id"] == night_21.run_id
    after = json.loads(s3.get_object(Bucket=bucket, Key=lock_key)["Body"].read())
    assert (after["run_id"], after["state"]) == (night_20.run_id, "released"), after
    assert {k: v for k, v in after.items() if k != "looked"} == before
    assert after["looked"]["run_id"] == night_21.run_id and after["looked"]["took"] == 0
    out = capfd.readouterr()
    assert f"given back by run {night_21.run_id}" in out.out + out.err
    assert f"naming run {night_20.run_id} again" in out.out + out.err


def test_a_conf_key_that_is_no_param_is_refused_not_ignored(monkeypatch, bucket_env, capfd):
    """Airflow keeps any key of a trigger's conf (the API, the CLI's --conf, a backfill's --dag-run-conf): a run
    triggered with {"dryrun": true} (meant: dry_run) ignored the key, masked the window for real, made its report
    the window's latest and emitted Asset events. plan now refuses a conf key that is no Param, naming the
    Param it looks like; nothing is masked or reported."""
    from test_dag import DE_CONF

    s3, bucket, _ = bucket_env
    dr = load_dag(monkeypatch).test(run_conf=dict(DE_CONF, dryrun=True))
    assert dr.state == "failed" and _ti_states(dr)["plan"] == "failed"
    out = capfd.readouterr()
    assert "'dryrun'" in out.out + out.err and "did you mean dry_run" in out.out + out.err
    assert _objects(s3, bucket, "masked/") == {} and _objects(s3, bucket, "qa/") == {}
    assert _asset_events(dr.run_id) == []


def test_a_collect_that_failed_for_good_after_taking_a_late_days_lock_does_not_pass_for_a_run_that_had_the_day(
        monkeypatch, bucket_env, capfd):
    """The 21st's collect took the 20th's lock to look for late photos, then failed for good (S3 refused that
    day's listing): release gave the lock back released in the 21st's name, as if that run had masked the 20th.
    A task of the 20th's run cleared afterwards (its qa, what the failure alert suggests) was then told that run
    21 'has had the day since: it masked that day again or picked up its late photos', untrue, and its report
    could no longer become the window's latest. A look that never finished now puts the lock back as it was."""
    from test_dag import DE_20, DE_CONF, _clear_and_rerun, _client_error, _inject_faults

    s3, bucket, keys = bucket_env
    monkeypatch.setenv("PLATEMASK_LATE_DAYS", "1")
    refused = {"on": False}
    _inject_faults(monkeypatch, lambda op, p: _client_error(op, "AccessDenied", 403, "Access Denied")
                   if refused["on"] and op == "ListObjectsV2" and p.get("Prefix") == "raw/DE/2026/11/20/" else None)
    lock_key = "runs/DE/locks/2026-11-20.json"
    dag_20 = load_dag(monkeypatch)
    night_20 = dag_20.test(run_conf=DE_CONF)
    assert night_20.state == "success" and len(_asset_events(night_20.run_id)) == 2
    before = json.loads(s3.get_object(Bucket=bucket, Key=lock_key)["Body"].read())
    refused["on"] = True
    night_21 = load_dag(monkeypatch).test(run_conf=dict(DE_CONF, window_start="2026-11-21", window_end="2026-11-22"))
    assert night_21.state == "failed" and _ti_states(night_21)["collect"] == "failed"
    refused["on"] = False
    after = json.loads(s3.get_object(Bucket=bucket, Key=lock_key)["Body"].read())
    assert (after["run_id"], after["state"]) == (night_20.run_id, "released"), after
    assert {k: v for k, v in after.items() if k != "looked"} == before and after["looked"]["run_id"] == night_21.run_id
    # the 21st's own day is released in its name as usual
    assert json.loads(s3.get_object(Bucket=bucket, Key="runs/DE/locks/2026-11-21.json")["Body"].read())[
        "run_id"] == night_21.run_id
    capfd.readouterr()
    assert _clear_and_rerun(dag_20, night_20, ["qa", "check", "publish", "release", "watcher"]) == "success"
    out = capfd.readouterr()
    assert "has had its days since" not in out.out + out.err
    rep = _report(s3, bucket, "DE", DE_20)
    assert rep["run_id"] == night_20.run_id and rep["lock_held"]
    assert len(_asset_events(night_20.run_id)) == 4  # the cleared qa's report is the window's current one


def test_a_day_whose_queued_run_is_a_dry_run_is_not_left_to_it_on_the_last_night_that_reaches_it(monkeypatch,
                                                                                               bucket_env):
    """late_days=1: the 21st's night is the last that reaches the 20th, no run of which had collected it. A run of
    the 20th was queued, so the 20th was left to it, but that run was a dry run (a backfill with
    --dag-run-conf '{"dry_run": true}', to see what it would do): it collects nothing for good and marks no day,
    and no later night reaches the 20th, so its photos were never masked and had no record. Only a queued or
    running run that will collect the day (no dry_run, no max_images) keeps it from the last night now."""
    from datetime import date

    from airflow.models.backfill import Backfill, ReprocessBehavior, _create_backfill
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    from platemask.schedules import backfill_bounds
    from test_dag import DE_CONF, _manifest

    s3, bucket, keys = bucket_env
    monkeypatch.setenv("PLATEMASK_LATE_DAYS", "1")
    load_dag(monkeypatch).test(run_conf={"region": "TH", "dry_run": True})  # writes the DAG folder's DAGs to the DB
    start, end = backfill_bounds(date(2026, 11, 20), date(2026, 11, 20))
    bf = _create_backfill(dag_id="plate_masking_de", from_date=start, to_date=end, max_active_runs=1, reverse=False,
                          dag_run_conf={"dry_run": True}, triggering_user_name="test",
                          reprocess_behavior=ReprocessBehavior.FAILED)  # (another test's run of the 20th: again)
    try:
        with create_session() as session:
            (run,) = session.query(DagRun).filter(DagRun.backfill_id == bf.id).all()
            assert str(run.state) == "queued" and run.conf == {"dry_run": True}
        window = "20261120T2300Z-20261121T2300Z"
        dr = load_dag(monkeypatch).test(run_conf=dict(DE_CONF, window_start="2026-11-21", window_end="2026-11-22"))
        assert dr.state == "success"
        rep = _report(s3, bucket, "DE", window)
        assert rep["late"] == 3 and rep["late_days_not_collected"] == [], rep["late_days_not_collected"]
        assert sorted(_manifest(s3, bucket, "DE", window, dr.run_id)) == sorted(keys[("DE", "20")] + keys[("DE", "21")])
        assert all(k.replace("raw/", "masked/", 1) in _objects(s3, bucket, "masked/") for k in keys[("DE", "20")])
        _assert_accounted(s3, bucket, "DE", window, dr.run_id, rep)
    finally:
        with create_session() as session:  # no queued run of the 20th left for the next tests' late pick-up
            session.query(Backfill).filter(Backfill.id == bf.id).update({"completed_at": datetime.now(timezone.utc)})
            session.query(DagRun).filter(DagRun.backfill_id == bf.id).update({"state": "failed"})


def test_a_whole_run_cleared_after_it_masked_a_late_photo_still_counts_as_having_had_that_day(monkeypatch,
                                                                                             bucket_env, capfd):
    """The 20th's run failed (car2's shard); car2 was re-uploaded and the 21st's night masked it as a late photo
    under the 20th's lock, but its release failed (S3 refused the write), so it still held that lock. The 21st's
    whole run was then cleared (the UI's Clear of a run): its collect found the 20th's lock its own, nothing late
    there any more (car2 was its own work), and gave the lock back as a look that took nothing (naming no run,
    or the 20th's). The 20th's failed mask task, cleared next as its alert says, took the lock again and masked its
    stale manifest: car2, pinned to its old upload, failed source_changed and removed the 21st's masked copy of
    the new upload. A run that kept a late day's lock before keeps it (it had the day)."""
    from test_dag import DE_CONF, _clear_and_rerun, _client_error, _inject_faults

    s3, bucket, keys = bucket_env
    car2 = keys[("DE", "20")][2]  # alone in the second shard (shard_size 2)
    broken = {"shard": True, "release": False}

    def fault(op, p):
        key = p.get("Key", "")
        if broken["shard"] and op == "GetObject" and key.endswith("/shards/0001.jsonl"):
            return _client_error(op, "AccessDenied", 403, "Access Denied")
        body = p.get("Body", b"")
        body = body.getvalue() if hasattr(body, "getvalue") else body
        if broken["release"] and op == "PutObject" and key == "runs/DE/locks/2026-11-20.json" \
                and json.loads(body).get("state") == "released":
            return _client_error(op, "AccessDenied", 403, "Access Denied")
        return None

    _inject_faults(monkeypatch, fault)
    dag_20 = load_dag(monkeypatch)
    night_20 = dag_20.test(run_conf=DE_CONF)
    assert night_20.state == "failed" and _ti_states(night_20)["process.mask"] == "failed,success"
    broken.update(shard=False, release=True)
    s3.put_object(Bucket=bucket, Key=car2, Body=s3.get_object(Bucket=bucket, Key=keys[("DE", "20")][0])["Body"].read())
    monkeypatch.setenv("PLATEMASK_LATE_DAYS", "1")  # (the 20th's run took none of the 19th's)
    dag_21 = load_dag(monkeypatch)
    night_21 = dag_21.test(run_conf=dict(DE_CONF, window_start="2026-11-21", window_end="2026-11-22"))
    assert night_21.state == "failed" and _ti_states(night_21)["release"] == "failed", _ti_states(night_21)
    assert _report(s3, bucket, "DE", "20261120T2300Z-20261121T2300Z")["late"] == 1
    lock = json.loads(s3.get_object(Bucket=bucket, Key="runs/DE/locks/2026-11-20.json")["Body"].read())
    assert (lock["run_id"], lock["state"]) == (night_21.run_id, "held")
    masked_car2 = _objects(s3, bucket, "masked/")[car2.replace("raw/", "masked/", 1)]
    broken["release"] = False
    assert _clear_and_rerun(dag_21, night_21, list(dag_21.task_ids)) == "success"
    lock = json.loads(s3.get_object(Bucket=bucket, Key="runs/DE/locks/2026-11-20.json")["Body"].read())
    assert (lock.get("run_id"), lock["state"]) == (night_21.run_id, "released"), lock
    capfd.readouterr()
    state = _clear_and_rerun(dag_20, night_20, ["process.mask", "qa", "check", "publish", "release", "watcher"])
    assert state == "failed"
    out = capfd.readouterr()
    assert f"run {night_21.run_id}" in out.out + out.err and "rerun the whole window" in out.out + out.err
    assert _objects(s3, bucket, "masked/")[car2.replace("raw/", "masked/", 1)] == masked_car2
    audit = json.loads(s3.get_object(Bucket=bucket, Key=car2.replace("raw/", "audit/", 1) + ".json")["Body"].read())
    assert audit["run_id"] == night_21.run_id and audit["status"] == "masked"
