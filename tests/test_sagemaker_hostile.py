"""backend=sagemaker, second review: the local transform runner held to AWS Batch Transform's
documented behaviour where a hostile operator or a broken job meets it."""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from platemask.runspec import RunSpec
from platemask.sagemaker_backend import manifest_document, stop, transform_request
from platemask.settings import Settings

SPEC = RunSpec(region="DE", window_start="2026-11-19T23:00:00+00:00", window_end="2026-11-20T23:00:00+00:00",
               run_id="manual__hostile", backend="sagemaker")


class _Container:
    """A container on 127.0.0.1 that answers the first ``quick`` records at once and holds the
    rest until ``release`` is set; ``answered`` counts the records it got."""

    def __init__(self, quick: int):
        self.quick, self.release, self.answered, self.lock = quick, threading.Event(), 0, threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"status": "ok"} if self.path == "/ping" else {"MaxConcurrentTransforms": 1})

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with owner.lock:
                    owner.answered += 1
                    n = owner.answered
                if n > owner.quick:
                    owner.release.wait(60)
                self._send(200, {"record": n})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.server.shutdown()


def _transform_of(s3, settings: Settings, keys: list[str], job: str) -> tuple[list[dict], dict]:
    """``keys`` put in the settings' bucket (small bodies: these tests' containers read none), their
    manifest, and the transform request of job ``job`` over them: (entries, request)."""
    entries = []
    for i, key in enumerate(keys):
        s3.put_object(Bucket=settings.bucket, Key=key, Body=b"photo %d" % i)
        entries.append({"key": key, "size": 7, "etag": s3.head_object(Bucket=settings.bucket, Key=key)["ETag"]})
    s3.put_object(Bucket=settings.bucket, Key="m.manifest", Body=json.dumps(manifest_document(settings, entries)).encode())
    return entries, transform_request(settings, SPEC, job=job, model="platemask-m", entries=entries,
                                      manifest_uri=f"s3://{settings.bucket}/m.manifest")


