"""backend=sagemaker: the ``.out`` contract between the container and the mask step, and the
container server's own environment, attacked as an operator or a broken deployment would."""
from __future__ import annotations

import hashlib
import io
import json
import uuid

import numpy as np
import pytest

from platemask.runspec import RunSpec
from platemask.settings import Settings

from conftest import jpeg_bytes

SPEC = RunSpec(region="DE", window_start="2026-11-19T23:00:00+00:00", window_end="2026-11-20T23:00:00+00:00",
               run_id="manual__contract", backend="sagemaker")


def _setup(s3, photos: dict[str, bytes], *, threshold=None):
    """A bucket holding ``photos``, a shard listing them as collect+shard would, and its spec."""
    settings = Settings(bucket=f"smc-{uuid.uuid4().hex[:8]}", sagemaker_image_uri="1.dkr.ecr.us-east-1.amazonaws.com/pm:t",
                        sagemaker_role_arn="arn:aws:iam::123456789012:role/pm")
    s3.create_bucket(Bucket=settings.bucket)
    entries = []
    for key, body in photos.items():
        s3.put_object(Bucket=settings.bucket, Key=key, Body=body)
        head = s3.head_object(Bucket=settings.bucket, Key=key)
        entries.append({"key": key, "size": head["ContentLength"], "etag": head["ETag"].strip('"')})
    spec = RunSpec(**{**SPEC.as_dict(), "threshold": threshold})
    shard_key = f"runs/DE/{spec.window.id}/{spec.run_id}/shards/0000.jsonl"
    s3.put_object(Bucket=settings.bucket, Key=shard_key, Body="".join(json.dumps(e) + "\n" for e in entries).encode())
    shard = {"spec": spec.as_dict(), "shard": f"s3://{settings.bucket}/{shard_key}", "index": 0, "count": len(entries)}
    return settings, shard


def _container_record(key: str, body: bytes, model_dir, plates: list[dict], near: list[dict] | None = None,
                      threshold: float | None = None) -> dict:
    """The record the container writes for ``body`` (what ``serve`` answers: the CLI's record and
    the threshold it ran at, ``threshold`` or the model's)."""
    from PIL import Image

    from platemask.model import load_config

    w, h = Image.open(io.BytesIO(body)).size
    return {"key": "", "status": "masked" if plates else "no_plate", "width": w, "height": h, "plates": plates,
            "near_misses": near or [], "model": load_config(model_dir).identity(),
            "input_sha256": hashlib.sha256(body).hexdigest(), "output_sha256": None, "review": False,
            "threshold": load_config(model_dir).score_threshold if threshold is None else threshold}


def _completed_job(s3, settings, shard, records: dict[str, dict]) -> dict:
    """The shard as the wait returns it after a Completed job whose ``.out`` files are ``records``."""
    job = "pm-de-contract-a0"
    out = f"s3://{settings.bucket}/sagemaker/output/DE/{RunSpec.from_dict(shard['spec']).window.id}/{job}/"
    for key, rec in records.items():
        s3.put_object(Bucket=settings.bucket, Key=out[len(f"s3://{settings.bucket}/"):] + key + ".out",
                      Body=json.dumps(rec).encode())
    return {**shard, "transform": {"job": job, "attempt": 0, "output": out, "outputs": [out], "state": "Completed",
                                   "failure_reason": None, "left_out": {}}}


def _mask(s3, settings, shard, model_dir) -> dict[str, dict]:
    from platemask.airflow_support import detector_factory
    from platemask.runs import mask_shard

    result = mask_shard(s3, settings, shard, detector_factory(settings, str(model_dir)), log=lambda m: None)
    key = result["detections"].split(f"s3://{settings.bucket}/")[1]
    recs = [json.loads(line) for line in s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read().splitlines()]
    assert len({r["key"] for r in recs}) == len(recs)
    return {r["key"]: r for r in recs}


