"""
### Plate masking

Every night, for each configured region, masks the licence plates in the inspection photos
uploaded for the previous local day: **collect** the day partitions of `raw/{region}/…` into a
manifest, **shard** it, **mask** each shard on a worker (mapped tasks; one model load per shard),
then write **QA** (`qa/{region}/{window}/report.json` and `report.html`) and check the failure
rate. Masked copies go to `masked/{region}/…` with the same relative path; originals are never
modified. Photos already masked for the same source ETag and model are skipped, so reruns and
retries only do what is missing.

Trigger by hand with a region and, optionally, an explicit window; backfill a new region with
`airflow backfill create --dag-id plate_masking --from-date … --to-date … --dag-run-conf '{"region": "TH"}'`.
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import (Asset, AsyncCallback, CronDataIntervalTimetable, DeadlineAlert, DeadlineReference, Param,
                         PokeReturnValue, dag, get_current_context, task, task_group)
from airflow.sdk.exceptions import AirflowFailException

from platemask.settings import Settings

SETTINGS = Settings.load()  # environment only: no network, no database, no torch at parse time
MASKED = Asset(f"s3://{SETTINGS.bucket}/masked/")  # name = URI: one asset per bucket
QA = Asset(f"s3://{SETTINGS.bucket}/qa/")
NULLABLE = {"type": ["null", "string"]}

params = {
    "region": Param("ALL", enum=["ALL", *SETTINGS.regions], title="Region",
                    description="Region to process; ALL (the nightly default) processes every configured region."),
    "window_start": Param(None, **NULLABLE, title="Window start",
                          description="ISO date or date-time (region time if no offset). Leave empty for the run's night."),
    "window_end": Param(None, **NULLABLE, title="Window end", description="Exclusive end, same format as the start."),
    "backend": Param("local", enum=["local", "sagemaker"], title="Segmentation backend"),
    "mode": Param("gaussian", enum=["gaussian", "pixelate", "solid"], title="Masking mode"),
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
                              title="Fail the run above this failure rate (after writing the QA report)"),
}


def _client():
    from platemask.airflow_support import s3_client

    return s3_client(Settings.from_airflow())


def _label(shard: dict) -> str:
    return f"{shard['spec']['region']} #{shard['index']} ({shard['count']} photos)"


def _stop_transform(context) -> None:
    """on_failure_callback of the wait: a timed-out or failed wait stops its SageMaker job."""
    from platemask.airflow_support import stop_transform

    ti = context["ti"]
    stop_transform(Settings.from_airflow(), ti.xcom_pull(task_ids="process.transform_submit", map_indexes=ti.map_index))


@dag(
    dag_id="plate_masking",
    schedule=CronDataIntervalTimetable("0 1 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=2,
    params=params,
    doc_md=__doc__,
    tags=["platemask", "privacy"],
    default_args={"retries": 3, "retry_delay": timedelta(seconds=20), "retry_exponential_backoff": 2.0,
                  "max_retry_delay": timedelta(minutes=10)},
    # Alert (in the triggerer) when a run is not done deadline_hours after it was queued: a nightly
    # run is queued when its window closes. PLATEMASK_DEADLINE_HOURS=0 leaves it off: Airflow
    # 3.3.2's dag.test() crashes on DAGs with deadlines once the run succeeds (DagRun.update_state
    # looks the alerts up by id and gets dicts), so tests and the demo turn it off.
    deadline=DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=timedelta(hours=SETTINGS.deadline_hours),
        callback=AsyncCallback("platemask.airflow_support.deadline_missed"),
    ) if SETTINGS.deadline_hours > 0 else None,
)
def plate_masking():
    @task
    def plan() -> list[dict]:
        from platemask.airflow_support import plan_from_context

        return plan_from_context(get_current_context(), Settings.from_airflow())

    @task(map_index_template="{{ region }}")
    def collect(spec: dict) -> dict:
        from platemask import runs

        get_current_context()["region"] = spec["region"]
        return runs.collect(_client(), Settings.from_airflow(), runs.RunSpec.from_dict(spec))

    @task
    def shard(collected: list[dict]) -> list[dict]:
        from platemask import runs

        return runs.make_shards(_client(), Settings.from_airflow(), list(collected))

    @task_group
    def process(shard: dict):
        """One shard: segmentation backend, then masking and upload."""

        @task(map_index_template="{{ shard_label }}")
        def transform_submit(shard: dict) -> dict:
            """backend=sagemaker: start (or find) the shard's Batch Transform job. local: nothing to do."""
            get_current_context()["shard_label"] = _label(shard)
            if shard["spec"]["backend"] != "sagemaker":
                return shard
            from platemask.airflow_support import submit_transform

            return submit_transform(Settings.from_airflow(), shard, get_current_context()["params"].get("model"))

        @task.sensor(mode="reschedule", poke_interval=SETTINGS.sagemaker_poll_seconds,
                     timeout=SETTINGS.sagemaker_max_runtime_hours * 3600, max_wait=timedelta(minutes=10),
                     exponential_backoff=True, map_index_template="{{ shard_label }}",
                     on_failure_callback=_stop_transform)
        def transform_wait(shard: dict) -> PokeReturnValue:
            """Wait for the job without holding a worker slot (reschedule mode); stop it on timeout."""
            get_current_context()["shard_label"] = _label(shard)
            if shard["spec"]["backend"] != "sagemaker":
                return PokeReturnValue(is_done=True, xcom_value=shard)
            from platemask.airflow_support import poll_transform

            done, shard = poll_transform(Settings.from_airflow(), shard, get_current_context()["params"].get("model"))
            return PokeReturnValue(is_done=done, xcom_value=shard)

        @task(queue=SETTINGS.queue, pool=SETTINGS.pool, execution_timeout=timedelta(hours=4),
              map_index_template="{{ shard_label }}")
        def mask(shard: dict) -> dict:
            """Mask the shard's photos (local model, or the transform job's polygons) and upload them."""
            from platemask import runs
            from platemask.airflow_support import detector_factory

            get_current_context()["shard_label"] = _label(shard)
            settings = Settings.from_airflow()
            model = get_current_context()["params"].get("model")
            return runs.mask_shard(_client(), settings, shard, detector_factory(settings, model))

        return mask(transform_wait(transform_submit(shard)))

    @task(trigger_rule="all_done")
    def qa(collected: list[dict]) -> list[dict]:
        """QA from the shards' detection files of this run; photos of failed shards count as failed."""
        from platemask import runs

        return runs.aggregate(_client(), Settings.from_airflow(), list(collected),
                              run_id=get_current_context()["dag_run"].run_id)

    @task(outlets=[MASKED, QA])
    def check(reports: list[dict]) -> None:
        """Fail the run when a region's failure rate is over the limit (the QA report is already written)."""
        from platemask import runs

        try:
            runs.check_failure_rate(reports)
        except runs.RunError as exc:
            raise AirflowFailException(str(exc)) from None

    collected = collect.expand(spec=plan())
    processed = process.expand(shard=shard(collected))
    reports = qa(collected)
    processed >> reports
    check(reports)


plate_masking_dag = plate_masking()
