"""The human-readable QA page: headline numbers, failures, and before/after thumbnails.

Thumbnails of originals show unmasked plates: the page is written only to the QA prefix, whose
access must be limited to reviewers (see README, "QA data is sensitive").
"""
from __future__ import annotations

import base64
import io
import random

from PIL import Image, ImageDraw

from .html_text import escape
from .qa_index import NOTHING_LISTED
from .storage import S3Store

THUMB = 360
MAX_REVIEW = 30
MAX_FAILED_SHOWN = 50  # failed photos named per reason; the rest are counted, never dropped without a word
MAX_DAYS_LEFT_SHOWN = 31  # earlier days left to their own runs, named on the page
MAX_ERROR_CHARS = 500
# The page may be opened straight from S3 or a download: it carries its own policy (no script,
# no fetches; inline styles and data: thumbnails only). The Plate QA view adds sandbox on top.
CSP_META = ('<meta http-equiv="Content-Security-Policy" '
            'content="default-src \'none\'; img-src data:; style-src \'unsafe-inline\'; base-uri \'none\'; form-action \'none\'">')


def _e(v) -> str:
    """Any value as escaped text: keys, reasons and numbers alike come from data someone else wrote."""
    return escape(v)


def _thumb(data: bytes, plates: list[dict], near: list[dict]) -> str:
    from .imageio import decode

    dec = decode(data)
    img = Image.fromarray(dec.rgb)
    s = THUMB / max(img.size)
    img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))))
    d = ImageDraw.Draw(img)
    for plist, colour in ((plates, (255, 40, 40)), (near, (255, 200, 0))):
        for p in plist:
            pts = [(x * s, y * s) for x, y in p["polygon"]]
            d.polygon(pts, outline=colour, width=2)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _verdict(report: dict) -> str:
    """The run's verdict on this region (``runs.verdict``) at the top of the page: a report whose run
    failed (not collected, photos without a record, duplicates, over the failure limit) must not read
    as a pass from its numbers (a collect that failed showed 0 photos, 0 failed, 0.00 %)."""
    v = report.get("verdict")
    if not isinstance(v, dict) or not isinstance(v.get("passed"), bool):
        return "<p class=warn>QA verdict: not recorded in this report.</p>"
    if v["passed"] and report.get("images") == 0 and report.get("collected") is not False:
        return f"<p class=warn>QA verdict: passed, but <b>{escape(NOTHING_LISTED)}</b>.</p>"
    if v["passed"]:
        return "<p class=ok>QA verdict: <b>passed</b>.</p>"
    problems = v.get("problems") if isinstance(v.get("problems"), list) else []
    return ("<div class=warn><b>QA verdict: FAILED</b>: this run is not to be trusted for the window"
            + ("<ul>" + "".join(f"<li>{escape(p)}</li>" for p in problems) + "</ul>" if problems else "")
            + "</div>")


def _failure_row(reason: str, info: dict) -> str:
    """One reason's failed photos, each with what was wrong (the key alone said nothing a reviewer
    could act on), and how many more there are when the list is longer than the page shows (the keys
    after the 50th were left out without a word)."""
    items = info["items"][:MAX_FAILED_SHOWN]
    lines = []
    for i in items:
        err = str(i.get("error") or "")
        err = err[:MAX_ERROR_CHARS] + " …" if len(err) > MAX_ERROR_CHARS else err
        lines.append(f"<code>{escape(i['key'])}</code>{': ' + escape(err) if err else ''}")
    more = (info["count"] if isinstance(info.get("count"), int) else len(info["items"])) - len(items)
    if more > 0:
        lines.append(f"<b>… and {more} more not shown here</b>: " + (
            f"each photo's audit record names it (report.json lists the first {len(info['items'])})"
            if info.get("truncated") is True else "report.json (failures_by_reason) and each photo's audit record name them"))
    return f"<tr><td>{escape(reason)}</td><td>{escape(info['count'])}</td><td>{'<br>'.join(lines)}</td></tr>"


def _days_left(report: dict) -> str:
    """The days before the window whose photos this run left to their own runs (no run of them had
    collected them yet): named in report.json only, a reviewer read the night as covering them."""
    days = report.get("late_days_not_collected")
    if not isinstance(days, list) or not days:
        return ""
    return ("<tr><th>earlier days left to their own runs (no run of them has collected them yet; their photos are "
            "picked up as late on the last night that reaches them, or backfill them)</th><td>"
            + escape(", ".join(str(d) for d in days[:MAX_DAYS_LEFT_SHOWN])) + "</td></tr>\n")


