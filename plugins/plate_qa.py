"""Airflow plugin: a "Plate QA" view in the Airflow UI.

Lists recent plate-masking runs per region with their headline QA numbers, and serves each
window's HTML report one click away. Served by the Airflow api-server under /plate-qa and shown
in the UI's navigation (iframe). Every route requires a logged-in Airflow user: the reports
contain thumbnails of unmasked originals.
"""
from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import HTMLResponse

from airflow.api_fastapi.core_api.security import get_user  # the api-server's own authentication (bearer or session cookie)

app = FastAPI(title="Plate QA", docs_url=None, redoc_url=None)


def _ctx():
    from platemask.airflow_support import s3_client
    from platemask.settings import Settings

    settings = Settings.from_airflow()
    return settings, s3_client(settings)


@app.get("/", response_class=HTMLResponse)
def index(per_region: int = 14, user=Depends(get_user)) -> str:
    from platemask.qa_index import recent_reports, render_index

    settings, client = _ctx()
    rows = recent_reports(client, settings, per_region=max(1, min(per_region, 90)))
    return render_index(rows, lambda region, window: f"report/{region}/{window}")


@app.get("/report/{region}/{window}", response_class=HTMLResponse)
def report(region: str, window: str, user=Depends(get_user)) -> HTMLResponse:
    from botocore.exceptions import ClientError

    from platemask.qa_index import qa_key

    settings, client = _ctx()
    try:
        key = qa_key(settings, region, window, "report.html")
    except ValueError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    try:
        body = client.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
    except ClientError as exc:
        raise HTTPException(status_code=404, detail=f"no QA report at s3://{settings.bucket}/{key}") from exc
    return HTMLResponse(body.decode("utf-8"), headers={"Cache-Control": "no-store", "X-Robots-Tag": "noindex"})


class PlateQAPlugin(AirflowPlugin):
    name = "plate_qa"
    fastapi_apps = [{"app": app, "url_prefix": "/plate-qa", "name": "Plate QA"}]
    external_views = [{"name": "Plate QA", "href": "/plate-qa/", "destination": "nav", "url_route": "plate-qa"}]
