"""
### Plate masking

Every night, for each configured region, masks the licence plates in the inspection photos
uploaded for the previous local day: **collect** the day partitions of `raw/{region}/…` into a
manifest, **shard** it, **mask** each shard on a worker (mapped tasks; one model load per shard),
then write **QA** (`qa/{region}/{window}/runs/{run}/report.json` and `report.html`, copied to
`qa/{region}/{window}/` as the window's latest) and **check** it. Masked copies go to
`masked/{region}/…` with the same relative path; originals are never modified. A photo is redone
only when what would change its masked copy changed (source, model, config, threshold, mode,
metadata policy, code version), so reruns and retries only do what is missing.

**The run's state is the truth:** it fails when any planned region could not be collected,
sharded, masked or reported, when a photo has no record, or above the failure limit, always after
writing the QA report (a watcher task downstream of everything fails the run). `masked`/`qa` Asset
events are emitted per region whose QA passed (extra: region, window, run, report, counts), never
for dry runs. One run at a time masks a region-window (`hold` takes an S3 lock; another run waits
for it, then fails naming the run that holds it); every run writes under its own run key.

One DAG per region, `plate_masking_<region>`, runs at the region's local midnight on the local day
that just ended (its data interval); backfill one with `airflow backfill create --dag-id
plate_masking_<region> --from-date <day before the first>T12:00:00+00:00 --to-date <last day>T12:00:00+00:00`
(README "Schedule and backfill"). `plate_masking` has no schedule: trigger it by hand for any
region (or ALL) and, optionally, an explicit window that has ended (one still open is refused: photos
still arrive in it); without one, with or without a logical date, it masks the local day that ended
before the trigger. A backfill's conf may not name a window: each of its runs masks its own night.
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Asset, Param, PokeReturnValue, dag, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException

from platemask import schedules
from platemask.constants import BACKENDS, DEFAULT_BACKEND, DEFAULT_MASK_MODE, MASK_MODES
from platemask.settings import Settings
from platemask.transform_wait import TransformWaitOperator
from platemask.transform_wait import shard_label as _label

SETTINGS = Settings.load()  # environment only (settings.PARSE_TIME_FIELDS): no network, database or torch
MASKED = Asset(f"s3://{SETTINGS.bucket}/masked/")  # name = URI: one asset per bucket
QA = Asset(f"s3://{SETTINGS.bucket}/qa/")
NULLABLE = {"type": ["null", "string"]}

params = {
    "region": Param("ALL", enum=["ALL", *SETTINGS.regions], title="Region",
                    description="Region to process; ALL (the nightly default) processes every configured region."),
    "window_start": Param(None, **NULLABLE, title="Window start",
                          description="ISO date or date-time (region time if no offset). Leave empty for the run's night."),
    "window_end": Param(None, **NULLABLE, title="Window end",
                        description="Exclusive end, same format as the start; no later than now (a window still "
                                    "open is refused)."),
    "backend": Param(DEFAULT_BACKEND, enum=list(BACKENDS), title="Segmentation backend"),
    "mode": Param(DEFAULT_MASK_MODE, enum=list(MASK_MODES), title="Masking mode"),
    "threshold": Param(None, type=["null", "number"], minimum=0, maximum=1, title="Score threshold",
                       description="Empty: the model's operating threshold (chosen for recall on held-out data). "
                                   "Well above it needs 'Unsafe threshold'; very confident detections are always masked."),
    "unsafe_threshold": Param(False, type="boolean", title="Unsafe threshold",
                              description="Allow a threshold well above the model's operating threshold."),
    "model": Param(None, **NULLABLE, title="Model folder", description="Empty: the deployed default model."),
    "reprocess": Param(False, type="boolean", title="Redo photos already masked"),
    "dry_run": Param(False, type="boolean", title="Dry run (collect and plan only; nothing masked)"),
    "max_images": Param(None, type=["null", "integer"], minimum=1, title="At most this many photos per region"),
    "max_failure_rate": Param(SETTINGS.max_failure_rate, type="number", minimum=0, maximum=1,
                              title="Fail the run above this failure rate (after writing the QA report)",
                              description="A window whose every photo failed (none masked or found without a plate) "
                                          "fails at any value, 1 included."),
}


def _client():
    from platemask.airflow_support import s3_client

    return s3_client(Settings.from_airflow())


def _stop_transform(context) -> None:
    """on_failure_callback of the wait: a timed-out or failed wait stops its SageMaker job."""
    from platemask.airflow_support import stop_transform

    ti = context["ti"]
    stop_transform(Settings.from_airflow(), ti.xcom_pull(task_ids="sagemaker.submit", map_indexes=ti.map_index))


def _planned(specs) -> None:
    """Skip an all_done task when plan failed (nothing was planned): the failure to read is the plan's,
    not a TypeError of this task beside it."""
    if specs is None:
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException("nothing was planned (the plan task failed): see its log")


def plate_masking():
    @task
    def plan() -> list[dict]:
        from platemask.airflow_support import plan_from_context

        return plan_from_context(get_current_context(), Settings.from_airflow())

    @task.sensor(mode="reschedule", poke_interval=SETTINGS.lock_poll_seconds,
                 timeout=SETTINGS.lock_wait_minutes * 60 + 3600)  # the timeout is a backstop
    def hold(specs: list[dict]) -> PokeReturnValue:
        """One run masks a region-window at a time: take each region's S3 lock, or wait (no worker
        slot held) for the run that holds it; fail naming that run once lock_wait_minutes are over."""
        from platemask.airflow_support import hold_locks, lock_wait_message

        settings = Settings.from_airflow()
        context = get_current_context()
        done, blocking = hold_locks(context, settings, specs)
        if done:
            return PokeReturnValue(is_done=True, xcom_value=specs)
        message = lock_wait_message(blocking, settings)
        now = pendulum.now("UTC")
        waited = now - (context["ti"].get_first_reschedule_date(context) or now)
        if waited >= timedelta(minutes=settings.lock_wait_minutes):
            raise AirflowFailException(f"{message} Waited {waited}.")
        print(message)
        return PokeReturnValue(is_done=False)

    @task(map_index_template="{{ region }}")
    def collect(spec: dict) -> dict:
        from platemask.airflow_support import collect_region

        context = get_current_context()
        context["region"] = spec["region"]
        return collect_region(context, Settings.from_airflow(), spec)

    @task(trigger_rule="all_done")
    def shard(specs: list[dict]) -> list[dict]:
        """Shards of every region that was collected: one region's failed collect does not stop the others."""
        from platemask import runs

        _planned(specs)
        return runs.make_shards(_client(), Settings.from_airflow(), list(specs))

    @task
    def of_backend(shards: list[dict], backend: str) -> list[dict]:
        """The shards of one backend: each backend's task group maps over its own, the other's over
        none (skipped without taking a worker slot or a GPU pool slot)."""
        return [s for s in shards if s["spec"]["backend"] == backend]

    def _mask(shard: dict) -> dict:
        """Mask the shard's photos (local model, or the transform job's polygons) and upload them."""
        from platemask import runs
        from platemask.airflow_support import detector_factory, hold_lock_to_mask

        get_current_context()["shard_label"] = _label(shard)
        settings = Settings.from_airflow()
        hold_lock_to_mask(get_current_context(), settings, shard["spec"])  # also when cleared after the run ended
        model = get_current_context()["params"].get("model")
        return runs.mask_shard(_client(), settings, shard, detector_factory(settings, model))

    @task_group
    def process(shard: dict):
        """backend=local: one shard masked with the model on a worker: the GPU queue and pool."""
        task(_mask, task_id="mask", queue=SETTINGS.queue, pool=SETTINGS.pool, execution_timeout=timedelta(hours=4),
             map_index_template="{{ shard_label }}")(shard)

    @task_group
    def sagemaker(shard: dict):
        """backend=sagemaker: one shard's Batch Transform job (submit, deferred wait: no worker slot
        while it runs), then masking with its polygons: only blurring, so the CPU queue and pool."""

        @task(map_index_template="{{ shard_label }}")
        def submit(shard: dict) -> dict:
            """Start (or find) the shard's Batch Transform job."""
            from platemask.airflow_support import submit_transform

            get_current_context()["shard_label"] = _label(shard)
            return submit_transform(Settings.from_airflow(), shard, get_current_context()["params"].get("model"))

        waited = TransformWaitOperator(task_id="wait", shard=submit(shard), map_index_template="{{ shard_label }}",
                                       on_failure_callback=_stop_transform).output
        task(_mask, task_id="mask", queue=SETTINGS.cpu_queue, pool=SETTINGS.cpu_pool,
             execution_timeout=timedelta(hours=4), map_index_template="{{ shard_label }}")(waited)

    @task(trigger_rule="all_done")
    def qa(specs: list[dict]) -> list[dict]:
        """QA per planned region from this run's records, whatever happened upstream: photos of failed
        shards count as failed (shard_failed), a region that was not collected is reported as such."""
        from platemask import runs
        from platemask.airflow_support import hold_locks_for_qa

        _planned(specs)
        settings = Settings.from_airflow()
        hold_locks_for_qa(get_current_context(), settings, list(specs))  # (cleared after release: if still its)
        return runs.aggregate(_client(), settings, list(specs), run_id=get_current_context()["dag_run"].run_id)

    @task
    def check(specs: list[dict], reports: list[dict]) -> None:
        """Fail unless every planned region has a passing QA report: each photo of its manifest exactly one
        record, failure rate within the limit (the reports are already written)."""
        from platemask import runs
        from platemask.runspec import RunError

        try:
            runs.check_reports(list(specs), list(reports))
        except RunError as exc:
            raise AirflowFailException(str(exc)) from None

    @task(outlets=[MASKED, QA], map_index_template="{{ region }}")
    def publish(report: dict) -> None:
        """Asset events for one region, only when its QA passed, it was not a dry run, and its report is
        still the window's current one (the latest report holds exactly its bytes)."""
        from airflow.sdk.exceptions import AirflowSkipException

        from platemask import runs

        context = get_current_context()
        context["region"] = report["region"]
        extra = runs.asset_extra(report)
        if extra is None:
            raise AirflowSkipException(f"{report['region']}: no Asset event ("
                                       + ("dry run" if report["dry_run"] else
                                          f"partial run: max_images covered {report['planned']} of {report['listed']} "
                                          "photos; run the window without max_images" if report.get("partial") else
                                          "; ".join(report["problems"])) + ")")
        # only for the window's current report: a qa or publish task cleared after the run released its
        # locks (after a newer run of the window, say) would send consumers to stale QA
        stale = runs.not_current(_client(), Settings.from_airflow(), report)
        if stale is not None:
            raise AirflowSkipException(f"no Asset event: {stale}")
        for asset in (MASKED, QA):
            context["outlet_events"][asset].extra = extra

    @task(trigger_rule="all_done")
    def release(specs: list[dict]) -> None:
        """Release this run's day locks (after QA has updated the latest reports); nothing
        to release when the plan failed (no locks were taken)."""
        from platemask.airflow_support import release_locks

        release_locks(Settings.from_airflow(), list(specs or []))

    @task(trigger_rule="one_failed", retries=0)
    def watcher() -> None:
        """Downstream of every task: fails the run when anything failed, so its final state is the truth."""
        raise AirflowFailException("a task of this run failed (see the failed tasks' logs and the QA reports): "
                                   "the run is failed even though its QA reports were written")

    specs = plan()
    held = hold(specs)
    collected = collect.expand(spec=held)
    shards = shard(specs)
    collected >> shards
    by_backend = {b: of_backend.override(task_id=f"{b}_shards")(shards, b) for b in BACKENDS}
    groups = {"local": process, "sagemaker": sagemaker}  # one task group per backend
    processed = [groups[b].expand(shard=by_backend[b]) for b in BACKENDS]
    reports = qa(specs)
    processed >> reports
    checked = check(specs, reports)
    published = publish.expand(report=reports)
    released = release(specs)
    reports >> released
    [specs, held, collected, shards, *by_backend.values(), *processed, reports, checked, published, released] >> watcher()


COMMON = dict(
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=2,
    doc_md=__doc__,
    tags=["platemask", "privacy"],
    default_args={"retries": SETTINGS.retries, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": 2.0,
                  "max_retry_delay": timedelta(minutes=10)},
    on_failure_callback=schedules.failure_notifier(SETTINGS),  # SNS; None when alerts are off
)

# any region or ALL, by hand (explicit window, or the local day that ended before it was triggered)
plate_masking_dag = dag(dag_id=schedules.MANUAL_DAG_ID, schedule=None, params=params, **COMMON)(plate_masking)()

# one per region: its local midnight, its local day; the deadline alerts for scheduled runs only
# (PLATEMASK_DEADLINE_HOURS=0 leaves it off: Airflow 3.3.2's dag.test() crashes on DAGs with
# deadlines once the run succeeds, so tests and the demo use the manual DAG or turn it off)
for _region in SETTINGS.regions:
    globals()[schedules.region_dag_id(_region)] = dag(
        dag_id=schedules.region_dag_id(_region),
        schedule=schedules.nightly_timetable(SETTINGS, _region),
        params={**params, "region": Param(_region, enum=[_region], title="Region")},
        deadline=schedules.deadline_alert(SETTINGS),
        **COMMON,
    )(plate_masking)()
