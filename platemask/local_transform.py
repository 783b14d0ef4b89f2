"""Local transform runner: does what SageMaker Batch Transform does, against a container on this machine.

Given a CreateTransformJob request, it reads the manifest from S3, waits for ``/ping``, asks
``/execution-parameters``, then POSTs each object to ``/invocations`` as SageMaker would (the
job's ContentType and Accept, one record per request with SplitType=None, at most
MaxConcurrentTransforms at once, retries on 5xx and timeouts up to InvocationsMaxRetries) and
writes the response to ``{S3OutputPath}/{key relative to the manifest prefix}.out``. A record
that fails gets no ``.out``, as with SageMaker.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .storage import parse_s3_uri


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(endpoint: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, _ = _http("GET", endpoint.rstrip("/") + "/ping", timeout=2)
            if status == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"container at {endpoint} did not answer /ping with 200 within {timeout:.0f} s")
        time.sleep(0.5)


def read_manifest(s3, uri: str) -> tuple[str, list[str]]:
    bucket, key = parse_s3_uri(uri)
    doc = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    if not doc or not isinstance(doc[0], dict) or "prefix" not in doc[0]:
        raise ValueError(f"{uri} is not a SageMaker manifest: the first element must be {{'prefix': 's3://…/'}}")
    return doc[0]["prefix"], [str(k) for k in doc[1:]]


def run_local_transform(request: dict, endpoint: str, s3, *, log: Callable[[str], None] = print) -> dict:
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
    max_bytes = int(request.get("MaxPayloadInMB", 6)) * 1024 * 1024
    wait_ready(endpoint)
    status, body = _http("GET", endpoint.rstrip("/") + "/execution-parameters")
    if status == 200 and not request.get("MaxConcurrentTransforms"):
        concurrency = int(json.loads(body).get("MaxConcurrentTransforms", 1))
    url = endpoint.rstrip("/") + "/invocations"

    def one(rel: str) -> tuple[str, int | None, str]:
        data = s3.get_object(Bucket=in_bucket, Key=in_prefix + rel)["Body"].read()
        if len(data) > max_bytes:
            return rel, 413, f"record is {len(data)} bytes, over MaxPayloadInMB"
        last = ""
        for attempt in range(retries + 1):
            try:
                status, resp = _http("POST", url, data, {"Content-Type": content_type, "Accept": accept}, timeout=timeout)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                status, resp, last = None, b"", f"{type(exc).__name__}: {exc}"
            if status is not None and 200 <= status < 300:
                extra = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms} if kms else {}
                s3.put_object(Bucket=out_bucket, Key=out_prefix + rel + ".out", Body=resp, ContentType=accept, **extra)
                return rel, status, ""
            if status is not None and 400 <= status < 500:
                return rel, status, resp.decode(errors="replace")[:500]
            last = last or resp.decode(errors="replace")[:500]
            time.sleep(min(2 ** attempt * 0.2, 5))
        return rel, status, last

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, rel_keys))
    wall = time.perf_counter() - t0
    failed = [{"key": k, "status": s, "error": e} for k, s, e in results if e]
    log(f"local transform {request['TransformJobName']}: {len(rel_keys) - len(failed)}/{len(rel_keys)} records "
        f"in {wall:.1f} s ({len(rel_keys) / wall if wall else 0:.2f} records/s, concurrency {concurrency})")
    return {"records": len(rel_keys), "failed": failed, "seconds": round(wall, 3)}
