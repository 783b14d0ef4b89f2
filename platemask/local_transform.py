"""Local transform runner: does what SageMaker Batch Transform does, against a container on this machine.

Given a CreateTransformJob request, it reads the manifest from S3, waits for ``/ping``, asks
``/execution-parameters``, then POSTs each object to ``/invocations`` as SageMaker would (the
job's ContentType and Accept, one record per request with SplitType=None, at most
MaxConcurrentTransforms at once, retries on 5xx and timeouts up to InvocationsMaxRetries) and
writes the response to ``{S3OutputPath}/{key relative to the manifest prefix}.out``.

A container that stops answering (a request gets no answer and /ping then stays unanswered for
``DEAD_CONTAINER_GRACE_S``, or says ``"status": "error"``) fails
the job at once, as AWS does, with a ``FailureReason`` naming the cause and no record; the records
not yet sent are counted (``not_sent``), not each tried through the retries.

Like Batch Transform, a record answered with a non-2xx status (after the retries for 5xx and
timeouts), or over MaxPayloadInMB, fails the whole job, but not the other records: every record
of the manifest is still tried and each one answered 2xx gets its ``.out``, and the job then
ends ``Failed`` with a ``FailureReason`` naming the first failed record (``ClientError: record
s3://bucket/key ...``) and how many failed. (SageMaker developer guide, "Use batch transform" and
Troubleshooting, "Job shows as failed": when the dataset has multiple input files, a transform job
continues to process input files even if it fails to process one; the processed files still
generate usable results. With a ManifestFile and SplitType=None each object is one input file.)
``LocalTransformHook`` puts that outcome where the backend looks for it:
DescribeTransformJob (moto's answer, which always says ``Completed``, overlaid with the
runner's outcome, stored next to the job's output as ``{S3OutputPath}.local-job.json``; until
it is stored the job is ``InProgress``, as a running job on AWS, so the DAG's deferred wait
really waits).

StopTransformJob (moto does not implement it) goes to the runner as on AWS: the job is
``Stopping`` at once, no record is started after the runner sees the stop, a record the container
answers after it gets no ``.out`` (AWS: a stopped job's output is not stored; ``.out`` files
written before stay), and the job ends ``Stopped``. The stop is a marker next to the job's
outcome (``{S3OutputPath}.local-stop.json``), so a stop from another process (the DAG's
``on_failure_callback``) reaches the runner thread of the task that started the job.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .storage import parse_s3_uri


# how long /ping may go unanswered after a request got no answer before the container counts as dead
# (a worker gunicorn restarts after a crash answers again within seconds)
DEAD_CONTAINER_GRACE_S = 30.0


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class ContainerUnhealthy(RuntimeError):
    """/ping reports an error for good (model failed to load, CUDA required but unusable)."""


def wait_ready(endpoint: str, timeout: float = 180.0, stopped: Callable[[], bool] | None = None) -> bool:
    """Until /ping answers 200 (True); a container that reports ``"status": "error"`` fails at once
    (SageMaker would fail the job at its health-check timeout; the outcome is the same). False as
    soon as ``stopped()`` says the job was stopped meanwhile: a StopTransformJob while the instance
    starts ends the job Stopped, as on AWS, not at the health check's timeout minutes later."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if stopped is not None and stopped():
            return False
        try:
            status, body = _http("GET", endpoint.rstrip("/") + "/ping", timeout=2)
            if status == 200:
                return True
            last = f"{status} {body.decode(errors='replace')[:300]}"
            try:
                if json.loads(body).get("status") == "error":
                    raise ContainerUnhealthy(f"container at {endpoint} failed its /ping health check: {last}")
            except (ValueError, AttributeError):
                pass
        except (urllib.error.URLError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"container at {endpoint} did not answer /ping with 200 within {timeout:.0f} s "
                               f"(last answer: {last})")
        time.sleep(0.5)


def read_manifest(s3, uri: str) -> tuple[str, list[str]]:
    bucket, key = parse_s3_uri(uri)
    doc = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    if not doc or not isinstance(doc[0], dict) or "prefix" not in doc[0]:
        raise ValueError(f"{uri} is not a SageMaker manifest: the first element must be {{'prefix': 's3://…/'}}")
    return doc[0]["prefix"], [str(k) for k in doc[1:]]


