"""The "Plate QA" Airflow UI view: registered as a plugin, reviewers only, safe with hostile QA data.

The view is exercised through the real Airflow api-server app (``create_app``), which mounts the
plugin found in the plugins folder, with real JWTs issued by the SimpleAuthManager's /auth/token
for a VIEWER and a USER ("reviewer"), and a real S3 endpoint (moto's server).
"""
import importlib.util
import json
import re
import secrets
import socket
import uuid

import pytest
from fastapi.testclient import TestClient

from conftest import ROOT

W_OLD, W_NEW = "20261118T2300Z-20261119T2300Z", "20261119T2300Z-20261120T2300Z"
STRICT_CSP = ("sandbox", "default-src 'none'", "img-src data:", "style-src 'unsafe-inline'")


def _load_plugin():
    spec = importlib.util.spec_from_file_location(f"plate_qa_{uuid.uuid4().hex}", ROOT / "plugins" / "plate_qa.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plugin_declares_app_and_nav_entry():
    mod = _load_plugin()
    p = mod.PlateQAPlugin
    assert p.fastapi_apps[0]["url_prefix"] == "/plate-qa" and p.fastapi_apps[0]["app"] is mod.app
    view = p.external_views[0]
    assert view["name"] == "Plate QA" and view["href"] == "/plate-qa/" and view["destination"] == "nav"


def test_airflow_discovers_the_plugin():
    from airflow import plugins_manager

    plugins, errors = plugins_manager._get_plugins()  # scans AIRFLOW__CORE__PLUGINS_FOLDER (set in conftest)
    assert not errors
    apps, _ = plugins_manager.get_fastapi_plugins()
    assert "plate_qa" in [p.name for p in plugins]
    assert any(a["url_prefix"] == "/plate-qa" for a in apps)


@pytest.fixture(scope="module")
def api(airflow_db, tmp_path_factory):
    """The real api-server app with SimpleAuthManager users viewer (VIEWER) and reviewer (USER), and their tokens."""
    passwords = {"viewer": secrets.token_urlsafe(16), "reviewer": secrets.token_urlsafe(16)}
    pw_file = tmp_path_factory.mktemp("auth") / "simple_auth_manager_passwords.json"
    pw_file.write_text(json.dumps(passwords))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__CORE__AUTH_MANAGER",
                  "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager")
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "viewer:viewer,reviewer:user")
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(pw_file))
        from airflow.api_fastapi.app import create_app, purge_cached_app

        purge_cached_app()
        client = TestClient(create_app())
        tokens = {}
        for user, password in passwords.items():
            r = client.post("/auth/token", json={"username": user, "password": password})
            assert r.status_code == 201, r.text
            tokens[user] = {"Authorization": f"Bearer {r.json()['access_token']}"}
        yield client, tokens
        purge_cached_app()


def _put_report(s3, bucket, window, report, html):
    s3.put_object(Bucket=bucket, Key=f"qa/DE/{window}/report.json", Body=json.dumps(report).encode())
    s3.put_object(Bucket=bucket, Key=f"qa/DE/{window}/report.html", Body=html.encode())


@pytest.fixture
def qa_bucket(aws_conn, monkeypatch):
    s3 = aws_conn
    bucket = f"qa-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    monkeypatch.setenv("PLATEMASK_BUCKET", bucket)
    for w, failed in ((W_OLD, 0), (W_NEW, 5)):
        rep = {"images": 100, "photos_in_window": 100, "by_status": {"masked": 80, "no_plate": 15, "failed": failed},
               "failure_rate": failed / 100, "max_failure_rate": 0.02, "plates": 91, "review": {"count": 4},
               "mask_images_per_second": 3.5, "model": {"name": "platemask-mnv2-fpn"}, "region": "DE",
               "window": {"start": w, "id": w}}
        _put_report(s3, bucket, w, rep, f"<html>report {w}</html>")
    return bucket


def _assert_strict_headers(resp):
    csp = resp.headers["content-security-policy"]
    assert all(part in csp for part in STRICT_CSP), csp
    assert "script-src" not in csp  # default-src 'none' covers scripts: none at all
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["cache-control"] == "no-store"


def test_no_login_is_refused_with_a_readable_page(api, qa_bucket):
    client, _ = api
    assert client.get("/api/v2/version").status_code == 200  # what the compose health check asks, without a login
    for path in ("/plate-qa/", f"/plate-qa/report/DE/{W_NEW}"):
        r = client.get(path)
        assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
        assert "Log in to Airflow" in r.text and "report " + W_NEW not in r.text


