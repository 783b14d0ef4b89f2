"""Glue between the DAG and the package: connections, context, backends, alerts.

Imported only inside task bodies (never at DAG parse time), so parsing stays free of torch,
network and database access.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Callable

from .constants import resolve_device
from .settings import Settings

log = logging.getLogger("platemask")


def s3_client_config(settings: Settings):
    """Adaptive retries (throttling and 5xx back off client-side) and a connection pool as large as the
    I/O threads of a mask task (readers, writers and audit lookups), so no thread waits for a connection."""
    from botocore.config import Config

    return Config(retries={"mode": "adaptive", "max_attempts": 8}, max_pool_connections=2 * settings.io_workers + 4)


def s3_client(settings: Settings):
    """A boto3 S3 client from the Airflow AWS connection (its ``endpoint_url`` extra reaches MinIO/moto);
    the connection's own ``config_kwargs``, if any, win over ``s3_client_config``."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    config = s3_client_config(settings)
    from_conn = S3Hook(aws_conn_id=settings.aws_conn_id).conn_config.botocore_config
    return S3Hook(aws_conn_id=settings.aws_conn_id, config=config.merge(from_conn) if from_conn else config).get_conn()


def plan_from_context(context: Any, settings: Settings) -> list[dict]:
    from airflow.sdk.exceptions import AirflowFailException

    from .runspec import RunError, plan_runs

    dag_run = context["dag_run"]
    # a manual run may have no logical date (Airflow 3), hence no data interval: its night is the local day
    # that ended before it was triggered (run_after), as for a manual run with one
    night_end = context.get("data_interval_end") or getattr(dag_run, "run_after", None)
    # Airflow keeps every key of a trigger's conf: one that is no Param ({"dryrun": true}) would be ignored
    # and the run would mask and publish what the operator meant to keep it from
    declared = getattr(context.get("dag"), "params", None)
    unknown = sorted(k for k in (getattr(dag_run, "conf", None) or {}) if declared is not None and k not in declared)
    if unknown:
        import difflib

        hints = [f"{k!r}" + (f" (did you mean {m[0]}?)" if (m := difflib.get_close_matches(str(k), list(declared), 1))
                             else "") for k in unknown]
        raise AirflowFailException(
            f"invalid run parameters: the run's conf has key(s) that are no Param of this DAG: {', '.join(hints)}; "
            "they would be ignored and the run would mask with the defaults instead. Trigger again without them; "
            f"the Params are: {', '.join(sorted(declared))}")
    try:
        run_type = getattr(dag_run, "run_type", None)
        specs = plan_runs(settings, dict(context["params"]), run_id=dag_run.run_id, data_interval_end=night_end,
                          now=datetime.now(timezone.utc), run_type=getattr(run_type, "value", run_type))
    except RunError as exc:
        raise AirflowFailException(f"invalid run parameters: {exc}") from None
    for s in specs:
        log.info("region %s: window %s .. %s (%s)", s.region, s.window_start, s.window_end, s.window.id)
    if not settings.alert_sns_topic_arn:
        from .schedules import ALERTS_OFF

        log.warning("platemask: %s", ALERTS_OFF)
    return [s.as_dict() for s in specs]


