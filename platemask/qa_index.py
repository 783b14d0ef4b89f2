"""Recent QA runs per region, read from the QA prefix: what the "Plate QA" Airflow view shows.

Everything read from ``report.json`` is untrusted text here: anyone who can write to ``qa/`` can
put anything in it. Rows keep only the fields the page shows, and ``render_index`` escapes every
one of them, numbers included. S3 failures become a ``QAStoreError`` that says which key, what
failed and what to do; the plugin turns it into a readable page with a 404/502/503 status.
"""
from __future__ import annotations

import html as html_lib
import json
import math
import re

from .html_text import escape
from .layout import WINDOW_ID, qa_key, qa_windows_prefix
from .settings import Settings
from .storage import MISSING_CODES, S3Store


# --- S3 failures a reviewer can act on ----------------------------------------------------------

class QAStoreError(Exception):
    """Reading QA data from S3 failed: which key, what failed, what to do, and the HTTP status."""

    def __init__(self, status: int, title: str, where: str, what: str, todo: str):
        super().__init__(f"{title}: {where}: {what}")
        self.status, self.title, self.where, self.what, self.todo = status, title, where, what, todo


def store_error(exc: Exception, *, bucket: str, key: str, action: str, conn_id: str) -> QAStoreError:
    """Classify a boto3 failure while ``action`` (e.g. "reading") ``s3://bucket/key``.

    404: the object is not there. 502: S3 answered but refused (no bucket, access denied, ...).
    503: S3 could not be reached or asked (endpoint down, no credentials, timeout).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"s3://{bucket}/{key}"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "?"))
        what = f"S3 answered {code}: {err.get('Message') or exc}"
        if code in MISSING_CODES:
            return QAStoreError(404, "No QA report here", where, what,
                                "The run for this window may not have reached its QA step yet, or its QA task "
                                "failed: check the plate_masking run for this window in the Airflow UI.")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            todo = (f"The credentials of the Airflow connection '{conn_id}' may not read the QA prefix: "
                    f"grant s3:ListBucket on the bucket and s3:GetObject on qa/* (see README, deployment).")
        elif code == "NoSuchBucket":
            todo = (f"Bucket '{bucket}' does not exist at the endpoint of connection '{conn_id}': "
                    "check PLATEMASK_BUCKET (set in the environment) and the connection's endpoint_url.")
        else:
            todo = "Try again in a minute; if it persists, check the S3 service and the api-server log."
        return QAStoreError(502, f"S3 refused {action} the QA data", where, what, todo)
    if isinstance(exc, BotoCoreError):
        return QAStoreError(503, "S3 is unreachable", where, f"{type(exc).__name__}: {exc}",
                            f"Check that S3 (MinIO in the compose deployment) is running and that the Airflow "
                            f"connection '{conn_id}' has the right endpoint_url and credentials, then reload this page.")
    raise TypeError(f"not a boto3 error: {exc!r}")


# --- reading ----------------------------------------------------------------------------------------

def _number(v):
    """A real number from report.json, or None (bools, strings, NaN and the like are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        if not math.isfinite(float(v)):
            return None
    except OverflowError:  # an int past any float (10**400): no count or rate is that
        return None
    return v


def summarise(region: str, window: str, report) -> dict:
    """The row the index shows for one report.json; fields of the wrong type become None (shown "?")."""
    if not isinstance(report, dict):
        return {"region": region, "window": window, "error": f"report.json is a {type(report).__name__}, not an object"}

    def sub(name):
        v = report.get(name)
        return v if isinstance(v, dict) else {}

    by_status, review, verdict = sub("by_status"), sub("review"), sub("verdict")
    days_left = report.get("late_days_not_collected")
    days_left = days_left if isinstance(days_left, list) else []
    says = (report.get("region"), sub("window").get("id"))
    if says != (region, window):  # copied or moved here: its numbers are another window's (or nobody's)
        return {"region": region, "window": window,
                "error": f"report.json is of region {says[0]!r}, window {says[1]!r}, not of the folder it is in "
                         f"({region}, {window}): copied or moved there, so its numbers are not shown as this window's"}
    return {
        "region": region, "window": window, "window_start": sub("window").get("start"),
        "run_id": report.get("run_id"), "photos": _number(report.get("images", report.get("photos_in_window"))),
        "late": _number(report.get("late")),
        "masked": _number(by_status.get("masked")), "no_plate": _number(by_status.get("no_plate")),
        "failed": _number(by_status.get("failed")),
        "failure_rate": _number(report.get("failure_rate")), "max_failure_rate": _number(report.get("max_failure_rate")),
        "plates": _number(report.get("plates")), "review": _number(review.get("count")),
        "images_per_second": _number(report.get("mask_images_per_second")), "model": sub("model").get("name"),
        "models": len(report["models"]) if isinstance(report.get("models"), list) else None,
        # the run's verdict (runs.verdict): a report whose run failed must not read as a pass from its
        # numbers (a collect that failed: 0 photos, 0 failed, 0.00 %); None when the report has none
        "passed": verdict.get("passed") if isinstance(verdict.get("passed"), bool) else None,
        "problems": [str(p)[:MAX_PROBLEM_CHARS] for p in verdict.get("problems", [])[:MAX_PROBLEMS]]
                    if isinstance(verdict.get("problems"), list) else [],
        # days before the window this night left to their own runs (none had collected them): their photos are
        # in no report of this night, and a reviewer reading the row must not take it as covering them
        "days_left": [str(d)[:MAX_DAY_CHARS] for d in days_left[:MAX_DAYS_LEFT]],
        "days_left_more": max(0, len(days_left) - MAX_DAYS_LEFT),
    }


# the most of a report.json the page reads (the pipeline's own are tens of KB: review and failure
# lists are capped); a larger one is a row that says so, never read whole into the api-server
MAX_REPORT_BYTES = 8 << 20
MAX_NAMED_FOLDERS = 5
MAX_PROBLEMS, MAX_PROBLEM_CHARS = 5, 400  # of a verdict, shown in the index
MAX_DAYS_LEFT, MAX_DAY_CHARS = 10, 40  # of late_days_not_collected, shown in the index
# a window that passed with no photo at all: a quiet night, or a region whose photos go somewhere its runs
# never list (a wrong raw_prefix, an upload path changed); a reviewer must not read it as a region masked
NOTHING_LISTED = ("no photo was listed for this window: if photos were uploaded for it, they are under another "
                  "prefix than the region's raw_prefix (check the setting and the upload path) and none was masked")


# report.html embeds its thumbnails: larger than report.json, still capped (served from memory)
MAX_REPORT_HTML_BYTES = 64 << 20
MAX_HEAD_BYTES = 4096  # where report.html's run meta is looked for


class ReportTooLarge(Exception):
    """A report.json larger than ``MAX_REPORT_BYTES``: not read."""


def load_report(store: S3Store, key: str) -> object:
    """A report.json parsed; ``ReportTooLarge`` above ``MAX_REPORT_BYTES`` (never read whole).
    S3's errors and ``json``'s are the caller's."""
    data = store.read_at_most(key, MAX_REPORT_BYTES)
    if data is None:
        raise ReportTooLarge(key)
    return json.loads(data)


# report.html names the run that wrote it (report_html.render_report), escaped as the page shows it
RUN_META = re.compile(r'<meta name="platemask-run-id" content="([^"]*)">')


def foreign_report(store: S3Store, settings: Settings, region: str, window: str, html: bytes | None = None) -> str | None:
    """Why the report in ``region``/``window``'s folder is not that window's (its report.json names
    another region or window: copied or moved there), or, given the report.html about to be served,
    why that page is not the report.json the index shows (another run's page: the copy of the latest
    report.html failed after report.json's, or an older page was put back), or None. A missing or
    unreadable report.json is not this check's business (the index shows why)."""
    key = qa_key(settings, region, window, "report.json")
    try:
        report = load_report(store, key)
    except Exception:  # noqa: BLE001 - missing, unreadable or not JSON: the index's row says which
        return None
    if not isinstance(report, dict):
        return None
    row = summarise(region, window, report)
    if row.get("error") or html is None:
        return row.get("error")
    m = RUN_META.search(html[:MAX_HEAD_BYTES].decode("utf-8", "replace"))
    if m and report.get("run_id") is not None and m.group(1) != escape(str(report["run_id"])):
        run_key = report.get("run_key")
        return (f"report.html here is the page of run {html_lib.unescape(m.group(1))}, but report.json (whose numbers the "
                f"index shows) is of run {report['run_id']}: the copy of the latest page failed or an "
                "older page was put back, so it is not served as this window's. That run's own page is "
                + (f"s3://{settings.bucket}/{key.rsplit('/', 1)[0]}/runs/{run_key}/report.html" if isinstance(run_key, str)
                   else "under runs/ in this window's QA folder")
                + "; rerun the QA task of that run to copy it here again.")
    return None


def recent_reports(client, settings: Settings, *, per_region: int = 14, before: str | None = None) -> list[dict]:
    """Newest first per region (of the windows that start before window id ``before``, when given); each
    row holds the headline numbers of one report.json. A region with more windows than ``per_region``
    ends with a row saying how many older ones there are (``older``) and the last one shown
    (``before``: the next page), never cut off without a word.

    Listing a region's prefix failing raises ``QAStoreError`` (the page cannot be trusted without
    it); one unreadable report.json becomes a row that says why, without hiding the others, and so
    does one larger than ``MAX_REPORT_BYTES`` or of another window than its folder's. Folders under
    a region's QA prefix that are not window ids are named in one row, never hidden.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    rows = []
    store = S3Store(settings.bucket, client=client)
    for region in settings.regions:
        base = qa_windows_prefix(settings, region)
        windows = []
        try:
            windows += [p[len(base):].strip("/") for p in store.list_folders(base)]
        except (ClientError, BotoCoreError) as exc:
            raise store_error(exc, bucket=settings.bucket, key=base, action="listing",
                              conn_id=settings.aws_conn_id) from exc
        odd = sorted(w for w in windows if not WINDOW_ID.match(w))
        if odd:
            rows.append({"region": region, "window": "?", "error": (
                f"{len(odd)} folder(s) under s3://{settings.bucket}/{base} are not window ids, so no run of this "
                f"pipeline wrote them and they are not shown: {', '.join(repr(w) for w in odd[:MAX_NAMED_FOLDERS])}"
                + (" ..." if len(odd) > MAX_NAMED_FOLDERS else ""))})
        listed = sorted((w for w in windows if WINDOW_ID.match(w) and (before is None or w < before)), reverse=True)
        shown = listed[:per_region]
        for w in shown:
            key = qa_key(settings, region, w, "report.json")
            try:
                report = load_report(store, key)
            except ReportTooLarge:
                rows.append({"region": region, "window": w, "error": f"report.json is larger than "
                             f"{MAX_REPORT_BYTES >> 20} MB (s3://{settings.bucket}/{key}): not read"})
                continue
            except (ClientError, BotoCoreError) as exc:
                err = store_error(exc, bucket=settings.bucket, key=key, action="reading", conn_id=settings.aws_conn_id)
                if err.status == 503:  # S3 went away mid-page: say so instead of a page of error rows
                    raise err from exc
                if err.status == 404:  # the window's folder holds only runs/: no run published a report
                    rows.append({"region": region, "window": w, "error": "no published report: only dry runs, partial "
                                 "(max_images) runs or runs that did not hold the window's lock wrote QA here (under "
                                 "runs/), or its run has not reached QA yet"})
                    continue
                rows.append({"region": region, "window": w, "error": f"{err.what} ({err.where})"})
                continue
            except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past the parser's depth
                rows.append({"region": region, "window": w,
                             "error": f"report.json is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}"})
                continue
            try:
                rows.append(summarise(region, w, report))
            except Exception as exc:  # noqa: BLE001 - one report the page cannot read never hides the others
                rows.append({"region": region, "window": w, "error": f"report.json cannot be shown: {type(exc).__name__}"})
        if len(listed) > len(shown):  # older windows (a failed night three weeks ago among them) are a page away
            rows.append({"region": region, "window": None, "older": len(listed) - len(shown), "before": shown[-1]})
    return rows


# --- rendering ----------------------------------------------------------------------------------------

def _cell(v, fmt=str) -> str:
    """One table cell's text, escaped whatever its type; None shows as "?"."""
    return "?" if v is None else escape(fmt(v))


def render_index(rows: list[dict], report_href, older_href=None, before: str | None = None) -> str:
    """The index page; ``older_href(before)`` links a region's next page of older windows."""
    esc = escape
    body = []
    for r in rows:
        if "older" in r:
            more = f' <a href="{esc(older_href(r["before"]))}">older windows</a>' if older_href else ""
            body.append(f"<tr><td>{esc(str(r['region']))}</td><td colspan=12>{esc(r['older'])} older window(s) "
                        f"not shown here{more}</td></tr>")
            continue
        link = (f'<a href="{esc(report_href(r["region"], r["window"]))}">report</a>'
                if isinstance(r["window"], str) and WINDOW_ID.match(r["window"]) else "")
        if "error" in r:
            body.append(f"<tr><td>{esc(str(r['region']))}</td><td>{esc(str(r['window']))}</td>"
                        f"<td colspan=10>unreadable: {esc(str(r['error']))}</td><td>{link}</td></tr>")
            continue
        over = r["failure_rate"] is not None and r["failure_rate"] > (r["max_failure_rate"] or 0)
        passed = r.get("passed")
        qa = ("?" if passed is None else f"passed, but {esc(NOTHING_LISTED)}" if passed and r["photos"] == 0 else
              "passed" if passed else
              "FAILED" + (": " + "; ".join(esc(p) for p in r.get("problems") or []) if r.get("problems") else ""))
        over = over or passed is False
        if r.get("days_left"):
            qa += ("; earlier day(s) left to their own runs, not in this report (no run of them had collected them: "
                   "their photos are picked up as late on the last night that reaches them, or backfill them): "
                   + ", ".join(esc(d) for d in r["days_left"])
                   + (f" and {esc(r['days_left_more'])} more" if r.get("days_left_more") else ""))
        others = f" and {r['models'] - 1} other model(s)" if isinstance(r.get("models"), int) and r["models"] > 1 else ""
        body.append(
            f"<tr{' class=bad' if over else ' class=warn' if passed and r['photos'] == 0 else ''}><td>{_cell(r['region'])}</td><td>{_cell(r['window_start'] or r['window'])}</td>"
            f"<td>{_cell(r['photos'])}{' (' + _cell(r['late']) + ' late)' if r.get('late') else ''}</td><td>{_cell(r['masked'])}</td><td>{_cell(r['no_plate'])}</td><td>{_cell(r['failed'])}</td>"
            f"<td>{_cell(r['failure_rate'], '{:.2%}'.format)}</td><td>{qa}</td><td>{_cell(r['plates'])}</td><td>{_cell(r['review'])}</td>"
            f"<td>{'' if r['images_per_second'] is None else _cell(r['images_per_second'])}</td><td>{_cell(r['model'])}{others}</td>"
            f"<td>{link}</td></tr>")
    return ("<!doctype html><html><head><meta charset=utf-8><title>Plate QA</title><style>"
            "body{font-family:system-ui,sans-serif;margin:1.5em} td,th{border:1px solid #ccc;padding:3px 8px}"
            "table{border-collapse:collapse} .bad{background:#fdd} .warn{background:#ffd}</style></head><body><h1>Plate QA — recent runs</h1>"
            "<p>Headline numbers from each window's QA report. Reports show thumbnails of unmasked originals: reviewers only.</p>"
            + (f"<p>Windows starting before {esc(before)} (<a href=\".\">newest</a>).</p>" if before else "")
            + "<table><tr><th>region</th><th>window</th><th>photos</th><th>masked</th><th>no plate</th><th>failed</th>"
            "<th>failure rate</th><th>QA</th><th>plates</th><th>review</th><th>images/s</th><th>model</th><th></th></tr>"
            + "".join(body) + "</table>" + ("" if rows else "<p>No QA reports yet.</p>") + "</body></html>")


def render_problem(title: str, paragraphs: list[str]) -> str:
    """A plain error page for the view; every paragraph is escaped."""
    esc = escape
    return ("<!doctype html><html><head><meta charset=utf-8><title>Plate QA: " + esc(title) + "</title><style>"
            "body{font-family:system-ui,sans-serif;margin:1.5em} .box{background:#fee;border:1px solid #c88;padding:8px 12px}"
            "</style></head><body><h1>Plate QA: " + esc(title) + "</h1><div class=box>"
            + "".join(f"<p>{esc(p)}</p>" for p in paragraphs) + "</div></body></html>")
