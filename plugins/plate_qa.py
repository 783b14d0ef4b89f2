"""Airflow plugin: a "Plate QA" view in the Airflow UI.

Lists recent plate-masking runs per region with their headline QA numbers, and serves each
window's HTML report one click away. Served by the Airflow api-server under /plate-qa and shown
in the UI's navigation (iframe).

Who may look: the reports contain thumbnails of unmasked originals, so a login is not enough.
Every route asks Airflow's auth manager whether the user may *edit* the ``plate_masking`` DAG
(``is_authorized_dag(method="PUT", details=DagDetails(id="plate_masking"))``, the same check the
REST API makes before pausing that DAG). With the SimpleAuthManager that is the USER, OP and ADMIN
roles; VIEWER is refused. With the FAB auth manager it is "can edit on DAG:plate_masking" (or on
all DAGs): give that permission to a "reviewer" role.

What is served: every page carries a Content-Security-Policy that forbids scripts, frames, forms
and any fetch (``default-src 'none'; img-src data:; style-src 'unsafe-inline'``) plus
``X-Content-Type-Options: nosniff``. A report.html is also sandboxed to an opaque origin
(``sandbox``): one that someone slipped into ``qa/`` runs no code and reaches nothing of Airflow's
origin. The view's own pages are sandboxed too but keep their origin (``sandbox
allow-same-origin``): from an opaque origin, following a report link is a cross-site request, and
the browser withholds Airflow's session cookie (SameSite=Lax). The index escapes every field of report.json, numbers included. When S3
fails the view answers a page that names the key, what failed and what to do (404/502/503).
"""
from __future__ import annotations

from typing import Annotated

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

# the api-server's own authentication (bearer token or session cookie) and authorisation
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from platemask.layout import WINDOW_ID, qa_key
from platemask.qa_index import (MAX_REPORT_HTML_BYTES, QAStoreError, foreign_report, recent_reports, render_index,
                                 render_problem, store_error)
from platemask.storage import S3Store

REVIEW_DAG_ID = "plate_masking"
REVIEW_METHOD = "PUT"  # "may edit the DAG": USER and above in the SimpleAuthManager, can_edit in FAB
# no script, no plugins, no frames, no fetches, no forms; only inline styles and data: thumbnails
_POLICY = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
# A report.html is bytes someone wrote into S3: sandboxed to an opaque origin, nothing of Airflow's
# origin (cookies, storage) is reachable from it, scripts or not.
CSP = "sandbox; " + _POLICY
# The view's own pages (the index and the error pages: every field escaped, no script allowed either)
# keep their origin: a link followed from an opaque-origin page is a cross-site request, and the
# browser then withholds Airflow's session cookie (SameSite=Lax), so in a real browser every report
# link of the index answered "please log in" (tests/test_browser.py).
INDEX_CSP = "sandbox allow-same-origin; " + _POLICY
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
}
UI_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2, "mode": "standard"}}

app = FastAPI(title="Plate QA", docs_url=None, redoc_url=None, openapi_url=None)


@app.middleware("http")
async def _security_headers(request: Request, call_next):
    response = await call_next(request)
    response.headers.update(SECURITY_HEADERS)
    untrusted = "report" in request.url.path.split("/")  # .../report/<region>/<window>, and anything like it
    response.headers["Content-Security-Policy"] = CSP if untrusted else INDEX_CSP
    return response


def _problem(status: int, title: str, paragraphs: list[str]) -> HTMLResponse:
    return HTMLResponse(render_problem(title, paragraphs), status_code=status)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> HTMLResponse:
    if exc.status_code == 401:
        return _problem(401, "please log in", [
            f"{exc.detail}. Log in to Airflow (or let your session be renewed by reloading the Airflow UI), "
            "then open Plate QA again."])
    if exc.status_code == 403 and exc.detail == "Forbidden":  # authenticated, but not a reviewer
        return _problem(403, "reviewers only", [
            f"{exc.detail}. Plate QA shows thumbnails of unmasked originals, so it is open only to users who may "
            f"edit the {REVIEW_DAG_ID} DAG (SimpleAuthManager: role USER, OP or ADMIN; FAB: can edit on "
            f"DAG:{REVIEW_DAG_ID}). The Viewer role is not enough.",
            "Ask an Airflow admin for reviewer access if you need to review QA reports."])
    if exc.status_code == 403:  # e.g. "Invalid JWT token"
        return _problem(403, "please log in again", [f"{exc.detail}. Log in to Airflow again, then open Plate QA."])
    return _problem(exc.status_code, "request refused", [str(exc.detail)])


