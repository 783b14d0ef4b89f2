"""The Plate QA view in a real browser: Chromium (headless, driven by Playwright) against a real
`airflow api-server` process, logged in through Airflow's own login form, the view opened from the
UI's navigation (an iframe), a report produced by a real run of the DAG (``dag.test()``) on moto's
S3 server.

What only a browser shows: whether the session cookie reaches the view from inside the UI's iframe
(a link followed from a sandboxed, opaque-origin page is a cross-site request, and the browser then
withholds Airflow's SameSite=Lax cookie), whether the thumbnails render under the view's policy,
and whether a hostile report.html runs anything. ``test_plugin.py`` checks the same view's headers
and escaping through the app in-process.

Needs Playwright (``pip install playwright``, in the ``test`` extra) and a Chromium: the one
``apt-get install chromium`` gives, or ``PLATEMASK_CHROMIUM``. Skips, saying which is missing, when
either is absent. Screenshots of each step go to the test's tmp folder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, _free_port, jpeg_bytes

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the test extra has it)")

DAG_FILE = ROOT / "dags" / "plate_masking.py"
W_RUN = "20261119T2300Z-20261120T2300Z"  # 2026-11-20 in Europe/Berlin, the window the real run masks
W_EVIL = "20261120T2300Z-20261121T2300Z"
SIMPLE_AUTH = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


def _chromium() -> str:
    for candidate in (os.environ.get("PLATEMASK_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("no Chromium: apt-get install chromium (or set PLATEMASK_CHROMIUM to a Chromium binary)")


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])  # root in CI: no user namespaces
        yield b
        b.close()


@pytest.fixture(scope="module")
def qa_bucket(moto_server, airflow_db):
    """A bucket whose window W_RUN was masked by a real run of the DAG (3 generated photos of cars), and
    whose window W_EVIL holds a report someone slipped into qa/: script in every field and in its page."""
    import boto3

    from platemask.training.synth import synth_car_scene

    bucket = f"qa-browser-{uuid.uuid4().hex[:8]}"
    env = {"AWS_ENDPOINT_URL": moto_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "PLATEMASK_BUCKET": bucket, "PLATEMASK_DEADLINE_HOURS": "0",
           "PLATEMASK_LATE_DAYS": "0", "PLATEMASK_RETRIES": "0",
           "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                                                   "extra": {"endpoint_url": moto_server, "region_name": "us-east-1"}})}
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    rng = np.random.default_rng(5)
    for i in range(3):
        img, _, _ = synth_car_scene(rng, plate_width=(120, 160))
        s3.put_object(Bucket=bucket, Key=f"raw/DE/2026/11/20/car{i}.jpg", Body=jpeg_bytes(img))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        spec = importlib.util.spec_from_file_location(f"plate_masking_{uuid.uuid4().hex}", DAG_FILE)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        dr = mod.plate_masking_dag.test(run_conf={"region": "DE", "window_start": "2026-11-20", "window_end": "2026-11-21"})
    assert dr.state == "success"
    report = json.loads(s3.get_object(Bucket=bucket, Key=f"qa/DE/{W_RUN}/report.json")["Body"].read())
    evil = "<script>alert(document.cookie)</script>"
    s3.put_object(Bucket=bucket, Key=f"qa/DE/{W_EVIL}/report.json", Body=json.dumps({
        "photos_in_window": evil, "by_status": {"masked": evil, "no_plate": 0, "failed": 0}, "failure_rate": 0,
        "max_failure_rate": 0.02, "plates": evil, "review": {"count": 0}, "mask_images_per_second": evil,
        "model": {"name": '"><img src=x onerror="alert(1);top.__pwned=1">'}, "region": "DE",
        "window": {"start": W_EVIL, "id": W_EVIL}}).encode())
    s3.put_object(Bucket=bucket, Key=f"qa/DE/{W_EVIL}/report.html", Body=(
        "<html><body><h1>slipped-in report</h1><script>alert(2); top.__pwned = 2</script>"
        "<img src=x onerror=\"alert(3); top.__pwned = 3\"><form action=/api/v2/dags method=post><button>x</button>"
        "</form></body></html>").encode())
    return env, report


@pytest.fixture(scope="module")
def api_server(qa_bucket, tmp_path_factory):
    """`airflow api-server` in its own process (uvicorn, as deployed) with SimpleAuthManager users
    reviewer (role USER) and viewer (role VIEWER); yields its URL and their passwords."""
    env_extra, _ = qa_bucket
    folder = tmp_path_factory.mktemp("api-server")
    passwords = {"reviewer": secrets.token_urlsafe(12), "viewer": secrets.token_urlsafe(12)}
    (folder / "passwords.json").write_text(json.dumps(passwords))
    port = _free_port()
    env = {**os.environ, **env_extra,
           "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH,
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "reviewer:user,viewer:viewer",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(folder / "passwords.json"),
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32)}
    log = folder / "api-server.log"
    # the DAGs in the metadata database, as the DAG processor puts them there, for the UI's DAG pages
    subprocess.run([sys.executable, "-m", "airflow", "dags", "reserialize"], env=env, check=True, capture_output=True,
                   timeout=300)
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "airflow", "api-server", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"], env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/api/v2/monitor/health", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"airflow api-server did not come up (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
                time.sleep(1)
        yield url, passwords
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _login(browser, url: str, user: str, password: str):
    """A fresh browser context logged in through Airflow's own sign-in form; returns its page."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.dialogs = []  # every alert() any frame of the page opened
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.goto(url + "/")
    page.wait_for_url("**/auth/login**", timeout=60_000)
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(url + "/", timeout=60_000)
    return page


