"""backend=sagemaker: packaging, the transform request, submission through the Airflow provider
against moto, the local transform runner against the real server, and the DAG end to end."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
import time
import uuid
from datetime import datetime, timezone

import numpy as np
import pytest

from platemask.runspec import RunError, RunSpec
from platemask.sagemaker_backend import (MAX_PAYLOAD_MB, job_name, manifest_document, model_name, payload_mb,
                                         transform_request)
from platemask.settings import Settings

from conftest import jpeg_bytes

NAME_RE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
SPEC = RunSpec(region="DE", window_start="2026-11-19T23:00:00+00:00", window_end="2026-11-20T23:00:00+00:00",
               run_id="scheduled__2026-11-21T01:00:00+00:00", backend="sagemaker")
ENTRIES = [{"key": f"raw/DE/2026/11/20/car{i}.jpg", "size": 300_000 + i, "etag": f"e{i}"} for i in range(3)]


def test_model_package_round_trip(model_dir, tmp_path):
    from platemask.model import load_model
    from platemask.package import package_model

    blob1, sha1 = package_model(model_dir, tmp_path / "model.tar.gz")
    blob2, sha2 = package_model(model_dir)
    assert sha1 == sha2 and blob1 == blob2  # reproducible: content-addressed key, uploaded once
    out = tmp_path / "opt-ml-model"
    with tarfile.open(fileobj=io.BytesIO(blob1)) as tar:
        assert sorted(tar.getnames()) == ["MODEL_CARD.md", "config.json", "orientation.onnx", "orientation.pt", "trunk.onnx",
                                          "verifier.onnx", "verifier.pt", "weights.pt"]
        # the "data" filter (no links out, no absolute paths) exists from Python 3.11.4 on
        tar.extractall(out, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    _, cfg = load_model(out)
    assert cfg.weights_sha256 == json.loads((model_dir / "config.json").read_text())["weights_sha256"]
    from platemask.segment import Segmenter

    seg = Segmenter(out)
    assert seg.model_info == cfg.identity()  # the unpacked folder runs with its verifier
    assert (seg.runtime, seg.verifier.runtime, seg.orientation.runtime) == ("onnx", "onnx", "onnx")  # and its ONNX graphs
    assert "verifier_sha256" in cfg.identity() and "orientation_sha256" in cfg.identity()


def test_job_names_are_valid_deterministic_and_content_bound():
    model = model_name("a" * 64, "123.dkr.ecr.eu-west-1.amazonaws.com/platemask:1")
    assert NAME_RE.match(model)
    n0 = job_name(SPEC, 7, ENTRIES, model)
    assert NAME_RE.match(n0) and len(n0) <= 63
    assert job_name(SPEC, 7, ENTRIES, model) == n0
    assert job_name(SPEC, 7, ENTRIES, model, attempt=1) != n0
    changed = [dict(ENTRIES[0], etag="new"), *ENTRIES[1:]]
    assert job_name(SPEC, 7, changed, model) != n0  # a re-uploaded photo is a new job
    assert job_name(RunSpec(**{**SPEC.as_dict(), "threshold": 0.3}), 7, ENTRIES, model) != n0
    assert "-t0300-" in job_name(RunSpec(**{**SPEC.as_dict(), "threshold": 0.3}), 7, ENTRIES, model)
    assert "-tdef-" in n0 and f"-m{model[-6:]}-" in n0  # threshold and model readable in the console
    assert job_name(RunSpec(**{**SPEC.as_dict(), "run_id": "manual__x"}), 7, ENTRIES, model) != n0  # a run's own jobs
    other_model = model_name("b" * 64, "123.dkr.ecr.eu-west-1.amazonaws.com/platemask:1")
    assert job_name(SPEC, 7, ENTRIES, other_model) != n0
    long = RunSpec(**{**SPEC.as_dict(), "region": "A_VERY_LONG_REGION_NAME_WITH_UNDERSCORES_AND_MORE"})
    assert NAME_RE.match(job_name(long, 9999, ENTRIES, model, attempt=9))


def test_job_names_follow_the_container_environment_not_the_mask_mode():
    """The container ignores the mode (the mask step applies it): a retry with another mode finds
    the same job. What it reads from the job (threshold, CUDA requirement) makes another job: a
    shard retried on a CPU instance after its GPU job failed must not find the failed GPU job."""
    from platemask.sagemaker_backend import container_environment

    model = model_name("a" * 64, "123.dkr.ecr.eu-west-1.amazonaws.com/platemask:1")

    def name(spec, settings):
        return job_name(spec, 0, ENTRIES, model, 0, "photos", container_environment(settings, spec, ENTRIES))

    gpu, cpu = Settings(sagemaker_instance_type="ml.g5.xlarge"), Settings(sagemaker_instance_type="ml.c5.2xlarge")
    pixelate = RunSpec(**{**SPEC.as_dict(), "mode": "pixelate"})
    assert name(pixelate, gpu) == name(SPEC, gpu)
    assert name(SPEC, cpu) != name(SPEC, gpu)
    assert name(RunSpec(**{**SPEC.as_dict(), "threshold": 0.3}), gpu) != name(SPEC, gpu)
    req = transform_request(gpu, SPEC, job="j", model=model, manifest_uri="s3://b/m", entries=ENTRIES)
    assert req["Environment"] == container_environment(gpu, SPEC, ENTRIES)  # one rule for the name and the job


def test_payload_limits():
    assert payload_mb(ENTRIES) == 1
    assert payload_mb([{"key": "k", "size": 5 * 2**20 + 1, "etag": "e"}]) == 6
    with pytest.raises(RunError, match="100 MB"):
        payload_mb([{"key": "raw/DE/huge.tif", "size": 101 * 2**20, "etag": "e"}])
    big = [{"key": "k", "size": 30 * 2**20, "etag": "e"}]
    req = transform_request(Settings(sagemaker_max_concurrent=8), SPEC, job="j", model="m", manifest_uri="s3://b/m",
                            entries=big)
    assert req["MaxConcurrentTransforms"] == 3 and req["MaxPayloadInMB"] >= 30
    assert req["MaxConcurrentTransforms"] * req["MaxPayloadInMB"] <= MAX_PAYLOAD_MB


def test_the_payload_limit_has_the_headroom_the_concurrency_leaves():
    """MaxPayloadInMB was the largest listed photo's size: one photo re-uploaded larger before the
    job reached it failed the whole job. The limit is now the most the concurrency allows (the
    container gets the same in SAGEMAKER_MAX_PAYLOAD_IN_MB), the concurrency unchanged."""
    from platemask.sagemaker_backend import container_environment, payload_limits

    for max_concurrent, entries, expected in [(4, ENTRIES, (25, 4)), (1, ENTRIES, (100, 1)), (8, ENTRIES, (12, 8)),
                                              (4, [{"key": "k", "size": 40 * 2**20, "etag": "e"}], (50, 2))]:
        settings = Settings(sagemaker_max_concurrent=max_concurrent)
        assert payload_limits(settings, entries) == expected
        req = transform_request(settings, SPEC, job="j", model="m", manifest_uri="s3://b/m", entries=entries)
        assert (req["MaxPayloadInMB"], req["MaxConcurrentTransforms"]) == expected
        assert req["Environment"]["SAGEMAKER_MAX_PAYLOAD_IN_MB"] == str(expected[0])
        assert container_environment(settings, SPEC, entries) == req["Environment"]


def test_transform_request_and_manifest():
    s = Settings(bucket="photos", sagemaker_kms_key_id="arn:aws:kms:eu-west-1:1:key/k", sagemaker_instance_type="ml.g5.xlarge")
    req = transform_request(s, SPEC, job="pm-job", model="platemask-x", manifest_uri="s3://photos/m.manifest", entries=ENTRIES)
    assert req["BatchStrategy"] == "SingleRecord"
    assert req["TransformInput"]["ContentType"] == "application/x-image"
    assert req["TransformInput"]["SplitType"] == "None"
    assert req["TransformInput"]["DataSource"]["S3DataSource"] == {"S3DataType": "ManifestFile", "S3Uri": "s3://photos/m.manifest"}
    assert req["TransformOutput"]["S3OutputPath"].startswith("s3://photos/sagemaker/output/DE/20261119T2300Z-20261120T2300Z/pm-job")
    assert req["TransformOutput"]["KmsKeyId"] == s.sagemaker_kms_key_id
    assert req["ModelClientConfig"]["InvocationsTimeoutInSeconds"] > 0 and req["ModelClientConfig"]["InvocationsMaxRetries"] >= 1
    assert manifest_document(s, ENTRIES) == [{"prefix": "s3://photos/"}, *(e["key"] for e in ENTRIES)]


def test_gpu_jobs_require_cuda_on_the_535_driver_ami():
    gpu = transform_request(Settings(sagemaker_instance_type="ml.g5.xlarge"), SPEC, job="j", model="m",
                            manifest_uri="s3://b/m", entries=ENTRIES)
    assert gpu["Environment"]["PLATEMASK_REQUIRE_CUDA"] == "1"
    assert gpu["TransformResources"]["TransformAmiVersion"] == "al2-ami-sagemaker-batch-gpu-535"
    cpu = transform_request(Settings(sagemaker_instance_type="ml.c5.2xlarge"), SPEC, job="j", model="m",
                            manifest_uri="s3://b/m", entries=ENTRIES)
    assert "PLATEMASK_REQUIRE_CUDA" not in cpu["Environment"] and "TransformAmiVersion" not in cpu["TransformResources"]


# ------------------------------------------------------------------ against moto + the real server

@pytest.fixture
def sm_env(aws_conn, monkeypatch, scene):
    s3 = aws_conn
    bucket = f"sm-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    settings = Settings(bucket=bucket, sagemaker_image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/platemask:test",
                        sagemaker_role_arn="arn:aws:iam::123456789012:role/platemask-sagemaker", shard_size=10)
    img = scene[0]
    entries = []
    for i in range(3):
        key = f"raw/DE/2026/11/20/car{i}.jpg"
        body = jpeg_bytes(img) if i < 2 else b"\xff\xd8\xff not a photo"
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        entries.append({"key": key, "size": len(body), "etag": s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')})
    spec = RunSpec(**{**SPEC.as_dict(), "region": "DE"})
    shard_key = f"runs/DE/{spec.window.id}/shards/0000.jsonl"
    s3.put_object(Bucket=bucket, Key=shard_key, Body="".join(json.dumps(e) + "\n" for e in entries).encode())
    shard = {"spec": spec.as_dict(), "shard": f"s3://{bucket}/{shard_key}", "index": 0, "count": len(entries)}
    return s3, settings, shard


def test_submit_through_the_provider_is_idempotent(sm_env, model_dir):
    from platemask.airflow_support import sagemaker_hook
    from platemask.sagemaker_backend import poll, submit

    s3, settings, shard = sm_env
    hook = sagemaker_hook(settings)
    first = submit(hook, s3, settings, shard, str(model_dir))
    job = first["transform"]["job"]
    desc = hook.describe_transform_job(job)
    assert desc["TransformJobName"] == job and desc["ModelName"] == first["transform"]["model"]
    assert hook.describe_model(first["transform"]["model"])["PrimaryContainer"]["Image"] == settings.sagemaker_image_uri
    # a retried submit (or a retried wait) attaches to the same job: no duplicate
    again = submit(hook, s3, settings, shard, str(model_dir))
    assert again["transform"]["job"] == job
    names = [j["TransformJobName"] for j in hook.get_conn().list_transform_jobs()["TransformJobSummaries"]]
    assert names.count(job) == 1
    done, polled = poll(hook, first)
    assert done and polled["transform"]["state"] == "Completed"
    done2, _ = poll(hook, first)  # polling again changes nothing
    assert done2
    models = [o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket, Prefix="sagemaker/models/")["Contents"]]
    assert len(models) == 1 and models[0].endswith("/model.tar.gz")  # uploaded once, content-addressed


def _records(s3, settings, result) -> dict:
    key = result["detections"].split(f"s3://{settings.bucket}/")[1]
    recs = [json.loads(line) for line in s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read().splitlines()]
    by_key = {r["key"]: r for r in recs}
    assert len(by_key) == len(recs)  # exactly one record per photo
    return by_key


def _local(settings, server_url, **kw):
    return dataclasses.replace(settings, sagemaker_local_endpoint=server_url, **kw)


def _shard_of(s3, settings, photos: dict, *, run_id="manual__1", index=0) -> dict:
    """Upload ``photos`` (key -> bytes; None: keep what is there) and write a shard as collect+shard would."""
    entries = []
    for key, body in photos.items():
        if body is not None:
            s3.put_object(Bucket=settings.bucket, Key=key, Body=body)
        head = s3.head_object(Bucket=settings.bucket, Key=key)
        entries.append({"key": key, "size": head["ContentLength"], "etag": head["ETag"].strip('"')})
    spec = RunSpec(**{**SPEC.as_dict(), "run_id": run_id})
    shard_key = f"runs/DE/{spec.window.id}/{run_id}/shards/{index:04d}.jsonl"
    s3.put_object(Bucket=settings.bucket, Key=shard_key, Body="".join(json.dumps(e) + "\n" for e in entries).encode())
    return {"spec": spec.as_dict(), "shard": f"s3://{settings.bucket}/{shard_key}", "index": index, "count": len(entries)}


def _wait(hook, submitted: dict, resubmit=None, timeout: float = 180) -> dict:
    """Poll as the DAG's wait does, each check from the submit task's XCom, until the jobs are done
    (the local runner's jobs run in the background: InProgress at first, as on AWS)."""
    import time

    from platemask.sagemaker_backend import poll

    deadline = time.monotonic() + timeout
    while True:
        done, waited = poll(hook, submitted, resubmit=resubmit)
        if done:
            return waited
        assert time.monotonic() < deadline, f"transform job {waited['transform']['job']} not done in {timeout} s"
        time.sleep(0.2)


def _run_shard(s3, settings, shard, model_dir):
    """transform_submit, transform_wait (until done) and mask, as the DAG runs them."""
    from platemask.airflow_support import detector_factory, sagemaker_hook
    from platemask.runs import mask_shard
    from platemask.sagemaker_backend import submit

    hook = sagemaker_hook(settings, s3)
    submitted = submit(hook, s3, settings, shard, str(model_dir))
    waited = _wait(hook, submitted, resubmit=lambda sh: submit(hook, s3, settings, sh, str(model_dir)))
    result = mask_shard(s3, settings, waited, detector_factory(settings, str(model_dir)), log=lambda m: None)
    return waited, _records(s3, settings, result)


def _published(s3, settings) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket, Prefix="masked/").get("Contents", [])}