def test_viewer_is_denied(api, qa_bucket):
    client, tokens = api
    assert client.get("/api/v2/dags", headers=tokens["viewer"]).status_code == 200  # a real, logged-in Viewer
    for path in ("/plate-qa/", f"/plate-qa/report/DE/{W_NEW}"):
        r = client.get(path, headers=tokens["viewer"])
        assert r.status_code == 403, (path, r.text)
        assert r.headers["content-type"].startswith("text/html")
        assert "reviewers only" in r.text and "plate_masking" in r.text and "Viewer role is not enough" in r.text
        assert "report " + W_NEW not in r.text and "platemask-mnv2-fpn" not in r.text  # nothing from S3
        _assert_strict_headers(r)


def test_reviewer_sees_index_and_report(api, qa_bucket):
    client, tokens = api
    page = client.get("/plate-qa/", headers=tokens["reviewer"])
    assert page.status_code == 200, page.text
    text = page.text
    assert text.index("20261119T2300Z") < text.index("20261118T2300Z")  # newest first
    assert "5.00%" in text and "class=bad" in text  # over the failure limit is flagged
    assert f'href="report/DE/{W_NEW}"' in text
    _assert_strict_headers(page)
    rep = client.get(f"/plate-qa/report/DE/{W_NEW}", headers=tokens["reviewer"])
    assert rep.status_code == 200 and rep.text == f"<html>report {W_NEW}</html>"
    assert rep.headers["content-type"] == "text/html; charset=utf-8"
    _assert_strict_headers(rep)
    # a report is someone's bytes: an opaque origin; the view's own index keeps Airflow's, so that its
    # links carry the session cookie in a browser (tests/test_browser.py)
    assert rep.headers["content-security-policy"].startswith("sandbox; ")
    assert page.headers["content-security-policy"].startswith("sandbox allow-same-origin; ")
    assert client.get("/plate-qa/report/DE/..%2F..%2Fraw", headers=tokens["reviewer"]).status_code == 404
    missing = client.get("/plate-qa/report/DE/20261201T2300Z-20261202T2300Z", headers=tokens["reviewer"])
    assert missing.status_code == 404
    assert f"s3://{qa_bucket}/qa/DE/20261201T2300Z-20261202T2300Z/report.html" in missing.text
    assert "QA task" in missing.text  # what to do


def test_malicious_report_is_escaped_and_report_html_cannot_run_script(api, aws_conn, qa_bucket):
    client, tokens = api
    evil = "<script>alert(document.cookie)</script>"
    img = '"><img src=x onerror=alert(1)>'
    w = "20261120T2300Z-20261121T2300Z"
    _put_report(aws_conn, qa_bucket, w, {
        "photos_in_window": evil, "by_status": {"masked": img, "no_plate": evil, "failed": evil, "region": evil},
        "failure_rate": evil, "max_failure_rate": img, "plates": {"x": evil}, "review": {"count": evil},
        "mask_images_per_second": img, "model": {"name": evil}, "window": {"start": img, "id": w}, "run_id": evil,
        "region": "DE",
    }, f"<html><body>{evil}<img src=x onerror=alert(2)></body></html>")
    page = client.get("/plate-qa/", headers=tokens["reviewer"])
    assert page.status_code == 200, page.text
    assert "<script" not in page.text and "<img" not in page.text
    assert "&lt;script&gt;alert(document.cookie)&lt;/script&gt;" in page.text  # the model name, escaped
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page.text  # the window start, escaped
    assert W_NEW in page.text  # the good reports are still listed
    # the served report.html keeps its bytes, but the browser is told to run nothing in it
    rep = client.get(f"/plate-qa/report/DE/{w}", headers=tokens["reviewer"])
    assert rep.status_code == 200
    _assert_strict_headers(rep)


def test_unreadable_report_json_is_one_row_not_a_broken_page(api, aws_conn, qa_bucket):
    client, tokens = api
    w = "20261121T2300Z-20261122T2300Z"
    aws_conn.put_object(Bucket=qa_bucket, Key=f"qa/DE/{w}/report.json", Body=b"{not json <b>")
    page = client.get("/plate-qa/", headers=tokens["reviewer"])
    assert page.status_code == 200
    assert "report.json is not valid JSON" in page.text and W_NEW in page.text and "<b>" not in page.text