def _region_change(s3, settings, key: str, original: np.ndarray, quad) -> float:
    """Mean absolute change of the published copy of ``key`` inside ``quad`` (0: left as it was)."""
    from PIL import Image

    body = s3.get_object(Bucket=settings.bucket, Key="masked/" + key.split("raw/", 1)[1])["Body"].read()
    out = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"), np.float32)
    x0, y0 = np.floor(np.min(quad, axis=0)).astype(int)
    x1, y1 = np.ceil(np.max(quad, axis=0)).astype(int)
    return float(np.abs(out[y0:y1, x0:x1] - original[y0:y1, x0:x1].astype(np.float32)).mean())


def test_a_plate_the_container_masked_is_masked_though_its_rounded_score_is_under_the_threshold(aws_conn, model_dir, scene):
    """A run at threshold 0.12344 (any threshold with more than 4 decimals): the container masks a
    plate scoring 0.123443 and writes its score rounded to 4 decimals, 0.1234. The check accepted it
    (within the rounding) but the mask step split the plates again at 0.12344: the plate the
    container masked was dropped, the photo recorded no_plate and published with the plate readable.
    The container's split is kept now: the plate is masked. The other way round (a run at 0.12346,
    a near miss scoring 0.12345 written as 0.1235) the mask step masked what the container and the
    local backend leave unmasked: it stays a near miss, as the container decided."""
    s3 = aws_conn
    img, quads, _ = scene
    body = jpeg_bytes(img)
    quad = np.asarray(quads[0], np.float64)
    polygon = [[round(float(x), 1), round(float(y), 1)] for x, y in quad]
    key = "raw/DE/2026/11/20/rounded.jpg"

    settings, shard = _setup(s3, {key: body}, threshold=0.12344)
    plate = {"score": round(0.123443, 4), "polygon": polygon}  # masked by the container (>= 0.12344), written 0.1234
    assert plate["score"] < 0.12344
    recs = _mask(s3, settings, _completed_job(s3, settings, shard, {key: _container_record(key, body, model_dir, [plate], threshold=0.12344)}),
                 model_dir)
    assert recs[key]["status"] == "masked" and len(recs[key]["plates"]) == 1, recs[key]
    assert _region_change(s3, settings, key, img, quad) > 10, "the plate was published readable"

    settings, shard = _setup(s3, {key: body}, threshold=0.12346)
    near = {"score": round(0.12345, 4), "polygon": polygon}  # a near miss (< 0.12346) written 0.1235
    assert near["score"] >= 0.12346
    recs = _mask(s3, settings, _completed_job(s3, settings, shard, {key: _container_record(key, body, model_dir, [], [near], threshold=0.12346)}),
                 model_dir)
    assert recs[key]["status"] == "no_plate" and len(recs[key]["near_misses"]) == 1, recs[key]


BAD_SERVER_ENVIRONMENT = [("SAGEMAKER_MODEL_SERVER_WORKERS", v) for v in ("0", "four", "-1", "1.5")] + \
                         [("PLATEMASK_SERVER_THREADS", v) for v in ("0", "x")] + \
                         [("SAGEMAKER_MODEL_SERVER_TIMEOUT", v) for v in ("abc", "-5")]