def _audit(s3, settings, key) -> dict:
    return json.loads(s3.get_object(Bucket=settings.bucket, Key="audit/" + key.split("raw/", 1)[1] + ".json")["Body"].read())


def test_local_runner_and_missing_outputs_fail_closed(sm_env, model_dir, server_url):
    from platemask.airflow_support import detector_factory
    from platemask.runs import mask_shard

    s3, settings, shard = sm_env
    settings = _local(settings, server_url)
    waited, recs = _run_shard(s3, settings, shard, model_dir)
    assert waited["transform"]["state"] == "Completed"
    out = waited["transform"]["output"].split(f"s3://{settings.bucket}/")[1]
    outs = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket, Prefix=out)["Contents"])
    assert outs == [out + f"raw/DE/2026/11/20/car{i}.jpg.out" for i in range(3)]
    assert recs["raw/DE/2026/11/20/car0.jpg"]["status"] == "masked"
    assert recs["raw/DE/2026/11/20/car2.jpg"]["status"] == "failed"
    # a decodable photo without .out:
    s3.delete_object(Bucket=settings.bucket, Key=out + "raw/DE/2026/11/20/car1.jpg.out")
    spec = dict(waited["spec"], reprocess=True)
    result = mask_shard(s3, settings, {**waited, "spec": spec}, detector_factory(settings, str(model_dir)), log=lambda m: None)
    miss = _records(s3, settings, result)["raw/DE/2026/11/20/car1.jpg"]
    assert miss["status"] == "failed" and miss["reason"] == "no_transform_output" and waited["transform"]["job"] in miss["error"]
    audit = _audit(s3, settings, "raw/DE/2026/11/20/car1.jpg")
    assert audit["status"] == "failed" and audit["masked_key"] is None


def test_an_undecodable_photo_is_its_own_failure_not_the_jobs(sm_env, model_dir, server_url):
    """The container answers 200 with a failed record; the job completes; that photo alone fails."""
    s3, settings, shard = sm_env
    settings = _local(settings, server_url)
    waited, recs = _run_shard(s3, settings, shard, model_dir)
    t = waited["transform"]
    assert t["state"] == "Completed" and t["attempt"] == 0 and not t.get("failure_reason")
    out_bucket, out_prefix = t["output"][len("s3://"):].split("/", 1)
    bad = json.loads(s3.get_object(Bucket=out_bucket, Key=out_prefix + "raw/DE/2026/11/20/car2.jpg.out")["Body"].read())
    assert bad["status"] == "failed" and bad["reason"] in ("not_an_image", "corrupt", "truncated") and bad["input_sha256"]
    assert set(recs) == {f"raw/DE/2026/11/20/car{i}.jpg" for i in range(3)}
    assert [recs[f"raw/DE/2026/11/20/car{i}.jpg"]["status"] for i in range(3)] == ["masked", "masked", "failed"]
    assert _published(s3, settings) == {"masked/DE/2026/11/20/car0.jpg", "masked/DE/2026/11/20/car1.jpg"}