def _qa_frame(page, timeout_s: float = 60):
    """The iframe the UI shows the view in, once its document has a body."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for frame in page.frames:
            if frame is not page.main_frame and "/plate-qa/" in frame.url:
                try:
                    frame.wait_for_selector("body", timeout=5_000)
                    return frame
                except sync_api.Error:
                    pass
        page.wait_for_timeout(500)  # not time.sleep: Playwright's sync API takes in events only in its calls
    raise AssertionError(f"no Plate QA frame in {[f.url for f in page.frames]}")


def _wait_text(frame, *texts: str, timeout_s: float = 30) -> str:
    """The frame's text once it shows any of ``texts``."""
    deadline = time.monotonic() + timeout_s
    body = ""
    while time.monotonic() < deadline:
        try:
            body = frame.inner_text("body")
        except sync_api.Error:  # the frame is navigating
            body = ""
        if any(t in body for t in texts):
            return body
        frame.page.wait_for_timeout(500)
    raise AssertionError(f"none of {texts!r} shown; the frame shows:\n{body[:1500]}")


def test_a_reviewer_opens_plate_qa_from_the_navigation_and_reads_a_real_report(browser, api_server, qa_bucket, tmp_path):
    url, passwords = api_server
    _, report = qa_bucket
    page = _login(browser, url, "reviewer", passwords["reviewer"])
    page.get_by_role("link", name="Plate QA").first.click()  # the UI's navigation entry
    frame = _qa_frame(page)
    index = _wait_text(frame, "2026-11-19T23:00:00")  # the run's window start
    page.screenshot(path=str(tmp_path / "1-index.png"))
    row = frame.locator("tr", has=frame.locator(f'a[href$="{W_RUN}"]'))
    cells = row.locator("td").all_inner_texts()
    assert cells[:4] == ["DE", report["window"]["start"], str(report["photos_in_window"]),
                         str(report["by_status"]["masked"])], cells
    assert '"><img src=x onerror=' in index  # the slipped-in report is a row, its fields shown as text

    row.get_by_role("link").click()  # the report, inside the same frame
    frame = _qa_frame(page)
    shown = _wait_text(frame, "Plate QA — DE", "please log in", "Plate QA:")
    page.screenshot(path=str(tmp_path / "2-report.png"))
    assert "please log in" not in shown, shown[:500]  # the session reached the view from the iframe
    assert "Plate QA — DE" in shown and "unmasked originals" in shown, shown[:500]
    images = frame.locator("img")
    assert images.count() >= 2
    drawn = [images.nth(i).evaluate("el => el.complete && el.naturalWidth") for i in range(images.count())]
    assert all(w and w > 0 for w in drawn), drawn  # the thumbnails render under the view's policy
    assert page.dialogs == []