def _other_models(report: dict) -> str:
    """Every model that made this report's records, when more than one did (a shard run with other
    weights: the page named only the first shard's model)."""
    models = report.get("models")
    if not isinstance(models, list) or len(models) < 2:
        return ""
    items = "".join(f"<li>{escape(m.get('name'))} <code>{escape(str(m.get('weights_sha256', ''))[:12])}</code>"
                    f"{' verifier <code>' + escape(str(m['verifier_sha256'])[:12]) + '</code>' if m.get('verifier_sha256') else ''}"
                    f": {escape(m.get('photos'))} photo(s)</li>" for m in models if isinstance(m, dict))
    return f"<div class=warn><b>{len(models)} models</b> made this report's records:<ul>{items}</ul></div>"


def _skipped_split(records: list[dict]) -> str:
    """What the skipped photos' earlier records say: the row read "already masked" for photos an earlier
    run found no plate in too (4 "already masked" beside 3 masked in all)."""
    split = {s: sum(1 for r in records if r.get("skipped") and r.get("status") == s) for s in ("masked", "no_plate")}
    if not any(split.values()):
        return ""
    return f" ({escape(split['masked'])} masked, {escape(split['no_plate'])} no plate)"


def _scope(report: dict) -> str:
    """Which photos the counts below are of. They add up to the report's records, which are the
    window's photos plus the late ones of the days before (a late photo was counted as masked but not
    among the "photos in window": 3 photos, 4 masked); a partial or dry run covers less than the window."""
    rows = []
    if report.get("photos_in_window") is not None:
        rows.append(f"<tr><th>photos listed in the window</th><td>{escape(report['photos_in_window'])}</td></tr>")
    if report.get("late"):
        rows.append(f"<tr><th>late photos of the days before the window in this report (uploaded after their "
                    f"night's run, or redone)</th><td>{escape(report['late'])}</td></tr>")
    if report.get("partial"):
        rows.append(f"<tr><th>partial run (max_images)</th><td class=warn>only {escape(report.get('planned'))} of the "
                    f"{escape(report.get('listed'))} photos listed were planned: the others are not in this report "
                    "and not masked by this run</td></tr>")
    if report.get("dry_run"):
        rows.append(f"<tr><th>dry run</th><td class=warn>nothing was masked or written: the counts are of the photos "
                    f"earlier runs already masked with this model; {escape(report.get('would_process'))} would be "
                    "processed</td></tr>")
    return "".join(rows)


def _pair(client, settings, masked_key, rec: dict) -> str:
    esc = escape
    cells = []
    store = S3Store(settings.bucket, client=client)
    etag = rec.get("source_etag")
    try:
        # the upload that was masked, not whatever is at the key now: another upload would be shown
        # with this record's polygons beside this record's masked copy
        raw = store.read(rec["key"], if_match=f'"{etag}"' if etag else None)
        cells.append(f'<img src="{_thumb(raw, rec["plates"], rec.get("near_misses", []))}" alt="before">')
    except Exception as exc:  # noqa: BLE001 - a missing thumbnail must not sink the report
        from botocore.exceptions import ClientError

        from .storage import IF_MATCH_FAILED_CODES, error_code

        if etag and isinstance(exc, ClientError) and error_code(exc) in IF_MATCH_FAILED_CODES:
            cells.append(f"<div class=miss>original re-uploaded since it was masked (ETag {esc(etag)} is gone): "
                         "not shown; the next run masks the new upload</div>")
        else:
            cells.append(f"<div class=miss>original unavailable: {esc(str(exc))}</div>")
    if rec["status"] != "failed":
        try:
            mk = masked_key(rec["key"])
            masked = store.read(mk)
            cells.append(f'<img src="{_thumb(masked, [], [])}" alt="after">')
        except Exception as exc:  # noqa: BLE001
            cells.append(f"<div class=miss>masked copy unavailable: {esc(str(exc))}</div>")
    scores = _e(", ".join(f"{p['score']:.2f}" for p in rec["plates"]))
    near = _e(", ".join(f"{p['score']:.2f}" for p in rec.get("near_misses", [])))
    why = rec.get("review_reason") or rec.get("error") or ""
    return (f"<figure>{''.join(cells)}<figcaption><code>{esc(rec['key'])}</code> — {esc(rec['status'])}"
            f"{'; masked ' + scores if scores else ''}{'; near misses ' + near if near else ''}"
            f"{'; ' + esc(why) if why else ''}</figcaption></figure>")