def _remask_with_out(s3, settings, waited, model_dir, key, edit):
    """The job's ``.out`` for ``key`` replaced by ``edit(record)`` (a dict, or bytes as they are),
    then the mask step again over the whole shard (reprocess: earlier audit records do not skip it)."""
    from platemask.airflow_support import detector_factory
    from platemask.runs import mask_shard

    out_bucket, out_prefix = waited["transform"]["output"][len("s3://"):].split("/", 1)
    obj = out_prefix + key + ".out"
    original = s3.get_object(Bucket=out_bucket, Key=obj)["Body"].read()
    body = edit(json.loads(original))
    s3.put_object(Bucket=out_bucket, Key=obj, Body=body if isinstance(body, bytes) else json.dumps(body).encode())
    try:
        shard = {**waited, "spec": dict(waited["spec"], reprocess=True)}
        return _records(s3, settings, mask_shard(s3, settings, shard, detector_factory(settings, str(model_dir)),
                                                 log=lambda m: None))
    finally:
        s3.put_object(Bucket=out_bucket, Key=obj, Body=original)


def test_one_malformed_out_record_fails_its_photo_not_its_detection_batch(sm_env, model_dir, server_url):
    """A two-point polygon, ``plates: null`` or a model that is no object in car0's ``.out`` raised
    out of the batch's check and failed every photo of the batch as detector_error: car1 was never
    published. Now car0 alone fails (bad_transform_output, naming its .out) and car1 is masked."""
    s3, settings, shard = sm_env
    settings = _local(settings, server_url)
    from platemask.airflow_support import sagemaker_hook
    from platemask.sagemaker_backend import submit

    hook = sagemaker_hook(settings, s3)
    waited = _wait(hook, submit(hook, s3, settings, shard, str(model_dir)))
    assert waited["transform"]["state"] == "Completed"
    victim, other = "raw/DE/2026/11/20/car0.jpg", "raw/DE/2026/11/20/car1.jpg"
    cases = {"two_point_polygon": lambda r: {**r, "plates": [{**r["plates"][0], "polygon": r["plates"][0]["polygon"][:2]}]},
             "plates_null": lambda r: {**r, "plates": None},
             "plate_not_an_object": lambda r: {**r, "plates": [7]},
             "plate_without_polygon": lambda r: {**r, "plates": [{"score": r["plates"][0]["score"]}]},
             "model_a_string": lambda r: {**r, "model": "m"},
             "near_misses_a_string": lambda r: {**r, "near_misses": "none"}}
    for case, edit in cases.items():
        recs = _remask_with_out(s3, settings, waited, model_dir, victim, edit)
        assert set(recs) == {f"raw/DE/2026/11/20/car{i}.jpg" for i in range(3)}, case
        bad = recs[victim]
        assert bad["status"] == "failed" and bad["reason"] == "bad_transform_output", (case, bad)
        assert victim + ".out" in bad["error"] and "not published" in bad["error"], (case, bad["error"])
        assert recs[other]["status"] == "masked", (case, recs[other])
        assert recs["raw/DE/2026/11/20/car2.jpg"]["reason"] != "bad_transform_output", case
        assert "masked/DE/2026/11/20/car0.jpg" not in _published(s3, settings), case
        assert _audit(s3, settings, victim)["status"] == "failed", case


def _with_plate(rec, **changes):
    return {**rec, "plates": [{**rec["plates"][0], **changes}, *rec["plates"][1:]]}


def _with_point(rec, value):
    poly = [list(pt) for pt in rec["plates"][0]["polygon"]]
    poly[1][0] = value
    return _with_plate(rec, polygon=poly)


def test_out_records_the_mask_step_cannot_trust_fail_their_photo_closed(sm_env, model_dir, server_url):
    """A NaN score, an unknown status without plates or a masked record without plates were taken
    as no_plate and the photo published unmasked. Every value the mask step uses is checked now:
    car0 fails (not published) with what is wrong in its .out, car1 goes on."""
    s3, settings, shard = sm_env
    settings = _local(settings, server_url)
    from platemask.airflow_support import sagemaker_hook
    from platemask.sagemaker_backend import submit

    hook = sagemaker_hook(settings, s3)
    waited = _wait(hook, submit(hook, s3, settings, shard, str(model_dir)))
    victim, other = "raw/DE/2026/11/20/car0.jpg", "raw/DE/2026/11/20/car1.jpg"
    nan, inf = float("nan"), float("inf")
    from platemask.model import load_config

    under = load_config(model_dir).score_threshold / 2  # the run's threshold: the model's
    cases = {  # name: (edit, reason, words of the error)
        "nan_score": (lambda r: _with_plate(r, score=nan), "bad_transform_output", "score nan"),
        "score_above_one": (lambda r: _with_plate(r, score=1.5), "bad_transform_output", "score 1.5"),
        "negative_score": (lambda r: _with_plate(r, score=-0.2), "bad_transform_output", "score -0.2"),
        "score_a_text": (lambda r: _with_plate(r, score="0.9"), "bad_transform_output", "not a number"),
        "status_bogus": (lambda r: {**r, "status": "totally-not-checked", "plates": [], "near_misses": []},
                         "bad_transform_output", "totally-not-checked"),
        "masked_without_plates": (lambda r: {**r, "plates": [], "near_misses": []}, "bad_transform_output",
                                  "masked but it has no plates"),
        "no_plate_with_plates": (lambda r: {**r, "status": "no_plate"}, "bad_transform_output", "no_plate but"),
        "inf_coordinate": (lambda r: _with_point(r, inf), "bad_transform_output", "not a finite number"),
        "nan_coordinate": (lambda r: _with_point(r, nan), "bad_transform_output", "not a finite number"),
        "text_coordinate": (lambda r: _with_point(r, "12"), "bad_transform_output", "not a finite number"),
        "plate_under_the_threshold": (lambda r: _with_plate(r, score=under), "detection_mismatch", "another threshold"),
        "near_miss_over_the_threshold": (lambda r: {**r, "status": "no_plate", "plates": [],
                                                    "near_misses": [{**r["plates"][0], "score": 0.95}]},
                                         "detection_mismatch", "another threshold"),
        "input_sha256_no_hash": (lambda r: {**r, "input_sha256": ["a"]}, "detection_mismatch", "input_sha256"),
        # a container at another threshold (one that ignored PLATEMASK_THRESHOLD, an older image): under
        # the model's review_low its split leaves no trace, the detections between the two in neither list
        "another_threshold": (lambda r: {**r, "threshold": 0.5}, "detection_mismatch", "another threshold"),
        "no_threshold": (lambda r: {k: v for k, v in r.items() if k != "threshold"}, "detection_mismatch",
                         "older than this code"),
    }
    for case, (edit, reason, words) in cases.items():
        recs = _remask_with_out(s3, settings, waited, model_dir, victim, edit)
        bad = recs[victim]
        assert bad["status"] == "failed" and bad["reason"] == reason, (case, bad)
        assert words in bad["error"] and victim in bad["error"] and "not published" in bad["error"], (case, bad["error"])
        assert recs[other]["status"] == "masked", (case, recs[other])
        assert "masked/DE/2026/11/20/car0.jpg" not in _published(s3, settings), case
    # the record as the container wrote it is still good
    recs = _remask_with_out(s3, settings, waited, model_dir, victim, lambda r: r)
    assert recs[victim]["status"] == "masked" and "masked/DE/2026/11/20/car0.jpg" in _published(s3, settings)


