"""Per-region nightly schedules, backfills of exactly the days asked, deadlines that ignore backfills,
SNS alerts (moto's SNS delivering to an SQS queue), and the Settings the Variable may not set."""
from __future__ import annotations

import asyncio
import json
import uuid
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from conftest import ROOT
from platemask import schedules
from platemask.settings import PARSE_TIME_FIELDS, Settings
from test_dag import load_dag

UTC = timezone.utc


# ------------------------------------------------------------------ timetables (pure)

def _core_timetable(region: str):
    from airflow.serialization.encoders import coerce_to_core_timetable

    return coerce_to_core_timetable(schedules.nightly_timetable(Settings(), region))


@pytest.mark.parametrize("region", ["DE", "PL", "TH", "US"])
def test_a_regions_run_is_due_at_its_local_midnight_and_covers_exactly_that_local_day(region):
    from airflow.timetables.base import TimeRestriction

    tz = ZoneInfo(Settings().region_timezones[region])
    tt = _core_timetable(region)
    # 2026-10-20 .. 2026-11-05 spans both DST ends (Europe 25 Oct, US 1 Nov)
    restriction = TimeRestriction(earliest=datetime(2026, 10, 20, tzinfo=tz), latest=None, catchup=True)
    info, day, seen = None, date(2026, 10, 20), []
    while day < date(2026, 11, 5):
        info = tt.next_dagrun_info(last_automated_data_interval=info and info.data_interval, restriction=restriction)
        start, end = info.data_interval
        assert (start, end) == (datetime(day.year, day.month, day.day, tzinfo=tz),
                                datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=tz))
        assert info.run_after == end  # due the moment the local day closes: lag 0 plus the scheduler's loop
        seen.append((end - start).total_seconds() / 3600)
        day += timedelta(days=1)
    if region in ("DE", "PL", "US"):
        assert sorted(set(seen)) == [24.0, 25.0]  # the night the clocks go back is a 25-hour day
    else:
        assert set(seen) == {24.0}


def test_the_window_a_nightly_run_plans_is_its_data_interval():
    from platemask.runspec import plan_runs

    s = Settings()
    for region in s.regions:
        start, end = _core_timetable(region).infer_manual_data_interval(run_after=datetime(2026, 10, 25, 12, tzinfo=UTC))
        (spec,) = plan_runs(s, {"region": region}, run_id="r", data_interval_end=end)
        assert (spec.window.start, spec.window.end) == (start, end)


def test_old_utc_cron_lagged_hours_the_regional_one_does_not():
    """The lag (window close -> run due) the README states: old 01:00 UTC cron vs per-region local midnight."""
    from airflow.timetables.interval import CronDataIntervalTimetable

    from platemask.runspec import plan_runs

    s = Settings()
    old = CronDataIntervalTimetable("0 1 * * *", timezone="UTC")
    lags = {}
    for region in ("DE", "TH", "US"):
        tz = ZoneInfo(s.region_timezones[region])
        close = datetime(2026, 11, 21, tzinfo=tz)  # the local day 2026-11-20 closes
        old_run, new_run = _first_run_due(old, close), _first_run_due(_core_timetable(region), close)
        # each of these runs takes that day (the local day that ended before its data interval's end)
        for run in (old_run, new_run):
            (spec,) = plan_runs(s, {"region": region}, run_id="r", data_interval_end=run.data_interval.end)
            assert spec.window.start == datetime(2026, 11, 20, tzinfo=tz)
        lags[region] = tuple((r.run_after - close).total_seconds() / 3600 for r in (old_run, new_run))
    assert lags == {"DE": (2.0, 0.0), "TH": (8.0, 0.0), "US": (20.0, 0.0)}


def _first_run_due(timetable, t: datetime):
    """The timetable's first run due at or after ``t``."""
    from airflow.timetables.base import TimeRestriction

    restriction = TimeRestriction(earliest=t - timedelta(days=2), latest=None, catchup=True)
    info = None
    while True:
        info = timetable.next_dagrun_info(last_automated_data_interval=info and info.data_interval, restriction=restriction)
        if info.run_after >= t:
            return info


# ------------------------------------------------------------------ backfill recipe, through Airflow's backfill

