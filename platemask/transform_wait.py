"""Deferrable wait for a shard's SageMaker transform job: no worker slot is held while it runs.

``TransformWaitOperator`` defers at once to ``TransformJobTrigger`` (the job was started seconds
before), and after every trigger event checks the job on a worker with ``sagemaker_backend.poll``
(a failed job that made progress is followed by an attempt over the photos still without output,
and the wait defers again on that attempt; a stopped job is not: StopTransformJob is an
operator's decision, and its photos without output fail ``transform_job_stopped``). The trigger polls
DescribeTransformJob in the triggerer (the same hook as the tasks, so a local transform runner's
outcome is seen too) until the job ends or the wait's deadline passes; the task then resumes on a
worker and checks again: a new attempt means another deferral, a finished one returns the shard
with the job's final state for the mask step. Past ``sagemaker_max_runtime_hours`` (counted from
the wait's start) the task fails without retry; the DAG's ``on_failure_callback`` stops the jobs.

Importing this module (the DAG file does, at parse time) touches no network and no torch.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator

from airflow.sdk import BaseOperator
from airflow.triggers.base import BaseTrigger, TriggerEvent

from .constants import TRANSFORM_JOB_ENDED
from .settings import Settings

log = logging.getLogger("platemask.transform_wait")


def shard_label(shard: dict) -> str:
    return f"{shard['spec']['region']} #{shard['index']} ({shard['count']} photos)"


class TransformJobTrigger(BaseTrigger):
    """Fires once the transform job ``job`` has ended (Completed, Failed, Stopped), or once
    ``deadline`` (ISO date-time) has passed with the job still running (``timed_out``).

    ``settings`` is the deferring task's ``Settings`` as a dict: the triggerer builds the same
    SageMaker hook from it (connection, local runner) and reads no Variable.
    """

    def __init__(self, job: str, settings: dict, deadline: str, poll_seconds: float = 60.0):
        super().__init__()
        self.job, self.settings, self.deadline, self.poll_seconds = job, settings, deadline, float(poll_seconds)
        self._hook = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"job": self.job, "settings": self.settings, "deadline": self.deadline, "poll_seconds": self.poll_seconds})

    def _describe(self) -> dict:
        """Blocking (boto3): run in a thread, never on the triggerer's event loop."""
        if self._hook is None:
            from .airflow_support import sagemaker_hook

            self._hook = sagemaker_hook(Settings.from_dict(self.settings))
        return self._hook.describe_transform_job(self.job)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        deadline = datetime.fromisoformat(self.deadline)
        while True:
            desc = await asyncio.to_thread(self._describe)
            state = desc["TransformJobStatus"]
            event = {"job": self.job, "state": state, "failure_reason": desc.get("FailureReason"),
                     "deadline": self.deadline, "timed_out": False}
            if state in TRANSFORM_JOB_ENDED:
                log.info("transform job %s: %s", self.job, state)
                yield TriggerEvent(event)
                return
            left = (deadline - datetime.now(timezone.utc)).total_seconds()
            if left <= 0:
                yield TriggerEvent({**event, "timed_out": True})
                return
            log.info("transform job %s: %s; next check in %.0f s", self.job, state, min(self.poll_seconds, left))
            await asyncio.sleep(min(self.poll_seconds, left))


class TransformWaitOperator(BaseOperator):
    """Wait for the shard's transform job and return the shard with the job's final state.
    ``shard`` is the submit task's XCom, rendered again on every resume, so each check starts from
    it as a retry would (``poll`` follows the run's attempts from there)."""

    template_fields = ("shard",)
    ui_color = "#ffe4b5"

    def __init__(self, *, shard: Any, **kwargs):
        super().__init__(**kwargs)
        self.shard = shard

    def execute(self, context) -> dict:
        context["shard_label"] = shard_label(self.shard)
        settings = Settings.from_airflow()
        deadline = datetime.now(timezone.utc) + timedelta(hours=settings.sagemaker_max_runtime_hours)
        job = self.shard["transform"].get("job")
        if job is None:  # nothing to do: every photo already masked with this model
            return self._check(context, settings, deadline)
        # the job was started seconds ago: defer at once (the trigger's first check may find it ended)
        self._defer(job, settings, deadline)

    def resume(self, context, event: dict) -> dict:
        context["shard_label"] = shard_label(self.shard)
        settings = Settings.from_airflow()
        if event.get("timed_out"):
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(
                f"transform job {event['job']} is still {event['state']} after sagemaker_max_runtime_hours="
                f"{settings.sagemaker_max_runtime_hours:g}: it is stopped and the shard's photos count as failed "
                "(never published; the next run redoes them). Look at the job in the SageMaker console "
                "(CloudWatch logs /aws/sagemaker/TransformJobs) before raising the limit.")
        return self._check(context, settings, datetime.fromisoformat(event["deadline"]))

    def _check(self, context, settings: Settings, deadline: datetime) -> dict:
        from .airflow_support import poll_transform

        done, shard = poll_transform(settings, self.shard, context["params"].get("model"))
        if done:
            return shard
        self._defer(shard["transform"]["job"], settings, deadline)

    def _defer(self, job: str, settings: Settings, deadline: datetime) -> None:
        left = deadline - datetime.now(timezone.utc)
        trigger = TransformJobTrigger(job=job, settings=dataclasses.asdict(settings), deadline=deadline.isoformat(),
                                      poll_seconds=settings.sagemaker_poll_seconds)
        # the trigger fires at the deadline; the deferral's own timeout is only a backstop behind it
        self.defer(trigger=trigger, method_name="resume",
                   timeout=max(left, timedelta(0)) + timedelta(seconds=3 * settings.sagemaker_poll_seconds + 60))