def test_a_regrown_photo_is_left_out_of_the_next_attempt_when_the_failure_reason_does_not_name_it(
        aws_conn, model_dir, server_url, scene):
    """AWS's FailureReason usually names no record ("See job logs"): the photo that failed the job
    is found in S3 (another ETag than the listing's) and left out of the next attempt; the photo
    attempt 0 could not finish (c2: the container answered 503 until the job's retries ran out) is
    masked by that attempt instead of failing transform_job_failed, and b1 is not sent again."""
    s3 = aws_conn
    photos = _four_photos(scene)
    with _FlakyContainer(server_url, [photos["raw/DE/2026/11/20/c2.jpg"]]) as container:
        settings = _local_runner_settings(s3, container.url, max_concurrent=1)
        # re-uploaded at 7 MB: the server's own limit is 6 MB (413), the job's is 100 (one at a time)
        shard = _regrown(s3, settings, photos, "raw/DE/2026/11/20/b1.jpg", np.random.default_rng(5).bytes(7 * 2**20))
        from platemask.airflow_support import sagemaker_hook
        from platemask.local_transform import job_state_key
        from platemask.sagemaker_backend import outputs_present, submit

        hook = sagemaker_hook(settings, s3)
        resubmit = lambda sh: submit(hook, s3, settings, sh, str(model_dir))  # noqa: E731
        submitted = resubmit(shard)
        first = _wait(hook, submitted)["transform"]  # attempt 0 alone: it fails on b1, and on c2
        assert first["state"] == "Failed" and "b1.jpg" in first["failure_reason"]
        assert "2 of 4 records failed" in first["failure_reason"], first["failure_reason"]
        assert outputs_present(s3, first["output"]) == {"raw/DE/2026/11/20/a0.jpg", "raw/DE/2026/11/20/d3.jpg"}
        # as AWS words it: no record named
        desc = hook.describe_transform_job(first["job"])
        bucket, key = job_state_key(desc["TransformOutput"]["S3OutputPath"])
        outcome = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(
            {**outcome, "FailureReason": "ClientError: See job logs for more information"}).encode())
        waited = _wait(hook, submitted, resubmit=resubmit)
        assert container.refused == Settings().sagemaker_invocation_retries + 1  # c2, in attempt 0 only
    t = waited["transform"]
    assert t["state"] == "Completed" and t["attempt"] == 1, t
    assert _job_manifests(s3, hook, re.sub(r"-a\d+$", "-a", t["job"]))[t["job"]] == ["raw/DE/2026/11/20/c2.jpg"]
    left = t["left_out"]["raw/DE/2026/11/20/b1.jpg"]
    assert left["reason"] == "source_changed" and "re-uploaded after it was listed" in left["error"]
    from platemask.airflow_support import detector_factory
    from platemask.runs import mask_shard

    recs = _records(s3, settings, mask_shard(s3, settings, waited, detector_factory(settings, str(model_dir)),
                                             log=lambda m: None))
    assert recs["raw/DE/2026/11/20/b1.jpg"]["status"] == "failed" and recs["raw/DE/2026/11/20/b1.jpg"]["reason"] == "source_changed"
    assert [recs[f"raw/DE/2026/11/20/{k}"]["status"] for k in ("a0.jpg", "c2.jpg", "d3.jpg")] == ["masked"] * 3
    assert _published(s3, settings) == {f"masked/DE/2026/11/20/{k}" for k in ("a0.jpg", "c2.jpg", "d3.jpg")}
    # b1 put back as listed before the mask step: it still fails alone, with what happened to it
    s3.put_object(Bucket=settings.bucket, Key="raw/DE/2026/11/20/b1.jpg", Body=photos["raw/DE/2026/11/20/b1.jpg"])
    again = _records(s3, settings, mask_shard(s3, settings, {**waited, "spec": dict(waited["spec"], reprocess=True)},
                                              detector_factory(settings, str(model_dir)), log=lambda m: None))
    b1 = again["raw/DE/2026/11/20/b1.jpg"]
    assert b1["status"] == "failed" and b1["reason"] == "source_changed" and "not sent again" in b1["error"]


def test_a_failed_job_keeps_its_output_and_only_the_rest_is_resubmitted(aws_conn, model_dir, server_url, scene):
    """A record the container refuses (413: over its SAGEMAKER_MAX_PAYLOAD_IN_MB of 6) fails the job
    as on AWS; what the job finished is used, only the rest (c3: the container answered it 503 until
    the job's retries ran out) goes to the next attempt, less the photo the FailureReason names (it
    would fail that attempt too): it fails alone with the job's reason, and c3 is masked by the next
    attempt (it failed transform_job_failed before)."""
    s3 = aws_conn
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)
    from conftest import png_bytes

    big = png_bytes(noise)
    assert len(big) > 6 * 2**20
    photos = {"raw/DE/2026/11/20/a0.jpg": jpeg_bytes(scene[0]), "raw/DE/2026/11/20/a1.jpg": jpeg_bytes(scene[0][:, ::-1]),
              "raw/DE/2026/11/20/b2.png": big, "raw/DE/2026/11/20/c3.jpg": jpeg_bytes(scene[0], quality=60)}
    container = _FlakyContainer(server_url, [photos["raw/DE/2026/11/20/c3.jpg"]])
    settings = _local_runner_settings(s3, container.url, max_concurrent=1)
    shard = _shard_of(s3, settings, photos)
    from platemask.airflow_support import detector_factory, sagemaker_hook
    from platemask.local_transform import read_manifest
    from platemask.runs import mask_shard
    from platemask.sagemaker_backend import outputs_present, poll, submit

    hook = sagemaker_hook(settings, s3)
    resubmit = lambda sh: submit(hook, s3, settings, sh, str(model_dir))  # noqa: E731
    with container:
        submitted = submit(hook, s3, settings, shard, str(model_dir))
        assert submitted["transform"]["attempt"] == 0 and submitted["transform"]["submitted"] == 4
        waited = _wait(hook, submitted, resubmit=resubmit)
        assert container.refused == Settings().sagemaker_invocation_retries + 1  # c3, in attempt 0 only
    t = waited["transform"]
    assert t["state"] == "Completed" and t["attempt"] == 1 and len(t["outputs"]) == 2
    first = hook.describe_transform_job(re.sub(r"-a1$", "-a0", t["job"]))
    assert first["TransformJobStatus"] == "Failed" and "b2.png" in first["FailureReason"]  # 413, or the connection it closed
    assert outputs_present(s3, t["outputs"][1]) == {"raw/DE/2026/11/20/a0.jpg", "raw/DE/2026/11/20/a1.jpg"}
    assert t["left_out"]["raw/DE/2026/11/20/b2.png"]["reason"] == "transform_record_failed"
    # the second attempt's manifest held only the photos the first left without output, less b2
    desc = hook.describe_transform_job(t["job"])
    manifest = desc["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"]
    assert read_manifest(s3, manifest)[1] == ["raw/DE/2026/11/20/c3.jpg"]
    # the next poke starts from the same XCom (a reschedule sensor keeps no state): same end, no new job
    jobs = lambda: sorted(j["TransformJobName"] for j in hook.get_conn().list_transform_jobs(  # noqa: E731
        MaxResults=100)["TransformJobSummaries"])
    before = jobs()
    assert poll(hook, submitted, resubmit=resubmit) == (True, waited) and jobs() == before
    recs = _records(s3, settings, mask_shard(s3, settings, waited, detector_factory(settings, str(model_dir)),
                                             log=lambda m: None))
    assert set(recs) == set(photos)
    assert [recs[f"raw/DE/2026/11/20/{k}"]["status"] for k in ("a0.jpg", "a1.jpg", "c3.jpg")] == ["masked"] * 3
    b2 = recs["raw/DE/2026/11/20/b2.png"]
    assert b2["status"] == "failed" and b2["reason"] == "transform_record_failed"
    assert "b2.png" in b2["error"] and first["TransformJobName"] in b2["error"] and "CloudWatch" in b2["error"]
    assert _published(s3, settings) == {f"masked/DE/2026/11/20/{k}" for k in ("a0.jpg", "a1.jpg", "c3.jpg")}
    # the next run submits only what is still to do
    from platemask.sagemaker_backend import stop

    again = submit(hook, s3, settings, _shard_of(s3, settings, dict.fromkeys(photos), run_id="r2"), str(model_dir))
    assert again["transform"]["photos"] == 1
    stop(hook, again)  # its container is gone: the job ends Stopped, its runner thread with it
    deadline = time.monotonic() + 30
    while hook.describe_transform_job(again["transform"]["job"])["TransformJobStatus"] != "Stopped":
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_record_the_container_rejects_fails_alone_and_its_job_still_masks_the_others(aws_conn, model_dir,
                                                                                      server_url, scene):
    """AWS Batch Transform goes on with the other input files when one fails, stores their output and
    ends Failed (developer guide, "Use batch transform" and Troubleshooting, "Job shows as failed").
    The local runner stopped starting records after the first one the container refused: a0-big.png
    (413, over the container's 6 MB) first in the manifest left the three photos after it without
    output, attempt 0 made no progress and every photo of the shard failed transform_job_failed.
    Now attempt 0 writes the others' output and is the only attempt; a0-big.png alone fails."""
    from conftest import png_bytes

    s3 = aws_conn
    settings = _local_runner_settings(s3, server_url, max_concurrent=1)
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8))
    assert len(big) > 6 * 2**20
    rejected = "raw/DE/2026/11/20/a0-big.png"
    others = ["raw/DE/2026/11/20/b1.jpg", "raw/DE/2026/11/20/c2.jpg", "raw/DE/2026/11/20/d3.jpg"]
    photos = {rejected: big, others[0]: jpeg_bytes(scene[0]), others[1]: jpeg_bytes(scene[0][:, ::-1]),
              others[2]: jpeg_bytes(scene[0], quality=60)}
    shard = _shard_of(s3, settings, photos)
    waited, recs = _run_shard(s3, settings, shard, model_dir)
    t = waited["transform"]
    assert t["attempt"] == 0 and t["state"] == "Failed" and t["outputs"] == [t["output"]], t
    assert f"s3://{settings.bucket}/{rejected}" in t["failure_reason"], t["failure_reason"]
    from platemask.airflow_support import sagemaker_hook

    base = re.sub(r"-a\d+$", "-a", t["job"])
    assert list(_job_manifests(s3, sagemaker_hook(settings, s3), base)) == [t["job"]]  # no second attempt
    out_bucket, out_prefix = t["output"][len("s3://"):].split("/", 1)
    written = sorted(o["Key"][len(out_prefix):-len(".out")]
                     for o in s3.list_objects_v2(Bucket=out_bucket, Prefix=out_prefix).get("Contents", []))
    assert written == others  # attempt 0 went on past the record it failed on
    assert set(recs) == set(photos)
    assert [recs[k]["status"] for k in others] == ["masked"] * 3, {k: recs[k].get("error") for k in others}
    bad = recs[rejected]
    assert bad["status"] == "failed" and bad["reason"] == "transform_record_failed", bad
    assert rejected in bad["error"] and t["job"] in bad["error"] and "413" in bad["error"]
    assert "CloudWatch" in bad["error"] and "next run" in bad["error"]
    assert _published(s3, settings) == {k.replace("raw/", "masked/", 1) for k in others}