@pytest.mark.parametrize("name,value", BAD_SERVER_ENVIRONMENT)
def test_a_bad_worker_count_threads_or_timeout_fails_the_health_check_with_its_name(name, value, tmp_path, model_dir):
    """The real server with SAGEMAKER_MODEL_SERVER_WORKERS=four (or threads, timeout that are no
    whole numbers) exited with a ValueError traceback before it listened, and with 0 workers or 0
    threads gunicorn's master listened with no worker to answer: the transform job failed on its
    health check after minutes, with no reason (or, with more workers than the host holds, never).
    Now the server starts on the defaults and /ping answers 503 bad_environment naming the variable,
    as it does for a bad threshold; the job fails on that, with that reason."""
    import os

    from conftest import _free_port
    from test_serve import start_refusing_server

    port = _free_port()
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS="1",
               PLATEMASK_MODEL_DIR=str(model_dir), PLATEMASK_DEVICE="cpu")
    env[name] = value
    log = tmp_path / "server.log"
    url, proc, status, body = start_refusing_server(env, port, log, "bad_environment",
                                                    "a server whose environment is wrong must not pass /ping")
    try:
        assert proc.poll() is None, f"the server exited:\n{log.read_text()[-2000:]}"
        assert status == 503 and body.get("reason") == "bad_environment", (status, body, log.read_text()[-2000:])
        assert f"{name}={value!r}" in body["error"] and "leave it unset" in body["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_server_environment_check_leaves_good_values_alone():
    from platemask.serve import gunicorn_options, server_environment

    values, problems = server_environment({"SAGEMAKER_MODEL_SERVER_WORKERS": " 3 ", "PLATEMASK_SERVER_THREADS": "2",
                                           "SAGEMAKER_MODEL_SERVER_TIMEOUT": "0"})
    assert problems == [] and values == {"workers": 3, "threads": 2, "timeout": 0}
    values, problems = server_environment({"SAGEMAKER_BATCH": "true"})
    assert problems == [] and values["workers"] >= 1 and values["threads"] == 8 and values["timeout"] == 3600
    assert gunicorn_options()["raw_env"] == [f"SAGEMAKER_MODEL_SERVER_WORKERS={gunicorn_options()['workers']}"]


class _Throttled:
    """An S3 client whose ``op`` (``head_object``, ``get_object``) of ``key`` fails with a throttling
    error while ``on`` (the rest as is)."""

    def __init__(self, s3, key: str, op: str):
        self.s3, self.key, self.op, self.on = s3, key, op, False

    def __getattr__(self, name):
        call = getattr(self.s3, name)
        if name != self.op:
            return call

        def throttled(**kw):
            from botocore.exceptions import ClientError

            if self.on and kw.get("Key") == self.key:
                raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."}},
                                  "".join(w.title() for w in name.split("_")))
            return call(**kw)

        return throttled