def render_report(report: dict, records: list[dict], *, client, settings, spec, masked_key, samples: int = 6,
                  rng: random.Random | None = None) -> str:
    """The QA page; ``masked_key(raw_key)`` names a photo's masked copy (the run's key layout)."""
    rng = rng or random.Random(0)
    esc = escape
    s = report["by_status"]
    review = [r for r in records if r.get("review") and r["status"] != "failed"][:MAX_REVIEW]
    pool = [r for r in records if r["status"] == "masked" and not r.get("review")]
    picks = rng.sample(pool, min(samples, len(pool)))
    fails = "".join(_failure_row(reason, info) for reason, info in report["failures_by_reason"].items())
    shards = "".join(
        f"<tr><td>{_e(sh['index'])}</td><td>{_e(sh['photos'])}</td><td>{_e(sh['processed'])}</td><td>{_e(sh['skipped'])}</td>"
        f"<td>{_e(sh['failed'])}</td><td>{_e(sh['wall_seconds'])}</td><td>{_e(sh['images_per_second'] or '')}</td></tr>"
        for sh in report.get("shards", []))
    hist = report["score_histogram"]
    bars = "".join(f"<tr><td>{lo:.1f}–{lo + 0.1:.1f}</td><td>{_e(c)}</td><td><div class=bar style='width:{min(int(c), 400)}px'></div></td></tr>"
                   for lo, c in zip(hist["bins"][:-1], hist["counts"]))
    area = (report["mask_area"].get("fraction_of_image") or {})
    model = report.get("model") or {}
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Plate QA {esc(spec.region)} {esc(spec.window.id)}</title>
{CSP_META}<meta name="robots" content="noindex"><meta name="platemask-run-id" content="{esc(spec.run_id)}"><style>
body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;vertical-align:top}}
figure{{display:inline-block;margin:8px;border:1px solid #ddd;padding:6px;max-width:760px}} img{{margin:2px}} .bar{{background:#4a7;height:10px}}
.warn{{background:#fee;padding:8px;border:1px solid #c88}} .ok{{background:#efe;padding:8px;border:1px solid #8c8}} .miss{{display:inline-block;width:{THUMB}px;color:#a00}}</style></head><body>
<h1>Plate QA — {esc(spec.region)}, window {esc(spec.window.start.isoformat())} → {esc(spec.window.end.isoformat())}</h1>
<p class=warn>This page shows thumbnails of <b>unmasked originals</b>. It lives only in the QA prefix; do not copy it elsewhere.</p>
{_verdict(report)}
<table><tr><th>photos in this report (one record each)</th><td>{_e(report['images'])}</td></tr>
{_scope(report)}
<tr><th>masked</th><td>{_e(s['masked'])}</td></tr><tr><th>no plate</th><td>{_e(s['no_plate'])}</td></tr>
<tr><th>failed (never published)</th><td>{_e(s['failed'])} ({_e(format(report['failure_rate'], '.2%'))}; limit {_e(format(report.get('max_failure_rate', 0), '.2%'))})</td></tr>
<tr><th>skipped: done by an earlier run with the same model and settings (counted above)</th><td>{_e(report.get('skipped_already_masked', 0))}{_skipped_split(records)}</td></tr>
{_days_left(report)}<tr><th>hidden files not masked (names starting with '.'; no record)</th><td>{_e(report.get('skipped_hidden', {}).get('count', 0))}{(': ' + esc(', '.join(report['skipped_hidden']['keys'][:10])) + (' …' if report['skipped_hidden']['count'] > 10 else '')) if report.get('skipped_hidden', {}).get('count') else ''}</td></tr>
<tr><th>plates masked</th><td>{_e(report['plates'])}</td></tr><tr><th>for review</th><td>{_e(report['review']['count'])}</td></tr>
<tr><th>masked area, median fraction of photo</th><td>{_e(format(area.get('median') or 0, '.3%'))}</td></tr>
<tr><th>mask images/s</th><td>{_e(report.get('mask_images_per_second') or '')}</td></tr>
<tr><th>model</th><td>{esc(str(model.get('name')))} <code>{esc(str(model.get('weights_sha256', ''))[:12])}</code>, threshold {_e(report.get('thresholds', {}).get('score'))}{_other_models(report)}</td></tr>
<tr><th>run</th><td>{esc(spec.run_id)}, backend {esc(spec.backend)}, mode {esc(spec.mode)}</td></tr></table>
<h2>Failures by reason</h2>{'<table><tr><th>reason</th><th>count</th><th>photos: what was wrong</th></tr>' + fails + '</table>' if fails else '<p>none</p>'}
<h2>Score histogram (masked plates)</h2><table>{bars}</table>
<h2>Shards</h2><table><tr><th>#</th><th>photos</th><th>processed</th><th>skipped</th><th>failed</th><th>seconds</th><th>images/s</th></tr>{shards}</table>
<h2>Review ({_e(report['review']['count'])}{', first ' + str(MAX_REVIEW) if report['review']['count'] > MAX_REVIEW else ''})</h2>
<p>Red: masked plate outline. Yellow: detection just below the threshold (not masked).</p>
{''.join(_pair(client, settings, masked_key, r) for r in review) or '<p>nothing to review</p>'}
<h2>Random samples</h2>{''.join(_pair(client, settings, masked_key, r) for r in picks) or '<p>no masked photos</p>'}
</body></html>"""


__all__ = ["render_report"]