class _FlakyContainer:
    """The real container server behind a proxy on 127.0.0.1 that answers 503 to the first ``tries``
    requests carrying each body of ``flaky`` (the container overloaded or restarting while the job
    sends them) and passes every other request through as it is. With ``tries`` = the job's
    InvocationsMaxRetries + 1 those records fail in the first job that sends them and are answered
    in the next: a failed job really leaves them without output (the runner, as AWS, tries every
    record; only the ones that fail stay unfinished)."""

    def __init__(self, upstream: str, flaky: list[bytes], tries: int | None = None, hold_after: int | None = None):
        """``hold_after``: the records after the first ``hold_after`` it passes through wait for
        ``release`` (set) before they are passed on (a job part-way through its manifest)."""
        import threading
        import urllib.error
        import urllib.request
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        tries = Settings().sagemaker_invocation_retries + 1 if tries is None else tries
        self.left = {hashlib.sha256(b).hexdigest(): tries for b in flaky}
        self.refused, self.passed, lock, owner = 0, 0, threading.Lock(), self
        self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, status: int, body: bytes, content_type: str):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, method: str, body: bytes | None):
                headers = {k: self.headers[k] for k in ("Content-Type", "Accept") if self.headers.get(k)}
                req = urllib.request.Request(upstream + self.path, data=body, method=method, headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=600) as r:
                        self._answer(r.status, r.read(), r.headers.get("Content-Type", "application/json"))
                except urllib.error.HTTPError as e:
                    self._answer(e.code, e.read(), e.headers.get("Content-Type", "application/json"))
                except OSError:  # the server closed the connection (a 413 before the body): so does the proxy
                    self.close_connection = True

            def do_GET(self):
                self._forward("GET", None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                digest = hashlib.sha256(body).hexdigest()
                with lock:
                    refuse = owner.left.get(digest, 0) > 0
                    if refuse:
                        owner.left[digest] -= 1
                        owner.refused += 1
                if refuse:
                    self._answer(503, b'{"error": "container restarting"}', "application/json")
                    return
                with lock:
                    owner.passed += 1
                    held = hold_after is not None and owner.passed > hold_after
                if held:
                    owner.release.wait(120)
                self._forward("POST", body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _local_runner_settings(s3, server_url: str, *, max_concurrent: int) -> Settings:
    """Settings for transform jobs run by the local runner against ``server_url``, in a new bucket."""
    settings = Settings(bucket=f"sm-{uuid.uuid4().hex[:8]}", sagemaker_image_uri="1.dkr.ecr.us-east-1.amazonaws.com/pm:t",
                        sagemaker_role_arn="arn:aws:iam::123456789012:role/pm", sagemaker_max_concurrent=max_concurrent,
                        sagemaker_local_endpoint=server_url)
    s3.create_bucket(Bucket=settings.bucket)
    return settings


def _four_photos(scene) -> dict[str, bytes]:
    """a0, b1 (quality 50: smaller), c2 (mirrored) and d3 of the 20th's partition."""
    return {"raw/DE/2026/11/20/a0.jpg": jpeg_bytes(scene[0]), "raw/DE/2026/11/20/b1.jpg": jpeg_bytes(scene[0], quality=50),
            "raw/DE/2026/11/20/c2.jpg": jpeg_bytes(scene[0][:, ::-1]), "raw/DE/2026/11/20/d3.jpg": jpeg_bytes(scene[0])}


def _regrown(s3, settings, photos, key, body: bytes):
    """The shard as listed, then ``key`` re-uploaded as ``body`` before the job runs."""
    shard = _shard_of(s3, settings, photos)
    s3.put_object(Bucket=settings.bucket, Key=key, Body=body)
    return shard


def _noise_jpeg(min_size: int) -> bytes:
    """A JPEG of at least ``min_size`` bytes (random pixels compress badly, as a camera's do at 95)."""
    from PIL import Image

    side = 600
    while True:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(3).integers(0, 255, (side, side * 4 // 3, 3), np.uint8)).save(
            buf, "JPEG", quality=95)
        if len(buf.getvalue()) >= min_size:
            return buf.getvalue()
        side = int(side * 1.3)


def _job_manifests(s3, hook, prefix: str) -> dict[str, list[str]]:
    """The photos of each transform job whose name starts with ``prefix``."""
    from platemask.local_transform import read_manifest

    out = {}
    for j in hook.get_conn().list_transform_jobs(MaxResults=100, NameContains=prefix)["TransformJobSummaries"]:
        if not j["TransformJobName"].startswith(prefix):
            continue
        desc = hook.describe_transform_job(j["TransformJobName"])
        out[j["TransformJobName"]] = read_manifest(s3, desc["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"])[1]
    return out


def test_a_photo_regrown_after_listing_fails_alone_not_the_job(aws_conn, model_dir, server_url, scene):
    """b1 listed at 0.2 MB (MaxPayloadInMB was 1), re-uploaded at 1.3 MB before the job: it failed
    attempts 0 and 1 (413) and every photo queued after it failed transform_job_failed. The limit
    now has the concurrency's headroom: the job completes, b1 alone fails source_changed."""
    s3 = aws_conn
    settings = _local_runner_settings(s3, server_url, max_concurrent=1)
    photos = _four_photos(scene)
    assert len(photos["raw/DE/2026/11/20/b1.jpg"]) < 2**20
    shard = _regrown(s3, settings, photos, "raw/DE/2026/11/20/b1.jpg", _noise_jpeg(int(1.25 * 2**20)))
    waited, recs = _run_shard(s3, settings, shard, model_dir)
    t = waited["transform"]
    assert t["state"] == "Completed" and t["attempt"] == 0, t
    from platemask.airflow_support import sagemaker_hook

    desc = sagemaker_hook(settings, s3).describe_transform_job(t["job"])
    assert desc["MaxPayloadInMB"] * 2**20 > 1.25 * 2**20 and desc["MaxPayloadInMB"] * desc["MaxConcurrentTransforms"] <= 100
    b1 = recs["raw/DE/2026/11/20/b1.jpg"]
    assert b1["status"] == "failed" and b1["reason"] == "source_changed" and "b1.jpg" in b1["error"]
    assert [recs[f"raw/DE/2026/11/20/{k}"]["status"] for k in ("a0.jpg", "c2.jpg", "d3.jpg")] == ["masked"] * 3
    assert _published(s3, settings) == {f"masked/DE/2026/11/20/{k}" for k in ("a0.jpg", "c2.jpg", "d3.jpg")}


def test_a_photo_whose_transform_output_key_would_be_too_long_fails_alone_not_the_job(aws_conn, moto_server, model_dir,
                                                                                         server_url, scene):
    """A legal photo key of 972 bytes: its masked (975) and audit (984) keys fit S3's 1,024 bytes, its
    transform output ``sagemaker/output/{region}/{window}/{job}/{key}.out`` does not. Sent to the job,
    its output upload was refused (KeyTooLongError) and the job failed, every attempt (4 jobs, a3
    Failed, each paying its instances' start-up on AWS), the photo failing transform_job_failed with
    the upload's error. It is now never sent: it fails alone (key_too_long), one job completes."""
    import boto3

    from fault_proxy import FaultProxy

    proxy = FaultProxy(moto_server)  # refuses keys over 1,024 bytes, as S3 does (moto does not)
    try:
        s3 = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
        settings = _local_runner_settings(s3, server_url, max_concurrent=1)
        photos = _four_photos(scene)
        long_key = "raw/DE/2026/11/20/a1" + "x" * 948 + ".jpg"
        photos[long_key] = jpeg_bytes(scene[0])
        shard = _shard_of(s3, settings, dict(sorted(photos.items())))
        waited, recs = _run_shard(s3, settings, shard, model_dir)
        t = waited["transform"]
        assert t["state"] == "Completed" and t["attempt"] == 0, t
        assert recs[long_key]["status"] == "failed" and recs[long_key]["reason"] == "key_too_long", recs[long_key]
        assert ".out" in recs[long_key]["error"] and "1,024" in recs[long_key]["error"]
        others = [k for k in photos if k != long_key]
        assert [recs[k]["status"] for k in others] == ["masked"] * 4, {k: recs[k].get("reason") for k in others}
        assert _published(s3, settings) == {k.replace("raw/", "masked/", 1) for k in others}
        assert not any(len(k.encode()) > 1024 for _, k, _ in proxy.seen)  # never even tried
    finally:
        proxy.close()


def test_an_object_over_sagemakers_payload_limit_fails_alone_not_its_shard(aws_conn, model_dir, server_url, scene,
                                                                           monkeypatch):
    """Every object of a partition is an input: a dashcam video over SageMaker's 100 MB MaxPayloadInMB
    made submit raise (RunError naming it), so the submit task failed, every retry, and all photos of
    its shard (up to 5,000) failed shard_failed in every run. It is now left out of the job and fails
    alone, too_large. (The limit is lowered to 2 MB here so that the test uploads 2.5 MB, not 100.)"""
    import platemask.sagemaker_backend as sm

    monkeypatch.setattr(sm, "MAX_PAYLOAD_MB", 2)
    s3 = aws_conn
    settings = _local_runner_settings(s3, server_url, max_concurrent=1)
    photos = _four_photos(scene)
    video = "raw/DE/2026/11/20/b9-huge.jpg"  # a photo here (a video would fail its decode first: not_an_image)
    photos[video] = _noise_jpeg(int(2.5 * 2**20))
    shard = _shard_of(s3, settings, dict(sorted(photos.items())))
    waited, recs = _run_shard(s3, settings, shard, model_dir)
    t = waited["transform"]
    assert t["state"] == "Completed" and t["attempt"] == 0, t
    assert recs[video]["status"] == "failed" and recs[video]["reason"] == "too_large", recs[video]
    assert "2 MB" in recs[video]["error"] and video in recs[video]["error"]
    others = [k for k in photos if k != video]
    assert [recs[k]["status"] for k in others] == ["masked"] * 4
    assert _published(s3, settings) == {k.replace("raw/", "masked/", 1) for k in others}


def test_an_archived_photo_fails_alone_not_its_transform_job(aws_conn, model_dir, server_url, scene):
    """A photo in S3 Glacier (a lifecycle rule moved an old partition, then a backfill lists it) cannot
    be read until it is restored (GET: InvalidObjectState). Sent to the transform job, it failed the
    job on every attempt (3 jobs here, each paying its instances' start-up on AWS), the photo failing
    transform_job_failed with an InternalServerError. The listing's storage class (and, for an
    archived one, a HEAD for a finished restore) now leaves it out: it fails alone, ``archived``,
    naming what to do; a restored one is sent."""
    from platemask.runs import collect, make_shards

    s3 = aws_conn
    settings = dataclasses.replace(_local_runner_settings(s3, server_url, max_concurrent=1), late_days=0)
    photos = _four_photos(scene)
    for k, body in photos.items():
        s3.put_object(Bucket=settings.bucket, Key=k, Body=body)
    cold = "raw/DE/2026/11/20/b5-archived.jpg"
    s3.put_object(Bucket=settings.bucket, Key=cold, Body=jpeg_bytes(scene[0]), StorageClass="GLACIER")
    spec = dataclasses.replace(SPEC, run_id="manual__cold")
    collect(s3, settings, spec, log=lambda m: None)
    (shard,) = make_shards(s3, settings, [spec.as_dict()], log=lambda m: None)
    waited, recs = _run_shard(s3, settings, shard, model_dir)
    t = waited["transform"]
    assert t["state"] == "Completed" and t["attempt"] == 0, t
    assert recs[cold]["status"] == "failed" and recs[cold]["reason"] == "archived", recs[cold]
    assert "GLACIER" in recs[cold]["error"] and "restore" in recs[cold]["error"].lower()
    assert [recs[k]["status"] for k in photos] == ["masked"] * 4
    assert _published(s3, settings) == {k.replace("raw/", "masked/", 1) for k in photos}


def test_a_photo_regrown_past_the_payload_limit_is_left_out_of_the_next_attempt(aws_conn, model_dir, server_url, scene):
    """Past even the headroom (10 MB at 10 at once) the record fails its job, as on AWS. The next
    attempt leaves it out (S3 shows another ETag, and a size over the job's limit: it would fail
    that attempt too), the others are masked, b1 fails alone with what happened to it."""
    s3 = aws_conn
    settings = _local_runner_settings(s3, server_url, max_concurrent=10)
    photos = _four_photos(scene)
    shard = _regrown(s3, settings, photos, "raw/DE/2026/11/20/b1.jpg", np.random.default_rng(4).bytes(11 * 2**20))
    waited, recs = _run_shard(s3, settings, shard, model_dir)
    t = waited["transform"]
    from platemask.airflow_support import sagemaker_hook

    hook = sagemaker_hook(settings, s3)
    first = hook.describe_transform_job(re.sub(r"-a\d+$", "-a0", t["job"]))
    assert first["MaxPayloadInMB"] == 10 and first["TransformJobStatus"] == "Failed" and "b1.jpg" in first["FailureReason"]
    left = t["left_out"]["raw/DE/2026/11/20/b1.jpg"]
    assert left["reason"] == "source_changed" and "over the job's MaxPayloadInMB of 10" in left["error"]
    # attempt 0 went on past b1 (as AWS does) and finished the others: no attempt follows, b1 is never sent again
    base = re.sub(r"-a\d+$", "-a", t["job"])  # this shard's attempts (moto holds other tests' jobs too)
    assert list(_job_manifests(s3, hook, base)) == [first["TransformJobName"]] and t["attempt"] == 0, t
    b1 = recs["raw/DE/2026/11/20/b1.jpg"]
    assert b1["status"] == "failed" and b1["reason"] == "source_changed" and "b1.jpg" in b1["error"]
    assert [recs[f"raw/DE/2026/11/20/{k}"]["status"] for k in ("a0.jpg", "c2.jpg", "d3.jpg")] == ["masked"] * 3
    assert _published(s3, settings) == {f"masked/DE/2026/11/20/{k}" for k in ("a0.jpg", "c2.jpg", "d3.jpg")}


def test_a_photo_replaced_after_detection_is_never_published(sm_env, model_dir, server_url):
    """Same size, other bytes: the mask step refuses them (IfMatch on the listed ETag) and the next run masks them."""
    from platemask.training.synth import synth_car_scene

    s3, settings, shard = sm_env
    settings = _local(settings, server_url)
    from platemask.airflow_support import detector_factory, sagemaker_hook
    from platemask.runs import mask_shard
    from platemask.sagemaker_backend import submit

    hook = sagemaker_hook(settings, s3)
    waited = _wait(hook, submit(hook, s3, settings, shard, str(model_dir)))
    key = "raw/DE/2026/11/20/car0.jpg"
    other = synth_car_scene(np.random.default_rng(99), n_plates=1, plate_width=(150, 170))[0]  # 1280x720 too
    s3.put_object(Bucket=settings.bucket, Key=key, Body=jpeg_bytes(other))
    recs = _records(s3, settings, mask_shard(s3, settings, waited, detector_factory(settings, str(model_dir)),
                                             log=lambda m: None))
    assert len(recs) == 3
    assert recs[key]["status"] == "failed" and recs[key]["reason"] == "source_changed"
    assert "masked/DE/2026/11/20/car0.jpg" not in _published(s3, settings)
    assert _audit(s3, settings, key)["status"] == "failed"
    # the next run lists the new ETag and masks the new upload
    nxt = _shard_of(s3, settings, dict.fromkeys(f"raw/DE/2026/11/20/car{i}.jpg" for i in range(3)), run_id="r2")
    waited2, recs2 = _run_shard(s3, settings, nxt, model_dir)
    assert waited2["transform"]["photos"] == 2  # car0 (new upload) and the undecodable car2; car1 is done
    assert recs2[key]["status"] == "masked" and recs2["raw/DE/2026/11/20/car1.jpg"].get("skipped")
    assert _audit(s3, settings, key)["input_sha256"] == hashlib.sha256(jpeg_bytes(other)).hexdigest()


def test_bytes_the_container_did_not_see_are_never_published(sm_env, model_dir, server_url, scene):
    """Listed as A, replaced by B before the job (the container detects on B), A put back before
    the mask step: the ETag matches again, the SHA-256 does not."""
    from platemask.training.synth import synth_car_scene

    s3, settings, shard = sm_env
    settings = _local(settings, server_url)
    key = "raw/DE/2026/11/20/car1.jpg"
    original = s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=settings.bucket, Key=key, Body=jpeg_bytes(synth_car_scene(np.random.default_rng(5))[0]))
    from platemask.airflow_support import detector_factory, sagemaker_hook
    from platemask.runs import mask_shard
    from platemask.sagemaker_backend import submit

    hook = sagemaker_hook(settings, s3)
    waited = _wait(hook, submit(hook, s3, settings, shard, str(model_dir)))
    s3.put_object(Bucket=settings.bucket, Key=key, Body=original)
    recs = _records(s3, settings, mask_shard(s3, settings, waited, detector_factory(settings, str(model_dir)),
                                             log=lambda m: None))
    assert recs[key]["status"] == "failed" and recs[key]["reason"] == "source_changed" and "input_sha256" in recs[key]["error"]
    assert recs["raw/DE/2026/11/20/car0.jpg"]["status"] == "masked"
    assert "masked/DE/2026/11/20/car1.jpg" not in _published(s3, settings)


def test_local_backend_reads_only_the_listed_version(sm_env, model_dir):
    from platemask.airflow_support import detector_factory
    from platemask.runs import mask_shard
    from platemask.training.synth import synth_car_scene

    s3, settings, shard = sm_env
    shard = {**shard, "spec": dict(shard["spec"], backend="local")}
    key = "raw/DE/2026/11/20/car0.jpg"
    s3.put_object(Bucket=settings.bucket, Key=key, Body=jpeg_bytes(synth_car_scene(np.random.default_rng(11))[0]))
    recs = _records(s3, settings, mask_shard(s3, settings, shard, detector_factory(settings, str(model_dir)),
                                             log=lambda m: None))
    assert recs[key]["status"] == "failed" and recs[key]["reason"] == "source_changed"
    assert recs["raw/DE/2026/11/20/car1.jpg"]["status"] == "masked"
    assert _published(s3, settings) == {"masked/DE/2026/11/20/car1.jpg"}


def test_a_gpu_job_without_cuda_fails_loudly_and_nothing_is_published(sm_env, model_dir, tmp_path):
    """The real server with PLATEMASK_REQUIRE_CUDA=1 (what a ml.g5 job sets) on this CPU machine:
    the job fails on the health check with the reason, and every photo is a failure."""
    import os
    import subprocess
    import sys

    import torch

    from conftest import ROOT, _free_port

    if torch.cuda.is_available():
        pytest.skip("CUDA works here")
    s3, settings, shard = sm_env
    port = _free_port()
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS="1",
               PLATEMASK_MODEL_DIR=str(model_dir), PLATEMASK_REQUIRE_CUDA="1")
    env.pop("PLATEMASK_DEVICE", None)
    proc = subprocess.Popen([sys.executable, "-m", "platemask.serve", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        settings = _local(settings, f"http://127.0.0.1:{port}", sagemaker_instance_type="ml.g5.xlarge")
        waited, recs = _run_shard(s3, settings, shard, model_dir)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    t = waited["transform"]
    assert t["state"] == "Failed" and "cuda_unavailable" in t["failure_reason"] and t["attempt"] == 0
    assert len(recs) == 3 and all(r["status"] == "failed" for r in recs.values())
    assert recs["raw/DE/2026/11/20/car0.jpg"]["reason"] == "transform_job_failed"
    assert "CUDA is not usable" in recs["raw/DE/2026/11/20/car0.jpg"]["error"]
    assert _published(s3, settings) == set()


def _masked(s3, bucket):
    out = {}
    for o in s3.list_objects_v2(Bucket=bucket, Prefix="masked/").get("Contents", []):
        out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def _count_trigger_runs(monkeypatch) -> list[str]:
    """Record each job the deferred wait's trigger runs for (dag.test() runs triggers in-process):
    a spy around the real ``run``, which it leaves as it is."""
    from platemask.transform_wait import TransformJobTrigger

    jobs: list[str] = []
    real = TransformJobTrigger.run

    def run(self):
        jobs.append(self.job)
        return real(self)

    monkeypatch.setattr(TransformJobTrigger, "run", run)
    return jobs


def test_dag_sagemaker_backend_matches_local(aws_conn, monkeypatch, airflow_db, server_url, model_dir):
    """Both backends through dag.test(): same records and pixels. The SageMaker path's wait defers
    (the local runner's job runs in the background, as on AWS), dag.test runs the trigger
    in-process, the task resumes and the CPU-queue mask step reads the job's output."""
    from io import BytesIO

    from PIL import Image

    from platemask.training.synth import synth_car_scene
    from test_dag import _ti_states, load_dag

    s3 = aws_conn
    rng = np.random.default_rng(3)
    photos = {f"raw/DE/2026/11/20/insp{i}/p.jpg": jpeg_bytes(synth_car_scene(rng, plate_width=(80, 160))[0]) for i in range(3)}
    photos["raw/DE/2026/11/20/insp9/p.jpg"] = b"\xff\xd8\xff broken upload"
    monkeypatch.setenv("PLATEMASK_DEADLINE_HOURS", "0")
    monkeypatch.setenv("PLATEMASK_SAGEMAKER_IMAGE_URI", "123456789012.dkr.ecr.us-east-1.amazonaws.com/platemask:test")
    monkeypatch.setenv("PLATEMASK_SAGEMAKER_ROLE_ARN", "arn:aws:iam::123456789012:role/platemask")
    monkeypatch.setenv("PLATEMASK_SAGEMAKER_LOCAL_ENDPOINT", server_url)
    monkeypatch.setenv("PLATEMASK_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("PLATEMASK_SAGEMAKER_POLL_SECONDS", "1")
    triggered = _count_trigger_runs(monkeypatch)
    reports, masked = {}, {}
    for backend in ("local", "sagemaker"):
        bucket = f"cmp-{backend}-{uuid.uuid4().hex[:6]}"
        s3.create_bucket(Bucket=bucket)
        for k, v in photos.items():
            s3.put_object(Bucket=bucket, Key=k, Body=v)
        monkeypatch.setenv("PLATEMASK_BUCKET", bucket)
        dag = load_dag(monkeypatch)
        dr = dag.test(logical_date=datetime(2026, 11, 21, 1, tzinfo=timezone.utc),
                      run_conf={"region": "DE", "backend": backend, "max_failure_rate": 0.5})
        assert dr.state == "success", backend
        states = _ti_states(dr)
        if backend == "sagemaker":
            assert states["process.mask"] == "skipped" and states["sagemaker.mask"] == "success"
            assert states["sagemaker.wait"] == "success"
            assert len(triggered) == 1 and triggered[0].endswith("-a0")  # the wait deferred to the trigger, once
        else:
            assert states["process.mask"] == "success" and states["sagemaker.mask"] == "skipped"
            assert triggered == []
        reports[backend] = json.loads(s3.get_object(Bucket=bucket, Key="qa/DE/20261119T2300Z-20261120T2300Z/report.json")["Body"].read())
        masked[backend] = {k.split("/", 1)[1]: v for k, v in _masked(s3, bucket).items()}
    loc, sm = reports["local"], reports["sagemaker"]
    assert loc["by_status"] == sm["by_status"] == {"masked": 3, "no_plate": 0, "failed": 1}
    assert loc["plates"] == sm["plates"]
    assert sm["shards"][0]["transform"]["job"].startswith("pm-de-")
    assert sorted(masked["local"]) == sorted(masked["sagemaker"])
    for k in masked["local"]:
        a = np.asarray(Image.open(BytesIO(masked["local"][k])), np.int16)
        b = np.asarray(Image.open(BytesIO(masked["sagemaker"][k])), np.int16)
        assert np.abs(a - b).mean() < 0.5, k  # same polygons, same masking


def test_dag_a_failed_job_is_resumed_with_the_rest_of_its_photos(aws_conn, monkeypatch, airflow_db, server_url,
                                                                  model_dir, scene):
    """Through dag.test(): the first job fails on a record the container refuses (413: over its
    6 MB limit) and on c3 (answered 503 until the job's retries ran out), finishing the two other
    photos; on resume the wait starts an attempt over c3 (the refused one left out: it would fail
    that attempt too) and defers again; that one completes, three photos are published and the
    refused one fails alone."""
    from conftest import png_bytes
    from test_dag import _ti_states, load_dag

    s3 = aws_conn
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8))
    assert len(big) > 6 * 2**20
    photos = {"raw/DE/2026/11/20/a0.jpg": jpeg_bytes(scene[0]), "raw/DE/2026/11/20/a1.jpg": jpeg_bytes(scene[0][:, ::-1]),
              "raw/DE/2026/11/20/b2.png": big, "raw/DE/2026/11/20/c3.jpg": jpeg_bytes(scene[0], quality=60)}
    bucket = f"fail-{uuid.uuid4().hex[:6]}"
    s3.create_bucket(Bucket=bucket)
    for k, v in photos.items():
        s3.put_object(Bucket=bucket, Key=k, Body=v)
    container = _FlakyContainer(server_url, [photos["raw/DE/2026/11/20/c3.jpg"]])
    for k, v in {"BUCKET": bucket, "DEADLINE_HOURS": "0", "MODEL_DIR": str(model_dir), "SAGEMAKER_POLL_SECONDS": "1",
                 "SAGEMAKER_IMAGE_URI": "123456789012.dkr.ecr.us-east-1.amazonaws.com/platemask:test",
                 "SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/platemask",
                 "SAGEMAKER_LOCAL_ENDPOINT": container.url, "SAGEMAKER_MAX_CONCURRENT": "1"}.items():
        monkeypatch.setenv(f"PLATEMASK_{k}", v)
    triggered = _count_trigger_runs(monkeypatch)
    dag = load_dag(monkeypatch)
    with container:
        dr = dag.test(logical_date=datetime(2026, 11, 21, 1, tzinfo=timezone.utc),
                      run_conf={"region": "DE", "backend": "sagemaker", "max_failure_rate": 0.5})
    assert container.refused == Settings().sagemaker_invocation_retries + 1  # c3, in attempt 0 only
    assert dr.state == "success" and _ti_states(dr)["sagemaker.wait"] == "success"
    # deferred on attempt 0; resumed when it failed, started attempt 1 over the rest, deferred on it
    assert [j[-3:] for j in triggered] == ["-a0", "-a1"]
    rep = json.loads(s3.get_object(Bucket=bucket, Key="qa/DE/20261119T2300Z-20261120T2300Z/report.json")["Body"].read())
    assert rep["by_status"] == {"masked": 3, "no_plate": 0, "failed": 1}
    assert set(rep["failures_by_reason"]) == {"transform_record_failed"}
    failed = {i["key"] for i in rep["failures_by_reason"]["transform_record_failed"]["items"]}
    assert failed == {"raw/DE/2026/11/20/b2.png"}
    assert rep["shards"][0]["transform"]["job"].endswith("-a1")
    published = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="masked/").get("Contents", [])}
    assert published == {"masked/DE/2026/11/20/a0.jpg", "masked/DE/2026/11/20/a1.jpg", "masked/DE/2026/11/20/c3.jpg"}