def test_reports_the_page_cannot_read_or_that_were_never_published_are_rows_not_a_500(api, aws_conn, qa_bucket):
    """A report.json nested past the parser's depth (RecursionError) or holding 10**400 as its failure
    rate (OverflowError when shown) gave a bare 500 that hid every region; a window whose folder
    holds only dry or partial runs' QA read as 'unreadable: S3 answered NoSuchKey'."""
    client, tokens = api
    deep, huge, dry = ("20261121T2300Z-20261122T2300Z", "20261122T2300Z-20261123T2300Z",
                       "20261123T2300Z-20261124T2300Z")
    aws_conn.put_object(Bucket=qa_bucket, Key=f"qa/DE/{deep}/report.json", Body=b"[" * 100000 + b"]" * 100000)
    aws_conn.put_object(Bucket=qa_bucket, Key=f"qa/DE/{huge}/report.json",
                        Body=b'{"failure_rate": 1' + b"0" * 400 + b', "photos_in_window": 10}')
    aws_conn.put_object(Bucket=qa_bucket, Key=f"qa/DE/{dry}/runs/manual__dry-1a2b3c4d/report.json", Body=b"{}")
    page = client.get("/plate-qa/", headers=tokens["reviewer"])
    assert page.status_code == 200, page.text[:300]
    assert "RecursionError" in page.text and W_NEW in page.text and W_OLD in page.text
    assert "no published report: only dry runs, partial" in page.text and "NoSuchKey" not in page.text


def test_a_report_in_the_wrong_folder_a_huge_one_and_odd_folders_are_rows_not_shown_as_windows(api, aws_conn, qa_bucket):
    """A report.json copied into another window's folder showed its numbers as that window's (a
    failing night shown green); a 9 MB one was read whole into the api-server; folders that are not
    window ids were hidden without a word."""
    client, tokens = api
    copied, huge = "20261121T2300Z-20261122T2300Z", "20261122T2300Z-20261123T2300Z"
    good = json.loads(aws_conn.get_object(Bucket=qa_bucket, Key=f"qa/DE/{W_OLD}/report.json")["Body"].read())
    assert good["by_status"]["failed"] == 0
    aws_conn.put_object(Bucket=qa_bucket, Key=f"qa/DE/{copied}/report.json", Body=json.dumps(good).encode())
    aws_conn.put_object(Bucket=qa_bucket, Key=f"qa/DE/{huge}/report.json",
                        Body=b'{"region": "DE", "pad": "' + b"x" * (9 << 20) + b'"}')
    empty = "20261123T2300Z-20261124T2300Z"  # a ranged GET of an empty object is S3's InvalidRange
    aws_conn.put_object(Bucket=qa_bucket, Key=f"qa/DE/{empty}/report.json", Body=b"")
    for odd in ("backup-2026", "20261121T2300Z-20261122T2300Z.old"):
        aws_conn.put_object(Bucket=qa_bucket, Key=f"qa/DE/{odd}/report.json", Body=json.dumps(good).encode())
    page = client.get("/plate-qa/", headers=tokens["reviewer"])
    assert page.status_code == 200, page.text[:300]
    assert f"window &#x27;{W_OLD}&#x27;, not of the folder it is in (DE, {copied})" in page.text or \
        f"window '{W_OLD}', not of the folder it is in (DE, {copied})" in page.text, page.text[:3000]
    assert "report.json is larger than 8 MB" in page.text and "report.json is not valid JSON" in page.text
    assert "2 folder(s) under" in page.text and "backup-2026" in page.text
    assert 'href="report/DE/?"' not in page.text
    assert page.text.count("<td>80</td>") == 2  # the two real windows' masked counts, and no third
    # the copied report's page is refused too, not served as this window's (its html came along)
    aws_conn.put_object(Bucket=qa_bucket, Key=f"qa/DE/{copied}/report.html", Body=f"<html>report {W_OLD}</html>".encode())
    rep = client.get(f"/plate-qa/report/DE/{copied}", headers=tokens["reviewer"])
    assert rep.status_code == 409 and "not of the folder it is in" in rep.text and f"report {W_OLD}" not in rep.text
    assert client.get(f"/plate-qa/report/DE/{W_OLD}", headers=tokens["reviewer"]).status_code == 200


