"""The QA numbers a reviewer acts on, checked adversarially: reports made by the real run steps (real
model, moto's S3 server), then read the way a reviewer reads them (report.html, the Plate QA index)."""
from __future__ import annotations

import dataclasses
import json
import re
import uuid

import numpy as np
import pytest

from conftest import jpeg_bytes
from platemask.runspec import RunSpec
from platemask.settings import Settings

WINDOW = {"window_start": "2026-11-19T23:00:00+00:00", "window_end": "2026-11-20T23:00:00+00:00"}
DAY = "raw/DE/2026/11/20/"


@pytest.fixture
def photos(s3_env):
    from platemask.training.synth import synth_car_scene

    s3 = s3_env
    bucket = f"qa-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    rng = np.random.default_rng(5)
    for i in range(3):
        img, _, _ = synth_car_scene(rng, plate_width=(120, 160))
        s3.put_object(Bucket=bucket, Key=f"{DAY}car{i}.jpg", Body=jpeg_bytes(img))
    return s3, Settings(bucket=bucket, shard_size=10, io_workers=2, batch_size=2)


def _get(s3, settings, uri_or_key: str) -> bytes:
    key = uri_or_key.split("/", 3)[3] if uri_or_key.startswith("s3://") else uri_or_key
    return s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read()