def test_a_slipped_in_report_runs_nothing_in_the_browser(browser, api_server, tmp_path):
    url, passwords = api_server
    page = _login(browser, url, "reviewer", passwords["reviewer"])
    page.get_by_role("link", name="Plate QA").first.click()
    frame = _qa_frame(page)
    _wait_text(frame, "2026-11-19T23:00:00")
    frame.locator(f'a[href$="{W_EVIL}"]').click()
    frame = _qa_frame(page)
    _wait_text(frame, "slipped-in report")
    page.wait_for_timeout(1000)  # time for an onerror or a script to have run
    page.screenshot(path=str(tmp_path / "evil.png"))
    assert page.dialogs == []
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.url.startswith(url)  # still the Airflow UI; nothing navigated the top page away


def test_a_viewer_is_shown_reviewers_only_in_the_browser(browser, api_server, tmp_path):
    url, passwords = api_server
    page = _login(browser, url, "viewer", passwords["viewer"])
    page.goto(url + "/plate-qa/")
    shown = page.inner_text("body")
    page.screenshot(path=str(tmp_path / "viewer.png"))
    assert "reviewers only" in shown and "2026-11-19T23:00:00" not in shown, shown[:500]


def _api(url: str, user: str, password: str, path: str) -> dict:
    req = urllib.request.Request(url + "/auth/token", data=json.dumps({"username": user, "password": password}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        token = json.loads(r.read())["access_token"]
    with urllib.request.urlopen(urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"}),
                                timeout=30) as r:
        return json.loads(r.read())


def test_a_window_triggered_from_the_ui_form_is_the_window_the_run_plans(browser, api_server, tmp_path):
    """The operator's manual run: the DAG's trigger form in the Airflow UI, region and window filled in,
    the rest left as the form shows it. The conf the UI sends is what the plan task turns into the run's
    window (an empty field must arrive as "no value", a date as the date typed)."""
    from platemask.runspec import plan_runs
    from platemask.settings import Settings

    url, passwords = api_server
    page = _login(browser, url, "reviewer", passwords["reviewer"])
    page.goto(url + "/dags/plate_masking")
    page.get_by_role("button", name="Trigger").first.click()
    form = page.get_by_role("dialog").last
    form.locator("#element_window_start").fill("2026-11-20")
    form.locator("#element_window_end").fill("2026-11-21")
    form.locator("#element_region").click()
    page.get_by_role("option", name="DE", exact=True).click()
    page.screenshot(path=str(tmp_path / "trigger-form.png"), full_page=True)
    before = {r["dag_run_id"] for r in _api(url, "reviewer", passwords["reviewer"], "/api/v2/dags/plate_masking/dagRuns")["dag_runs"]}
    form.get_by_role("button", name="Trigger").last.click()
    deadline = time.monotonic() + 30
    while True:
        runs = [r for r in _api(url, "reviewer", passwords["reviewer"], "/api/v2/dags/plate_masking/dagRuns")["dag_runs"]
                if r["dag_run_id"] not in before]
        if runs or time.monotonic() > deadline:
            break
        page.wait_for_timeout(500)
    page.screenshot(path=str(tmp_path / "triggered.png"))
    assert len(runs) == 1, "the form created no run"
    run = runs[0]
    conf = run["conf"]
    assert (conf["region"], conf["window_start"], conf["window_end"]) == ("DE", "2026-11-20", "2026-11-21"), conf
    assert conf["threshold"] is None and conf["model"] is None and conf["max_images"] is None, conf  # empty: no value
    specs = plan_runs(Settings(), conf, run_id=run["dag_run_id"], data_interval_end=None,
                      now=datetime.now(timezone.utc), run_type=run["run_type"])
    assert [(sp.region, sp.window.id) for sp in specs] == [("DE", W_RUN)]
    assert specs[0].threshold is None and specs[0].backend == "local" and not specs[0].dry_run