def _run_is_live(dag_id: str) -> Callable[[dict], bool]:
    """``is_live(lock)``: whether the run named by a lock document is still queued or running (in the DAG
    that took it: the regions' nightly DAGs and the manual one share the region's day locks)."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    def is_live(lock: dict) -> bool:
        run_id = lock.get("run_id")
        return bool(run_id) and RuntimeTaskInstance.get_dr_count(
            dag_id=lock.get("dag_id") or dag_id, run_ids=[run_id], states=["queued", "running"]) > 0

    return is_live


def _day_run_pending(settings: Settings, region: str) -> Callable[[Any], bool]:
    """``day_pending(d)``: whether a run of the region's nightly DAG for local day ``d`` (logical date: that day's
    local midnight) is queued or running (e.g. a backfill's run not started yet) and will collect the day: a dry
    run or a ``max_images`` run (a backfill with such a --dag-run-conf) marks no day, so leaving the day to it on
    the last night that reaches it would leave its photos unmasked, with no record."""
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    from airflow.sdk.execution_time import task_runner
    from airflow.sdk.execution_time.comms import GetPreviousDagRun

    from .schedules import region_dag_id

    tz = ZoneInfo(settings.region_timezones[region])

    def pending(d) -> bool:
        midnight = datetime(d.year, d.month, d.day, tzinfo=tz)
        e = d + timedelta(days=1)
        for state in ("queued", "running"):  # the latest run in that state before the next day's midnight
            run = task_runner.SUPERVISOR_COMMS.send(GetPreviousDagRun(
                dag_id=region_dag_id(region), logical_date=datetime(e.year, e.month, e.day, tzinfo=tz),
                state=state)).dag_run
            if run is None or run.logical_date is None or run.logical_date != midnight:
                continue
            conf = run.conf if isinstance(run.conf, dict) else {}
            if conf.get("dry_run") or conf.get("max_images") is not None:
                log.info("%s %s: run %s of that day is %s but will not collect it (%s): not left to it", region, d,
                         run.run_id, state, "dry run" if conf.get("dry_run") else f"max_images {conf['max_images']}")
                continue
            return True
        return False

    return pending


def collect_region(context: Any, settings: Settings, spec_dict: dict) -> dict:
    """The collect step for one region: a late day's photos are picked up under that day's lock (taken
    for this DAG's run), also when a run that is no longer queued or running left it held."""
    from .runs import collect
    from .runspec import RunSpec

    dag_id = context["dag_run"].dag_id
    spec = RunSpec.from_dict(spec_dict)
    return collect(s3_client(settings), settings, spec, is_live=_run_is_live(dag_id), owner={"dag_id": dag_id},
                   day_pending=_day_run_pending(settings, spec.region))


def hold_locks(context: Any, settings: Settings, specs: list[dict]) -> tuple[bool, list[dict]]:
    """Take the day locks of every region this run masks (in region order, so two runs
    never wait on each other). Returns (all held, the other runs' locks still in the way).
    Dry runs write nothing shared and take no lock."""
    from .runs import acquire_lock
    from .runspec import RunSpec

    client = s3_client(settings)
    dag_id = context["dag_run"].dag_id
    is_live = _run_is_live(dag_id)
    blocking = []
    for d in sorted(specs, key=lambda d: d["region"]):
        spec = RunSpec.from_dict(d)
        if spec.dry_run:
            continue
        held = acquire_lock(client, settings, spec, is_live=is_live, log=log.info, owner={"dag_id": dag_id})
        if held is not None:
            blocking.append(held)
            break  # in order: wait for this one before taking the next
    return not blocking, blocking


def hold_lock_to_mask(context: Any, settings: Settings, spec_dict: dict) -> None:
    """Before a shard is masked: this run holds the day locks of its region-window (and of the days
    before it whose late photos its collect picked up), or takes them again when this run released them
    and no other run has had them since. A run's failed tasks cleared after it ended (what its failure
    alert suggests) would otherwise mask without them, beside another run of those days, and its QA
    would never become the window's latest report; and, cleared after another run had those days,
    would mask its stale manifest over that run's work (a photo re-uploaded since fails source_changed
    and loses that run's masked copy) and make its old report the window's latest again.
    Raises ``AirflowFailException`` naming the run that holds one, or has had it since. Dry runs take no lock."""
    from airflow.sdk.exceptions import AirflowFailException

    from .runs import acquire_late_locks, acquire_lock
    from .runspec import RunSpec

    spec = RunSpec.from_dict(spec_dict)
    if spec.dry_run:
        return
    dag_id = context["dag_run"].dag_id
    client, is_live, owner = s3_client(settings), _run_is_live(dag_id), {"dag_id": dag_id}
    held = acquire_lock(client, settings, spec, is_live=is_live, log=log.info, owner=owner, reclaim=True)
    if held is None:  # and the days whose late photos its collect picked up
        held = acquire_late_locks(client, settings, spec, is_live=is_live, log=log.info, owner=owner, reclaim=True)
    again = (f"rerun the whole window instead (trigger plate_masking with region {spec.region}, window_start "
             f"{spec.window_start} and window_end {spec.window_end})")
    if held is not None and held.get("superseded"):
        raise AirflowFailException(
            f"not masking: run {held.get('run_id') or '(unknown: its lock document cannot be read)'} "
            + (f"of {held['dag_id']} " if held.get("dag_id") else "")
            + f"has had region {spec.region} day {held.get('day')} since this run released it ({held.get('state')}, "
            f"since {held.get('since')}): it masked that day again or picked up its late photos, so this run's "
            "manifest is no longer the day's, and masking it now could undo that run's work (a photo re-uploaded "
            "since would fail source_changed here and lose that run's masked copy). Clearing this run's tasks "
            f"cannot bring it up to date: {again}.")
    if held is not None:
        raise AirflowFailException(
            f"not masking: {_holders(held)}; two runs must not mask one window at once. Once that run has "
            f"finished, {again}.")


def hold_locks_for_qa(context: Any, settings: Settings, specs: list[dict]) -> None:
    """Before QA: a run's ``qa`` task cleared after the run released its locks (it failed, or the reports
    could not be written) takes the window's locks again where this run released them and no other run has
    had them since, so that its report becomes the window's latest (and ``publish`` may emit for it); where
    another run has had them, its report stays its own (``publish`` says why). Only regions this run
    collected (a run that collected held the locks); dry runs take no lock. ``release`` gives them back."""
    from .runs import acquire_lock, load_collected
    from .runspec import RunSpec

    client, dag_id = s3_client(settings), context["dag_run"].dag_id
    is_live = _run_is_live(dag_id)
    for d in sorted(specs, key=lambda d: d["region"]):
        spec = RunSpec.from_dict(d)
        if spec.dry_run or load_collected(client, settings, spec) is None:
            continue
        held = acquire_lock(client, settings, spec, is_live=is_live, log=log.info, owner={"dag_id": dag_id},
                            reclaim=True)
        if held is not None:
            log.info("%s %s: this run's QA report will not be the window's latest: run %s %s", spec.region,
                     spec.window.id, held.get("run_id"),
                     "has had its days since this run released them" if held.get("superseded") else "holds them")


def _holders(*locks: dict) -> str:
    """Who holds these lock documents, in words."""
    return "; ".join(f"region {b.get('region')} window {b.get('window')} is being masked by run {b.get('run_id')} "
                     + (f"of {b['dag_id']} " if b.get("dag_id") else "") + f"(since {b.get('since')})" for b in locks)


def lock_wait_message(blocking: list[dict], settings: Settings) -> str:
    return _holders(*blocking) + (
        f". This run waits up to {settings.lock_wait_minutes:g} min (lock_wait_minutes) for it, then fails: "
        "let that run finish, then rerun this one.")


def release_locks(settings: Settings, specs: list[dict]) -> None:
    from .runs import release_lock
    from .runspec import RunSpec

    client = s3_client(settings)
    for d in specs:
        release_lock(client, settings, RunSpec.from_dict(d), log=log.info)


def _device(settings: Settings) -> str:
    return resolve_device(settings.device)


def detector_factory(settings: Settings, model_dir: str | None = None) -> Callable:
    """``factory(spec, entries, shard) -> (detect, model_info, cfg)`` for the spec's backend."""

    def factory(spec, entries, shard):
        if spec.backend == "local":
            from .allocator import keep_triton_out

            keep_triton_out()  # a task's process imports torch here first (platemask.allocator)
            from .segment import Segmenter

            seg = Segmenter(model_dir or settings.model_dir, device=_device(settings), batch_size=settings.batch_size,
                            threshold=spec.threshold)
            log.info("model %s (%s) on %s; warm-up %.1f s", seg.cfg.name, seg.cfg.weights_sha256[:12], seg.device,
                     seg.warm_up())

            def detect(keys, decoded):
                return seg.on_views([d.detector_views for d in decoded])

            detect.device = str(seg.device)  # the job's threads and memory follow it (JobOptions.for_device)
            return detect, seg.model_info, seg.cfg
        if spec.backend == "sagemaker":
            from .sagemaker_backend import transform_detector

            if "transform" not in shard:
                raise ValueError(f"shard {shard['shard']} has no transform job: did the sagemaker.submit task run?")
            return transform_detector(settings, spec, entries, model_dir, shard["transform"], s3_client(settings))
        raise ValueError(f"unknown backend {spec.backend!r}")

    return factory


def sagemaker_hook(settings: Settings, s3=None):
    """The provider's SageMakerHook; with ``sagemaker_local_endpoint`` its transform jobs run on that
    local container server (``LocalTransformHook``), their outcome reported by DescribeTransformJob."""
    from airflow.providers.amazon.aws.hooks.sagemaker import SageMakerHook

    hook = SageMakerHook(aws_conn_id=settings.sagemaker_conn_id or settings.aws_conn_id)
    if not settings.sagemaker_local_endpoint:
        return hook
    from .local_transform import LocalTransformHook

    return LocalTransformHook(hook, settings.sagemaker_local_endpoint, s3 or s3_client(settings), log=log.info)


def submit_transform(settings: Settings, shard: dict, model_dir: str | None) -> dict:
    from .sagemaker_backend import submit

    s3 = s3_client(settings)
    return submit(sagemaker_hook(settings, s3), s3, settings, shard, model_dir or settings.model_dir)


def poll_transform(settings: Settings, shard: dict, model_dir: str | None = None) -> tuple[bool, dict]:
    """One check of the deferred wait (``transform_wait``): a failed job that made progress (or one this
    DAG stopped itself) is followed by one over the rest; a job an operator stopped is not."""
    from .sagemaker_backend import poll, submit

    s3 = s3_client(settings)
    hook = sagemaker_hook(settings, s3)
    done, shard = poll(hook, shard, resubmit=lambda sh: submit(hook, s3, settings, sh, model_dir or settings.model_dir))
    log.info("transform job %s: %s", shard["transform"]["job"], shard["transform"].get("state", "submitted"))
    return done, shard


def stop_transform(settings: Settings, shard: dict | None) -> None:
    from .sagemaker_backend import stop

    if shard and shard.get("spec", {}).get("backend") == "sagemaker":
        stop(sagemaker_hook(settings), shard, s3_client(settings), settings)


# deadline rows created before the alerts moved to schedules name this path
from .schedules import deadline_missed  # noqa: E402,F401