def job_state_key(output_path: str) -> tuple[str, str]:
    """Where the runner keeps a job's outcome: next to (not inside) the job's output folder."""
    bucket, prefix = parse_s3_uri(output_path.rstrip("/") + "/")
    return bucket, prefix.rstrip("/") + ".local-job.json"


def job_stop_key(output_path: str) -> tuple[str, str]:
    """Where a StopTransformJob for the job is marked: next to its outcome."""
    bucket, key = job_state_key(output_path)
    return bucket, key[:-len(".local-job.json")] + ".local-stop.json"


def stop_requested(s3, output_path: str) -> bool:
    bucket, key = job_stop_key(output_path)
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except s3.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def run_local_transform(request: dict, endpoint: str, s3, *, log: Callable[[str], None] = print,
                        stopped: Callable[[], bool] | None = None) -> dict:
    """Run the job; returns its outcome (``TransformJobStatus``, ``FailureReason``, per-record stats).
    ``stopped`` (default: the job's stop marker, checked at most once a second) says whether a
    StopTransformJob arrived: then no record is started nor written and the job ends ``Stopped``."""
    src = request["TransformInput"]["DataSource"]["S3DataSource"]
    if src["S3DataType"] != "ManifestFile":
        raise ValueError("the local runner implements S3DataType=ManifestFile only")
    if request["TransformInput"].get("SplitType", "None") != "None" or request.get("BatchStrategy") != "SingleRecord":
        raise ValueError("the local runner implements SplitType=None with BatchStrategy=SingleRecord only")
    prefix, rel_keys = read_manifest(s3, src["S3Uri"])
    in_bucket, in_prefix = parse_s3_uri(prefix)
    out_bucket, out_prefix = parse_s3_uri(request["TransformOutput"]["S3OutputPath"].rstrip("/") + "/")
    kms = request["TransformOutput"].get("KmsKeyId")
    content_type = request["TransformInput"]["ContentType"]
    accept = request["TransformOutput"].get("Accept", "application/json")
    client_cfg = request.get("ModelClientConfig", {})
    timeout = client_cfg.get("InvocationsTimeoutInSeconds", 600)
    retries = client_cfg.get("InvocationsMaxRetries", 3)
    concurrency = int(request.get("MaxConcurrentTransforms") or 1)
    max_mb = int(request.get("MaxPayloadInMB", 6))
    max_bytes = max_mb * 1024 * 1024
    name = request["TransformJobName"]
    t0 = time.perf_counter()
    stop_seen = threading.Event()
    checked = [0.0]
    check_lock = threading.Lock()

    def is_stopped() -> bool:
        if stop_seen.is_set():
            return True
        with check_lock:
            if time.monotonic() - checked[0] >= 1.0 or stopped is not None:
                checked[0] = time.monotonic()
                if (stopped or (lambda: stop_requested(s3, request["TransformOutput"]["S3OutputPath"])))():
                    stop_seen.set()
        return stop_seen.is_set()
    def none_started(state: str, **reason) -> dict:
        """The outcome of a job that ended before its first record: nothing sent, nothing stored."""
        return {"TransformJobStatus": state, **reason, "records": len(rel_keys), "done": 0, "failed": [],
                "not_started": len(rel_keys), "not_sent": 0, "seconds": round(time.perf_counter() - t0, 3)}

    try:
        ready = wait_ready(endpoint, stopped=is_stopped)
    except (TimeoutError, ContainerUnhealthy) as exc:  # SageMaker: the container failed its ping health check
        reason = f"ClientError: the container did not pass the /ping health check: {exc}"
        log(f"local transform {name}: Failed ({reason})")
        return none_started("Failed", FailureReason=reason)
    if not ready:  # stopped before the container was up
        log(f"local transform {name}: Stopped before the container passed its health check")
        return none_started("Stopped")
    status, body = _http("GET", endpoint.rstrip("/") + "/execution-parameters")
    if status == 200 and not request.get("MaxConcurrentTransforms"):
        concurrency = int(json.loads(body).get("MaxConcurrentTransforms", 1))
    url = endpoint.rstrip("/") + "/invocations"

    not_started = "not started: the job was stopped"
    not_sent = "not sent: the container stopped answering"
    dead: list[str] = []  # why the container is taken for dead (the first finding)
    dead_lock = threading.Lock()
    ping_url = endpoint.rstrip("/") + "/ping"

    def container_gone(last: str) -> bool:
        """Whether the container is down, asked after a request that got no answer: AWS fails the job
        once the container stops answering /ping or keeps refusing connections; each record then
        waited through every retry (connection refused, or the invocation timeout, again and again),
        minutes of retries over a dead container before the job failed. A /ping that answers (200, or
        503 while a restarted worker loads) means the miss was this request's: it is tried again as before."""
        end = time.monotonic() + DEAD_CONTAINER_GRACE_S
        while not dead:
            try:
                status, body = _http("GET", ping_url, timeout=5)
                try:
                    broken = json.loads(body).get("status") == "error"  # the server says it cannot serve, for good
                except (ValueError, AttributeError):
                    broken = False
                if not broken:  # 200, or 503 loading (a worker restarted by gunicorn): the retries ride it out
                    return False
                ping = f"{status} {body.decode(errors='replace')[:200]}"
                break
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                ping = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > end:  # kept refusing (or not answering) for the whole grace period
                ping += f" for {DEAD_CONTAINER_GRACE_S:g} s"
                break
            time.sleep(1.0)
        if dead:
            return True
        with dead_lock:
            if not dead:
                dead.append(f"POST /invocations got no answer ({last[:200]}) and GET /ping then answered {ping[:200]}")
        return True

    def one(rel: str) -> tuple[str, int | None, str]:
        """(key, the container's last status or None, what went wrong as a phrase after the record's URI).
        A failed record fails the job, not the records after it: they are all tried (AWS goes on with
        the other input files), only a stop ends the job early."""
        if is_stopped():
            return rel, None, not_started
        if dead:
            return rel, None, not_sent
        data = s3.get_object(Bucket=in_bucket, Key=in_prefix + rel)["Body"].read()
        if len(data) > max_bytes:  # SageMaker's own check: the container never sees the record, the job fails
            return rel, None, f"is {len(data)} bytes, over the job's MaxPayloadInMB of {max_mb}: not sent to the container"
        last = ""
        for attempt in range(retries + 1):
            try:
                status, resp = _http("POST", url, data, {"Content-Type": content_type, "Accept": accept}, timeout=timeout)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                status, resp, last = None, b"", f"{type(exc).__name__}: {exc}"
                if container_gone(last):  # the job fails now, naming why; this record and the rest are not sent
                    return rel, None, not_sent
            if status is not None and 200 <= status < 300:
                if is_stopped():  # AWS does not store a stopped job's output
                    return rel, None, not_started
                extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms} if kms else {}
                s3.put_object(Bucket=out_bucket, Key=out_prefix + rel + ".out", Body=resp, ContentType=accept, **extra)
                return rel, status, ""
            if status is not None and 400 <= status < 500:
                return rel, status, f"got {status} from the container: {resp.decode(errors='replace')[:500]}"
            last = last or resp.decode(errors="replace")[:500]
            time.sleep(min(2 ** attempt * 0.2, 5))
        return rel, status, f"got {status or 'no answer'} from the container: {last}"

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, rel_keys))
    wall = time.perf_counter() - t0
    failed = [{"key": k, "status": s, "error": e} for k, s, e in results if e and e not in (not_started, not_sent)]
    skipped = sum(1 for _, _, e in results if e == not_started)
    unsent = sum(1 for _, _, e in results if e == not_sent)
    done = len(rel_keys) - len(failed) - skipped - unsent
    state = "Failed" if failed or dead else "Completed"
    if stop_seen.is_set() or (stopped or (lambda: stop_requested(s3, request["TransformOutput"]["S3OutputPath"])))():
        state = "Stopped"
    outcome = {"TransformJobStatus": state, "records": len(rel_keys), "done": done,
               "failed": failed, "not_started": skipped, "not_sent": unsent, "seconds": round(wall, 3)}
    if dead and state == "Failed":  # no record is named: none of them is the cause
        outcome["FailureReason"] = (
            f"ClientError: the container stopped answering: {dead[0]}; {unsent} of {len(rel_keys)} records were not "
            f"sent, the output of the {done} answered before is stored"
            + (f", {len(failed)} record(s) failed on their own" if failed else "")
            + "; see the container's logs (CloudWatch /aws/sagemaker/TransformJobs) for why it stopped")
    elif failed and state == "Failed":
        first = failed[0]
        more = (f"; {len(failed)} of {len(rel_keys)} records failed, the output of the {done} others is stored"
                if len(failed) > 1 else "")
        outcome["FailureReason"] = f"ClientError: record {prefix}{first['key']} {first['error'][:340]}{more}"
    log(f"local transform {name}: {outcome['TransformJobStatus']}, {done}/{len(rel_keys)} records in {wall:.1f} s "
        f"({done / wall if wall else 0:.2f} records/s, concurrency {concurrency})"
        + (f"; {outcome['FailureReason']}" if outcome.get("FailureReason") else ""))
    return outcome


