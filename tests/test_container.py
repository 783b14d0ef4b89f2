"""Contract tests of the built inference image, running as SageMaker runs it.

`make container-test` (scripts/container_test.py) builds containers/inference/Dockerfile, starts
``docker run --network host ... IMAGE serve`` with the packaged model mounted read-only at
/opt/ml/model, and runs this file with PLATEMASK_CONTAINER_URL (the server) and
PLATEMASK_CONTAINER_NAME (the container, for ``docker exec``/``inspect``/``restart``).
Without PLATEMASK_CONTAINER_URL every test here skips, so ``make test`` needs no Docker.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from platemask.geometry import polygon_area

from conftest import jpeg_bytes, png_bytes
# the DAG's backend=sagemaker end to end, here against the container instead of a host process:
# collected in this module, it gets this module's `server_url` fixture below
from test_sagemaker import test_dag_sagemaker_backend_matches_local  # noqa: F401

URL = os.environ.get("PLATEMASK_CONTAINER_URL", "").rstrip("/")
NAME = os.environ.get("PLATEMASK_CONTAINER_NAME", "")
SAGEMAKER_PING_LIMIT_S = 240  # a container must answer /ping within 4 minutes of its start
CONTAINER_UID = "10001"  # containers/inference/Dockerfile: useradd --uid 10001 platemask

pytestmark = pytest.mark.skipif(not URL, reason="PLATEMASK_CONTAINER_URL is not set: `make container-test` builds "
                                                "the inference image, starts it and runs these tests against it")
needs_docker = pytest.mark.skipif(not NAME or shutil.which("docker") is None,
                                  reason="PLATEMASK_CONTAINER_NAME is not set or no docker CLI: cannot inspect the container")


def call(path, body=None, ctype=None, timeout=120):
    req = urllib.request.Request(URL + path, data=body, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def docker(*args, check=True):
    res = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    assert not check or res.returncode == 0, f"docker {' '.join(args)}: {res.stderr}"
    return res


@pytest.fixture
def ready():
    """The container answers /ping 200 (a test before may have restarted it)."""
    from platemask.local_transform import wait_ready

    wait_ready(URL, timeout=SAGEMAKER_PING_LIMIT_S)
    return URL


@pytest.fixture
def server_url(ready):
    return ready


@needs_docker
def test_restart_answers_503_while_loading_then_200_within_sagemakers_limit():
    docker("restart", "-t", "30", NAME)
    t0, seen = time.monotonic(), []
    while time.monotonic() - t0 < SAGEMAKER_PING_LIMIT_S:
        try:
            status = call("/ping", timeout=2)[0]
        except (urllib.error.URLError, OSError):
            status = None  # gunicorn not listening yet
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == 200:
            break
        time.sleep(0.05)
    took = time.monotonic() - t0
    print(f"restart to /ping 200: {took:.1f} s, statuses {seen}")
    assert seen[-1] == 200, f"no /ping 200 within {SAGEMAKER_PING_LIMIT_S} s: {seen}\n{docker('logs', '--tail', '40', NAME).stderr}"
    assert 503 in seen, f"/ping never said 503 while the model loaded: {seen}"
    assert 500 not in seen


def test_ping_names_the_shipped_model(ready, model_dir):
    status, body = call("/ping")
    assert status == 200 and body["status"] == "ok"
    shipped = json.loads((model_dir / "config.json").read_text())
    assert body["model"]["weights_sha256"] == shipped["weights_sha256"]


def _cli_record(data: bytes, name: str, tmp_path, model_dir) -> dict:
    from platemask.cli import main

    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    (src / name).write_bytes(data)
    assert main(["mask", str(src), str(tmp_path / "out"), "--model", str(model_dir), "--device", "cpu",
                 "--detections", str(tmp_path / "d.jsonl")]) == 0
    (rec,) = [r for r in map(json.loads, (tmp_path / "d.jsonl").read_text().splitlines()) if r["key"].endswith(name)]
    return rec


@pytest.mark.parametrize("kind", ["jpeg_with_plate", "png_with_plate", "jpeg_without_plate"])
def test_invocations_give_the_cli_record(ready, kind, scene, tmp_path, model_dir):
    img = scene[0] if "with_plate" in kind else np.full((480, 640, 3), 90, np.uint8)
    data, ctype, name = ((png_bytes(img), "image/png", "car.png") if kind.startswith("png")
                         else (jpeg_bytes(img), "image/jpeg", "car.jpg"))
    status, rec = call("/invocations", data, ctype)
    assert status == 200, rec
    cli = _cli_record(data, name, tmp_path, model_dir)
    assert set(rec) == set(cli)
    assert rec["status"] == cli["status"] == ("masked" if "with_plate" in kind else "no_plate")
    assert rec["input_sha256"] == cli["input_sha256"] and (rec["width"], rec["height"]) == (cli["width"], cli["height"])
    assert rec["model"] == cli["model"]
    assert len(rec["plates"]) == len(cli["plates"])
    for a, b in zip(rec["plates"], cli["plates"]):  # same torch build, other CPU threads: tiny float noise only
        assert abs(a["score"] - b["score"]) < 2e-3
        area_a, area_b = (polygon_area(np.asarray(x["polygon"], np.float32)) for x in (a, b))
        assert abs(area_a - area_b) <= 0.02 * area_b
        assert np.abs(np.asarray(a["box"]) - np.asarray(b["box"])).max() < 1.0


def test_undecodable_photo_is_a_failed_record_and_the_server_stays_up(ready):
    """200 with a `failed` record (serve.py): Batch Transform fails the whole job on any non-2xx."""
    data = b"\xff\xd8\xff this is no jpeg"
    status, body = call("/invocations", data, "image/jpeg")
    assert status == 200, (status, body)
    assert body["status"] == "failed" and body["reason"] in ("not_an_image", "corrupt", "truncated"), body
    assert body["error"] and body["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert call("/ping")[0] == 200


def test_wrong_content_type_is_415(ready):
    status, body = call("/invocations", b"{}", "application/json")
    assert status == 415 and body["reason"] == "unsupported_media_type"
    assert "image/jpeg" in body["error"]


def test_body_over_the_payload_limit_is_413(ready):
    limit = call("/execution-parameters")[1]["MaxPayloadInMB"]
    host, port = urllib.parse.urlsplit(URL).hostname, urllib.parse.urlsplit(URL).port
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("POST", "/invocations", os.urandom((limit + 1) * 1024 * 1024), {"Content-Type": "image/jpeg"})
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answers 413 from Content-Length and closes before reading the body: read that answer
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and body["reason"] == "payload_too_large" and f"{limit} MB" in body["error"]


def test_execution_parameters_fit_batch_transform(ready):
    status, params = call("/execution-parameters")
    assert status == 200 and set(params) == {"MaxConcurrentTransforms", "BatchStrategy", "MaxPayloadInMB"}
    assert params["BatchStrategy"] == "SINGLE_RECORD"
    assert params["MaxConcurrentTransforms"] >= 1 and 1 <= params["MaxPayloadInMB"] <= 100
    assert params["MaxConcurrentTransforms"] * params["MaxPayloadInMB"] <= 100  # SageMaker's product limit


@needs_docker
def test_runs_as_the_non_root_user(ready):
    assert docker("inspect", "-f", "{{.Config.User}}", NAME).stdout.strip() == "platemask"
    assert docker("exec", NAME, "id", "-u").stdout.strip() == CONTAINER_UID
    status = docker("exec", NAME, "cat", "/proc/1/status").stdout  # the server itself, not just exec's default
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == [CONTAINER_UID] * 4


@needs_docker
def test_model_dir_is_mounted_read_only(ready):
    mounts = json.loads(docker("inspect", "-f", "{{json .Mounts}}", NAME).stdout)
    (m,) = [m for m in mounts if m["Destination"] == "/opt/ml/model"]
    assert m["RW"] is False
    res = docker("exec", NAME, "touch", "/opt/ml/model/written-by-the-container", check=False)
    assert res.returncode != 0 and "Read-only file system" in res.stderr