@app.exception_handler(QAStoreError)
async def _store_error(request: Request, exc: QAStoreError) -> HTMLResponse:
    return _problem(exc.status, exc.title, [f"Key: {exc.where}", f"What failed: {exc.what}", f"What to do: {exc.todo}"])


def _reviewer(user: GetUserDep,
              _: Annotated[None, Depends(requires_access_dag(method=REVIEW_METHOD, param_dag_id=REVIEW_DAG_ID))]):
    """The logged-in user, when Airflow's auth manager lets them edit the plate_masking DAG (else 401/403)."""
    return user


Reviewer = Annotated[object, Depends(_reviewer)]


def _ctx():
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from botocore.config import Config

    from platemask.settings import Settings

    try:
        settings = Settings.from_airflow()
    except ValueError as exc:  # a bad PLATEMASK_* value or platemask_settings Variable
        raise StarletteHTTPException(500, f"the platemask settings are invalid: {exc}. Fix the platemask_settings "
                                          "Variable or the api-server's PLATEMASK_* environment.") from exc
    # the UI's own client: short timeouts, so an S3 outage gives an error page in seconds, not minutes
    client = S3Hook(aws_conn_id=settings.aws_conn_id, config=Config(**UI_S3_CONFIG)).get_conn()
    return settings, client


@app.get("/", response_class=HTMLResponse)
def index(user: Reviewer, per_region: int = 14, before: str | None = None) -> HTMLResponse:
    """The newest ``per_region`` windows of each region, or those starting before window id ``before``
    (the "older windows" link a region's last row carries when it has more)."""
    if before is not None and not WINDOW_ID.match(before):
        return _problem(400, "not a window id", [f"before={before!r} is not a window id (such as "
                                                 "20261119T2300Z-20261120T2300Z): follow the index's 'older windows' link."])
    settings, client = _ctx()
    per_region = max(1, min(per_region, 90))
    rows = recent_reports(client, settings, per_region=per_region, before=before)
    return HTMLResponse(render_index(rows, lambda region, window: f"report/{region}/{window}",
                                     lambda w: f"?per_region={per_region}&before={w}", before=before))


@app.get("/report/{region}/{window}")
def report(region: str, window: str, user: Reviewer) -> Response:
    from botocore.exceptions import BotoCoreError, ClientError


    settings, client = _ctx()
    try:
        key = qa_key(settings, region, window, "report.html")
    except ValueError as exc:
        return _problem(404, "no such report", [f"{exc}: a report address is report/<region>/<window id>, "
                                                "as linked from the Plate QA index."])
    store = S3Store(settings.bucket, client=client)
    try:
        body = store.read_at_most(key, MAX_REPORT_HTML_BYTES)
    except (ClientError, BotoCoreError) as exc:
        raise store_error(exc, bucket=settings.bucket, key=key, action="reading",
                          conn_id=settings.aws_conn_id) from exc
    if body is None:
        return _problem(413, "report too large", [f"s3://{settings.bucket}/{key} is larger than "
                                                  f"{MAX_REPORT_HTML_BYTES >> 20} MB: not served. Open it from S3."])
    # reads report.json; its own errors are None
    foreign = foreign_report(store, settings, region, window, html=body)
    if foreign:  # a copied report, or another run's page, would show other numbers than the index as this window's
        return _problem(409, "report of another window or run", [foreign])
    # served as bytes with an explicit type; the CSP and nosniff headers come from the middleware
    return Response(body, media_type="text/html; charset=utf-8")


class PlateQAPlugin(AirflowPlugin):
    name = "plate_qa"
    fastapi_apps = [{"app": app, "url_prefix": "/plate-qa", "name": "Plate QA"}]
    external_views = [{"name": "Plate QA", "href": "/plate-qa/", "destination": "nav", "url_route": "plate-qa"}]