def test_a_failed_s3_check_while_the_wait_walks_the_attempts_does_not_forget_the_running_attempt(
        aws_conn, model_dir, server_url, scene):
    """Attempt 0 fails on its first record (big.jpg, re-uploaded at 7 MB after the listing: the
    container's 413) and on the two others (the container answered them 503 until the job's
    retries ran out), so without any output; S3 shows big.jpg changed, so attempt 1 runs over the
    two other photos. Every later check of the wait walks the attempts again from the submit task's
    XCom, and asks S3 again: when that HEAD failed (throttling, a moment's 5xx), attempt 0 looked
    like a failure without progress, the walk stopped there and the wait ended on attempt 0
    ``Failed``: attempt 1's work was never read, both photos failed transform_job_failed (the
    shard's every photo, on AWS up to 5,000). An attempt that exists is walked into, whatever
    the re-check says: both are masked, and big.jpg alone fails."""
    import dataclasses

    from platemask.airflow_support import detector_factory, sagemaker_hook
    from platemask.runs import mask_shard
    from platemask.sagemaker_backend import submit

    s3 = aws_conn
    settings = Settings(bucket=f"smc-{uuid.uuid4().hex[:8]}", sagemaker_image_uri="1.dkr.ecr.us-east-1.amazonaws.com/pm:t",
                        sagemaker_role_arn="arn:aws:iam::123456789012:role/pm", sagemaker_max_concurrent=1,
                        sagemaker_local_endpoint=server_url)
    s3.create_bucket(Bucket=settings.bucket)
    big, b, c = "raw/DE/2026/11/20/a-big.jpg", "raw/DE/2026/11/20/b.jpg", "raw/DE/2026/11/20/c.jpg"
    photos = {big: jpeg_bytes(scene[0], quality=50), b: jpeg_bytes(scene[0]), c: jpeg_bytes(scene[0][:, ::-1])}
    entries = []
    for key, body in photos.items():
        s3.put_object(Bucket=settings.bucket, Key=key, Body=body)
        head = s3.head_object(Bucket=settings.bucket, Key=key)
        entries.append({"key": key, "size": head["ContentLength"], "etag": head["ETag"].strip('"')})
    spec = SPEC
    shard_key = f"runs/DE/{spec.window.id}/{spec.run_id}/shards/0000.jsonl"
    s3.put_object(Bucket=settings.bucket, Key=shard_key, Body="".join(json.dumps(e) + "\n" for e in entries).encode())
    shard = {"spec": spec.as_dict(), "shard": f"s3://{settings.bucket}/{shard_key}", "index": 0, "count": 3}
    s3.put_object(Bucket=settings.bucket, Key=big, Body=np.random.default_rng(5).bytes(7 * 2**20))  # after listing
    from test_sagemaker import _FlakyContainer

    container = _FlakyContainer(server_url, [photos[b], photos[c]])  # b and c fail attempt 0, not attempt 1
    settings = dataclasses.replace(settings, sagemaker_local_endpoint=container.url)

    flaky = _Throttled(s3, big, "head_object")
    hook = sagemaker_hook(settings, s3)
    resubmit = lambda sh: submit(hook, flaky, settings, sh, str(model_dir))  # noqa: E731
    with container:
        submitted = resubmit(shard)
        # attempt 1 runs over b and c; from then on S3 cannot say what became of big.jpg
        waited = _wait_with_reads_failing_from_attempt_1(hook, submitted, resubmit, flaky)
        assert container.refused == 2 * (settings.sagemaker_invocation_retries + 1)  # in attempt 0 only
    t = waited["transform"]
    assert t["attempt"] == 1 and t["state"] == "Completed", t
    result = mask_shard(s3, settings, waited, detector_factory(settings, str(model_dir)), log=lambda m: None)
    key = result["detections"].split(f"s3://{settings.bucket}/")[1]
    recs = {r["key"]: r for r in map(json.loads, s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read().splitlines())}
    assert recs[b]["status"] == "masked" and recs[c]["status"] == "masked", (recs[b], recs[c])
    assert recs[big]["status"] == "failed", recs[big]


def _wait_with_reads_failing_from_attempt_1(hook, submitted, resubmit, flaky, second=lambda job: None) -> dict:
    """The wait's checks: attempt 0 alone until it ends, then the check that starts attempt 1 (its job
    name to ``second``), then ``flaky`` on (S3 reads failing) for every later check until the wait ends."""
    import time

    from platemask.sagemaker_backend import poll

    deadline = time.monotonic() + 180
    while not poll(hook, submitted)[0]:  # attempt 0 alone
        assert time.monotonic() < deadline
        time.sleep(0.2)
    done, waited = poll(hook, submitted, resubmit=resubmit)  # starts attempt 1 over the rest
    assert not done and waited["transform"]["attempt"] == 1, waited["transform"]
    second(waited["transform"]["job"])
    flaky.on = True
    while True:
        done, waited = poll(hook, submitted, resubmit=resubmit)
        if done:
            return waited
        assert time.monotonic() < deadline, waited["transform"]
        time.sleep(0.2)


