"""When runs happen and who hears about a bad one: per-region nightly timetables, backfill bounds,
the deadline alert and the run-failure notifier.

One DAG per region (``plate_masking_<region>``) runs at its region's local midnight with a data
interval that is exactly the local day that just ended (23 or 25 hours on DST days); the manual DAG
``plate_masking`` (no schedule) takes any region or ALL and an explicit window. Imported by the DAG
file at parse time: nothing here touches the network, the database or torch; the SNS notifier is
imported only when alerts are configured.
"""
from __future__ import annotations

import logging
from datetime import date, datetime, time, timedelta, timezone

from .settings import Settings

log = logging.getLogger("platemask")

MANUAL_DAG_ID = "plate_masking"
# Local midnight: the run is due the moment its region's day closes. Photos uploaded into a day's
# partition after its run are picked up by the following nights (Settings.late_days).
NIGHTLY_CRON = "0 0 * * *"
ALERTS_OFF = "alerts are off: alert_sns_topic_arn is empty, so run failures and missed deadlines are only logged"


def region_dag_id(region: str) -> str:
    return f"{MANUAL_DAG_ID}_{region.lower()}"


def nightly_timetable(settings: Settings, region: str, cron: str = NIGHTLY_CRON):
    """Cron data intervals in the region's own time zone: each run's interval is one local day
    (``cron`` is for the lag benchmark, bench/bench_schedule_lag.py)."""
    from airflow.sdk import CronDataIntervalTimetable

    return CronDataIntervalTimetable(cron, timezone=settings.region_timezones[region])


def backfill_bounds(first_day: date, last_day: date) -> tuple[datetime, datetime]:
    """``--from-date``/``--to-date`` for a backfill of the local days ``first_day`` .. ``last_day``
    (both included) of any region whose UTC offset is strictly between -12 h and +12 h.

    Airflow creates the runs whose logical date (the local midnight that starts the day) lies within
    [from, to], both ends included. Noon UTC of the day before the first day and noon UTC of the last
    day bracket exactly those midnights whatever the region's offset or DST, whereas bare dates
    (midnight UTC) drop the first day east of UTC and the last day west of it.
    """
    if last_day < first_day:
        raise ValueError(f"last day {last_day} is before the first day {first_day}")
    noon = time(12, tzinfo=timezone.utc)
    return datetime.combine(first_day - timedelta(days=1), noon), datetime.combine(last_day, noon)


def backfill_command(region: str, first_day: date, last_day: date) -> str:
    start, end = backfill_bounds(first_day, last_day)
    return (f"airflow backfill create --dag-id {region_dag_id(region)} "
            f"--from-date {start:%Y-%m-%dT%H:%M:%S+00:00} --to-date {end:%Y-%m-%dT%H:%M:%S+00:00}")


def deadline_alert(settings: Settings):
    """Alert when a nightly run is not done ``deadline_hours`` after it was queued (at its window's
    close). Backfill and manual runs get the deadline row too (Airflow creates it for every run of the
    DAG), but the callback alerts for scheduled runs only: a backfill queue is not an incident."""
    if settings.deadline_hours <= 0:
        return None
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=timedelta(hours=settings.deadline_hours),
        callback=AsyncCallback("platemask.schedules.deadline_missed",
                               kwargs={"hours": settings.deadline_hours, **alert_target(settings)}),
    )


def alert_target(settings: Settings) -> dict:
    """Where alerts go: ``{"topic_arn": ..., "aws_conn_id": ...}``; topic_arn None = alerts off."""
    return {"topic_arn": settings.alert_sns_topic_arn or None,
            "aws_conn_id": settings.alert_aws_conn_id}


def failure_notifier(settings: Settings):
    """``on_failure_callback`` of every DAG: sends the failure through the Amazon provider's SnsNotifier
    (``run_failed``), or None when alerts are off."""
    target = alert_target(settings)
    if not target["topic_arn"]:
        return None
    from functools import partial

    return partial(run_failed, bucket=settings.bucket, **target)


