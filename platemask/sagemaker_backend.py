"""Backend "sagemaker": segmentation as a SageMaker Batch Transform job on our container.

Per shard: package the model (content-addressed, uploaded once), create the SageMaker model
(idempotent), write a ManifestFile of the shard's photos still to do (no audit record for this
source ETag, model, mode and threshold), start a transform job with a deterministic name (a
retry finds and reuses its job instead of starting a duplicate), wait without a worker slot
(the DAG's deferred wait, ``platemask.transform_wait``), then mask with the polygons from the
``{output}/{key}.out`` files.

Batch Transform fails the whole job when one record gets a non-2xx answer, so the container
answers 200 with a ``failed`` record for a photo it cannot decode (that photo's failure, not the
job's). A job that fails anyway goes on with its other records (as AWS does) and keeps the
``.out`` files of the records it finished: they are used, and the next attempt's manifest holds
only the rest, less the photos that would fail it again (re-uploaded or gone since the listing,
or named by the FailureReason), which fail on their own; attempts stop when one makes no
progress. A stopped job (StopTransformJob) is the end of the shard's attempts: its ``.out``
files are used, the rest fails ``transform_job_stopped``. ``MaxPayloadInMB`` is the
largest the job's concurrency allows, not the largest listed photo's size: a photo re-uploaded
larger before the job reaches it fails alone (``source_changed``) instead of failing the job. A
photo without ``.out`` fails with the job's FailureReason, a photo whose bytes are not the ones
the container saw fails ``source_changed``; neither is published.

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
from typing import Any, Callable, Iterable

from .constants import MODEL_DIR_ENV, SAGEMAKER_MODEL_DIR, TRANSFORM_JOB_ENDED
from .detections import Plate
from .imageio import ImageError
from .model import load_config
from .package import package_model
from .layout import S3_MAX_KEY_BYTES, audit_key, key_too_long, run_prefix
from .runs import already_done, archived_error, photo_identities, read_audit
from .runspec import RunError, RunSpec
from .settings import Settings
from .storage import MISSING_CODES, S3Store, error_code, parse_s3_uri, read_json_lines

log = logging.getLogger("platemask.sagemaker")

MAX_PAYLOAD_MB = 100  # SageMaker's limit for MaxPayloadInMB, and for MaxConcurrentTransforms x MaxPayloadInMB
NAME_MAX = 63
_NAME_BAD = re.compile(r"[^a-zA-Z0-9-]+")
TERMINAL = TRANSFORM_JOB_ENDED
ENDED_EARLY = ("Failed", "Stopped")
MAX_ATTEMPTS = 10
GPU_INSTANCE = re.compile(r"^ml\.[gp]\d")  # ml.g4dn/g5/g6/p3/p4d/p5...: NVIDIA GPUs


def gpu_instance(instance_type: str) -> bool:
    return bool(GPU_INSTANCE.match(instance_type))


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


def container_environment(settings: Settings, spec: RunSpec, entries: list[dict]) -> dict[str, str]:
    """The job's Environment: all the container reads from the job besides the model (pure)."""
    env = {"SAGEMAKER_MAX_PAYLOAD_IN_MB": str(payload_limits(settings, entries)[0]),
           "PLATEMASK_THRESHOLD": "" if spec.threshold is None else str(spec.threshold)}
    if gpu_instance(settings.sagemaker_instance_type):
        # the container refuses to pass /ping without working CUDA: a GPU job never runs on the CPU
        env["PLATEMASK_REQUIRE_CUDA"] = "1"
    return env


def job_name(spec: RunSpec, shard_index: int, entries: list[dict], model: str, attempt: int = 0, bucket: str = "",
             environment: dict[str, str] | None = None) -> str:
    """Deterministic per (bucket, region, window, run, shard content, model, container environment):
    everything that changes the container's output (the model and image via ``model``, the
    threshold and the CUDA requirement via ``environment``) and nothing it ignores (the mask mode
    is applied later, by the mask step). A retry in the same run finds its job; ``attempt`` only
    moves on after a job with the previous name failed or was stopped; a new run starts its own jobs."""
    env = sorted((environment or {}).items())
    content = _short_hash(bucket, spec.window.id, spec.run_id, shard_index, model, spec.threshold, *env,
                          *(f"{e['key']}@{e['etag']}" for e in entries), n=8)
    day = spec.window.start.strftime("%Y%m%d")
    threshold = "tdef" if spec.threshold is None else f"t{round(spec.threshold * 1000):04d}"  # readable in the console
    return sagemaker_name("pm", spec.region.lower(), day, threshold, f"m{model[-6:]}", content, f"s{shard_index:04d}",
                          f"a{attempt}")


