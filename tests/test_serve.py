"""Contract tests of the inference container's server, started for real on 127.0.0.1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from platemask.geometry import polygon_area

from conftest import ROOT, _free_port, exif_orientation_jpeg, jpeg_bytes, png_bytes


def call(url, body=None, ctype=None, method=None, timeout=60):
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers={"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_server(env: dict, port: int, log) -> tuple[str, subprocess.Popen, bool]:
    """Start the real gunicorn server with ``env``, its output in ``log``; wait up to 120 s for
    /ping 200. Returns its URL, the process and whether /ping answered 503 (loading) on the way."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "platemask.serve", "serve"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    saw_loading = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status, _ = call(url + "/ping", timeout=2)
            if status == 503:
                saw_loading = True
            if status == 200:
                return url, proc, saw_loading
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"server did not become healthy:\n{log.read_text()[-3000:]}")


def start_refusing_server(env: dict, port: int, log, reason: str, why: str) -> tuple[str, subprocess.Popen, int | None, dict]:
    """Start the real gunicorn server with ``env`` (its output in ``log``), which must never pass
    /ping (``why``); poll it up to 120 s until /ping answers with ``reason``. Returns its URL, the
    process, the last /ping status and body (the caller terminates the process)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "platemask.serve", "serve"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    url, status, body, deadline = f"http://127.0.0.1:{port}", None, {}, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and body.get("reason") != reason:
            try:
                status, raw = call(url + "/ping", timeout=2)
                body = json.loads(raw)
                assert status != 200, why
            except (urllib.error.URLError, OSError, ValueError):
                pass
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        raise
    return url, proc, status, body


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS="2",
               PLATEMASK_MODEL_DIR=str(model_dir), SAGEMAKER_MAX_PAYLOAD_IN_MB="2", PLATEMASK_DEVICE="cpu")
    url, proc, saw_loading = start_server(env, port, tmp_path_factory.mktemp("serve") / "server.log")
    yield url, proc, saw_loading
    proc.terminate()
    proc.wait(timeout=30)


def test_ping_is_503_until_the_model_is_loaded(model_dir):
    from platemask.serve import create_app

    app = create_app(str(model_dir), load=False)
    client = app.test_client()
    assert client.get("/ping").status_code == 503
    app.extensions["platemask_model"].load()
    t0 = time.perf_counter()
    r = client.get("/ping")
    assert r.status_code == 200 and time.perf_counter() - t0 < 2.0
    assert r.get_json()["model"]["weights_sha256"]


def test_a_broken_model_is_reported_not_hidden(tmp_path, model_dir):
    """A model that cannot load answers 503 (not ready, for good) with the reason, as the README
    says: a 500 read as the server crashing on a health check. A folder whose config.json lost its
    weights_sha256 is such a model (its weights cannot be checked)."""
    import shutil

    from platemask.serve import create_app

    app = create_app(str(tmp_path / "nothing-here"), load=False)
    app.extensions["platemask_model"].load()
    r = app.test_client().get("/ping")
    assert r.status_code == 503 and "config.json" in r.get_json()["error"]
    assert r.get_json()["status"] == "error" and r.get_json()["reason"] == "model_load_failed"
    r = app.test_client().post("/invocations", data=b"\xff\xd8\xff", content_type="image/jpeg")
    assert r.status_code == 503 and r.get_json()["reason"] == "model_load_failed"
    unchecked = tmp_path / "unchecked"
    shutil.copytree(model_dir, unchecked)
    cfg = json.loads((unchecked / "config.json").read_text())
    cfg["weights_sha256"] = ""
    (unchecked / "config.json").write_text(json.dumps(cfg))
    app = create_app(str(unchecked), load=False)
    app.extensions["platemask_model"].load()
    r = app.test_client().get("/ping")
    assert r.status_code == 503 and "records no SHA-256" in r.get_json()["error"]


BAD_ENVIRONMENT = [("PLATEMASK_THRESHOLD", v) for v in ("nan", "inf", "-1", "2", "0.5x")] + \
                  [("SAGEMAKER_MAX_PAYLOAD_IN_MB", v) for v in ("0", "-1", "0.00001", "101", "nan", "six")] + \
                  [("PLATEMASK_PIXEL_BUDGET_MB", v) for v in ("0", "-5", "1.5")] + \
                  [("PLATEMASK_RUNTIME", "tensorrt"), ("PLATEMASK_REQUIRE_CUDA", "on")] + \
                  [("PLATEMASK_BODY_TIMEOUT_S", v) for v in ("0", "-1", "nan", "soon")]


@pytest.mark.parametrize("name,value", BAD_ENVIRONMENT)
def test_an_environment_it_cannot_serve_with_fails_the_health_check(model_dir, monkeypatch, name, value):
    """/ping said 200 while every /invocations answered 500 (a threshold outside [0, 1]) or 413
    (a payload limit of 0 or 10 bytes), or the app did not start at all (pixel budget 0). Now the
    start-up check makes /ping answer 503 bad_environment, naming the variable and what to set."""
    from platemask.serve import create_app

    monkeypatch.setenv("PLATEMASK_DEVICE", "cpu")
    monkeypatch.setenv(name, value)
    app = create_app(str(model_dir))
    holder = app.extensions["platemask_model"]
    assert holder.settled.wait(120)
    client = app.test_client()
    r = client.get("/ping")
    body = r.get_json()
    assert r.status_code == 503, body
    assert body["status"] == "error" and body["reason"] == "bad_environment"
    assert f"{name}={value!r}" in body["error"] and ("set" in body["error"] or "leave it" in body["error"])
    r = client.post("/invocations", data=jpeg_bytes(np.zeros((64, 64, 3), np.uint8)), content_type="image/jpeg")
    assert r.status_code == 503 and r.get_json()["reason"] == "bad_environment"


@pytest.mark.parametrize("name,value", [("PLATEMASK_THRESHOLD", "0"), ("PLATEMASK_THRESHOLD", "1"),
                                        ("PLATEMASK_THRESHOLD", " 0.35 "), ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "1"),
                                        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "100"), ("PLATEMASK_REQUIRE_CUDA", "0")])
def test_environment_values_at_the_edges_are_served(name, value, monkeypatch):
    from platemask.pipeline import JobOptions
    from platemask.serve import read_environment

    env, problems = read_environment({name: value})
    assert problems == []
    assert read_environment({}) == ({"threshold": None, "max_payload_mb": 6.0, "pixel_budget_mb": JobOptions.pixel_budget_mb,
                                     "runtime": "auto", "require_cuda": False, "body_timeout_s": 60.0}, [])


def test_the_real_server_with_a_bad_threshold_fails_its_health_check_and_the_job(model_dir, tmp_path, aws_conn):
    """The real gunicorn server with PLATEMASK_THRESHOLD=nan: /ping 503 with the reason from the
    first answer on (no model loaded), and a transform job through the local runner fails on its
    health check with that reason instead of sending every photo to a 500."""
    from platemask.local_transform import run_local_transform

    port = _free_port()
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS="1",
               PLATEMASK_MODEL_DIR=str(model_dir), PLATEMASK_DEVICE="cpu", PLATEMASK_THRESHOLD="nan")
    log = tmp_path / "server.log"
    url, proc, status, body = start_refusing_server(env, port, log, "bad_environment",
                                                    "a server that refuses every request must not pass /ping")
    try:
        assert status == 503 and body["reason"] == "bad_environment", (body, log.read_text()[-2000:])
        assert "PLATEMASK_THRESHOLD='nan'" in body["error"]
        s3, bucket = aws_conn, f"env-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="raw/a.jpg", Body=jpeg_bytes(np.zeros((64, 64, 3), np.uint8)))
        s3.put_object(Bucket=bucket, Key="m.manifest", Body=json.dumps([{"prefix": f"s3://{bucket}/"}, "raw/a.jpg"]).encode())
        request = {"TransformJobName": "env-job", "MaxConcurrentTransforms": 1, "MaxPayloadInMB": 6,
                   "BatchStrategy": "SingleRecord",
                   "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "ManifestFile",
                                                                      "S3Uri": f"s3://{bucket}/m.manifest"}},
                                      "ContentType": "application/x-image", "SplitType": "None"},
                   "TransformOutput": {"S3OutputPath": f"s3://{bucket}/out/"}}
        outcome = run_local_transform(request, url, s3, log=lambda m: None)
        assert outcome["TransformJobStatus"] == "Failed" and outcome["done"] == 0
        assert "bad_environment" in outcome["FailureReason"] and "PLATEMASK_THRESHOLD" in outcome["FailureReason"]
        assert "PLATEMASK_THRESHOLD='nan'" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_jpeg_record_matches_the_cli_record(server, scene, tmp_path, model_dir):
    url, _, _ = server
    img, _, _ = scene
    data = jpeg_bytes(img)
    status, body = call(url + "/invocations", data, "image/jpeg")
    assert status == 200
    rec = json.loads(body)
    # the same photo through the CLI
    from platemask.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "car.jpg").write_bytes(data)
    assert main(["mask", str(tmp_path / "in"), str(tmp_path / "out"), "--model", str(model_dir),
                 "--detections", str(tmp_path / "d.jsonl")]) == 0
    cli = json.loads((tmp_path / "d.jsonl").read_text())
    assert set(rec) == set(cli)
    assert rec["status"] == cli["status"] == "masked"
    assert rec["input_sha256"] == cli["input_sha256"] and (rec["width"], rec["height"]) == (cli["width"], cli["height"])
    assert len(rec["plates"]) == len(cli["plates"])
    for a, b in zip(rec["plates"], cli["plates"]):
        assert abs(a["score"] - b["score"]) < 1e-3
        area_a, area_b = (polygon_area(np.asarray(x["polygon"], np.float32)) for x in (a, b))
        assert abs(area_a - area_b) <= 0.02 * area_b
        assert np.abs(np.asarray(a["box"]) - np.asarray(b["box"])).max() < 1.0
    assert rec["output_sha256"] is None  # the container detects; masking happens in the DAG


@pytest.mark.parametrize("ctype", ["image/png", "application/x-image"])
def test_png_and_generic_image(server, scene, ctype):
    url, _, _ = server
    status, body = call(url + "/invocations", png_bytes(scene[0]), ctype)
    assert status == 200 and json.loads(body)["status"] == "masked"


def test_wrong_type_oversize_and_garbage(server):
    url, _, _ = server
    status, body = call(url + "/invocations", b"{}", "application/json")
    assert status == 415 and json.loads(body)["reason"] == "unsupported_media_type"
    status, body = call(url + "/invocations", os.urandom(3 * 1024 * 1024), "image/jpeg")
    assert status == 413 and "2 MB" in json.loads(body)["error"]
    assert call(url + "/ping")[0] == 200  # still alive


def test_a_photo_it_cannot_decode_is_a_failed_record_not_an_http_error(server):
    """Batch Transform fails the whole job on any non-2xx answer: a bad photo is that photo's failure."""
    import hashlib

    url, _, _ = server
    garbage = b"\xff\xd8\xff this is no jpeg"
    status, body = call(url + "/invocations", garbage, "image/jpeg")
    rec = json.loads(body)
    assert status == 200 and rec["status"] == "failed" and rec["reason"] in ("not_an_image", "corrupt", "truncated")
    assert rec["error"] and rec["input_sha256"] == hashlib.sha256(garbage).hexdigest() and rec["plates"] == []
    assert rec["model"]["weights_sha256"]
    status, body = call(url + "/invocations", b"", "image/png")
    assert status == 200 and json.loads(body)["reason"] == "empty_file"
    # over the pixel limit: refused before decoding, as a failed record
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.new("L", (12000, 8000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 2 * 2**20
    status, body = call(url + "/invocations", buf.getvalue(), "image/png")
    assert status == 200 and json.loads(body)["status"] == "failed" and json.loads(body)["reason"] == "too_large"
    assert call(url + "/ping")[0] == 200
    # a text EXIF Orientation: a 500 (the whole transform job failed, its retry too) before
    status, body = call(url + "/invocations", exif_orientation_jpeg(2, 4, b"abc\0"), "image/jpeg")
    assert status == 200 and json.loads(body)["status"] in ("masked", "no_plate"), body


def test_a_gpu_job_without_usable_cuda_fails_its_health_check(model_dir, tmp_path):
    """PLATEMASK_REQUIRE_CUDA=1 (set for ml.g*/ml.p* jobs) on a machine where CUDA cannot run: the
    real gunicorn server answers /ping 503 cuda_unavailable and says why in its log."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA works here: the check passes (covered by the GPU run)")
    port = _free_port()
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS="1",
               PLATEMASK_MODEL_DIR=str(model_dir), PLATEMASK_REQUIRE_CUDA="1")
    env.pop("PLATEMASK_DEVICE", None)
    log = tmp_path / "server.log"
    url, proc, status, body = start_refusing_server(env, port, log, "cuda_unavailable",
                                                    "a GPU job must not pass /ping on the CPU")
    try:
        assert body.get("reason") == "cuda_unavailable" and status == 503, (body, log.read_text()[-2000:])
        assert "CUDA is not usable" in body["error"]
        status, raw = call(url + "/invocations", b"\xff\xd8\xff", "image/jpeg", timeout=90)
        assert status == 503 and json.loads(raw)["reason"] == "cuda_unavailable"
        assert "PLATEMASK_REQUIRE_CUDA=1 but CUDA is not usable" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_concurrent_requests(server):
    url, proc, _ = server
    rng = np.random.default_rng(0)
    bodies = [jpeg_bytes(rng.integers(0, 255, (360, 640, 3), dtype=np.uint8)) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: call(url + "/invocations", b, "image/jpeg", timeout=120), bodies))
    assert [s for s, _ in results] == [200] * 8
    assert all(json.loads(b)["status"] in ("masked", "no_plate") for _, b in results)
    assert proc.poll() is None


def test_execution_parameters(server):
    url, _, _ = server
    status, body = call(url + "/execution-parameters")
    params = json.loads(body)
    assert status == 200 and params == {"MaxConcurrentTransforms": 2, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 2}


def _post_chunked(url, parts, ctype="image/jpeg", timeout=60):
    """POST a body with Transfer-Encoding: chunked (no Content-Length), as streaming clients send it."""
    import http.client
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", "/invocations", body=iter(parts), headers={"Content-Type": ctype}, encode_chunked=True)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_chunked_upload_over_the_limit_is_413(server, scene):
    url, _, _ = server
    mb = 1024 * 1024
    status, body = _post_chunked(url, [os.urandom(256 * 1024) for _ in range(12)])  # 3 MB, limit 2 MB
    assert status == 413 and json.loads(body)["reason"] == "payload_too_large", body[:300]
    data = jpeg_bytes(scene[0])  # under the limit, chunked: read whole, not cut
    assert len(data) < 2 * mb
    status, body = _post_chunked(url, [data[i:i + 4096] for i in range(0, len(data), 4096)])
    assert status == 200 and json.loads(body)["status"] == "masked"
    assert call(url + "/ping")[0] == 200


def test_read_body_stops_at_the_limit():
    import io

    from werkzeug.exceptions import RequestEntityTooLarge

    from platemask.serve import read_body

    class Counting(io.BytesIO):
        def read(self, n=-1):
            out = super().read(n)
            self.taken = getattr(self, "taken", 0) + len(out)
            return out

    assert read_body(io.BytesIO(b"x" * 1000), 1000, chunk=64) == b"x" * 1000  # exactly the limit is fine
    stream = Counting(b"x" * 10_000_000)
    with pytest.raises(RequestEntityTooLarge):
        read_body(stream, 1000, chunk=64)
    assert stream.taken == 1001  # never buffered past the limit


def _gradient_jpeg(w, h, seed):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    img = np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), (x + y) / 2], axis=2)
    img = img + rng.normal(0, 2, (1, w, 1))
    return jpeg_bytes(np.clip(img, 0, 255).astype(np.uint8), quality=80)


@pytest.fixture(scope="module")
def one_worker_server(model_dir, tmp_path_factory):
    """One worker, a 40 MB pixel budget (three 12 MP photos do not fit at once), big payloads allowed."""
    port = _free_port()
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS="1",
               PLATEMASK_MODEL_DIR=str(model_dir), SAGEMAKER_MAX_PAYLOAD_IN_MB="20", PLATEMASK_DEVICE="cpu",
               PLATEMASK_PIXEL_BUDGET_MB="40")
    env.pop("PLATEMASK_SERVER_THREADS", None)
    url, proc, _ = start_server(env, port, tmp_path_factory.mktemp("serve1") / "server.log")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_ping_answers_while_large_inferences_run(one_worker_server):
    """4 parallel 12 MP requests to one worker (the issue: 4 x 79 MP, /ping timed out after 10 s)."""
    url = one_worker_server
    bodies = [_gradient_jpeg(4000, 3000, i) for i in range(4)]
    pings: list[float] = []
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, url + "/invocations", b, "image/jpeg", timeout=600) for b in bodies]
        time.sleep(0.5)
        while not all(f.done() for f in futures):
            t0 = time.monotonic()
            status, _ = call(url + "/ping", timeout=5)  # urllib raises on a timeout: the test fails there
            assert status == 200
            pings.append(time.monotonic() - t0)
            time.sleep(0.3)
        results = [f.result() for f in futures]
    assert [s for s, _ in results] == [200] * 4
    assert all((json.loads(b)["width"], json.loads(b)["height"]) == (4000, 3000) for _, b in results)
    assert len(pings) >= 3 and max(pings) < 5


def test_worker_decodes_within_its_pixel_budget(model_dir, monkeypatch):
    """Parallel requests to one worker take turns for a 1 MB budget (one 640x480 photo at a time);
    every reservation is given back, failed requests' too."""
    from platemask.serve import create_app

    monkeypatch.setenv("PLATEMASK_PIXEL_BUDGET_MB", "1")
    app = create_app(str(model_dir), load=False)
    app.extensions["platemask_model"].load()
    budget = app.extensions["platemask_budget"]
    seen = []
    reserve = budget.reserve

    def watched(ticket, nbytes):
        reserve(ticket, nbytes)
        seen.append((budget.in_use, budget.holders))

    monkeypatch.setattr(budget, "reserve", watched)
    rng = np.random.default_rng(1)
    bodies = [jpeg_bytes(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(4)]
    bodies.append(bodies[0][: len(bodies[0]) // 2])  # truncated: fails after reserving

    def post(body):
        r = app.test_client().post("/invocations", data=body, content_type="image/jpeg")
        return r.status_code

    with ThreadPoolExecutor(5) as pool:
        statuses = list(pool.map(post, bodies))
    assert statuses == [200] * 5  # the truncated photo is a failed record (tested above), not an HTTP error
    assert len(seen) == 5 and max(n for _, n in seen) == 1
    assert budget.high_water == 640 * 480 * 3 <= budget.capacity
    assert budget.in_use == 0 and budget.holders == 0


def test_requests_that_stop_sending_part_way_do_not_take_the_servers_threads(model_dir, tmp_path, scene):
    """A slow-loris on the real gunicorn server: a POST /invocations whose Content-Length is larger than
    the body it sends (or whose headers stop part-way) held a worker thread for good (gunicorn's worker
    timeout never fires while its main loop runs): with as many such connections as threads, /ping timed
    out and the transform job failed on its health check. Now the body and the headers have a deadline
    (PLATEMASK_BODY_TIMEOUT_S): a short body is answered 408 body_timeout saying what to send, a stalled
    header's connection is closed, a body announced over the payload limit is drained only that long
    before its 413, and the server goes on answering."""
    import socket

    port = _free_port()
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS="1",
               PLATEMASK_SERVER_THREADS="2", PLATEMASK_MODEL_DIR=str(model_dir), PLATEMASK_DEVICE="cpu",
               PLATEMASK_BODY_TIMEOUT_S="2")
    url, proc, _ = start_server(env, port, tmp_path / "server.log")
    stalled = []
    try:
        head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        for sent in ((head + b"Content-Length: 100000\r\n\r\n" + jpeg_bytes(scene[0])[:500],) * 2 + (head,) * 2
                     + (head + b"Content-Length: 50000000\r\n\r\n",)):  # over the limit: its 413 drains the body
            c = socket.create_connection(("127.0.0.1", port))
            c.sendall(sent)
            stalled.append(c)
        time.sleep(0.5)
        assert call(url + "/ping", timeout=30)[0] == 200  # urllib raises on a timeout: the test fails there
        for c, expected in zip(stalled[:2] + stalled[4:], (b"HTTP/1.1 408", b"HTTP/1.1 408", b"HTTP/1.1 413")):
            c.settimeout(30)
            answer = b""
            while b"}" not in answer:
                part = c.recv(4096)
                assert part, answer
                answer += part
            status, _, body = answer.partition(b"\r\n\r\n")
            assert status.startswith(expected), answer
            body = json.loads(body)
            assert (body["reason"] == "body_timeout" and "Content-Length" in body["error"]
                    or body["reason"] == "payload_too_large"), body
        for c in stalled[2:4]:
            c.settimeout(30)
            assert c.recv(4096) == b""  # closed, not held
        status, body = call(url + "/invocations", jpeg_bytes(scene[0]), "image/jpeg", timeout=120)
        assert status == 200 and json.loads(body)["status"] == "masked"
    finally:
        for c in stalled:
            c.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_a_body_that_keeps_arriving_is_not_cut_at_the_stall_deadline(model_dir, tmp_path, scene):
    """PLATEMASK_BODY_TIMEOUT_S bounded a body's whole arrival, not its silences: a photo sent steadily
    (never quiet for more than a tenth of a second) over longer than that deadline was answered 408
    body_timeout, and a 408 fails the whole Batch Transform job. At the default 60 s a 100 MB record
    (MaxPayloadInMB's top) had to come at 1.7 MB/s. Now the deadline counts from the body's last bytes
    (and the whole body may take ten times it): the steady photo is masked on the real gunicorn server,
    and a body that stops still gets its 408."""
    import socket

    port = _free_port()
    env = dict(os.environ, SAGEMAKER_BIND_TO_PORT=str(port), SAGEMAKER_MODEL_SERVER_WORKERS="1",
               PLATEMASK_SERVER_THREADS="2", PLATEMASK_MODEL_DIR=str(model_dir), PLATEMASK_DEVICE="cpu",
               PLATEMASK_BODY_TIMEOUT_S="2")
    url, proc, _ = start_server(env, port, tmp_path / "server.log")
    body = jpeg_bytes(scene[0])
    assert call(url + "/ping", timeout=30)[0] == 200

    def answer_to(pieces, pause):
        c = socket.create_connection(("127.0.0.1", port))
        try:
            c.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode())
            for piece in pieces:
                c.sendall(piece)
                time.sleep(pause)
            c.settimeout(120)
            got = b""
            while b"}" not in got.partition(b"\r\n\r\n")[2]:
                part = c.recv(65536)
                assert part, got
                got += part
            status, _, rest = got.partition(b"\r\n\r\n")
            return status.split(b"\r\n")[0], json.loads(rest)
        finally:
            c.close()

    try:
        step = max(1, len(body) // 50)
        pieces = [body[i:i + step] for i in range(0, len(body), step)]
        started = time.monotonic()
        status, rec = answer_to(pieces, 0.1)  # ~5 s of steady sending against a 2 s deadline
        assert time.monotonic() - started > 4, "the photo was not sent over longer than the deadline"
        assert status.startswith(b"HTTP/1.1 200") and rec["status"] == "masked", (status, rec)
        status, rec = answer_to([body[:len(body) // 2]], 0)  # then silence: still cut
        assert status.startswith(b"HTTP/1.1 408") and rec["reason"] == "body_timeout", (status, rec)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_body_deadline_counts_silences_and_bounds_the_whole_body():
    """body_deadline on a real socket pair: a reader fed a byte every 0.1 s is cut at its total (1 s),
    not at its 0.4 s stall deadline; one fed nothing is cut at the stall deadline."""
    import socket
    import threading

    from platemask.serve import body_deadline

    def read_until_cut(feed_every):
        a, b = socket.socketpair()
        stop = threading.Event()

        def feed():
            while feed_every and not stop.wait(feed_every):
                with __import__("contextlib").suppress(OSError):
                    b.sendall(b"x")

        t = threading.Thread(target=feed, daemon=True)
        t.start()
        started = time.monotonic()
        try:
            with body_deadline(a, 0.4, total=1.0) as late:
                while a.recv(1):
                    late.progress()
            return time.monotonic() - started, late.is_set()
        finally:
            stop.set()
            a.close()
            b.close()

    took, cut = read_until_cut(0.1)
    assert cut and 0.9 <= took < 3.0, took
    took, cut = read_until_cut(0)
    assert cut and 0.35 <= took < 0.9, took