def failure_message(*, dag_id: str | None, run_id: str | None, reason: str | None, task_id: str | None,
                    bucket: str) -> str:
    return (f"platemask: run {run_id} of {dag_id} failed ({reason or 'failed'}"
            + (f", last failed task {task_id}" if task_id else "") + "). Photos of a failed region are not "
            f"published; the QA reports under s3://{bucket}/qa/ say which photos and why. Fix the cause, then clear "
            "the failed tasks or trigger the window again.")


def deadline_message(dag_run: dict, deadline: dict, hours: float | None) -> str:
    interval = f"{dag_run.get('data_interval_start')} .. {dag_run.get('data_interval_end')}"
    return (f"platemask: nightly run {dag_run.get('dag_run_id') or dag_run.get('run_id')} of {dag_run.get('dag_id')} "
            f"(window {interval}) is not done {'?' if hours is None else f'{hours:g}'} h after it was queued (deadline "
            f"{deadline.get('deadline_time')}, state {dag_run.get('state')}): photos of that night are not "
            "masked yet. Look at the run in the Airflow UI (a task waiting for a lock, a pool, SageMaker?).")


def run_failed(context: dict, *, topic_arn: str, aws_conn_id: str | None, bucket: str) -> None:
    """DAG ``on_failure_callback``: the run failed; publish it to the SNS topic with the Amazon provider's
    SnsNotifier. The message is built here, not templated: the callback's context may carry a
    serialized DAG without a Jinja environment (``dag.test()``)."""
    from airflow.providers.amazon.aws.notifications.sns import SnsNotifier

    dag_run = context.get("dag_run")
    ti = context.get("ti") or context.get("task_instance")
    dag_id = getattr(context.get("dag"), "dag_id", None) or getattr(dag_run, "dag_id", None)
    message = failure_message(dag_id=dag_id, run_id=context.get("run_id") or getattr(dag_run, "run_id", None),
                              reason=context.get("reason"), task_id=getattr(ti, "task_id", None), bucket=bucket)
    log.error(message)
    SnsNotifier(aws_conn_id=aws_conn_id, target_arn=topic_arn, message=message,
                subject=f"platemask: {dag_id} run failed"[:100]).notify(context)


async def deadline_missed(*, hours: float | None = None, topic_arn: str | None = None,
                          aws_conn_id: str | None = None, context: dict | None = None, **_) -> str:
    """Deadline callback (runs in the triggerer): a *scheduled* run not done ``hours`` after it was
    queued is an incident, sent to the SNS topic with the Amazon provider's SnsNotifier. Backfill and
    manual runs are queued behind each other on purpose: they are only logged, never alerted.
    Returns what it did ("skipped", "logged" or "sent")."""
    context = context or {}
    dag_run = context.get("dag_run") or {}
    run_type = dag_run.get("run_type")
    run = f"{dag_run.get('dag_id')} run {dag_run.get('dag_run_id') or dag_run.get('run_id')}"
    if run_type != "scheduled":
        log.info("platemask: %s (%s) passed its deadline: no alert, deadlines apply to scheduled nightly runs only",
                 run, run_type)
        return "skipped"
    message = deadline_message(dag_run, context.get("deadline") or {}, hours)
    log.error(message)
    if not topic_arn:
        log.error("platemask: %s", ALERTS_OFF)
        return "logged"
    import asyncio

    from airflow.providers.amazon.aws.notifications.sns import SnsNotifier

    notifier = SnsNotifier(aws_conn_id=aws_conn_id, target_arn=topic_arn, message=message,
                           subject=f"platemask: {dag_run.get('dag_id')} missed its deadline"[:100])
    # the provider's async path needs aiobotocore; its sync one runs off the triggerer's event loop
    await asyncio.to_thread(notifier.notify, context)
    return "sent"