def payload_mb(entries: list[dict]) -> int:
    """The MB the largest listed photo needs; refuses photos SageMaker cannot take."""
    if not entries:
        return 1
    big = max(entries, key=lambda e: e["size"])
    mb = max(1, math.ceil(big["size"] / (1024 * 1024)))
    if mb > MAX_PAYLOAD_MB:
        raise RunError(f"{big['key']} is {big['size'] / 2**20:.0f} MB: above SageMaker's {MAX_PAYLOAD_MB} MB "
                       "MaxPayloadInMB limit; mask it with backend=local or shrink it first")
    return mb


def payload_limits(settings: Settings, entries: list[dict]) -> tuple[int, int]:
    """(MaxPayloadInMB, MaxConcurrentTransforms) of a job over ``entries`` (pure).

    The concurrency is what the largest listed photo allows (SageMaker: their product <= 100 MB);
    the payload limit is then the largest that concurrency allows, not that photo's size: the
    listing is hours older than the job, and a record over the limit fails the whole job (every
    photo after it too, and each attempt pays the instances' start-up). With the defaults (4 at
    once) a photo listed at 0.2 MB and re-uploaded at 20 MB is still taken, and then fails alone
    as ``source_changed``; the limit costs nothing while records stay small."""
    need = payload_mb(entries)
    concurrent = max(1, min(settings.sagemaker_max_concurrent, MAX_PAYLOAD_MB // need))
    return max(need, MAX_PAYLOAD_MB // concurrent), concurrent


def output_uri(settings: Settings, spec: RunSpec, job: str) -> str:
    return f"s3://{settings.bucket}/" + settings.sagemaker_output_prefix.format(region=spec.region, window=spec.window.id) + job + "/"


def output_key_too_long(settings: Settings, spec: RunSpec, raw_key: str) -> str | None:
    """Why a photo cannot go to a transform job, or None: its masked copy or audit record key
    (``layout.key_too_long``), or the ``.out`` key the job would write for it (output prefix, a job
    name of up to 63 characters, the photo's key, ``.out``), is over S3's 1,024 bytes. Such a photo
    would make the job's output upload fail (the job with it), or fail in the mask step anyway."""
    why = key_too_long(settings, spec.region, raw_key)
    if why:
        return why
    bucket, prefix = parse_s3_uri(output_uri(settings, spec, "j" * NAME_MAX))
    n = len((prefix + raw_key + ".out").encode("utf-8"))
    if n > S3_MAX_KEY_BYTES:
        return (f"s3://{settings.bucket}/{raw_key}: the transform job's output key for it would be up to {n} bytes "
                f"(s3://{bucket}/{settings.sagemaker_output_prefix.format(region=spec.region, window=spec.window.id)}"
                f"{{job}}/{{key}}.out), over S3's {S3_MAX_KEY_BYTES:,}-byte limit: not sent to the job; shorten the "
                "photo's path below raw/ or sagemaker_output_prefix (nothing was published)")
    return None


def transform_request(settings: Settings, spec: RunSpec, *, job: str, model: str, manifest_uri: str,
                      entries: list[dict]) -> dict:
    """The CreateTransformJob request (pure)."""
    mb, concurrent = payload_limits(settings, entries)
    out: dict = {"S3OutputPath": output_uri(settings, spec, job), "Accept": "application/json", "AssembleWith": "None"}
    if settings.sagemaker_kms_key_id:
        out["KmsKeyId"] = settings.sagemaker_kms_key_id
    resources: dict = {"InstanceType": settings.sagemaker_instance_type, "InstanceCount": settings.sagemaker_instance_count}
    if settings.sagemaker_kms_key_id:
        resources["VolumeKmsKeyId"] = settings.sagemaker_kms_key_id
    env = container_environment(settings, spec, entries)
    if gpu_instance(settings.sagemaker_instance_type) and settings.sagemaker_transform_ami_version:
        resources["TransformAmiVersion"] = settings.sagemaker_transform_ami_version
    return {
        "TransformJobName": job,
        "ModelName": model,
        "MaxConcurrentTransforms": concurrent,
        "MaxPayloadInMB": mb,
        "BatchStrategy": "SingleRecord",
        "ModelClientConfig": {"InvocationsTimeoutInSeconds": settings.sagemaker_invocation_timeout_s,
                              "InvocationsMaxRetries": settings.sagemaker_invocation_retries},
        "Environment": env,
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
    store = S3Store.for_settings(settings, s3)
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
                                 "Environment": {MODEL_DIR_ENV: SAGEMAKER_MODEL_DIR}},
            "Tags": [{"Key": "platemask:model_sha256", "Value": sha}],
        })
        log.info("created SageMaker model %s", name)
    return name, sha


def photos_to_do(s3, settings: Settings, spec: RunSpec, entries: list[dict], cfg) -> list[dict]:
    """The shard's photos without an audit record for their result identity (source ETag, model,
    config, threshold, mode, metadata policy, code; all of them with ``reprocess``): the same rule
    as the mask step's skip."""
    if spec.reprocess:
        return list(entries)
    identity = photo_identities(spec, entries, cfg.identity(), cfg)

    def done(e: dict) -> bool:
        audit = read_audit(s3, settings, audit_key(settings, spec.region, e["key"]))
        return already_done(s3, settings, spec, e, audit, identity[e["key"]])

    with ThreadPoolExecutor(settings.io_workers) as pool:
        flags = list(pool.map(done, entries))
    return [e for e, d in zip(entries, flags) if not d]


def outputs_present(s3, output: str) -> set[str]:
    """Keys (relative to the manifest prefix, the bucket root) a job wrote a ``.out`` for."""
    bucket, prefix = parse_s3_uri(output)
    return {o["Key"][len(prefix):-len(".out")] for o in S3Store(bucket, client=s3).iter_objects(prefix)
            if o["Key"].endswith(".out")}


def _describe(hook, job: str) -> dict | None:
    try:
        return hook.describe_transform_job(job)
    except Exception as exc:  # noqa: BLE001 - boto's ClientError; anything but "not found" is re-raised
        if not _not_found(exc):
            raise
        return None


_URI_END = re.compile(r"""[\s'"`,;:)\]}>]""")  # a character that ends a URI in prose


def _named_in(reason: str, bucket: str, pending: list[dict], known: Iterable[str] = ()) -> list[dict]:
    """The photos a FailureReason names as ``s3://bucket/key``, whole: the URI must end there (the
    end of the text, whitespace or punctuation that ends a URI in prose; the local runner writes
    ``record s3://bucket/key got ...``), and where a longer pending key's URI starts at the same
    place, that one is named, not this one. ``raw/x/IMG_1`` is not named by ``.../IMG_10`` nor by
    ``.../IMG_1.jpg``, whether or not those are pending. AWS's FailureReason is free text: what
    cannot be read as a whole key names nothing (the photo then stays in the next attempt). ``known``:
    the shard's other keys, also looked for as the longer key (``raw/my`` pending is not named by
    ``.../raw/my car.jpg`` when ``raw/my car.jpg`` has output already or was left out: a space ends a
    URI in prose, and ``raw/my`` was blamed for another record's failure)."""
    longer = {o["key"] for o in pending} | set(known)
    out = []
    for e in pending:
        uri = f"s3://{bucket}/{e['key']}"
        at = reason.find(uri)
        while at != -1:
            end = at + len(uri)
            if (end == len(reason) or _URI_END.match(reason, end)) and not any(
                    len(o) > len(e["key"]) and reason.startswith(f"s3://{bucket}/{o}", at) for o in longer):
                out.append(e)
                break
            at = reason.find(uri, at + 1)
    return out


def _heads(s3, settings: Settings, entries: list[dict], cache: dict) -> None:
    """``cache[key]``: (ETag, size) of each photo now, None when it is gone; left out when S3 does
    not say (the photo then stays in the next attempt). One HEAD a photo, through the storage layer."""
    from botocore.exceptions import BotoCoreError, ClientError

    store = S3Store(settings.bucket, client=s3)

    def head(e: dict):
        try:
            now = store.head(e["key"])
            return e["key"], None if now is None else (now["ETag"].strip('"'), now["ContentLength"])
        except (ClientError, BotoCoreError) as exc:
            log.warning("cannot check s3://%s/%s before the next transform attempt: %s", settings.bucket, e["key"], exc)
        return e["key"], False

    todo = [e for e in entries if e["key"] not in cache]
    if todo:
        with ThreadPoolExecutor(settings.io_workers) as pool:
            cache.update((k, v) for k, v in pool.map(head, todo) if v is not False)


def leave_out(s3, settings: Settings, desc: dict, job: str, attempt: int, pending: list[dict],
              heads: dict, shard_keys: Iterable[str] = ()) -> dict[str, dict]:
    """The photos a failed job left without output that would fail the next attempt too, each
    with its own failure (reason, error) for the mask step: re-uploaded since the listing (another
    ETag: on AWS the usual cause is a record over MaxPayloadInMB, and those bytes would never be
    published in this run anyway) or gone, and those the FailureReason names (the local runner and
    some AWS errors name the record; AWS often says only "see job logs", hence the S3 check)."""
    bucket, why = settings.bucket, desc.get("FailureReason") or "no reason given"
    limit = desc.get("MaxPayloadInMB")
    nxt = "not sent again in this run (the rest of the shard goes on without it)"
    out: dict[str, dict] = {}
    _heads(s3, settings, pending, heads)
    for e in pending:
        uri = f"s3://{bucket}/{e['key']}"
        if e["key"] not in heads:
            continue
        now = heads[e["key"]]
        if now is None:
            out[e["key"]] = {"reason": "source_missing", "error": f"{uri} was deleted after it was listed and transform "
                             f"job {job} failed ({why}): {nxt}; nothing to publish"}
        elif now[0] != e["etag"]:
            over = (f", over the job's MaxPayloadInMB of {limit}" if isinstance(limit, int) and now[1] > limit * 2**20
                    else "")
            out[e["key"]] = {"reason": "source_changed", "error": f"{uri} was re-uploaded after it was listed (ETag "
                             f"{e['etag']} -> {now[0]}, {e['size']} -> {now[1]} bytes{over}) and transform job {job} "
                             f"failed ({why}): {nxt}; not published, the next run lists the new upload and masks it"}
    for e in _named_in(why, bucket, pending, shard_keys):
        out.setdefault(e["key"], {"reason": "transform_record_failed", "error": (
            f"transform job {job} failed on s3://{bucket}/{e['key']} ({why}): {nxt}; not published; see the job's "
            f"CloudWatch logs (/aws/sagemaker/TransformJobs, {job}) for this record; the next run tries it again")})
    return out


def _archived(s3, settings: Settings, entries: list[dict]) -> dict[str, dict]:
    """The photos listed in an archived storage class (Glacier, Deep Archive) whose restore has not
    finished (a HEAD's ``Restore`` header), each with its failure: a transform job cannot read them
    and would fail on every attempt. A photo S3 does not answer for stays in the job."""
    from botocore.exceptions import BotoCoreError, ClientError

    store = S3Store(settings.bucket, client=s3)
    out = {}
    for e in entries:
        if not e.get("storage_class"):
            continue
        try:
            head = store.head(e["key"])
        except (ClientError, BotoCoreError) as exc:
            log.warning("cannot check whether s3://%s/%s is restored: %s", settings.bucket, e["key"], exc)
            continue
        if head is not None and 'ongoing-request="false"' in (head.get("Restore") or ""):
            continue  # restored: readable until its expiry
        out[e["key"]] = {"reason": "archived", "error": archived_error(f"s3://{settings.bucket}/{e['key']}",
                                                                      e["storage_class"])}
    return out


def submit(hook, s3, settings: Settings, shard: dict, model_dir: str) -> dict:
    """Start (or find) this shard's transform job. Returns the shard dict with a ``transform`` entry.

    Walks the attempts of this run: a running or completed job is reused; a failed one
    contributes the ``.out`` files it wrote and the next attempt gets a manifest of the rest, less
    the photos ``leave_out`` finds would fail it again (each gets its own failure in
    ``transform["left_out"]``); a stopped one contributes its ``.out`` files and ends the walk (an
    operator's stop is not undone by a new attempt). An attempt that ended without new output and
    without a photo to leave out ends the walk (no job over the same photos again and again): the
    mask step then fails the rest with that job's FailureReason. An attempt that exists is always walked into, and
    called from the wait (``shard`` is the submit task's XCom) the attempts keep the names it gave
    them: what S3 answers on a later check never starts a second chain of jobs nor forgets one.
    """
    spec = RunSpec.from_dict(shard["spec"])
    entries = read_json_lines(s3, shard["shard"])
    model, model_sha = ensure_model(hook, s3, settings, model_dir)
    todo = photos_to_do(s3, settings, spec, entries, load_config(model_dir))
    # a photo whose output keys S3 would refuse, or one over SageMaker's payload limit (a video in the
    # partition), is never sent: it fails alone (key_too_long, too_large), not the job nor the shard
    not_sent = {e["key"]: {"reason": "key_too_long", "error": why} for e in todo
                if (why := output_key_too_long(settings, spec, e["key"]))}
    not_sent.update({e["key"]: {"reason": "too_large", "error": (
        f"s3://{settings.bucket}/{e['key']} is {e['size'] / 2**20:.0f} MB, above SageMaker's {MAX_PAYLOAD_MB} MB "
        "MaxPayloadInMB limit: not sent to the transform job, not published; mask it with backend=local or shrink "
        "it first")} for e in todo if e["key"] not in not_sent and e["size"] > MAX_PAYLOAD_MB * 2**20})
    not_sent.update(_archived(s3, settings, [e for e in todo if e["key"] not in not_sent]))
    todo = [e for e in todo if e["key"] not in not_sent]
    base = {"model": model, "model_sha256": model_sha, "photos": len(todo)}
    if not todo:
        log.info("shard %s: no photo to send of %d (already masked with this model, or failing alone: keys too "
                 "long for S3, too large, archived): no transform job", shard["shard"], len(entries))
        return {**shard, "transform": {**base, "job": None, "state": "Completed", "outputs": [], "left_out": not_sent}}
    todo_keys = {e["key"] for e in todo}
    earlier: list[str] = []  # outputs of this run's failed or stopped attempts, newest first
    have: set[str] = set()
    left_out: dict[str, dict] = dict(not_sent)  # key -> its own failure: not sent to later attempts
    heads: dict = {}
    last: dict = {}
    # the wait's checks walk the attempts the submit task named (its XCom): recomputed here, the names
    # would follow whatever S3 answers now (an audit record that cannot be read counts as to do), and
    # another name is another job over the whole shard beside the running one
    pinned = (shard.get("transform") or {}).get("job")
    pinned = pinned if isinstance(pinned, str) and re.search(r"-a\d+$", pinned) else None

    def name_of(attempt: int) -> str:
        if pinned:
            return re.sub(r"-a\d+$", f"-a{attempt}", pinned)
        return job_name(spec, shard["index"], todo, model, attempt, settings.bucket, container_environment(settings, spec, todo))

    for attempt in range(MAX_ATTEMPTS):
        job = name_of(attempt)
        output = output_uri(settings, spec, job)
        t = {**base, "job": job, "attempt": attempt, "output": output, "outputs": [output, *earlier],
             "left_out": dict(left_out)}
        desc = _describe(hook, job)
        if desc is None:
            rest = [e for e in todo if e["key"] not in have and e["key"] not in left_out]
            manifest_uri = S3Store.for_settings(settings, s3).put_json(
                run_prefix(settings, spec) + f"transform/{job}.manifest", manifest_document(settings, rest))
            request = transform_request(settings, spec, job=job, model=model, manifest_uri=manifest_uri, entries=rest)
            log.info("starting transform job %s (%d photos, %d already done by earlier attempts, %d left out, "
                     "MaxPayloadInMB %d, MaxConcurrentTransforms %d)", job, len(rest), len(have), len(left_out),
                     request["MaxPayloadInMB"], request["MaxConcurrentTransforms"])
            hook.create_transform_job(request, wait_for_completion=False)
            return {**shard, "transform": {**t, "submitted": len(rest)}}
        state = desc["TransformJobStatus"]
        if state not in ENDED_EARLY:
            log.info("transform job %s already exists (%s): reusing it", job, state)
            return {**shard, "transform": t}
        got = outputs_present(s3, output) & todo_keys
        new = got - have
        have |= got
        earlier.insert(0, output)
        dropped: dict[str, dict] = {}
        if state == "Failed":
            pending = [e for e in todo if e["key"] not in have and e["key"] not in left_out]
            dropped = leave_out(s3, settings, desc, job, attempt, pending, heads, [e["key"] for e in entries])
        # progress: new output, or a photo S3 shows would fail the next attempt too. A photo the
        # FailureReason names alone is no reason for another attempt (a container that fails every
        # record must not cost an attempt per photo): then it fails with the rest, the job's reason
        sure = any(v["reason"] != "transform_record_failed" for v in dropped.values())
        # a stopped job (StopTransformJob: an operator's decision; this DAG stops jobs only once its
        # wait has failed) is not followed by an attempt over the rest: a stop is never undone
        stopped = state == "Stopped" and not stopped_by_dag(s3, settings, output)
        if not (new or sure) or stopped:
            dropped = {}
            # every check of the wait walks the attempts again and asks S3 again: an attempt this
            # run already started (when S3 showed a photo to leave out, and a HEAD that fails now
            # cannot show it) is walked into, never forgotten with its work
            sure = attempt + 1 < MAX_ATTEMPTS and _describe(hook, name_of(attempt + 1)) is not None
        left_out.update(dropped)
        last = {**t, "outputs": list(earlier), "state": state, "failure_reason": desc.get("FailureReason"),
                "left_out": dict(left_out)}
        log.warning("transform job %s %s (%s): %d photos done by it, %d of %d still without output%s", job, state,
                    desc.get("FailureReason") or "no reason given", len(new), len(todo_keys - have), len(todo),
                    "".join(f"; {k} left out of the next attempt ({v['reason']})" for k, v in dropped.items())
                    + ("; stopped (StopTransformJob): no attempt is started over the rest" if stopped and not sure
                       else ""))
        if not ((new and not stopped) or sure) or have | set(left_out) >= todo_keys:
            break
    return {**shard, "transform": last}


def poll(hook, shard: dict, *, resubmit: Callable[[dict], dict] | None = None) -> tuple[bool, dict]:
    """(done, shard with the final state of the job in charge): one check of the deferred wait.

    ``shard`` is what the submit task returned (each check, first or after a resume, starts
    from it). With ``resubmit`` (``submit`` bound to its clients), a failed job is followed through
    the run's attempts: ``submit`` reuses the attempt in charge or starts one over the photos still
    without output, and the wait goes on; it ends at an attempt without progress, or at a stopped one.
    """
    t = shard["transform"]
    if t.get("job") is None:
        return True, shard
    desc = hook.describe_transform_job(t["job"])
    state = desc["TransformJobStatus"]
    while state in ENDED_EARLY and resubmit is not None:
        again = resubmit(shard)["transform"]
        if again["job"] == t["job"]:
            t = again  # the walk ended here: outputs of every attempt, this job's FailureReason
            break
        log.warning("transform job %s %s (%s): the photos it left without output are with %s", t["job"], state,
                    desc.get("FailureReason"), again["job"])
        t = again
        desc = hook.describe_transform_job(t["job"])
        state = desc["TransformJobStatus"]
    done = state in TERMINAL
    return done, {**shard, "transform": {**t, "state": state, "failure_reason": desc.get("FailureReason")}}


def dag_stop_key(output: str) -> str:
    """Where ``stop`` marks a job this DAG stopped itself: next to (not inside) the job's output folder
    (in the run's bucket, as every job's output is)."""
    return parse_s3_uri(output.rstrip("/") + "/")[1].rstrip("/") + ".dag-stop.json"


def stopped_by_dag(s3, settings: Settings, output: str) -> bool:
    """Whether the job writing to ``output`` was stopped by this DAG (``stop``), not by an operator."""
    return S3Store.for_settings(settings, s3).exists(dag_stop_key(output))


def stop(hook, shard: dict, s3=None, settings: Settings | None = None) -> None:
    """Stop the shard's job and any later attempt the wait started (its XCom only names the first).
    With ``s3`` and ``settings`` each job is first marked stopped by this DAG (``dag_stop_key``), so a
    wait cleared afterwards (what the failure alert says to do) follows it with an attempt over the rest
    instead of taking it for an operator's stop, which ends the shard's attempts."""
    t = (shard or {}).get("transform") or {}
    job = t.get("job")
    if not job:
        return
    names = [job]
    if re.search(r"-a\d+$", job):
        names += [re.sub(r"-a\d+$", f"-a{n}", job) for n in range(int(t.get("attempt", 0)) + 1, MAX_ATTEMPTS)]
    spec = RunSpec.from_dict(shard["spec"]) if s3 is not None and settings is not None and shard.get("spec") else None
    for name in names:
        if spec is not None:
            S3Store.for_settings(settings, s3).put_json(dag_stop_key(output_uri(settings, spec, name)),
                                                        {"TransformJobName": name, "stopped_by": "plate_masking"})
        try:
            hook.get_conn().stop_transform_job(TransformJobName=name)
            log.warning("stopped transform job %s", name)
        except Exception as exc:  # noqa: BLE001 - finished or never started jobs cannot be stopped
            log.info("could not stop %s: %s", name, exc)


OUT_STATUSES = ("masked", "no_plate")  # a container record's verdicts besides "failed"
SCORE_ROUNDING = 5e-5  # records carry scores rounded to 4 decimals (detections.Plate.to_json)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REASON = re.compile(r"[a-z][a-z0-9_]{0,47}")


class ThresholdMismatch(ValueError):
    """A record's plates were split at another threshold than this run's."""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _checked_plate(p: Any, where: str) -> Plate:
    if not isinstance(p, dict):
        raise ValueError(f"{where} is {type(p).__name__}, not a plate object")
    score = p.get("score")
    if not _number(score) or not 0.0 <= score <= 1.0:
        raise ValueError(f"{where} has score {score!r}, not a number within [0, 1]")
    poly = p.get("polygon")
    if not isinstance(poly, list) or any(not isinstance(pt, list) or len(pt) != 2 for pt in poly) or len(poly) < 3:
        raise ValueError(f"{where}'s polygon is not a list of at least 3 [x, y] points: {str(poly)[:80]}")
    if not all(_number(c) for pt in poly for c in pt):
        raise ValueError(f"{where}'s polygon has a coordinate that is not a finite number: {str(poly)[:80]}")
    return Plate.from_json(p)


def record_plates(rec: dict, threshold: float) -> list[Plate]:
    """The plates (masked ones, then near misses) of a container record whose status is
    ``masked`` or ``no_plate``, checked as the mask step will use them. ValueError says what is
    wrong: an unknown status, ``plates``/``near_misses`` not lists, a ``masked`` record without
    plates or a ``no_plate`` one with some, a score that is no number in [0, 1], a polygon of fewer
    than 3 points or with a coordinate that is no finite number. ``ThresholdMismatch`` when the
    split between plates and near misses is not this run's (``threshold``, the mask step's
    ``plates_to_mask`` rule): the mask step would leave a plate the container masked unmasked."""
    from .pipeline import HARD_MASK_SCORE

    status = rec.get("status")
    if status not in OUT_STATUSES:
        raise ValueError(f"status {str(status)[:40]!r} is none of masked, no_plate, failed")
    plates, near = rec.get("plates"), rec.get("near_misses", [])
    for name, items in (("plates", plates), ("near_misses", near)):
        if not isinstance(items, list):
            raise ValueError(f"{name} is {type(items).__name__}, not a list")
    if status == "masked" and not plates:
        raise ValueError("status is masked but it has no plates")
    if status == "no_plate" and plates:
        raise ValueError(f"status is no_plate but it has {len(plates)} plate(s)")
    effective = min(threshold, HARD_MASK_SCORE)
    out = []
    for name, items in (("plates", plates), ("near_misses", near)):
        for i, p in enumerate(items):
            plate = _checked_plate(p, f"{name}[{i}]")
            if name == "plates" and plate.score < effective - SCORE_ROUNDING:
                raise ThresholdMismatch(f"plate {i} scores {plate.score:g}, under this run's threshold {effective:g}")
            if name == "near_misses" and plate.score >= effective + SCORE_ROUNDING:
                raise ThresholdMismatch(f"near miss {i} scores {plate.score:g}, at or above this run's threshold "
                                        f"{effective:g}")
            # the container's split stands: the mask step splits again at the threshold, and a score
            # rounded across it (a threshold of more than 4 decimals) would drop a plate the container
            # masked (published readable) or mask a near miss it did not
            if name == "plates" and plate.score < effective:
                plate.score = effective
            elif name == "near_misses" and plate.score >= effective:
                plate.score = math.nextafter(effective, 0.0)
            out.append(plate)
    return out


def transform_detector(settings: Settings, spec: RunSpec, entries: list[dict], model_dir: str | None,
                       transform: dict, s3) -> tuple:
    """Detector that reads the job's ``.out`` records instead of running a model.

    Each photo's record comes from the newest attempt that wrote one. ``detect.expected_sha256``
    holds the SHA-256 of the bytes the container saw per key: the mask step reads the original
    through ``runs.ManifestSource``, which refuses other bytes (``source_changed``).
    """
    from botocore.exceptions import ClientError

    cfg = load_config(model_dir or settings.model_dir)
    outputs = transform.get("outputs") or ([transform["output"]] if transform.get("output") else [])
    job = transform.get("job")
    state = transform.get("state") or "without a state"
    why = transform.get("failure_reason") or f"job ended {state}"
    left_out = transform.get("left_out") or {}

    where: dict[str, str] = {}  # key -> the .out it was read from

    def fetch(key: str) -> dict | ImageError:
        if key in left_out:  # never sent (key too long, too large), or left out after a failed attempt: no .out
            return ImageError(left_out[key]["reason"], left_out[key]["error"])
        for out in outputs:
            out_bucket, out_prefix = parse_s3_uri(out)  # the photo's key is no URI part ('?', '#')
            try:
                body = S3Store(out_bucket, client=s3).read(out_prefix + key + ".out")
            except ClientError as exc:
                if error_code(exc) in MISSING_CODES:
                    continue
                return ImageError("transform_output_unreadable", f"cannot read {out}{key}.out: {exc}")
            where[key] = f"{out}{key}.out"
            try:
                rec = json.loads(body)
            except ValueError:
                return ImageError("bad_transform_output", f"{out}{key}.out is not JSON; not published, the next run "
                                  "redoes it")
            return rec if isinstance(rec, dict) else ImageError("bad_transform_output", f"{out}{key}.out is no "
                                                                "record; not published, the next run redoes it")
        if state == "Stopped":
            return ImageError("transform_job_stopped", f"transform job {job} was stopped (StopTransformJob: by an "
                              "operator, or by this DAG once its wait had failed) before it processed "
                              f"s3://{settings.bucket}/{key}; a stop is not undone: not sent to another attempt, "
                              "not published; once the reason for the stop is dealt with, rerun the window (the "
                              "next nights' late pick-up redoes it too)")
        if state in ENDED_EARLY:
            return ImageError("transform_job_failed", f"transform job {job} ended {state} without output for "
                              f"s3://{settings.bucket}/{key} ({why}); not published; see the job's CloudWatch logs "
                              f"(/aws/sagemaker/TransformJobs, {job}); the next run redoes it")
        return ImageError("no_transform_output", f"transform job {job} wrote no output for "
                          f"s3://{settings.bucket}/{key} ({why}); not published, the next run redoes it")

    keys = [e["key"] for e in entries]
    with ThreadPoolExecutor(settings.io_workers) as pool:
        outputs_by_key = dict(zip(keys, pool.map(fetch, keys)))
    model_info = {**cfg.identity(), "backend": "sagemaker", "transform_job": job}
    identity = cfg.identity()
    threshold = cfg.score_threshold if spec.threshold is None else spec.threshold  # the mask step's (runs.mask_shard)

    def check(key: str, rec: dict | ImageError | None, dec) -> list[Plate] | ImageError:
        """This photo's plates, or its failure: whatever one ``.out`` holds fails that photo alone."""
        try:
            return _check(key, rec, dec)
        except ThresholdMismatch as exc:
            return ImageError("detection_mismatch", f"{where.get(key, key)}: {exc} (the container ran with another "
                              "threshold); not masking with it, not published; the next run redoes it")
        except Exception as exc:  # noqa: BLE001 - a malformed record is its photo's failure, never its batch's
            return ImageError("bad_transform_output", f"{where.get(key, key)} is malformed ({type(exc).__name__}: "
                              f"{exc}); not masking with it, not published; the next run redoes it (if it recurs, "
                              f"look at the container's output for {key})")

    def _check(key: str, rec: dict | ImageError | None, dec) -> list[Plate] | ImageError:
        if rec is None:
            return ImageError("no_transform_output", f"{key} was not in the transform job")
        if isinstance(rec, ImageError):
            return rec
        if rec.get("status") == "failed":  # the container's verdict on this photo
            reason = rec.get("reason")
            return ImageError(reason if isinstance(reason, str) and _REASON.fullmatch(reason) else "container_failed",
                              f"the container could not process it: {str(rec.get('error') or 'no message')[:500]}")
        seen = rec.get("model")
        if not isinstance(seen, dict):
            raise ValueError(f"its model is {type(seen).__name__}, not an object")
        # every hash this model folder has must be the record's: an empty one is no match
        wrong = [k for k in ("weights_sha256", "verifier_sha256", "orientation_sha256") if k in identity and seen.get(k) != identity[k]]
        if wrong:
            return ImageError("detection_mismatch", f"{where.get(key, key)} is not from this model ({', '.join(wrong)} "
                              "differ); not masking with it, not published; the next run redoes it")
        sha = rec.get("input_sha256")
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            return ImageError("detection_mismatch", f"{where.get(key, key)} has no valid input_sha256 ({str(sha)[:70]!r}): "
                              "the bytes the container saw cannot be checked; not masking with it, not published; "
                              "the next run redoes it")
        ran_at = rec.get("threshold")
        if isinstance(ran_at, bool) or not isinstance(ran_at, (int, float)) or ran_at != threshold:
            # below the model's review_low a container at another threshold leaves no trace in the split
            # (the detections between the two are in neither list): the threshold itself must be the run's
            return ImageError("detection_mismatch", f"{where.get(key, key)}: the container ran at threshold "
                              f"{str(ran_at)[:40]}, this run's is {threshold:g} (another threshold, or an "
                              "inference image older than this code); not masking with it, not published; the "
                              "next run redoes it")
        if (rec.get("width"), rec.get("height")) != (dec.width, dec.height):
            return ImageError("detection_mismatch", f"{key}: the container saw {rec.get('width')}x{rec.get('height')}, "
                              f"the worker decoded {dec.width}x{dec.height}; not masking with misplaced polygons")
        return record_plates(rec, threshold)

    def detect(keys, decoded):
        return [check(key, outputs_by_key.get(key), dec) for key, dec in zip(keys, decoded)]

    detect.expected_sha256 = {k: r["input_sha256"] for k, r in outputs_by_key.items()
                              if isinstance(r, dict) and isinstance(r.get("input_sha256"), str) and r["input_sha256"]}
    return detect, model_info, cfg