class LocalTransformHook:
    """A SageMaker hook whose transform jobs run on a local container server.

    The API side (models, job registration, names, tags) goes to the wrapped hook (the Amazon
    provider's ``SageMakerHook``, against moto in tests); ``create_transform_job`` then runs the
    job with ``run_local_transform`` and stores its outcome, and ``describe_transform_job``
    reports that outcome (status and FailureReason) as SageMaker would.
    """

    def __init__(self, hook, endpoint: str, s3, *, log: Callable[[str], None] = print):
        self.hook, self.endpoint, self.s3, self.log = hook, endpoint, s3, log

    def __getattr__(self, name):  # describe_model, create_model, ...
        return getattr(self.hook, name)

    def get_conn(self):
        """The wrapped hook's client, its StopTransformJob going to the local runner."""
        return _LocalClient(self, self.hook.get_conn())

    def stop_transform_job(self, name: str) -> None:
        """StopTransformJob: the job is ``Stopping`` until its runner ends it ``Stopped``. A job that
        has ended cannot be stopped (ValidationException, as on AWS); an unknown one is not found."""
        from botocore.exceptions import ClientError

        desc = self.describe_transform_job(name)  # the wrapped hook raises for an unknown job
        if desc["TransformJobStatus"] not in ("InProgress", "Stopping"):
            raise ClientError({"Error": {"Code": "ValidationException", "Message": (
                f"Transform job {name} has already ended ({desc['TransformJobStatus']}): it cannot be stopped")}},
                "StopTransformJob")
        bucket, key = job_stop_key(desc["TransformOutput"]["S3OutputPath"])
        self.s3.put_object(Bucket=bucket, Key=key, Body=json.dumps({"TransformJobName": name}).encode(),
                           ContentType="application/json")

    def create_transform_job(self, config: dict, wait_for_completion: bool = False, **kw):
        """Register the job, then run it: in a background thread unless ``wait_for_completion``
        (as on AWS, the call returns at once and DescribeTransformJob says ``InProgress`` until
        the outcome is stored). The thread is not a daemon: a task process that started a job
        ends only after it."""
        response = self.hook.create_transform_job(config, wait_for_completion=False, **kw)
        if wait_for_completion:
            self._run(config)
        else:
            threading.Thread(target=self._run, args=(config,), name=f"local-transform-{config['TransformJobName']}",
                             daemon=False).start()
        return response

    def _run(self, config: dict) -> None:
        try:
            outcome = run_local_transform(config, self.endpoint, self.s3, log=self.log)
        except Exception as exc:  # noqa: BLE001 - the job's boundary: any crash is the job's FailureReason, as on AWS
            outcome = {"TransformJobStatus": "Failed", "FailureReason": f"InternalServerError: {type(exc).__name__}: {exc}"}
        bucket, key = job_state_key(config["TransformOutput"]["S3OutputPath"])
        self.s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(outcome).encode(), ContentType="application/json")

    def describe_transform_job(self, name: str) -> dict:
        desc = self.hook.describe_transform_job(name)
        bucket, key = job_state_key(desc["TransformOutput"]["S3OutputPath"])
        try:
            outcome = json.loads(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except self.s3.exceptions.NoSuchKey:  # registered, not (yet) run here
            stopping = stop_requested(self.s3, desc["TransformOutput"]["S3OutputPath"])
            return {**desc, "TransformJobStatus": "Stopping" if stopping else "InProgress"}
        desc = {**desc, "TransformJobStatus": outcome["TransformJobStatus"]}
        if outcome.get("FailureReason"):
            desc["FailureReason"] = outcome["FailureReason"]
        return desc


class _LocalClient:
    """A boto3 SageMaker client whose ``stop_transform_job`` stops the local runner's job."""

    def __init__(self, owner: LocalTransformHook, client):
        self._owner, self._client = owner, client

    def __getattr__(self, name):
        return getattr(self._client, name)

    def stop_transform_job(self, *, TransformJobName: str) -> dict:  # noqa: N803 - boto3's keyword
        self._owner.stop_transform_job(TransformJobName)
        return {}