def _run(s3, settings, spec, model_dir, *, collect_it=True):
    """hold -> collect -> shard -> mask -> qa -> release, as the DAG's tasks call them."""
    from platemask.airflow_support import detector_factory
    from platemask.runs import acquire_lock, aggregate, collect, make_shards, mask_shard, release_lock

    if not spec.dry_run:  # a dry run takes no lock
        assert acquire_lock(s3, settings, spec, is_live=lambda lock: False, log=lambda m: None) is None
    if collect_it:
        collect(s3, settings, spec, log=lambda m: None, is_live=lambda lock: False)
        for sh in make_shards(s3, settings, [spec.as_dict()], log=lambda m: None):
            mask_shard(s3, settings, sh, detector_factory(settings, str(model_dir)), log=lambda m: None)
    (report,) = aggregate(s3, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
    release_lock(s3, settings, spec, log=lambda m: None)
    return report


def _index(s3, settings):
    from platemask.qa_index import recent_reports, render_index

    return render_index(recent_reports(s3, settings), lambda r, w: f"report/{r}/{w}")


def _cells(html: str, window: str) -> list[str]:
    row = next(r for r in html.split("<tr") if f"report/DE/{window}" in r)
    return [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]


def _row(index: str, window: str) -> str:
    return next(r for r in index.split("<tr") if f"report/DE/{window}" in r)


def test_a_run_whose_qa_failed_is_shown_failed_not_as_a_pass(photos, model_dir):
    """A rerun whose collect failed holds the lock, so its report became the window's latest: the
    Plate QA index and report.html showed 0 masked, 0 failed, 0.00 % (under the 2 % limit) with no
    word that QA failed; a run whose shard task failed for good, within a raised failure limit, read
    as a plain pass too. Both show the run's verdict and its problems now."""
    s3, settings = photos
    shards_of_two = dataclasses.replace(settings, shard_size=2)
    w = RunSpec(region="DE", run_id="x", **WINDOW).window.id
    # the nightly run: a shard's task failed for good (1 of 3 photos without a record, limit raised to 50 %)
    spec = RunSpec(region="DE", run_id="scheduled__1", max_failure_rate=0.5, **WINDOW)
    from platemask.airflow_support import detector_factory
    from platemask.runs import acquire_lock, aggregate, collect, make_shards, mask_shard, release_lock

    assert acquire_lock(s3, settings, spec, is_live=lambda lock: False, log=lambda m: None) is None
    collect(s3, shards_of_two, spec, log=lambda m: None, is_live=lambda lock: False)
    first, _ = make_shards(s3, shards_of_two, [spec.as_dict()], log=lambda m: None)
    mask_shard(s3, shards_of_two, first, detector_factory(settings, str(model_dir)), log=lambda m: None)
    (rep,) = aggregate(s3, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
    release_lock(s3, settings, spec, log=lambda m: None)
    assert not rep["passed"] and rep["latest"] and rep["failure_rate"] < 0.5  # the run fails; the rate passes
    html = _get(s3, settings, rep["html"]).decode()
    assert "QA verdict: FAILED" in html and "have no record" in html
    row = _row(_index(s3, settings), w)
    assert "class=bad" in row and "FAILED" in row and "have no record" in row

    # a rerun whose collect failed: nothing masked, and its report is the window's latest now
    rep = _run(s3, settings, RunSpec(region="DE", run_id="manual__2", **WINDOW), model_dir, collect_it=False)
    assert not rep["passed"] and rep["latest"] and rep["by_status"]["failed"] == 0 and rep["failure_rate"] == 0
    html = _get(s3, settings, rep["html"]).decode()
    assert "QA verdict: FAILED" in html and "not collected" in html and "passed" not in html
    assert "photos listed in the window" not in html  # nothing was listed: no empty count
    row = _row(_index(s3, settings), w)
    assert "class=bad" in row and "FAILED" in row and "not collected" in row

    # a run that passed says so
    rep = _run(s3, settings, RunSpec(region="DE", run_id="manual__3", **WINDOW), model_dir)
    assert rep["passed"] and rep["latest"]
    assert "QA verdict: <b>passed</b>" in _get(s3, settings, rep["html"]).decode()
    row = _row(_index(s3, settings), w)
    # (a first night with late_days 3 also names the earlier days it left to their own runs)
    assert "class=bad" not in row and re.search(r"<td>passed(; earlier day\(s\) left to their own runs[^<]*)?</td>", row)


def _counts(html: str) -> dict[str, int]:
    """The headline numbers report.html shows, by their row's label."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"<tr><th>([^<]+)</th><td>(\d+)", html)}


def test_the_counts_shown_add_up_to_the_photos_shown_with_late_partial_and_dry_runs(photos, model_dir):
    """A late photo of the day before (picked up under late_days) was counted as masked but the page and
    the index showed only the window's photos: 3 photos, 4 masked. A partial (max_images) or dry run's
    page said nothing of what it left out: 4 photos in the window, 2 masked (or 3, none masked by it)."""
    s3, settings = photos
    # the night of the 19th ran (nothing there), then a photo of the 19th came late
    _run(s3, settings, RunSpec(region="DE", run_id="scheduled__0", window_start="2026-11-18T23:00:00+00:00",
                               window_end="2026-11-19T23:00:00+00:00"), model_dir)
    s3.put_object(Bucket=settings.bucket, Key="raw/DE/2026/11/19/late.jpg", Body=_get(s3, settings, f"{DAY}car0.jpg"))
    spec = RunSpec(region="DE", run_id="scheduled__1", **WINDOW)
    rep = _run(s3, settings, spec, model_dir)
    assert rep["passed"] and rep["latest"] and rep["photos"] == 4 and rep["by_status"]["masked"] == 4
    html = _get(s3, settings, rep["html"]).decode()
    n = _counts(html)
    assert n["photos in this report (one record each)"] == n["masked"] + n["no plate"] + n["failed (never published)"] == 4
    assert n["photos listed in the window"] == 3
    assert n["late photos of the days before the window in this report (uploaded after their night's run, or redone)"] == 1
    qa = json.loads(_get(s3, settings, rep["report"]))  # the page says what report.json says
    assert (n["masked"], n["no plate"], n["failed (never published)"]) == tuple(qa["by_status"][k] for k in ("masked", "no_plate", "failed"))
    assert (n["plates masked"], n["for review"], n["photos in this report (one record each)"]) == (
        qa["plates"], qa["review"]["count"], qa["images"])
    cells = _cells(_index(s3, settings), spec.window.id)
    assert cells[2] == "4 (1 late)" and sum(int(c) for c in cells[3:6]) == 4

    s3.put_object(Bucket=settings.bucket, Key=f"{DAY}car3.jpg", Body=_get(s3, settings, f"{DAY}car1.jpg"))
    dry = _run(s3, settings, RunSpec(region="DE", run_id="manual__dry", dry_run=True, **WINDOW), model_dir)
    html = _get(s3, settings, dry["html"]).decode()
    assert "dry run</th><td class=warn>nothing was masked or written" in html and "; 1 would be processed" in html
    part = _run(s3, settings, RunSpec(region="DE", run_id="manual__two", max_images=2, **WINDOW), model_dir)
    assert part["partial"] and (part["planned"], part["listed"]) == (2, 4)
    html = _get(s3, settings, part["html"]).decode()
    assert "only 2 of the 4 photos listed were planned" in html
    assert _counts(html)["photos in this report (one record each)"] == 2 and _counts(html)["photos listed in the window"] == 4


def _night_of_truncated_uploads(s3, settings, n: int, model_dir) -> dict:
    """``n`` uploads cut in half (upload-000.jpg ...) beside the night's photos, and the night's run."""
    good = _get(s3, settings, f"{DAY}car0.jpg")
    for i in range(n):
        s3.put_object(Bucket=settings.bucket, Key=f"{DAY}upload-{i:03d}.jpg", Body=good[: len(good) // 2])
    return _run(s3, settings, RunSpec(region="DE", run_id="scheduled__1", **WINDOW), model_dir)


def test_a_long_failure_list_says_how_many_more_and_what_was_wrong(photos, model_dir):
    """60 truncated uploads in one night: report.html named the first 50 keys and dropped the other
    10 without a word, and no key said what was wrong with it or what to do (report.json did)."""
    s3, settings = photos
    rep = _night_of_truncated_uploads(s3, settings, 60, model_dir)
    qa = json.loads(_get(s3, settings, rep["report"]))
    assert qa["by_status"]["failed"] == 60 and qa["failures_by_reason"]["truncated"]["count"] == 60
    html = _get(s3, settings, rep["html"]).decode()
    shown = re.findall(r"upload-(\d{3})\.jpg</code>: ([^<]*)", html)
    assert len(shown) == 50 and all("truncated" in err and "upload the original again" in err for _, err in shown)
    assert "… and 10 more not shown here" in html


# characters a browser shows as nothing (or as a plain space): in a key they make it pass for another
INVISIBLE = {"soft hyphen": "\u00ad", "tag": "\U000e0041", "arabic letter mark": "\u061c", "variation selector": "\ufe0f",
             "tab": "\t", "no-break space": "\u00a0", "line separator": "\u2028",
             "mongolian vowel separator": "\u180e", "hangul filler": "\u3164"}


def _shown(html: str) -> str:
    """What a browser shows of a page's text: tags gone, entities read, characters it draws as nothing
    dropped, runs of white space (tab, newline, no-break space, line separator) one space."""
    import html as h
    import unicodedata

    text = h.unescape(re.sub(r"<[^>]+>", " ", html))
    text = "".join(c for c in text if unicodedata.category(c) not in ("Cf", "Mn") and c not in "\u3164\u115f\u1160")
    return re.sub(r"[\s\u00a0]+", " ", text)


def test_a_key_with_invisible_characters_cannot_pass_for_another_photos_key(photos, model_dir):
    """Damaged uploads named car0.jpg with an invisible character inside (soft hyphen, a tag character,
    an Arabic letter mark, a variation selector, a Mongolian vowel separator; or a tab, a no-break space,
    a line separator: a space to the eye) were listed as failed under what reads as 'car0.jpg' or
    'car 0.jpg', the key of a photo that was masked: only bidi controls and zero-width characters were
    shown as codes. Every such character is shown as its code now (report.html and the index alike)."""
    s3, settings = photos
    good = _get(s3, settings, f"{DAY}car0.jpg")
    for ch in INVISIBLE.values():  # moto's server cannot store a key with a newline; S3 can
        s3.put_object(Bucket=settings.bucket, Key=f"{DAY}car{ch}0.jpg", Body=good[:100])
    rep = _run(s3, settings, RunSpec(region="DE", run_id="scheduled__1", **WINDOW), model_dir)
    assert rep["by_status"] == {"masked": 3, "no_plate": 0, "failed": len(INVISIBLE)}
    html = _get(s3, settings, rep["html"]).decode()
    failures = _shown(html[html.index("Failures by reason"):html.index("Score histogram")])
    for name, ch in INVISIBLE.items():
        assert ch not in html, name
        code = f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}"
        assert f"raw/DE/2026/11/20/car{code}0.jpg" in failures, name
    assert "car0.jpg" not in failures and "car 0.jpg" not in failures  # no failed key reads as the masked photo's



def test_stage_times_per_photo_are_of_the_photos_that_went_through_the_stages(photos, model_dir):
    """A rerun that skipped 3 photos already masked and masked 1 new one divided its stage times by 4:
    timings_ms_per_image said the detector took a quarter of what it took a photo."""
    s3, settings = photos
    _run(s3, settings, RunSpec(region="DE", run_id="manual__1", **WINDOW), model_dir)
    s3.put_object(Bucket=settings.bucket, Key=f"{DAY}car3.jpg", Body=_get(s3, settings, f"{DAY}car1.jpg"))
    rep = _run(s3, settings, RunSpec(region="DE", run_id="manual__2", **WINDOW), model_dir)
    qa = json.loads(_get(s3, settings, rep["report"]))
    assert qa["skipped_already_masked"] == 3 and qa["processed_this_run"] == 1 and qa["images"] == 4
    (shard,) = qa["shards"]
    assert shard["processed"] == 1 and shard["timings_s"]["segment"] > 0
    for stage, seconds in shard["timings_s"].items():
        assert qa["timings_ms_per_image"][stage] == round(1000 * seconds, 1), stage


def test_photos_that_never_reached_a_stage_take_no_share_of_its_time(photos, model_dir):
    """A photo whose key is legal but whose masked copy's or audit record's key would be over S3's
    1,024 bytes fails key_too_long before it is read; it still counted among the photos the stage
    times were divided by (3 photos through the stages, the times divided by 4)."""
    s3, settings = photos
    long_key = DAY + "k" * (1016 - len(DAY)) + ".jpg"
    s3.put_object(Bucket=settings.bucket, Key=long_key, Body=_get(s3, settings, f"{DAY}car1.jpg"))
    rep = _run(s3, settings, RunSpec(region="DE", run_id="manual__1", **WINDOW), model_dir)
    qa = json.loads(_get(s3, settings, rep["report"]))
    assert qa["images"] == 4 and [i["key"] for i in qa["failures_by_reason"]["key_too_long"]["items"]] == [long_key]
    (shard,) = qa["shards"]
    for stage, seconds in shard["timings_s"].items():
        assert qa["timings_ms_per_image"][stage] == round(1000 * seconds / 3, 1), stage


def test_photos_masked_by_another_model_than_the_first_shards_are_named(photos, model_dir, tmp_path):
    """A shard whose task ran with other weights (a model deployed or the folder changed while the run
    was masking, then a retried or later task) made records the report never named: report.json, the
    page and the index gave the first shard's model alone. Every model that made records is listed now."""
    import shutil

    from platemask.airflow_support import detector_factory
    from platemask.runs import acquire_lock, aggregate, collect, make_shards, mask_shard, release_lock

    s3, settings = photos
    other = tmp_path / "redeployed"
    shutil.copytree(model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, name="platemask-redeployed")))
    two = dataclasses.replace(settings, shard_size=2)
    spec = RunSpec(region="DE", run_id="scheduled__1", **WINDOW)
    assert acquire_lock(s3, two, spec, is_live=lambda lock: False, log=lambda m: None) is None
    collect(s3, two, spec, log=lambda m: None, is_live=lambda lock: False)
    first, second = make_shards(s3, two, [spec.as_dict()], log=lambda m: None)
    mask_shard(s3, two, first, detector_factory(two, str(model_dir)), log=lambda m: None)
    mask_shard(s3, two, second, detector_factory(two, str(other)), log=lambda m: None)
    (rep,) = aggregate(s3, two, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
    release_lock(s3, two, spec, log=lambda m: None)
    qa = json.loads(_get(s3, settings, rep["report"]))
    assert qa["model"]["name"] == cfg["name"]  # the first shard's, as before
    assert sorted((m["name"], m["photos"]) for m in qa["models"]) == [(cfg["name"], 2), ("platemask-redeployed", 1)]
    html = _get(s3, settings, rep["html"]).decode()
    assert "<b>2 models</b> made this report's records" in html and "platemask-redeployed</li>" not in html
    assert re.search(r"platemask-redeployed <code>[0-9a-f]{12}</code> verifier <code>[0-9a-f]{12}</code>: 1 photo", html)
    assert "and 1 other model(s)" in _cells(_index(s3, settings), spec.window.id)[11]


def test_photos_skipped_on_a_rerun_are_not_all_called_already_masked(photos, model_dir):
    """On a rerun the page said 'skipped (already masked with this model): 4' beside 'masked: 3': the
    photo an earlier run found no plate in was counted as already masked too."""
    s3, settings = photos
    s3.put_object(Bucket=settings.bucket, Key=f"{DAY}empty.jpg", Body=jpeg_bytes(np.full((480, 640, 3), 128, np.uint8)))
    first = _run(s3, settings, RunSpec(region="DE", run_id="manual__1", **WINDOW), model_dir)
    assert first["by_status"] == {"masked": 3, "no_plate": 1, "failed": 0}
    rep = _run(s3, settings, RunSpec(region="DE", run_id="manual__2", **WINDOW), model_dir)
    html = _get(s3, settings, rep["html"]).decode()
    n = _counts(html)
    assert (n["masked"], n["no plate"]) == (3, 1)
    assert re.search(r"<tr><th>skipped: done by an earlier run[^<]*</th><td>4 \(3 masked, 1 no plate\)</td>", html)
    assert "already masked" not in html


def test_the_page_served_for_a_window_is_the_run_whose_numbers_the_index_shows(photos, model_dir, moto_server):
    """The latest report is two copies, report.json then report.html. When the second failed (S3 refused
    it, for real, through the fault proxy), the index showed the new run's numbers (1 failed, QA FAILED)
    and its report link served the old run's page (0 failed, QA passed) as this window's. The view now
    refuses a page of another run than report.json's, naming both and where the matching page is."""
    import boto3
    from botocore.exceptions import ClientError

    from fault_proxy import FaultProxy
    from platemask.qa_index import foreign_report, recent_reports
    from platemask.runs import acquire_lock, aggregate, collect, make_shards, mask_shard
    from platemask.airflow_support import detector_factory
    from platemask.storage import S3Store

    s3, settings = photos
    first = _run(s3, settings, RunSpec(region="DE", run_id="manual__1", **WINDOW), model_dir)
    assert first["passed"] and first["latest"]
    s3.put_object(Bucket=settings.bucket, Key=f"{DAY}damaged.jpg", Body=_get(s3, settings, f"{DAY}car0.jpg")[:300])
    spec = RunSpec(region="DE", run_id="manual__2", **WINDOW)
    w = spec.window.id
    latest_html = f"qa/DE/{w}/report.html"
    proxy = FaultProxy(moto_server, fault=lambda req: ("status", 403, "AccessDenied")
                       if req.method == "PUT" and req.key == latest_html else None)
    try:
        via_proxy = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
        assert acquire_lock(s3, settings, spec, is_live=lambda lock: False, log=lambda m: None) is None
        collect(s3, settings, spec, log=lambda m: None, is_live=lambda lock: False)
        for sh in make_shards(s3, settings, [spec.as_dict()], log=lambda m: None):
            mask_shard(s3, settings, sh, detector_factory(settings, str(model_dir)), log=lambda m: None)
        with pytest.raises(ClientError, match="AccessDenied"):
            aggregate(via_proxy, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
    finally:
        proxy.close()
    (row,) = [r for r in recent_reports(s3, settings) if r["window"] == w]
    assert (row["run_id"], row["failed"], row["passed"]) == ("manual__2", 1, False)  # what the index shows
    page = _get(s3, settings, latest_html)
    assert b'content="manual__1"' in page and b"QA verdict: <b>passed</b>" in page  # what its link would serve
    why = foreign_report(S3Store(settings.bucket, client=s3), settings, "DE", w, html=page)
    assert why and "page of run manual__1" in why and "report.json (whose numbers the index shows) is of run manual__2" in why
    assert f"/qa/DE/{w}/runs/{spec.run_key}/report.html" in why
    # the page of the run report.json names is served as before
    s3.put_object(Bucket=settings.bucket, Key=latest_html, Body=_get(s3, settings, f"qa/DE/{w}/runs/{spec.run_key}/report.html"))
    assert foreign_report(S3Store(settings.bucket, client=s3), settings, "DE", w, html=_get(s3, settings, latest_html)) is None


def test_a_night_of_more_failures_than_a_report_lists_stays_readable_and_says_where_the_rest_are(
        photos, model_dir, monkeypatch):
    """7,500 failed uploads with long keys made an 8.4 MB report.json, and the Plate QA index (which
    reads at most 8 MB) showed that window as 'not read': the night every photo failed was the one
    a reviewer could not see. A DAG run's report now names the first ``MAX_FAILURES_LISTED`` of a
    reason (here 4) and says it left the rest to the audit records, which name each one."""
    from platemask import qa
    from platemask.layout import audit_key

    monkeypatch.setattr(qa, "MAX_FAILURES_LISTED", 4)
    s3, settings = photos
    rep = _night_of_truncated_uploads(s3, settings, 12, model_dir)
    report = json.loads(_get(s3, settings, rep["report"]))
    truncated = report["failures_by_reason"]["truncated"]
    assert report["by_status"]["failed"] == truncated["count"] == 12
    assert len(truncated["items"]) == 4 and truncated["truncated"] is True
    for i in range(12):  # each photo left out of the list is named by its audit record
        audit = json.loads(_get(s3, settings, audit_key(settings, "DE", f"{DAY}upload-{i:03d}.jpg")))
        assert audit["status"] == "failed" and audit["reason"] == "truncated"
    html = _get(s3, settings, rep["html"]).decode()
    assert len(re.findall(r"upload-\d{3}\.jpg</code>: ", html)) == 4
    assert "… and 8 more not shown here</b>: each photo's audit record names it (report.json lists the first 4)" in html


def test_a_window_in_which_nothing_was_listed_is_not_shown_as_a_plain_pass(photos, model_dir):
    """A region whose photos are uploaded under another prefix than its raw_prefix lists nothing every
    night: its QA passed with 0 photos, 0 failed, 0.00 %, and the index and page said 'passed', as
    for a night masked in full. They now say that nothing was listed, and where to look."""
    from platemask.html_text import escape
    from platemask.qa_index import NOTHING_LISTED

    s3, settings = photos
    empty = dataclasses.replace(settings, raw_prefix="uploads/{region}/{yyyy}/{mm}/{dd}/")  # the photos are under raw/
    spec = RunSpec(region="DE", run_id="scheduled__1", **WINDOW)
    rep = _run(s3, empty, spec, model_dir)
    report = json.loads(_get(s3, empty, rep["report"]))
    assert report["images"] == 0 and report["verdict"]["passed"] is True
    html = _get(s3, empty, rep["html"]).decode()
    assert f"QA verdict: passed, but <b>{escape(NOTHING_LISTED)}</b>" in html
    row = _row(_index(s3, empty), spec.window.id)
    assert "class=warn" in row and f"passed, but {escape(NOTHING_LISTED)}" in row
    # a window with photos still reads as a plain pass
    rep = _run(s3, settings, RunSpec(region="DE", run_id="scheduled__2", **WINDOW), model_dir)
    assert json.loads(_get(s3, settings, rep["report"]))["images"] == 3
    row = _row(_index(s3, settings), spec.window.id)
    assert re.search(r"<td>passed(; earlier day\(s\) left to their own runs[^<]*)?</td>", row)
    assert escape(NOTHING_LISTED) not in row


def test_publish_does_not_skip_its_asset_events_when_s3_cannot_say_whether_its_report_is_current(
        photos, model_dir, moto_server):
    """publish emits only for the window's current report (runs.not_current). When S3 refused the read of
    the window's latest report.json (AccessDenied, SlowDown), not_current answered 'cannot tell ... rerun the
    whole window' and publish skipped: the run ended green with no Asset event and no alert, although its
    report was the current one. A failed read now fails the task (it retries; the run fails if it goes on)."""
    import boto3

    from fault_proxy import FaultProxy
    from platemask.runs import not_current
    from platemask.runspec import RunError

    s3, settings = photos
    rep = _run(s3, settings, RunSpec(region="DE", run_id="scheduled__1", **WINDOW), model_dir)
    assert rep["passed"] and rep["latest"] and not_current(s3, settings, rep) is None
    latest = f"qa/DE/{RunSpec(region='DE', run_id='x', **WINDOW).window.id}/report.json"
    proxy = FaultProxy(moto_server, fault=lambda req: ("status", 403, "AccessDenied")
                       if req.method == "GET" and req.key == latest else None)
    try:
        via_proxy = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
        with pytest.raises(RunError, match="AccessDenied.*no Asset event is skipped"):
            not_current(via_proxy, settings, rep)
    finally:
        proxy.close()


def test_earlier_days_left_to_their_own_runs_are_named_on_the_page(photos, model_dir):
    """The 21st's run leaves the 20th (no run of it has collected it yet) to that day's own run and picks up
    none of its photos as late: only report.json's late_days_not_collected said so, and the page read as if
    the night covered every day its late pick-up reaches."""
    s3, settings = photos
    settings = dataclasses.replace(settings, late_days=2)
    night_21 = RunSpec(region="DE", run_id="scheduled__21", window_start="2026-11-20T23:00:00+00:00",
                       window_end="2026-11-21T23:00:00+00:00")
    rep = _run(s3, settings, night_21, model_dir)
    report = json.loads(_get(s3, settings, rep["report"]))
    assert report["late_days_not_collected"] == ["2026-11-20"] and report["late"] == 0
    html = _get(s3, settings, rep["html"]).decode()
    assert re.search(r"earlier days left to their own runs[^<]*</th><td>2026-11-20</td>", html), html[:3000]


def test_the_index_names_the_earlier_days_a_night_left_to_their_own_runs(photos, model_dir):
    """report.json and report.html named the days before the window that the night left to their own runs
    (late_days_not_collected), but the Plate QA index did not: a reviewer scanning it read the 21st's row as
    a night that covered every day its late pick-up reaches, while the 20th's photos were in no report."""
    s3, settings = photos
    settings = dataclasses.replace(settings, late_days=2)
    s3.put_object(Bucket=settings.bucket, Key="raw/DE/2026/11/21/car.jpg", Body=_get(s3, settings, f"{DAY}car0.jpg"))
    night_21 = RunSpec(region="DE", run_id="scheduled__21", window_start="2026-11-20T23:00:00+00:00",
                       window_end="2026-11-21T23:00:00+00:00")
    rep = _run(s3, settings, night_21, model_dir)
    assert json.loads(_get(s3, settings, rep["report"]))["late_days_not_collected"] == ["2026-11-20"]
    row = _row(_index(s3, settings), night_21.window.id)
    assert re.search(r"<td>passed[^<]*earlier day\(s\) left to their own runs[^<]*: 2026-11-20</td>", row), row
    # once the 20th's own run has collected it, the next try of the 21st leaves no day: a plain pass
    _run(s3, settings, RunSpec(region="DE", run_id="scheduled__20", **WINDOW), model_dir)
    rep = _run(s3, settings, dataclasses.replace(night_21, run_id="scheduled__21b"), model_dir)
    assert json.loads(_get(s3, settings, rep["report"]))["late_days_not_collected"] == []
    row = _row(_index(s3, settings), night_21.window.id)
    assert "<td>passed</td>" in row and "left to their own runs" not in row
    # report.json is untrusted: whatever the field holds, the row shows escaped text, at most MAX_DAYS_LEFT days
    from platemask.qa_index import MAX_DAYS_LEFT, render_index, summarise

    report = json.loads(_get(s3, settings, rep["report"]))
    evil = "<svg onload=alert(1)>\u202e"
    for odd in ([evil] * 25, evil, {"x": evil}, 7, None):
        out = render_index([summarise("DE", night_21.window.id, dict(report, late_days_not_collected=odd))],
                           lambda r, w: f"report/{r}/{w}")
        assert "<svg" not in out and "\u202e" not in out
        assert ("and 15 more" in out and out.count("&lt;svg") == MAX_DAYS_LEFT) if isinstance(odd, list) else \
            "left to their own runs" not in out


def test_a_retried_mask_task_does_not_count_its_first_tries_photos_in_the_images_per_second(photos, model_dir):
    """A mask task whose worker was lost after it had masked 2 of its shard's 3 photos (their audit records
    written) is retried: the retry finds those 2 done by this run (earlier_attempt) and masks the third. The
    report's mask images/s (report.html, the Plate QA index) divided all 3 photos by the retry's time, which
    masked one: three times the speed the task had (a shard of 200 with one left: 200 times)."""
    from platemask.airflow_support import detector_factory
    from platemask.runs import acquire_lock, aggregate, collect, make_shards, mask_shard, release_lock

    s3, settings = photos
    spec = RunSpec(region="DE", run_id="scheduled__20", **WINDOW)
    assert acquire_lock(s3, settings, spec, is_live=lambda lock: False, log=lambda m: None) is None
    collect(s3, settings, spec, log=lambda m: None)
    (shard,) = make_shards(s3, settings, [spec.as_dict()], log=lambda m: None)
    factory = detector_factory(settings, str(model_dir))
    mask_shard(s3, settings, shard, factory, log=lambda m: None)
    s3.delete_object(Bucket=settings.bucket, Key="audit/DE/2026/11/20/car2.jpg.json")  # the worker is lost first
    retry = mask_shard(s3, settings, shard, factory, log=lambda m: None)  # the task's retry
    retried = json.loads(_get(s3, settings, retry["summary"]))
    assert retried["processed"] == 3 and retried["images_per_second"] > 0  # (of the 1 photo it masked)
    (rep,) = aggregate(s3, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
    release_lock(s3, settings, spec, log=lambda m: None)
    qa = json.loads(_get(s3, settings, rep["report"]))
    assert qa["processed_this_run"] == 3 and qa["by_status"]["masked"] == 3 and rep["passed"]
    assert sum(bool(r.get("earlier_attempt")) for r in _records(s3, settings, spec)) == 2
    assert qa["mask_images_per_second"] == round(1 / retried["wall_seconds"], 3), (qa["mask_images_per_second"],
                                                                                   retried["wall_seconds"])


def _records(s3, settings, spec) -> list[dict]:
    from platemask.layout import run_prefix

    out = []
    for o in s3.list_objects_v2(Bucket=settings.bucket, Prefix=run_prefix(settings, spec) + "detections/")["Contents"]:
        if o["Key"].endswith(".jsonl"):
            out += [json.loads(x) for x in _get(s3, settings, o["Key"]).decode().splitlines()]
    return out