def test_inference_image_pairs_a_cuda12_torch_with_the_535_driver_ami():
    """No Docker engine here: read the Dockerfile. Driver 535 runs CUDA 12.x builds, not CUDA 13."""
    from conftest import ROOT

    text = (ROOT / "containers" / "inference" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-(base|runtime)-ubuntu\d+\.\d+", args["BASE_IMAGE"])
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu12\d", args["TORCH_INDEX_URL"])
    assert args["TORCH_CUDA"] == "12." and text.index("ARG BASE_IMAGE") < text.index("FROM ${BASE_IMAGE}")
    assert Settings().sagemaker_transform_ami_version == "al2-ami-sagemaker-batch-gpu-535"


def test_inference_image_installs_dependencies_before_the_source():
    """A code change must not reinstall ~6 GB of wheels: every pip install of dependencies comes
    before the source is copied, and the package itself is installed without dependencies."""
    from conftest import ROOT

    text = (ROOT / "containers" / "inference" / "Dockerfile").read_text()
    source = text.index("COPY platemask")
    assert text.index("-r /tmp/requirements.txt") < source and text.index("--index-url \"$TORCH_INDEX_URL\"") < source
    assert "optional-dependencies']['serve']" in text[:source]
    assert "pip install --no-cache-dir --no-deps ." in text[source:] and ".[serve]" not in text


def test_a_region_window_is_one_transform_job_up_to_sagemaker_shard_size(aws_conn):
    """Every job pays its instances' start-up: backend=sagemaker cuts shards (= jobs) of up to
    sagemaker_shard_size photos, scaled inside the job by InstanceCount, not 200-photo jobs."""
    from platemask.layout import run_prefix
    from platemask.runs import make_shards

    s3 = aws_conn
    settings = Settings(bucket=f"sm-{uuid.uuid4().hex[:8]}", shard_size=200, sagemaker_shard_size=5000)
    s3.create_bucket(Bucket=settings.bucket)
    entries = [{"key": f"raw/DE/2026/11/20/p{i:04d}.jpg", "size": 1000, "etag": f"e{i}"} for i in range(450)]
    s3.put_object(Bucket=settings.bucket, Key="m.jsonl", Body="".join(json.dumps(e) + "\n" for e in entries).encode())

    def collected(backend):  # what collect leaves for the region: make_shards reads it back
        spec = RunSpec(**{**SPEC.as_dict(), "backend": backend, "run_id": f"manual__{backend}"})
        found = {"spec": spec.as_dict(), "manifest": f"s3://{settings.bucket}/m.jsonl", "count": len(entries)}
        s3.put_object(Bucket=settings.bucket, Key=run_prefix(settings, spec) + "collected.json",
                      Body=json.dumps(found).encode())
        return [spec.as_dict()]

    counts = {backend: [sh["count"] for sh in make_shards(s3, settings, collected(backend), log=lambda m: None)]
              for backend in ("local", "sagemaker")}
    assert counts == {"local": [200, 200, 50], "sagemaker": [450]}
    assert [sh["count"] for sh in make_shards(s3, dataclasses.replace(settings, sagemaker_shard_size=300),
                                              collected("sagemaker"), log=lambda m: None)] == [300, 150]


# ------------------------------------------------------------------ the deferred wait's trigger

def _registered_job(s3, **settings_kw):
    """A transform job registered with the SageMaker API (moto), not run: the local runner's
    DescribeTransformJob says InProgress until the job's outcome is stored, as AWS does while it runs."""
    from platemask.airflow_support import sagemaker_hook

    settings = Settings(bucket=f"tr-{uuid.uuid4().hex[:8]}", **settings_kw)
    s3.create_bucket(Bucket=settings.bucket)
    s3.put_object(Bucket=settings.bucket, Key="m.manifest", Body=json.dumps(manifest_document(settings, ENTRIES)).encode())
    job = f"pm-trigger-{uuid.uuid4().hex[:8]}"
    request = transform_request(settings, SPEC, job=job, model="platemask-m", entries=ENTRIES,
                                manifest_uri=f"s3://{settings.bucket}/m.manifest")
    hook = sagemaker_hook(settings, s3)
    getattr(hook, "hook", hook).create_transform_job(request, wait_for_completion=False)  # register only
    return settings, job, request


def _trigger(settings, job, *, deadline_s: float = 3600, poll: float = 0.2):
    from datetime import timedelta

    from platemask.transform_wait import TransformJobTrigger

    deadline = (datetime.now(timezone.utc) + timedelta(seconds=deadline_s)).isoformat()
    trigger = TransformJobTrigger(job=job, settings=dataclasses.asdict(settings), deadline=deadline, poll_seconds=poll)
    from airflow.sdk.serde import deserialize, serialize

    classpath, kwargs = trigger.serialize()
    assert classpath == "platemask.transform_wait.TransformJobTrigger"
    return TransformJobTrigger(**deserialize(serialize(kwargs)))  # as the triggerer builds it from the stored kwargs


def test_trigger_waits_while_in_progress_and_fires_with_the_failure(aws_conn):
    import asyncio

    from platemask.local_transform import job_state_key

    s3 = aws_conn
    settings, job, request = _registered_job(s3, sagemaker_local_endpoint="http://127.0.0.1:9")

    async def scenario():
        run = asyncio.ensure_future(anext(_trigger(settings, job).run()))
        await asyncio.sleep(1.5)
        assert not run.done()  # InProgress: still waiting (several polls), nothing fired
        bucket, key = job_state_key(request["TransformOutput"]["S3OutputPath"])
        outcome = {"TransformJobStatus": "Failed", "FailureReason": "ClientError: record b2.png got 413"}
        await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=key, Body=json.dumps(outcome).encode())
        return await asyncio.wait_for(run, 30)

    event = asyncio.run(scenario())
    assert event.payload["job"] == job and event.payload["state"] == "Failed" and not event.payload["timed_out"]
    assert event.payload["failure_reason"] == "ClientError: record b2.png got 413"


