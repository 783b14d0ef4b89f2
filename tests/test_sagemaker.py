"""backend=sagemaker: packaging, the transform request, submission through the Airflow provider
against moto, the local transform runner against the real server, and the DAG end to end."""
from __future__ import annotations

import io
import json
import re
import tarfile
import uuid
from datetime import datetime, timezone

import numpy as np
import pytest

from platemask.runs import RunError, RunSpec
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
        assert sorted(tar.getnames()) == ["MODEL_CARD.md", "config.json", "verifier.pt", "weights.pt"]
        tar.extractall(out, filter="data")
    _, cfg = load_model(out)
    assert cfg.weights_sha256 == json.loads((model_dir / "config.json").read_text())["weights_sha256"]
    from platemask.segment import Segmenter

    assert Segmenter(out).model_info == cfg.identity()  # the unpacked folder runs with its verifier
    assert "verifier_sha256" in cfg.identity()


def test_job_names_are_valid_deterministic_and_content_bound():
    model = model_name("a" * 64, "123.dkr.ecr.eu-west-1.amazonaws.com/platemask:1")
    assert NAME_RE.match(model)
    n0 = job_name(SPEC, 7, ENTRIES, model)
    assert NAME_RE.match(n0) and len(n0) <= 63
    assert job_name(SPEC, 7, ENTRIES, model) == n0
    assert job_name(SPEC, 7, ENTRIES, model, attempt=1) != n0
    changed = [dict(ENTRIES[0], etag="new"), *ENTRIES[1:]]
    assert job_name(SPEC, 7, changed, model) != n0  # a re-uploaded photo is a new job
    long = RunSpec(**{**SPEC.as_dict(), "region": "A_VERY_LONG_REGION_NAME_WITH_UNDERSCORES_AND_MORE"})
    assert NAME_RE.match(job_name(long, 9999, ENTRIES, model, attempt=9))


def test_payload_limits():
    assert payload_mb(ENTRIES) == 1
    assert payload_mb([{"key": "k", "size": 5 * 2**20 + 1, "etag": "e"}]) == 6
    with pytest.raises(RunError, match="100 MB"):
        payload_mb([{"key": "raw/DE/huge.tif", "size": 101 * 2**20, "etag": "e"}])
    big = [{"key": "k", "size": 30 * 2**20, "etag": "e"}]
    req = transform_request(Settings(sagemaker_max_concurrent=8), SPEC, job="j", model="m", manifest_uri="s3://b/m",
                            entries=big)
    assert req["MaxPayloadInMB"] == 30 and req["MaxConcurrentTransforms"] * req["MaxPayloadInMB"] <= MAX_PAYLOAD_MB


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


def test_local_runner_and_missing_outputs_fail_closed(sm_env, model_dir, server_url):
    from platemask.airflow_support import detector_factory, sagemaker_hook
    from platemask.local_transform import run_local_transform
    from platemask.runs import mask_shard
    from platemask.sagemaker_backend import poll, submit

    s3, settings, shard = sm_env
    hook = sagemaker_hook(settings)
    stats = {}
    submitted = submit(hook, s3, settings, shard, str(model_dir),
                       local_runner=lambda req: stats.update(run_local_transform(req, server_url, s3)))
    assert stats["records"] == 3 and len(stats["failed"]) == 1 and stats["failed"][0]["status"] == 400
    out = submitted["transform"]["output"].split(f"s3://{settings.bucket}/")[1]
    outs = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket, Prefix=out)["Contents"])
    assert outs == [out + "raw/DE/2026/11/20/car0.jpg.out", out + "raw/DE/2026/11/20/car1.jpg.out"]
    _, waited = poll(hook, submitted)
    result = mask_shard(s3, settings, waited, detector_factory(settings, str(model_dir)), log=lambda m: None)
    recs = {r["key"]: r for r in map(json.loads, s3.get_object(
        Bucket=settings.bucket, Key=result["detections"].split(f"s3://{settings.bucket}/")[1])["Body"].read().splitlines())}
    assert recs["raw/DE/2026/11/20/car0.jpg"]["status"] == "masked"
    bad = recs["raw/DE/2026/11/20/car2.jpg"]
    # the worker cannot decode it either, so it fails there first; with a decodable photo and no .out:
    assert bad["status"] == "failed"
    s3.delete_object(Bucket=settings.bucket, Key=out + "raw/DE/2026/11/20/car1.jpg.out")
    spec = dict(waited["spec"], reprocess=True)
    result = mask_shard(s3, settings, {**waited, "spec": spec}, detector_factory(settings, str(model_dir)), log=lambda m: None)
    recs = {r["key"]: r for r in map(json.loads, s3.get_object(
        Bucket=settings.bucket, Key=result["detections"].split(f"s3://{settings.bucket}/")[1])["Body"].read().splitlines())}
    miss = recs["raw/DE/2026/11/20/car1.jpg"]
    assert miss["status"] == "failed" and miss["reason"] == "no_transform_output" and waited["transform"]["job"] in miss["error"]
    audit = json.loads(s3.get_object(Bucket=settings.bucket, Key="audit/DE/2026/11/20/car1.jpg.json")["Body"].read())
    assert audit["status"] == "failed" and audit["masked_key"] is None


@pytest.fixture(scope="module")
def server_url(model_dir):
    import os
    import subprocess
    import sys

    from conftest import ROOT, _free_port

    port = _free_port()
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS="2",
               PLATEMASK_MODEL_DIR=str(model_dir), PLATEMASK_DEVICE="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "platemask.serve", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    from platemask.local_transform import wait_ready

    try:
        wait_ready(url, timeout=120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _masked(s3, bucket):
    out = {}
    for o in s3.list_objects_v2(Bucket=bucket, Prefix="masked/").get("Contents", []):
        out[o["Key"]] = s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def test_dag_sagemaker_backend_matches_local(aws_conn, monkeypatch, airflow_db, server_url, model_dir):
    from io import BytesIO

    from PIL import Image

    from platemask.training.synth import synth_car_scene
    from test_dag import load_dag

    s3 = aws_conn
    rng = np.random.default_rng(3)
    photos = {f"raw/DE/2026/11/20/insp{i}/p.jpg": jpeg_bytes(synth_car_scene(rng, plate_width=(80, 160))[0]) for i in range(3)}
    photos["raw/DE/2026/11/20/insp9/p.jpg"] = b"\xff\xd8\xff broken upload"
    monkeypatch.setenv("PLATEMASK_DEADLINE_HOURS", "0")
    monkeypatch.setenv("PLATEMASK_SAGEMAKER_IMAGE_URI", "123456789012.dkr.ecr.us-east-1.amazonaws.com/platemask:test")
    monkeypatch.setenv("PLATEMASK_SAGEMAKER_ROLE_ARN", "arn:aws:iam::123456789012:role/platemask")
    monkeypatch.setenv("PLATEMASK_SAGEMAKER_LOCAL_ENDPOINT", server_url)
    monkeypatch.setenv("PLATEMASK_MODEL_DIR", str(model_dir))
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