def test_text_that_reorders_itself_is_shown_as_codes():
    """Bidi overrides in a photo key survived escaping: 'car\u202egpj.exe' showed as 'carexe.jpg'."""
    from platemask.html_text import escape
    from platemask.qa_index import render_index

    key = "raw/DE/car\u202egpj.exe<b>\u200b"
    assert escape(key) == "raw/DE/car\\u202egpj.exe&lt;b&gt;\\u200b"
    out = render_index([{"region": "DE", "window": W_OLD, "error": key}], lambda r, w: f"report/{r}/{w}")
    assert "\u202e" not in out and "\\u202e" in out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_s3_down_gives_a_readable_503(api, qa_bucket, monkeypatch):
    client, tokens = api
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": f"http://127.0.0.1:{_closed_port()}", "region_name": "us-east-1"}}))
    for path, key in (("/plate-qa/", f"s3://{qa_bucket}/qa/DE/"),
                      (f"/plate-qa/report/DE/{W_NEW}", f"s3://{qa_bucket}/qa/DE/{W_NEW}/report.html")):
        r = client.get(path, headers=tokens["reviewer"])
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("text/html")
        assert "S3 is unreachable" in r.text and key in r.text  # which key
        assert "EndpointConnectionError" in r.text  # what failed
        assert "aws_default" in r.text and "endpoint_url" in r.text  # what to do
        _assert_strict_headers(r)


def test_missing_bucket_gives_a_readable_502(api, aws_conn, monkeypatch):
    client, tokens = api
    monkeypatch.setenv("PLATEMASK_BUCKET", f"absent-{uuid.uuid4().hex[:8]}")
    r = client.get("/plate-qa/", headers=tokens["reviewer"])
    assert r.status_code == 502, r.text
    assert "NoSuchBucket" in r.text and "PLATEMASK_BUCKET" in r.text


def test_bad_settings_give_a_readable_500(api, qa_bucket, monkeypatch):
    client, tokens = api
    monkeypatch.setenv("PLATEMASK_TIME_SOURCE", "<b>mtime</b>")
    r = client.get("/plate-qa/", headers=tokens["reviewer"])
    assert r.status_code == 500 and r.headers["content-type"].startswith("text/html")
    assert "platemask settings are invalid" in r.text and "time_source" in r.text and "<b>" not in r.text


def test_index_escapes_every_field():
    """render_index alone: whatever a row holds, no markup gets through (numbers included)."""
    from platemask.qa_index import render_index, summarise

    evil = "<svg onload=alert(1)>"
    row = summarise("DE", W_NEW, {"photos_in_window": 10, "by_status": {"masked": 7, "no_plate": 2, "failed": 1},
                                  "failure_rate": 0.1, "max_failure_rate": 0.02, "plates": 9, "review": {"count": 1},
                                  "model": {"name": evil}, "window": {"start": evil, "id": W_NEW},
                                  "region": "DE"})
    row["photos"] = evil  # a caller that forgot to check types still gets escaped output
    out = render_index([row, {"region": evil, "window": W_OLD, "error": evil}], lambda r, w: f"report/{r}/{w}")
    assert "<svg" not in out and out.count("&lt;svg onload=alert(1)&gt;") == 6  # 4 cells, the error, the link
    assert "10.00%" in out and "class=bad" in out


def test_report_html_escapes_what_it_was_given_and_carries_its_own_csp(aws_conn):
    """report.html itself: hostile photo keys, reasons and shard summaries stay text; no script can run."""
    from platemask.detections import record
    from platemask.qa import build_report
    from platemask.report_html import render_report
    from platemask.runspec import RunSpec
    from platemask.settings import Settings

    evil = "<script>alert(1)</script>"
    bucket = f"qa-{uuid.uuid4().hex[:8]}"
    aws_conn.create_bucket(Bucket=bucket)
    records = [record(f"raw/DE/2026/11/19/{evil}.jpg", status="failed", reason=evil, error=evil),
               record(f"raw/DE/2026/11/19/{evil}2.jpg", status="no_plate", review=True, review_reason=evil)]
    report = build_report(records, model={"name": evil, "weights_sha256": evil}, extra={
        "shards": [{"index": evil, "photos": evil, "processed": 1, "skipped": 0, "failed": evil,
                    "wall_seconds": evil, "images_per_second": evil}],
        "photos_in_window": evil, "mask_images_per_second": evil, "max_failure_rate": 0.02})
    report["thresholds"] = {"score": evil}
    page = render_report(report, records, client=aws_conn, settings=Settings(bucket=bucket),
                         masked_key=lambda k: k.replace("raw/", "masked/", 1),
                         spec=RunSpec(region="DE", window_start="2026-11-19T00:00:00+01:00",
                                      window_end="2026-11-20T00:00:00+01:00", run_id=evil))
    assert "<script" not in page and page.count("&lt;script&gt;") >= 10
    assert ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline';") in page