def _sync_dags(monkeypatch, **env):
    """Parse the DAG folder and write its DAGs to the metadata DB, as the DAG processor does."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL", "0")  # this parse wins, however recent the last
    manager = DagBundlesManager()
    manager.sync_bundles_to_db()
    (bundle,) = [b for b in manager.get_all_dag_bundles() if b.name == "dags-folder"]
    bundle.initialize()
    bag = BundleDagBag(dag_folder=str(ROOT / "dags"), bundle_path=bundle.path, bundle_name=bundle.name)
    assert bag.import_errors == {}
    sync_bag_to_db(bag, bundle.name, bundle.version)
    return bag


def _backfill_runs(dag_id: str, start: datetime, end: datetime, conf: dict | None = None):
    from airflow.models.backfill import Backfill, _create_backfill
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:  # one backfill at a time per DAG: end those other tests left open
        session.query(Backfill).filter(Backfill.dag_id == dag_id, Backfill.completed_at.is_(None)) \
            .update({"completed_at": datetime.now(UTC)})
    bf = _create_backfill(dag_id=dag_id, from_date=start, to_date=end, max_active_runs=2, reverse=False,
                          dag_run_conf=conf or {}, triggering_user_name="test")
    with create_session() as session:
        runs = session.query(DagRun).filter(DagRun.backfill_id == bf.id).order_by(DagRun.logical_date).all()
        out = [(r.run_id, r.run_type, r.data_interval_start, r.data_interval_end, r.id) for r in runs]
        session.query(Backfill).filter(Backfill.id == bf.id).update({"completed_at": datetime.now(UTC)})
    return out


@pytest.mark.parametrize("region", ["DE", "US", "TH"])
def test_the_readme_backfill_recipe_covers_exactly_the_days_asked(monkeypatch, airflow_db, region):
    from platemask.runspec import plan_runs

    _sync_dags(monkeypatch)
    s = Settings()
    tz = ZoneInfo(s.region_timezones[region])
    first, last = date(2026, 10, 20), date(2026, 11, 3)  # both DST ends inside
    start, end = schedules.backfill_bounds(first, last)
    assert schedules.backfill_command(region, first, last) == (
        f"airflow backfill create --dag-id plate_masking_{region.lower()} "
        "--from-date 2026-10-19T12:00:00+00:00 --to-date 2026-11-03T12:00:00+00:00")
    runs = _backfill_runs(schedules.region_dag_id(region), start, end)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    assert [r[1] for r in runs] == ["backfill"] * len(days)
    windows = []
    for run_id, _, di_start, di_end, _ in runs:
        (spec,) = plan_runs(s, {"region": region}, run_id=run_id, data_interval_end=di_end)
        assert (spec.window.start, spec.window.end) == (di_start, di_end)
        windows.append(spec.window)
    # exactly the local days asked: one each, in order, midnight to midnight, nothing before or after
    assert [w.start.astimezone(tz).date() for w in windows] == days
    assert all(w.start.astimezone(tz).time() == w.end.astimezone(tz).time() == datetime.min.time() for w in windows)
    assert [w.partition_days(tz) for w in windows] == [[d] for d in days]


def test_bare_dates_miss_a_day_which_is_why_the_recipe_uses_noon_utc(monkeypatch, airflow_db):
    """The old recipe's bare dates are midnight UTC: east of UTC the first day is lost, west of it the last."""
    _sync_dags(monkeypatch)
    bare = datetime(2026, 9, 1, tzinfo=UTC), datetime(2026, 9, 5, tzinfo=UTC)
    th = [r[2].astimezone(ZoneInfo("Asia/Bangkok")).date().day for r in _backfill_runs("plate_masking_th", *bare)]
    us = [r[2].astimezone(ZoneInfo("America/New_York")).date().day for r in _backfill_runs("plate_masking_us", *bare)]
    assert th == [2, 3, 4, 5] and us == [1, 2, 3, 4]  # asked: 1..5
    with pytest.raises(ValueError, match="before the first day"):
        schedules.backfill_bounds(date(2026, 9, 5), date(2026, 9, 1))


# ------------------------------------------------------------------ alerts: SNS through moto

@pytest.fixture
def sns_topic(aws_conn, moto_server):
    """A real SNS topic on the moto server with an SQS queue subscribed: what arrives is what was sent."""
    import boto3

    sns = boto3.client("sns", endpoint_url=moto_server, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")
    topic = sns.create_topic(Name=f"platemask-alerts-{uuid.uuid4().hex[:6]}")["TopicArn"]
    queue = sqs.create_queue(QueueName=f"ops-{uuid.uuid4().hex[:6]}")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)

    def received() -> list[dict]:
        msgs = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
        return [json.loads(m["Body"]) for m in msgs]

    return topic, received


def _logged(capfd, caplog) -> str:
    """What was logged: Airflow's structlog writes to the terminal once configured, else to logging."""
    return "".join(capfd.readouterr()) + caplog.text


def _deadline_of(run_row_id: int):
    from airflow.models.deadline import Deadline
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.query(Deadline).filter(Deadline.dagrun_id == run_row_id).one_or_none()


