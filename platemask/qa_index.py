"""Recent QA runs per region, read from the QA prefix: what the "Plate QA" Airflow view shows."""
from __future__ import annotations

import html
import json
import re

from .settings import Settings

WINDOW_ID = re.compile(r"^\d{8}T\d{4}Z-\d{8}T\d{4}Z$")
REGION = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def qa_key(settings: Settings, region: str, window: str, name: str) -> str:
    """Key of a QA file, refusing anything that is not a plain region and window id."""
    if not REGION.match(region) or not WINDOW_ID.match(window):
        raise ValueError(f"not a region/window: {region!r}/{window!r}")
    return settings.qa_root.format(region=region, window=window) + name


def recent_reports(client, settings: Settings, *, per_region: int = 14) -> list[dict]:
    """Newest first per region; each row holds the headline numbers of one report.json."""
    rows = []
    for region in settings.regions:
        base = settings.qa_root.split("{window}")[0].format(region=region)
        windows = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=base, Delimiter="/"):
            windows += [p["Prefix"][len(base):].strip("/") for p in page.get("CommonPrefixes", [])]
        for w in sorted((w for w in windows if WINDOW_ID.match(w)), reverse=True)[:per_region]:
            try:
                body = client.get_object(Bucket=settings.bucket, Key=qa_key(settings, region, w, "report.json"))["Body"].read()
                r = json.loads(body)
            except Exception as exc:  # noqa: BLE001 - one unreadable report must not hide the others
                rows.append({"region": region, "window": w, "error": f"{type(exc).__name__}: {exc}"})
                continue
            rows.append({
                "region": region, "window": w, "window_start": (r.get("window") or {}).get("start"),
                "run_id": r.get("run_id"), "photos": r.get("photos_in_window", r.get("images")), **r["by_status"],
                "failure_rate": r.get("failure_rate"), "max_failure_rate": r.get("max_failure_rate"),
                "plates": r.get("plates"), "review": r["review"]["count"],
                "images_per_second": r.get("mask_images_per_second"), "model": (r.get("model") or {}).get("name"),
            })
    return rows


def render_index(rows: list[dict], report_href) -> str:
    esc = html.escape
    body = []
    for r in rows:
        link = f'<a href="{esc(report_href(r["region"], r["window"]))}">report</a>'
        if "error" in r:
            body.append(f"<tr><td>{esc(r['region'])}</td><td>{esc(r['window'])}</td><td colspan=9>unreadable: {esc(r['error'])}</td><td>{link}</td></tr>")
            continue
        over = (r["failure_rate"] or 0) > (r["max_failure_rate"] or 0)
        body.append(
            f"<tr{' class=bad' if over else ''}><td>{esc(r['region'])}</td><td>{esc(str(r['window_start'] or r['window']))}</td>"
            f"<td>{r['photos']}</td><td>{r['masked']}</td><td>{r['no_plate']}</td><td>{r['failed']}</td>"
            f"<td>{(r['failure_rate'] or 0):.2%}</td><td>{r['plates']}</td><td>{r['review']}</td>"
            f"<td>{r['images_per_second'] or ''}</td><td>{esc(str(r['model']))}</td><td>{link}</td></tr>")
    return ("<!doctype html><html><head><meta charset=utf-8><title>Plate QA</title><style>"
            "body{font-family:system-ui,sans-serif;margin:1.5em} td,th{border:1px solid #ccc;padding:3px 8px}"
            "table{border-collapse:collapse} .bad{background:#fdd}</style></head><body><h1>Plate QA — recent runs</h1>"
            "<p>Headline numbers from each window's QA report. Reports show thumbnails of unmasked originals: reviewers only.</p>"
            "<table><tr><th>region</th><th>window</th><th>photos</th><th>masked</th><th>no plate</th><th>failed</th>"
            "<th>failure rate</th><th>plates</th><th>review</th><th>images/s</th><th>model</th><th></th></tr>"
            + "".join(body) + "</table>" + ("" if rows else "<p>No QA reports yet.</p>") + "</body></html>")