def test_older_windows_are_a_page_away_never_cut_off_without_a_word(api, aws_conn, qa_bucket):
    """With 16 windows of DE the index showed the newest 14 and nothing of the 2 oldest (a failed night
    among them): no count, no link, and no way past 90 windows. The region's last row now says how many
    older windows there are and links the next page."""
    client, tokens = api
    good = json.loads(aws_conn.get_object(Bucket=qa_bucket, Key=f"qa/DE/{W_OLD}/report.json")["Body"].read())
    newer = [f"202612{d:02d}T2300Z-202612{d + 1:02d}T2300Z" for d in range(1, 15)]
    for w in newer:
        _put_report(aws_conn, qa_bucket, w, dict(good, window={"start": w, "id": w}), f"<html>report {w}</html>")
    page = client.get("/plate-qa/", headers=tokens["reviewer"])
    assert page.status_code == 200, page.text[:300]
    assert all(f'href="report/DE/{w}"' in page.text for w in newer), re.sub(r"<[^>]+>", " ", page.text)[:3000]
    assert f"report/DE/{W_NEW}" not in page.text and f"report/DE/{W_OLD}" not in page.text
    assert "2 older window(s) not shown here" in page.text
    link = re.search(r'<a href="([^"]+)">older windows</a>', page.text).group(1)
    assert link == f"?per_region=14&amp;before={newer[0]}"
    older = client.get("/plate-qa/" + link.replace("&amp;", "&"), headers=tokens["reviewer"])
    assert older.status_code == 200, older.text[:300]
    assert f'href="report/DE/{W_NEW}"' in older.text and f'href="report/DE/{W_OLD}"' in older.text
    assert "class=bad" in older.text and "older window(s)" not in older.text  # W_NEW failed 5 %: now in sight
    assert f"Windows starting before {newer[0]}" in older.text
    bad = client.get("/plate-qa/?before=<b>x</b>", headers=tokens["reviewer"])
    assert bad.status_code == 400 and "not a window id" in bad.text and "<b>" not in bad.text


def test_index_fields_of_the_verdict_models_and_late_photos_are_escaped_whatever_their_type():
    """Guard: the fields the index reads since the verdict, late and models columns came in."""
    from platemask.qa_index import render_index, summarise

    evil = "<svg onload=alert(1)>\u202e"
    base = {"images": 3, "by_status": {"masked": 3, "no_plate": 0, "failed": 0}, "failure_rate": 0,
            "max_failure_rate": 0.02, "region": "DE", "window": {"start": W_NEW, "id": W_NEW}}
    rows = [summarise("DE", W_NEW, dict(base, verdict={"passed": False, "problems": [evil, {"x": evil}] * 9},
                                        models=[evil, 1], late=evil)),
            summarise("DE", W_NEW, dict(base, verdict={"passed": "yes", "problems": evil}, models=evil, late=10**400)),
            summarise("DE", W_NEW, dict(base, verdict=[evil], models=None, late=True))]
    assert [r["passed"] for r in rows] == [False, None, None] and len(rows[0]["problems"]) == 5
    out = render_index(rows, lambda r, w: f"report/{r}/{w}")
    assert "<svg" not in out and "\u202e" not in out and "&lt;svg onload=alert(1)&gt;\\u202e" in out
    assert "FAILED: " in out and "and 1 other model(s)" in out and out.count("class=bad") == 1


def test_a_page_of_another_run_than_report_json_is_refused_not_served(api, aws_conn, qa_bucket):
    """The view served whatever report.html the window's folder held, though the index showed
    report.json's run (tests/test_qa_hostile.py makes the mismatch for real: a failed copy)."""
    client, tokens = api
    good = json.loads(aws_conn.get_object(Bucket=qa_bucket, Key=f"qa/DE/{W_OLD}/report.json")["Body"].read())
    _put_report(aws_conn, qa_bucket, W_OLD, dict(good, run_id="scheduled__new", run_key="scheduled__new-1a2b3c4d"),
                '<!doctype html><html><head><meta name="platemask-run-id" content="scheduled__old"></head>'
                "<body>old page</body></html>")
    r = client.get(f"/plate-qa/report/DE/{W_OLD}", headers=tokens["reviewer"])
    assert r.status_code == 409 and "old page" not in r.text, r.text[:500]
    assert "page of run scheduled__old" in r.text and "is of run scheduled__new" in r.text
    assert f"s3://{qa_bucket}/qa/DE/{W_OLD}/runs/scheduled__new-1a2b3c4d/report.html" in r.text
    _assert_strict_headers(r)
    aws_conn.put_object(Bucket=qa_bucket, Key=f"qa/DE/{W_OLD}/report.html", Body=(
        b'<html><head><meta name="platemask-run-id" content="scheduled__new"></head><body>new page</body></html>'))
    r = client.get(f"/plate-qa/report/DE/{W_OLD}", headers=tokens["reviewer"])
    assert r.status_code == 200 and "new page" in r.text