def test_a_failed_audit_read_while_the_wait_rechecks_starts_no_second_job(aws_conn, model_dir, server_url, scene):
    """A rerun of a window where done.jpg is already masked: the job is over a-big.jpg and new.jpg.
    Attempt 0 fails on a-big.jpg (re-uploaded at 7 MB after the listing: the container's 413) and
    on new.jpg (answered 503 until the job's retries ran out), and attempt 1 takes new.jpg. Every later check of the wait walks the attempts again and recomputed
    the photos to do from the audit records, where one that cannot be read counts as to do: one
    failed read (throttling) put done.jpg back, the attempts' names (they hash the photos) changed,
    and the wait started a new attempt 0 over the whole shard beside the running attempt 1, which
    it forgot (its output unread, never stopped at the deadline, instances paid twice). The
    attempts' names are now the submit task's: the wait ends on attempt 1, no other job starts."""
    import dataclasses

    from platemask.airflow_support import sagemaker_hook
    from platemask.sagemaker_backend import submit

    s3 = aws_conn
    img, quads, _ = scene
    done_key, big, new_key = "raw/DE/2026/11/20/done.jpg", "raw/DE/2026/11/20/a-big.jpg", "raw/DE/2026/11/20/new.jpg"
    body = jpeg_bytes(img)
    settings, shard = _setup(s3, {done_key: body})
    polygon = [[round(float(x), 1), round(float(y), 1)] for x, y in np.asarray(quads[0], np.float64)]
    recs = _mask(s3, settings, _completed_job(s3, settings, shard, {
        done_key: _container_record(done_key, body, model_dir, [{"score": 0.99, "polygon": polygon}])}), model_dir)
    assert recs[done_key]["status"] == "masked"

    entries = [json.loads(line) for line in s3.get_object(Bucket=settings.bucket, Key=shard["shard"].split("/", 3)[3])[
        "Body"].read().splitlines()]
    for key, photo in ((big, jpeg_bytes(img, quality=50)), (new_key, jpeg_bytes(img[:, ::-1]))):
        s3.put_object(Bucket=settings.bucket, Key=key, Body=photo)
        head = s3.head_object(Bucket=settings.bucket, Key=key)
        entries.append({"key": key, "size": head["ContentLength"], "etag": head["ETag"].strip('"')})
    spec = RunSpec(**{**SPEC.as_dict(), "run_id": "manual__rerun"})
    shard_key = f"runs/DE/{spec.window.id}/{spec.run_id}/shards/0000.jsonl"
    s3.put_object(Bucket=settings.bucket, Key=shard_key, Body="".join(json.dumps(e) + "\n" for e in entries).encode())
    shard = {"spec": spec.as_dict(), "shard": f"s3://{settings.bucket}/{shard_key}", "index": 0, "count": 3}
    s3.put_object(Bucket=settings.bucket, Key=big, Body=np.random.default_rng(5).bytes(7 * 2**20))  # after listing

    from test_sagemaker import _FlakyContainer

    container = _FlakyContainer(server_url, [jpeg_bytes(img[:, ::-1])])  # new.jpg fails attempt 0, not attempt 1
    settings = dataclasses.replace(settings, sagemaker_local_endpoint=container.url, sagemaker_max_concurrent=1)
    flaky = _Throttled(s3, "audit/DE/2026/11/20/done.jpg.json", "get_object")
    hook = sagemaker_hook(settings, s3)
    resubmit = lambda sh: submit(hook, flaky, settings, sh, str(model_dir))  # noqa: E731
    with container:
        submitted = resubmit(shard)
        assert submitted["transform"]["photos"] == 2  # a-big.jpg and new.jpg: done.jpg is masked
        # attempt 0 fails on a-big.jpg and new.jpg, attempt 1 runs over new.jpg; from then on done.jpg's
        # audit record cannot be read
        seconds: list[str] = []
        waited = _wait_with_reads_failing_from_attempt_1(hook, submitted, resubmit, flaky, seconds.append)
        (second,) = seconds
        assert container.refused == settings.sagemaker_invocation_retries + 1  # in attempt 0 only
    assert waited["transform"]["job"] == second and waited["transform"]["state"] == "Completed", waited["transform"]
    ours = sorted(j["TransformJobName"] for j in hook.get_conn().list_transform_jobs(MaxResults=100)["TransformJobSummaries"]
                  if hook.describe_transform_job(j["TransformJobName"])["TransformOutput"]["S3OutputPath"].startswith(
                      f"s3://{settings.bucket}/"))
    assert ours == sorted([submitted["transform"]["job"], second]), ours