def _describe_until(hook, job: str, states: tuple[str, ...], timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while True:
        desc = hook.describe_transform_job(job)
        if desc["TransformJobStatus"] in states or time.monotonic() > end:
            return desc
        time.sleep(0.1)


def test_a_job_stopped_while_its_container_starts_ends_stopped_at_once(aws_conn):
    """StopTransformJob while the instance starts (no container answers /ping yet): the local runner
    only looked for a stop between records, so the job sat InProgress, then Stopping, for the whole
    180 s health-check wait, then ended Failed, not Stopped; its thread outlived the test that started
    it (a pytest run then waited minutes at exit). Now it ends Stopped within the runner's 1 s look,
    with no record sent and no output."""
    from conftest import _free_port

    from platemask.airflow_support import sagemaker_hook

    s3 = aws_conn
    settings = Settings(bucket=f"hs-{uuid.uuid4().hex[:8]}", sagemaker_local_endpoint=f"http://127.0.0.1:{_free_port()}")
    s3.create_bucket(Bucket=settings.bucket)
    job = f"pm-stopearly-{uuid.uuid4().hex[:8]}-a0"
    _, request = _transform_of(s3, settings, [f"raw/DE/2026/11/20/car{i}.jpg" for i in range(3)], job)
    hook = sagemaker_hook(settings, s3)
    hook.create_transform_job(request, wait_for_completion=False)
    time.sleep(1.0)
    assert hook.describe_transform_job(job)["TransformJobStatus"] == "InProgress"  # waiting for /ping
    stop(hook, {"transform": {"job": job, "attempt": 0}})
    desc = _describe_until(hook, job, ("Completed", "Failed", "Stopped"), timeout=20)
    assert desc["TransformJobStatus"] == "Stopped" and not desc.get("FailureReason"), desc
    out = request["TransformOutput"]["S3OutputPath"][len(f"s3://{settings.bucket}/"):]
    assert s3.list_objects_v2(Bucket=settings.bucket, Prefix=out).get("KeyCount", 0) == 0
    assert _thread_ends(f"local-transform-{job}")  # the runner's thread is done too


def _thread_ends(name: str, timeout: float = 5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not [t for t in threading.enumerate() if t.name == name and t.is_alive()]:
            return True
        time.sleep(0.05)
    return False


def test_a_stopped_local_job_stops_starting_records_and_ends_stopped(aws_conn):
    """The DAG's on_failure_callback (``sagemaker_backend.stop``) stops a job past its deadline. moto
    has no StopTransformJob: the local runner went on, wrote every ``.out`` and said Completed, so
    no stopped job, nor what the backend does after one, could be seen before AWS."""
    from platemask.airflow_support import sagemaker_hook

    s3 = aws_conn
    container = _Container(quick=2)
    try:
        settings = Settings(bucket=f"hs-{uuid.uuid4().hex[:8]}", sagemaker_local_endpoint=container.url,
                            sagemaker_max_concurrent=2)
        s3.create_bucket(Bucket=settings.bucket)
        job = f"pm-stop-{uuid.uuid4().hex[:8]}-a0"
        entries, request = _transform_of(s3, settings, [f"raw/DE/2026/11/20/car {i}+%#é.jpg" for i in range(8)], job)
        assert request["MaxConcurrentTransforms"] == 2
        hook = sagemaker_hook(settings, s3)
        hook.create_transform_job(request, wait_for_completion=False)
        end = time.monotonic() + 30
        while container.answered < 4 and time.monotonic() < end:  # 2 answered, 2 held by the container
            time.sleep(0.05)
        assert container.answered == 4

        stop(hook, {"transform": {"job": job, "attempt": 0}})
        assert hook.describe_transform_job(job)["TransformJobStatus"] == "Stopping"
        time.sleep(1.2)  # the runner looks for a stop at most once a second
        container.release.set()
        desc = _describe_until(hook, job, ("Completed", "Failed", "Stopped"))
        assert desc["TransformJobStatus"] == "Stopped"
        assert not desc.get("FailureReason")
        out = request["TransformOutput"]["S3OutputPath"][len(f"s3://{settings.bucket}/"):]
        written = [o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket, Prefix=out).get("Contents", [])]
        assert len(written) == 2, written  # the two answered before the stop; none after it
        assert all(w[len(out):-len(".out")] in {e["key"] for e in entries} for w in written)
        assert container.answered == 4  # no record started after the stop
        # an ended job cannot be stopped again (AWS: ValidationException); the backend's stop logs it
        from botocore.exceptions import ClientError

        with pytest.raises(ClientError, match="already ended"):
            hook.get_conn().stop_transform_job(TransformJobName=job)
    finally:
        container.close()


def test_a_failure_reason_names_a_photo_only_by_its_whole_key(aws_conn):
    """``_named_in`` matched keys by substring: a FailureReason naming ``.../IMG_10`` (names without
    an extension are photos too) or ``.../car.jpg.jpg`` also "named" ``.../IMG_1`` and ``.../car.jpg``
    when those were pending and the longer key was not: they were left out of the next attempt and
    failed transform_record_failed, blamed for another record's failure (found by reading the code).
    A key is named now only where its whole URI stands in the reason (text, whitespace or
    punctuation after it), never as the start of a longer key."""
    from platemask.sagemaker_backend import leave_out

    s3 = aws_conn
    settings = Settings(bucket=f"hs-{uuid.uuid4().hex[:8]}")
    s3.create_bucket(Bucket=settings.bucket)
    keys = ["raw/DE/2026/11/20/IMG_1", "raw/DE/2026/11/20/car.jpg", "raw/DE/2026/11/20/car 2.jpg"]
    pending = []
    for key in keys:
        s3.put_object(Bucket=settings.bucket, Key=key, Body=b"photo " + key.encode())
        pending.append({"key": key, "size": 1, "etag": s3.head_object(Bucket=settings.bucket, Key=key)["ETag"].strip('"')})

    def left(reason: str) -> dict[str, str]:
        desc = {"FailureReason": reason, "MaxPayloadInMB": 25}
        return {k: v["reason"] for k, v in leave_out(s3, settings, desc, "pm-x-a0", 0, pending, {}).items()}

    uri = f"s3://{settings.bucket}/raw/DE/2026/11/20/"
    # the local runner's wording, and free text as AWS may word it: another record, not these
    assert left(f"ClientError: record {uri}IMG_10 got 413 from the container: too large") == {}
    assert left(f"ClientError: record {uri}car.jpg.jpg got 413 from the container") == {}
    assert left(f"AlgorithmError: {uri}IMG_1.jpg: Unable to get response from algorithm") == {}
    # named whole: each one alone
    assert left(f"ClientError: record {uri}IMG_1 got 413 from the container") == {keys[0]: "transform_record_failed"}
    assert left(f"AlgorithmError: {uri}car.jpg: Unable to get response") == {keys[1]: "transform_record_failed"}
    assert left(f"ClientError: record {uri}car 2.jpg is 30000000 bytes, over the job's MaxPayloadInMB of 25") == {
        keys[2]: "transform_record_failed"}
    assert left(f"failed on '{uri}IMG_1'") == {keys[0]: "transform_record_failed"}
    assert left(f"failed on {uri}IMG_1") == {keys[0]: "transform_record_failed"}
    # a longer key of the shard that is not pending (its output is in, or it was left out already):
    # 'raw/.../my' was blamed for 'my car.jpg', whose name has a space where a URI in prose may end
    mine = "raw/DE/2026/11/20/my"
    s3.put_object(Bucket=settings.bucket, Key=mine, Body=b"photo")
    pending = [{"key": mine, "size": 1, "etag": s3.head_object(Bucket=settings.bucket, Key=mine)["ETag"].strip('"')}]
    desc = {"FailureReason": f"ClientError: record {uri}my car.jpg got 400 from the container", "MaxPayloadInMB": 25}
    assert leave_out(s3, settings, desc, "pm-x-a0", 0, pending, {}, [mine, mine + " car.jpg"]) == {}
    desc = {"FailureReason": f"ClientError: record {uri}my got 400 from the container", "MaxPayloadInMB": 25}
    assert list(leave_out(s3, settings, desc, "pm-x-a0", 0, pending, {}, [mine, mine + " car.jpg"])) == [mine]


def _stopped_part_way(s3, model_dir, server_url, scene, stop):
    """Four photos in one job that answers a0 and holds b1 until released; ``stop(settings, hook, submitted)``
    stops the job then, and the wait follows it to its end. (settings, hook, photos, job, the waited shard,
    requests the container answered in all)."""
    from test_sagemaker import _FlakyContainer, _four_photos, _local_runner_settings, _shard_of, _wait

    from platemask.airflow_support import sagemaker_hook
    from platemask.sagemaker_backend import submit

    photos = _four_photos(scene)
    with _FlakyContainer(server_url, [], hold_after=1) as container:  # a0 answered, b1 held until released
        settings = _local_runner_settings(s3, container.url, max_concurrent=1)
        shard = _shard_of(s3, settings, photos)
        hook = sagemaker_hook(settings, s3)
        resubmit = lambda sh: submit(hook, s3, settings, sh, str(model_dir))  # noqa: E731
        submitted = resubmit(shard)
        job = submitted["transform"]["job"]
        end = time.monotonic() + 60
        while container.passed < 2 and time.monotonic() < end:
            time.sleep(0.05)
        assert container.passed == 2
        stop(settings, hook, submitted)
        assert hook.describe_transform_job(job)["TransformJobStatus"] == "Stopping"
        time.sleep(1.2)  # the runner looks for a stop at most once a second
        container.release.set()
        waited = _wait(hook, submitted, resubmit=resubmit)
        return settings, hook, photos, job, waited, container.passed


def test_a_job_an_operator_stops_is_not_resubmitted_and_its_rest_fails_saying_so(aws_conn, model_dir, server_url,
                                                                                  scene):
    """An operator stops a running transform job (console or CLI: StopTransformJob). The DAG's wait
    took the Stopped job like a failed one and started an attempt over the photos it had not done,
    at once and without a word: the stop was undone (and each further stop started the next of up
    to 10 attempts). A stop is now the end of the shard's jobs: what the job finished is masked,
    the rest fails transform_job_stopped, saying who may have stopped it and what to do."""
    from test_sagemaker import _job_manifests, _published, _records

    from platemask.airflow_support import detector_factory
    from platemask.runs import mask_shard
    from platemask.sagemaker_backend import outputs_present

    s3 = aws_conn
    settings, hook, photos, job, waited, passed = _stopped_part_way(  # the operator stops it
        s3, model_dir, server_url, scene, lambda settings, hook, submitted: hook.get_conn().stop_transform_job(
            TransformJobName=submitted["transform"]["job"]))
    assert passed == 2  # nothing sent after the stop, by this job or another
    done, *rest = sorted(photos)
    t = waited["transform"]
    assert t["job"] == job and t["attempt"] == 0 and t["state"] == "Stopped", t
    assert list(_job_manifests(s3, hook, job[:-1])) == [job]  # no attempt over the rest
    assert outputs_present(s3, t["output"]) == {done}
    recs = _records(s3, settings, mask_shard(s3, settings, waited, detector_factory(settings, str(model_dir)),
                                             log=lambda m: None))
    assert set(recs) == set(photos) and recs[done]["status"] == "masked"
    for key in rest:
        assert recs[key]["status"] == "failed" and recs[key]["reason"] == "transform_job_stopped", recs[key]
        error = recs[key]["error"]
        assert key in error and job in error and "StopTransformJob" in error and "rerun" in error, error
    assert _published(s3, settings) == {done.replace("raw/", "masked/", 1)}


def test_a_job_this_dag_stopped_is_followed_by_an_attempt_over_the_rest_when_its_wait_is_cleared(
        aws_conn, model_dir, server_url, scene):
    """The wait's on_failure_callback stops the shard's job (a wait that failed, e.g. at its deadline),
    and the failure alert says to clear the failed tasks. The cleared wait saw a Stopped job and took
    it for an operator's stop: the rest of the shard failed transform_job_stopped where an attempt
    over the rest used to finish it. The DAG's own stop is now marked, and only an unmarked stop ends
    the shard's attempts."""
    from test_sagemaker import _job_manifests, _records

    from platemask.airflow_support import detector_factory, stop_transform
    from platemask.runs import mask_shard

    s3 = aws_conn
    settings, hook, photos, job, waited, _ = _stopped_part_way(  # the failed wait's on_failure_callback stops it
        s3, model_dir, server_url, scene, lambda settings, hook, submitted: stop_transform(settings, submitted))
    # ... and the wait, cleared, followed it to its end
    t = waited["transform"]
    assert t["state"] == "Completed" and t["attempt"] == 1, t
    assert list(_job_manifests(s3, hook, job[:-1])) == [job, job[:-1] + "1"]
    recs = _records(s3, settings, mask_shard(s3, settings, waited, detector_factory(settings, str(model_dir)),
                                             log=lambda m: None))
    assert set(recs) == set(photos) and all(r["status"] == "masked" for r in recs.values()), recs


def test_a_container_that_dies_fails_its_job_at_once_naming_why_instead_of_retrying_every_record(aws_conn,
                                                                                                 monkeypatch):
    """The container dies part-way through a job (out of memory, a crash): every request after is refused.
    The local runner tried each remaining record through all its retries before failing the job (here 30
    records x 4 tries, minutes when each try waits out the invocation timeout), and its FailureReason
    blamed the first such record by its URI, so the backend left that photo out as transform_record_failed
    although the photo was not the cause. AWS fails the job once the container stops answering /ping. Now
    a request without an answer is followed by one /ping: no answer there fails the job at once, naming
    both, no record named; the records not sent are counted, those answered before keep their output."""
    import platemask.local_transform as local_transform
    from platemask.local_transform import run_local_transform

    monkeypatch.setattr(local_transform, "DEAD_CONTAINER_GRACE_S", 2.0)  # how long /ping may stay unanswered
    s3 = aws_conn
    answered = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            data = json.dumps({"status": "ok"} if self.path == "/ping" else {"MaxConcurrentTransforms": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            answered.append(self.path)
            if len(answered) > 3:  # the fourth request finds the container dying: no answer, and no more
                threading.Thread(target=lambda: (server.shutdown(), server.server_close()), daemon=True).start()
                self.close_connection = True
                return
            data = b'{"status": "no_plate"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = Settings(bucket=f"hd-{uuid.uuid4().hex[:8]}", sagemaker_max_concurrent=1,
                        sagemaker_local_endpoint=f"http://127.0.0.1:{server.server_address[1]}")
    s3.create_bucket(Bucket=settings.bucket)
    _, request = _transform_of(s3, settings, [f"raw/DE/2026/11/20/car{i:02d}.jpg" for i in range(30)],
                               f"pm-dead-{uuid.uuid4().hex[:8]}-a0")
    outcome = run_local_transform(request, settings.sagemaker_local_endpoint, s3, log=lambda m: None)
    assert outcome["TransformJobStatus"] == "Failed", outcome
    why = outcome["FailureReason"]
    assert "the container stopped answering" in why and "GET /ping then answered" in why, why
    assert f"s3://{settings.bucket}/raw/" not in why  # no photo is blamed for the container's death
    assert (outcome["done"], outcome["failed"], outcome["not_sent"]) == (3, [], 27), outcome
    assert len(answered) == 4  # the request it died on was not sent again
    out = request["TransformOutput"]["S3OutputPath"][len(f"s3://{settings.bucket}/"):]
    assert s3.list_objects_v2(Bucket=settings.bucket, Prefix=out).get("KeyCount") == 3
