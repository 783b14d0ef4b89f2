"""The "Plate QA" Airflow UI view: registered as a plugin, authenticated, reads QA from S3."""
import importlib.util
import json
import uuid

import pytest
from fastapi.testclient import TestClient

from conftest import ROOT


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


def test_views_require_login():
    client = TestClient(_load_plugin().app)
    assert client.get("/").status_code in (401, 403)
    assert client.get("/report/DE/20261119T2300Z-20261120T2300Z").status_code in (401, 403)


@pytest.fixture
def qa_bucket(aws_conn, monkeypatch):
    s3 = aws_conn
    bucket = f"qa-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    monkeypatch.setenv("PLATEMASK_BUCKET", bucket)
    for w, failed in (("20261118T2300Z-20261119T2300Z", 0), ("20261119T2300Z-20261120T2300Z", 5)):
        rep = {"images": 100, "photos_in_window": 100, "by_status": {"masked": 80, "no_plate": 15, "failed": failed},
               "failure_rate": failed / 100, "max_failure_rate": 0.02, "plates": 91, "review": {"count": 4},
               "mask_images_per_second": 3.5, "model": {"name": "platemask-mnv2-fpn"}, "window": {"start": w}}
        s3.put_object(Bucket=bucket, Key=f"qa/DE/{w}/report.json", Body=json.dumps(rep).encode())
        s3.put_object(Bucket=bucket, Key=f"qa/DE/{w}/report.html", Body=f"<html>report {w}</html>".encode())
    return bucket


def test_index_and_report_for_a_logged_in_user(qa_bucket):
    mod = _load_plugin()
    mod.app.dependency_overrides[mod.get_user] = lambda: object()
    client = TestClient(mod.app)
    page = client.get("/")
    assert page.status_code == 200
    text = page.text
    assert text.index("20261119T2300Z") < text.index("20261118T2300Z")  # newest first
    assert "5.00%" in text and "class=bad" in text  # over the failure limit is flagged
    assert 'href="report/DE/20261119T2300Z-20261120T2300Z"' in text
    rep = client.get("/report/DE/20261119T2300Z-20261120T2300Z")
    assert rep.status_code == 200 and "report 20261119T2300Z" in rep.text
    assert rep.headers["cache-control"] == "no-store"
    assert client.get("/report/DE/..%2F..%2Fraw").status_code == 404
    assert client.get("/report/DE/20261201T2300Z-20261202T2300Z").status_code == 404