def test_trigger_fires_at_once_for_a_completed_job_and_at_the_deadline_for_a_running_one(aws_conn):
    import asyncio

    s3 = aws_conn
    settings, job, _ = _registered_job(s3)  # moto alone: its jobs are Completed at once
    event = asyncio.run(asyncio.wait_for(anext(_trigger(settings, job).run()), 30))
    assert event.payload["state"] == "Completed" and not event.payload["timed_out"]
    settings, job, _ = _registered_job(s3, sagemaker_local_endpoint="http://127.0.0.1:9")  # never runs
    event = asyncio.run(asyncio.wait_for(anext(_trigger(settings, job, deadline_s=1).run()), 30))
    assert event.payload["state"] == "InProgress" and event.payload["timed_out"]


def test_a_wait_past_its_deadline_fails_without_retry():
    from airflow.sdk.exceptions import AirflowFailException

    from platemask.transform_wait import TransformWaitOperator

    op = TransformWaitOperator(task_id="wait", shard={"spec": {"region": "DE"}, "index": 0, "count": 3})
    with pytest.raises(AirflowFailException, match="still InProgress after sagemaker_max_runtime_hours"):
        op.resume({"params": {}}, event={"job": "pm-x", "state": "InProgress", "failure_reason": None,
                                         "deadline": "2026-11-21T00:00:00+00:00", "timed_out": True})