def _miss_and_run_callback(run_row_id: int) -> list[dict]:
    """What the scheduler and the triggerer do when the run's deadline passes: ``handle_miss`` queues the
    callback with the run's context, the triggerer runs it as a CallbackTrigger. Returns its events."""
    from airflow.models.deadline import Deadline
    from airflow.triggers.callback import CallbackTrigger
    from airflow.utils.session import create_session

    with create_session() as session:
        deadline = session.query(Deadline).filter(Deadline.dagrun_id == run_row_id).one()
        deadline.handle_miss(session)
        data = dict(deadline.callback.data)

    async def run():
        trigger = CallbackTrigger(callback_path=data["path"], callback_kwargs=json.loads(json.dumps(data["kwargs"], default=str)))
        return [e.payload async for e in trigger.run()]

    return asyncio.run(run())


def test_deadlines_alert_for_nightly_runs_and_never_for_backfills(monkeypatch, airflow_db, sns_topic, capfd, caplog):
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    topic, received = sns_topic
    caplog.set_level("INFO", logger="platemask")
    _sync_dags(monkeypatch, PLATEMASK_ALERT_SNS_TOPIC_ARN=topic, PLATEMASK_DEADLINE_HOURS="6")
    # a backfill run gets a deadline row (Airflow creates one per run) ...
    (bf_run, *_rest) = _backfill_runs("plate_masking_de", *schedules.backfill_bounds(date(2026, 8, 3), date(2026, 8, 4)))
    assert bf_run[1] == "backfill" and _deadline_of(bf_run[4]) is not None
    # ... but its miss is only logged: a long backfill queue is not an incident
    events = _miss_and_run_callback(bf_run[4])
    assert [e["state"] for e in events] == ["running", "success"] and events[-1]["body"] == "skipped"
    assert "no alert, deadlines apply to scheduled nightly runs only" in _logged(capfd, caplog)
    assert received() == []

    # a scheduled (nightly) run that misses its deadline pages through SNS
    with create_session() as session:
        dag = session.scalar(SerializedDagModel.latest_item_select_object("plate_masking_de")).dag
        start, end = datetime(2026, 8, 10, tzinfo=ZoneInfo("Europe/Berlin")), datetime(2026, 8, 11, tzinfo=ZoneInfo("Europe/Berlin"))
        from airflow.timetables.base import DataInterval

        dr = dag.create_dagrun(run_id=f"scheduled__{uuid.uuid4().hex[:8]}", logical_date=start,
                               data_interval=DataInterval(start, end), run_after=end, conf={},
                               run_type=DagRunType.SCHEDULED, state=DagRunState.QUEUED,
                               triggered_by=DagRunTriggeredByType.TIMETABLE, session=session)
        session.commit()
        row_id, run_id = dr.id, dr.run_id
    deadline = _deadline_of(row_id)
    assert deadline is not None and abs((deadline.deadline_time - dr.queued_at) - timedelta(hours=6)) < timedelta(seconds=1)
    events = _miss_and_run_callback(row_id)
    assert events[-1] == {"state": "success", "body": "sent"}
    (msg,) = received()
    assert msg["Subject"] == "platemask: plate_masking_de missed its deadline"
    assert run_id in msg["Message"] and "not done 6 h after it was queued" in msg["Message"]


def test_a_failed_run_is_announced_on_sns(monkeypatch, airflow_db, aws_conn, sns_topic):
    topic, received = sns_topic
    bucket = f"photos-{uuid.uuid4().hex[:8]}"
    aws_conn.create_bucket(Bucket=bucket)
    dag = load_dag(monkeypatch, PLATEMASK_ALERT_SNS_TOPIC_ARN=topic, PLATEMASK_BUCKET=bucket, PLATEMASK_RETRIES=0,
                   PLATEMASK_DEADLINE_HOURS=0)
    dr = dag.test(run_conf={"region": "DE", "window_start": "2026-11-21", "window_end": "2026-11-20"})
    assert dr.state == "failed"
    (msg,) = received()
    assert msg["Subject"] == "platemask: plate_masking run failed"
    assert f"run {dr.run_id} of plate_masking failed (task_failure, last failed task " in msg["Message"]
    assert f"s3://{bucket}/qa/" in msg["Message"]


def test_alerts_off_without_a_topic_and_says_so(monkeypatch, capfd, caplog):
    from platemask.schedules import deadline_missed

    monkeypatch.delenv("PLATEMASK_ALERT_SNS_TOPIC_ARN", raising=False)
    caplog.set_level("INFO", logger="platemask")
    assert load_dag(monkeypatch, "plate_masking_us").on_failure_callback is None
    assert schedules.failure_notifier(Settings()) is None
    ctx = {"dag_run": {"dag_id": "plate_masking_us", "dag_run_id": "scheduled__x", "run_type": "scheduled"},
           "deadline": {"deadline_time": "2026-11-21T11:00:00+00:00"}}
    assert asyncio.run(deadline_missed(hours=6, topic_arn=None, context=ctx)) == "logged"
    out = _logged(capfd, caplog)
    assert "scheduled__x" in out and schedules.ALERTS_OFF in out


