"""Backend "sagemaker": segmentation as a SageMaker Batch Transform job on our container.

Per shard: package the model (content-addressed, uploaded once), create the SageMaker model
(idempotent), write a ManifestFile of the shard's photos, start a transform job with a
deterministic name (a retry finds and reuses its job instead of starting a duplicate), wait
without a worker slot (the DAG's reschedule sensor), then mask with the polygons from the
``{output}/{key}.out`` files. A photo without ``.out`` (SageMaker skips failed records) fails
with a reason and is never published.

The SageMaker client is the Airflow Amazon provider's ``SageMakerHook`` (any object with its
create/describe methods works, which keeps this module testable without Airflow).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from .detections import Plate
from .imageio import ImageError
from .model import load_config
from .package import package_model
from .runs import RunError, RunSpec, _get_lines, _put_json, run_prefix
from .settings import Settings
from .storage import S3Store, parse_s3_uri

log = logging.getLogger("platemask.sagemaker")

MAX_PAYLOAD_MB = 100  # SageMaker's limit for MaxPayloadInMB, and for MaxConcurrentTransforms x MaxPayloadInMB
NAME_MAX = 63
_NAME_BAD = re.compile(r"[^a-zA-Z0-9-]+")
TERMINAL = ("Completed", "Failed", "Stopped")


def _short_hash(*parts: Any, n: int = 10) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:n]


def sagemaker_name(*parts: str) -> str:
    """A SageMaker resource name: [a-zA-Z0-9](-*[a-zA-Z0-9])*, at most 63 characters."""
    name = _NAME_BAD.sub("-", "-".join(parts)).strip("-")
    name = re.sub(r"-{2,}", "-", name)[:NAME_MAX].rstrip("-")
    if not name or not name[0].isalnum():
        raise ValueError(f"cannot make a SageMaker name from {parts!r}")
    return name


def model_name(model_sha: str, image_uri: str) -> str:
    return sagemaker_name("platemask", _short_hash(model_sha, image_uri, n=16))


def job_name(spec: RunSpec, shard_index: int, entries: list[dict], model: str, attempt: int = 0, bucket: str = "") -> str:
    """Deterministic per (bucket, region, window, shard content, model, mode); ``attempt`` only
    moves on after a job with the previous name failed or was stopped."""
    content = _short_hash(bucket, spec.window.id, shard_index, model, spec.mode,
                          *(f"{e['key']}@{e['etag']}" for e in entries), n=8)
    day = spec.window.start.strftime("%Y%m%d")
    return sagemaker_name("pm", spec.region.lower(), day, content, f"s{shard_index:04d}", f"a{attempt}")


def payload_mb(entries: list[dict]) -> int:
    """MaxPayloadInMB from the largest photo; refuses photos SageMaker cannot take."""
    if not entries:
        return 1
    big = max(entries, key=lambda e: e["size"])
    mb = max(1, math.ceil(big["size"] / (1024 * 1024)))
    if mb > MAX_PAYLOAD_MB:
        raise RunError(f"{big['key']} is {big['size'] / 2**20:.0f} MB: above SageMaker's {MAX_PAYLOAD_MB} MB "
                       "MaxPayloadInMB limit; mask it with backend=local or shrink it first")
    return mb


def output_uri(settings: Settings, spec: RunSpec, job: str) -> str:
    return f"s3://{settings.bucket}/" + settings.sagemaker_output_prefix.format(region=spec.region, window=spec.window.id) + job + "/"


def transform_request(settings: Settings, spec: RunSpec, *, job: str, model: str, manifest_uri: str,
                      entries: list[dict]) -> dict:
    """The CreateTransformJob request (pure)."""
    mb = payload_mb(entries)
    concurrent = max(1, min(settings.sagemaker_max_concurrent, MAX_PAYLOAD_MB // mb))
    out: dict = {"S3OutputPath": output_uri(settings, spec, job), "Accept": "application/json", "AssembleWith": "None"}
    if settings.sagemaker_kms_key_id:
        out["KmsKeyId"] = settings.sagemaker_kms_key_id
    resources: dict = {"InstanceType": settings.sagemaker_instance_type, "InstanceCount": settings.sagemaker_instance_count}
    if settings.sagemaker_kms_key_id:
        resources["VolumeKmsKeyId"] = settings.sagemaker_kms_key_id
    return {
        "TransformJobName": job,
        "ModelName": model,
        "MaxConcurrentTransforms": concurrent,
        "MaxPayloadInMB": mb,
        "BatchStrategy": "SingleRecord",
        "ModelClientConfig": {"InvocationsTimeoutInSeconds": settings.sagemaker_invocation_timeout_s,
                              "InvocationsMaxRetries": settings.sagemaker_invocation_retries},
        "Environment": {"SAGEMAKER_MAX_PAYLOAD_IN_MB": str(mb), "PLATEMASK_THRESHOLD": ""
                        if spec.threshold is None else str(spec.threshold)},
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "ManifestFile", "S3Uri": manifest_uri}},
            "ContentType": "application/x-image",
            "CompressionType": "None",
            "SplitType": "None",
        },
        "TransformOutput": out,
        "TransformResources": resources,
        "Tags": [{"Key": "platemask:region", "Value": spec.region}, {"Key": "platemask:window", "Value": spec.window.id},
                 {"Key": "platemask:run", "Value": spec.run_id[:256]}],
    }


def manifest_document(settings: Settings, entries: list[dict]) -> list:
    return [{"prefix": f"s3://{settings.bucket}/"}, *(e["key"] for e in entries)]


def _not_found(exc: Exception) -> bool:
    text = str(exc)
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""
    return code in ("ValidationException", "ResourceNotFound") and ("not find" in text.lower() or "not found" in text.lower()
                                                                    or "does not exist" in text.lower())


def ensure_model(hook, s3, settings: Settings, model_dir: str) -> tuple[str, str]:
    """Upload ``model.tar.gz`` under its SHA-256 (once) and create the SageMaker model (once)."""
    if not settings.sagemaker_image_uri or not settings.sagemaker_role_arn:
        raise RunError("backend=sagemaker needs sagemaker_image_uri and sagemaker_role_arn (PLATEMASK_SAGEMAKER_IMAGE_URI, "
                       "PLATEMASK_SAGEMAKER_ROLE_ARN or the platemask_settings Variable); see README 'SageMaker'")
    blob, sha = package_model(model_dir)
    key = f"{settings.sagemaker_model_prefix}{sha}/model.tar.gz"
    store = S3Store(settings.bucket, client=s3, sse=settings.sse, kms_key_id=settings.kms_key_id)
    if not store.exists(key):
        store.write(key, blob, "application/gzip")
        log.info("uploaded model artifact s3://%s/%s", settings.bucket, key)
    name = model_name(sha, settings.sagemaker_image_uri)
    try:
        hook.describe_model(name)
    except Exception as exc:  # noqa: BLE001 - boto's ClientError; anything but "not found" is re-raised
        if not _not_found(exc):
            raise
        hook.create_model({
            "ModelName": name, "ExecutionRoleArn": settings.sagemaker_role_arn,
            "PrimaryContainer": {"Image": settings.sagemaker_image_uri, "ModelDataUrl": f"s3://{settings.bucket}/{key}",
                                 "Environment": {"PLATEMASK_MODEL_DIR": "/opt/ml/model"}},
            "Tags": [{"Key": "platemask:model_sha256", "Value": sha}],
        })
        log.info("created SageMaker model %s", name)
    return name, sha


def submit(hook, s3, settings: Settings, shard: dict, model_dir: str, *,
           local_runner: Callable[[dict], dict] | None = None) -> dict:
    """Start (or find) this shard's transform job. Returns the shard dict with a ``transform`` entry."""
    spec = RunSpec.from_dict(shard["spec"])
    entries = _get_lines(s3, shard["shard"])
    model, model_sha = ensure_model(hook, s3, settings, model_dir)
    manifest_key = run_prefix(settings, spec) + f"transform/{shard['index']:04d}.manifest"
    manifest_uri = _put_json(s3, settings, manifest_key, manifest_document(settings, entries))
    for attempt in range(10):
        job = job_name(spec, shard["index"], entries, model, attempt, settings.bucket)
        try:
            state = hook.describe_transform_job(job)["TransformJobStatus"]
        except Exception as exc:  # noqa: BLE001
            if not _not_found(exc):
                raise
            state = None
        if state in ("Failed", "Stopped"):
            continue  # that attempt is over; the next name starts a fresh job
        request = transform_request(settings, spec, job=job, model=model, manifest_uri=manifest_uri, entries=entries)
        if state is None:
            hook.create_transform_job(request, wait_for_completion=False)
            log.info("started transform job %s (%d photos, MaxPayloadInMB %d, MaxConcurrentTransforms %d)", job,
                     len(entries), request["MaxPayloadInMB"], request["MaxConcurrentTransforms"])
            if local_runner is not None:
                local_runner(request)
        else:
            log.info("transform job %s already exists (%s): reusing it", job, state)
        return {**shard, "transform": {"job": job, "output": request["TransformOutput"]["S3OutputPath"],
                                       "model": model, "model_sha256": model_sha, "attempt": attempt}}
    raise RunError(f"shard {shard['shard']}: 10 transform attempts failed; see the jobs' FailureReason")