# ------------------------------------------------------------------ Settings: the Variable and parse time

def test_the_variable_refuses_parse_time_fields_naming_the_environment_variable():
    with pytest.raises(ValueError) as exc:
        Settings.load({"queue": "gpu", "shard_size": 50}, env={})
    msg = str(exc.value)
    assert "sets queue" in msg and "PLATEMASK_QUEUE" in msg and "parsed" in msg and "remove them from the Variable" in msg
    with pytest.raises(ValueError, match="bucket, deadline_hours.*PLATEMASK_BUCKET, PLATEMASK_DEADLINE_HOURS"):
        Settings.load({"deadline_hours": 1, "bucket": "b"}, env={})
    # run-time fields still come from the Variable, over the environment
    s = Settings.load({"shard_size": 50, "late_days": 1}, env={"PLATEMASK_SHARD_SIZE": "10", "PLATEMASK_QUEUE": "gpu"})
    assert (s.shard_size, s.late_days, s.queue) == (50, 1, "gpu")


@pytest.mark.parametrize("fields", [
    {"masked_root": "raw/{region}/"},  # masked copies replaced their originals; the run ended green
    {"masked_root": "raw/{region}/masked/"},
    {"audit_root": "raw/"},
    {"qa_root": "masked/{region}/qa/{window}/"},
    {"sagemaker_output_prefix": "audit/{region}/so/"},
    {"raw_prefix": "photos/{region}/{yyyy}/{mm}/{dd}/", "runs_root": "photos/{run}/"},
])
def test_settings_refuse_a_layout_that_writes_among_the_originals_or_its_own_files(fields):
    env = {f"PLATEMASK_{k.upper()}": v for k, v in fields.items()}
    with pytest.raises(ValueError, match="overlap.*give each its own prefix"):
        Settings.load(env=env)
    with pytest.raises(ValueError, match="overlap"):
        Settings.load({k: v for k, v in fields.items() if k not in PARSE_TIME_FIELDS}, env={})
    Settings.load({"masked_root": "blurred/{region}/", "audit_root": "records/{region}/"}, env={})  # apart: fine


def test_every_setting_the_dag_file_reads_at_parse_time_is_a_parse_time_field():
    """Which fields the DAG file reads while it is parsed, found by parsing it with a recording Settings."""
    import importlib.util
    import sys

    import platemask.settings as settings_mod

    read: set[str] = set()
    real_getattribute = Settings.__getattribute__
    names = set(Settings.__dataclass_fields__)
    readers = {str(ROOT / "dags" / "plate_masking.py"), schedules.__file__}  # not Settings' own validation

    def recording(self, name):
        if name in names and sys._getframe(1).f_code.co_filename in readers:
            read.add(name)
        return real_getattribute(self, name)

    spec = importlib.util.spec_from_file_location(f"pm_{uuid.uuid4().hex}", ROOT / "dags" / "plate_masking.py")
    mod = importlib.util.module_from_spec(spec)
    Settings.__getattribute__ = recording
    try:
        spec.loader.exec_module(mod)
    finally:
        Settings.__getattribute__ = real_getattribute
    assert read, "the DAG file read no setting?"
    assert read <= PARSE_TIME_FIELDS, sorted(read - PARSE_TIME_FIELDS)
    assert settings_mod.PARSE_TIME_FIELDS <= set(Settings.__dataclass_fields__)


def test_a_run_with_a_parse_time_field_in_the_variable_fails_saying_what_to_do(monkeypatch, airflow_db, aws_conn, capfd):
    """Before: the Variable's queue was silently ignored (the mask task's queue comes from parsing)."""
    from airflow.models.variable import Variable

    bucket = f"photos-{uuid.uuid4().hex[:8]}"
    aws_conn.create_bucket(Bucket=bucket)
    dag = load_dag(monkeypatch, PLATEMASK_BUCKET=bucket, PLATEMASK_RETRIES=0, PLATEMASK_DEADLINE_HOURS=0)
    Variable.set("platemask_settings", json.dumps({"queue": "gpu", "shard_size": 5}))
    try:
        dr = dag.test(run_conf={"region": "DE", "window_start": "2026-11-20", "window_end": "2026-11-21"})
    finally:
        Variable.delete("platemask_settings")
    assert dr.state == "failed"
    out = "".join(capfd.readouterr())
    assert "the platemask_settings Variable sets queue" in out and "Set PLATEMASK_QUEUE in the environment" in out