def poll(hook, shard: dict) -> tuple[bool, dict]:
    """(done, shard with the job's final state) for the wait sensor."""
    t = shard["transform"]
    desc = hook.describe_transform_job(t["job"])
    state = desc["TransformJobStatus"]
    done = state in TERMINAL
    return done, {**shard, "transform": {**t, "state": state, "failure_reason": desc.get("FailureReason")}}


def stop(hook, shard: dict) -> None:
    t = (shard or {}).get("transform")
    if t:
        try:
            hook.get_conn().stop_transform_job(TransformJobName=t["job"])
            log.warning("stopped transform job %s", t["job"])
        except Exception as exc:  # noqa: BLE001 - already finished jobs cannot be stopped
            log.info("could not stop %s: %s", t["job"], exc)


def transform_detector(settings: Settings, spec: RunSpec, entries: list[dict], model_dir: str | None,
                       transform: dict, s3) -> tuple:
    """Detector that reads the job's ``.out`` records instead of running a model."""
    cfg = load_config(model_dir or settings.model_dir)
    out_bucket, out_prefix = parse_s3_uri(transform["output"])
    why = transform.get("failure_reason") or f"job ended {transform.get('state', 'without a state')}"

    def fetch(key: str) -> dict | ImageError:
        from botocore.exceptions import ClientError

        try:
            body = s3.get_object(Bucket=out_bucket, Key=out_prefix + key + ".out")["Body"].read()
        except ClientError:
            return ImageError("no_transform_output", f"transform job {transform['job']} wrote no output for "
                              f"s3://{settings.bucket}/{key} ({why}); SageMaker skips records the container refused")
        try:
            return json.loads(body)
        except ValueError:
            return ImageError("bad_transform_output", f"unreadable output for {key} from job {transform['job']}")

    with ThreadPoolExecutor(settings.io_workers) as pool:
        outputs = dict(zip([e["key"] for e in entries], pool.map(fetch, [e["key"] for e in entries])))
    model_info = {**cfg.identity(), "backend": "sagemaker", "transform_job": transform["job"]}

    def detect(keys, decoded):
        res = []
        for key, dec in zip(keys, decoded):
            rec = outputs.get(key)
            if isinstance(rec, ImageError) or rec is None:
                res.append(rec or ImageError("no_transform_output", f"{key} was not in the transform job"))
            elif (rec.get("width"), rec.get("height")) != (dec.width, dec.height):
                res.append(ImageError("detection_mismatch", f"{key}: the container saw {rec.get('width')}x{rec.get('height')}, "
                                      f"the worker decoded {dec.width}x{dec.height}; not masking with misplaced polygons"))
            else:
                res.append([Plate.from_json(p) for p in rec.get("plates", []) + rec.get("near_misses", [])])
        return res

    return detect, model_info, cfg
