"""The run steps on S3 (moto's server), below the DAG: run isolation, the region-window lock, result identity."""
from __future__ import annotations

import dataclasses
from datetime import date
import json
import shutil
import threading
import uuid

import numpy as np
import pytest

from conftest import jpeg_bytes
from platemask.layout import lock_keys
from platemask.runs import acquire_lock, collect, make_shards, release_lock
from platemask.runspec import RunSpec, run_key
from platemask.settings import Settings

WINDOW = {"window_start": "2026-11-19T23:00:00+00:00", "window_end": "2026-11-20T23:00:00+00:00"}


@pytest.fixture
def photos(s3_env):
    from platemask.training.synth import synth_car_scene

    s3 = s3_env
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    rng = np.random.default_rng(5)
    keys = []
    for i in range(4):
        img, _, _ = synth_car_scene(rng, plate_width=(120, 160))
        keys.append(f"raw/DE/2026/11/20/car{i}.jpg")
        s3.put_object(Bucket=bucket, Key=keys[-1], Body=jpeg_bytes(img))
    return s3, Settings(bucket=bucket, shard_size=2, io_workers=2, batch_size=2), keys


def _shard_keys(s3, shards):
    out = []
    for sh in shards:
        bucket, key = sh["shard"][5:].split("/", 1)
        out += [json.loads(x)["key"] for x in s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()]
    return out


def _collected_by_its_run(s3, settings, *days: int):
    """What the nightly run of each DE local day of November does first: its collect marks the day collected
    (late pick-up takes only photos of such days). Called before the test uploads that day's photos, they are
    photos that arrived after their night's run."""
    for day in days:
        spec = RunSpec(region="DE", run_id=f"scheduled__{day}", window_start=f"2026-11-{day - 1:02d}T23:00:00+00:00",
                       window_end=f"2026-11-{day:02d}T23:00:00+00:00")
        collect(s3, dataclasses.replace(settings, late_days=0), spec, log=lambda m: None)


def test_run_keys_are_readable_stable_and_distinct():
    a = run_key("scheduled__2026-11-21T01:00:00+00:00")
    assert a.startswith("scheduled__2026-11-21T01-00-00-00-00-") and a == run_key("scheduled__2026-11-21T01:00:00+00:00")
    assert run_key("manual__a/b") != run_key("manual__a:b")  # same sanitised text, different runs
    with pytest.raises(ValueError, match="must contain"):
        Settings(runs_root="runs/{region}/{window}/")


def test_a_manual_run_during_the_nightly_run_does_not_shorten_it(photos):
    """The reported incident: a max_images run of the same window collected between the nightly run's
    collect and shard steps. Each run keeps its own manifest and shards."""
    s3, settings, keys = photos
    nightly = RunSpec(region="DE", run_id="scheduled__2026-11-21T01:00:00+00:00", **WINDOW)
    manual = RunSpec(region="DE", run_id="manual__2026-11-21T01:05:00+00:00", max_images=1, dry_run=True, **WINDOW)
    collect(s3, settings, nightly)
    collect(s3, settings, manual)
    nightly_shards = make_shards(s3, settings, [nightly.as_dict()])
    manual_shards = make_shards(s3, settings, [manual.as_dict()])
    assert sorted(_shard_keys(s3, nightly_shards)) == keys
    assert _shard_keys(s3, manual_shards) == keys[:1]
    assert all(run_key(nightly.run_id) in sh["shard"] for sh in nightly_shards)


def test_the_lock_lets_one_run_mask_a_region_window(photos):
    s3, settings, _ = photos
    a = RunSpec(region="DE", run_id="scheduled__a", **WINDOW)
    b = RunSpec(region="DE", run_id="manual__b", **WINDOW)
    live = {"scheduled__a", "manual__b"}
    is_live = lambda lock: lock["run_id"] in live  # noqa: E731 - what Airflow says about the run
    assert acquire_lock(s3, settings, a, is_live=is_live) is None
    held = acquire_lock(s3, settings, b, is_live=is_live)
    assert held["run_id"] == "scheduled__a" and held["state"] == "held"
    assert acquire_lock(s3, settings, a, is_live=is_live) is None  # a retry of the holder: re-entrant
    assert not release_lock(s3, settings, b)  # b cannot release a's lock
    assert release_lock(s3, settings, a)
    assert acquire_lock(s3, settings, b, is_live=is_live) is None  # released: b takes it
    live.discard("manual__b")  # b dies holding it
    assert acquire_lock(s3, settings, a, is_live=is_live) is None
    (key,) = lock_keys(settings, a)  # a nightly window: one local day
    assert key == "runs/DE/locks/2026-11-20.json"
    doc = json.loads(s3.get_object(Bucket=settings.bucket, Key=key)["Body"].read())
    assert doc["run_id"] == "scheduled__a" and doc["state"] == "held" and doc["day"] == "2026-11-20"


def test_overlapping_windows_never_mask_the_same_day_at_once(photos):
    """Locks were per window id: the 20th's nightly run and a manual run over the 20th-22nd took
    different locks and masked the same photos at once (a masked copy of one run's mode under the
    other run's audit record)."""
    s3, settings, _ = photos
    live = {"scheduled__20", "manual__3days", "scheduled__19"}
    is_live = lambda lock: lock["run_id"] in live  # noqa: E731
    night = RunSpec(region="DE", run_id="scheduled__20", **WINDOW)
    three = RunSpec(region="DE", run_id="manual__3days", window_start="2026-11-20T00:00:00+01:00",
                    window_end="2026-11-23T00:00:00+01:00")
    before = RunSpec(region="DE", run_id="scheduled__19", window_start="2026-11-19T00:00:00+01:00",
                     window_end="2026-11-20T00:00:00+01:00")
    assert len(lock_keys(settings, three)) == 3
    assert acquire_lock(s3, settings, night, is_live=is_live) is None
    held = acquire_lock(s3, settings, three, is_live=is_live)
    assert held is not None and held["run_id"] == "scheduled__20"
    assert acquire_lock(s3, settings, before, is_live=is_live) is None  # the day before: no overlap, no wait
    assert release_lock(s3, settings, night)
    assert acquire_lock(s3, settings, three, is_live=is_live) is None  # now it holds all three days
    assert acquire_lock(s3, settings, night, is_live=is_live)["run_id"] == "manual__3days"
    assert release_lock(s3, settings, three)
    assert acquire_lock(s3, settings, night, is_live=is_live) is None


def test_a_rerun_redoes_a_masked_copy_that_is_not_the_one_its_record_describes(photos, model_dir):
    """A rerun skipped a photo when a masked copy existed, whatever its bytes: a copy replaced by
    another run (or by hand) stayed, under an audit record that describes other bytes."""
    s3, settings, keys = photos
    assert _mask(s3, settings, RunSpec(region="DE", run_id="manual__1", **WINDOW), model_dir) == (4, 0)
    masked = "masked/DE/2026/11/20/car2.jpg"
    s3.put_object(Bucket=settings.bucket, Key=masked, Body=b"someone else's bytes")
    assert _mask(s3, settings, RunSpec(region="DE", run_id="manual__2", **WINDOW), model_dir) == (1, 3)
    audit = json.loads(s3.get_object(Bucket=settings.bucket, Key="audit/DE/2026/11/20/car2.jpg.json")["Body"].read())
    body = s3.get_object(Bucket=settings.bucket, Key=masked)["Body"].read()
    import hashlib

    assert hashlib.sha256(body).hexdigest() == audit["output_sha256"]


def test_two_runs_racing_for_a_free_lock_get_exactly_one(photos):
    s3, settings, _ = photos
    specs = [RunSpec(region="DE", run_id=f"manual__{i}", **WINDOW) for i in range(6)]
    release_lock(s3, settings, specs[0])
    results, barrier = {}, threading.Barrier(len(specs))

    def race(spec):
        barrier.wait()
        results[spec.run_id] = acquire_lock(s3, settings, spec, is_live=lambda lock: True)

    threads = [threading.Thread(target=race, args=(s,)) for s in specs]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winners = [rid for rid, held in results.items() if held is None]
    assert len(winners) == 1
    assert all(held["run_id"] == winners[0] for held in results.values() if held is not None)


# ------------------------------------------------------------------ result identity

def _shard_records(s3, settings, spec, model_dir) -> dict:
    """Collect ``spec``'s window into one shard, mask it, and return its records by key."""
    from platemask.airflow_support import detector_factory
    from platemask.runs import mask_shard

    collect(s3, settings, spec, log=lambda m: None)
    (shard,) = make_shards(s3, settings, [spec.as_dict()], log=lambda m: None)
    out = mask_shard(s3, settings, shard, detector_factory(settings, str(model_dir)), log=lambda m: None)
    bucket, key = out["detections"][5:].split("/", 1)
    return {r["key"]: r for r in map(json.loads, s3.get_object(Bucket=bucket, Key=key)["Body"].read().splitlines())}


def _mask(s3, settings, spec, model_dir):
    from platemask.airflow_support import detector_factory
    from platemask.runs import mask_shard

    settings = dataclasses.replace(settings, shard_size=10)  # one shard: one model load
    collect(s3, settings, spec)
    out = [mask_shard(s3, settings, sh, detector_factory(settings, str(model_dir)), log=lambda m: None)
           for sh in make_shards(s3, settings, [spec.as_dict()])]
    return sum(o["processed"] for o in out), sum(o["skipped"] for o in out)


def test_a_shard_on_a_gpu_gets_the_gpu_job_options_whatever_settings_device_says(photos, model_dir):
    """settings.device is "auto" by default: the job's options follow where the detector really runs
    (the old rule read "auto" as a CPU, so a GPU worker kept the CPU's pixel budget and threads)."""
    import sys

    from platemask.model import load_config
    from platemask.pipeline import GPU_SWITCH_INTERVAL_MS
    from platemask.runs import mask_shard

    s3, settings, keys = photos
    assert settings.device == "auto"
    cfg = load_config(model_dir)
    seen = []

    def factory(device):
        def detect(keys, decoded):
            seen.append((device, sys.getswitchinterval()))
            return [[] for _ in decoded]

        if device:
            detect.device = device
        return lambda spec, entries, shard: (detect, cfg.identity(verify=False), cfg)

    spec = RunSpec(region="DE", run_id="manual__gpu", **WINDOW)
    collect(s3, settings, spec)
    shards = make_shards(s3, settings, [spec.as_dict()])
    mask_shard(s3, settings, shards[0], factory("cuda"), log=lambda m: None)
    mask_shard(s3, settings, shards[1], factory(None), log=lambda m: None)  # e.g. a transform job's detections
    assert {d: s for d, s in seen} == {"cuda": pytest.approx(GPU_SWITCH_INTERVAL_MS / 1000),
                                      None: pytest.approx(sys.getswitchinterval())}


def test_a_rerun_redoes_exactly_the_photos_whose_result_would_change(photos, model_dir, tmp_path):
    s3, settings, keys = photos
    n = len(keys)
    runs = iter(range(100))

    def spec(**kw):
        return RunSpec(region="DE", run_id=f"manual__{next(runs)}", **WINDOW, **kw)

    assert _mask(s3, settings, spec(), model_dir) == (n, 0)
    audit = json.loads(s3.get_object(Bucket=settings.bucket, Key="audit/DE/2026/11/20/car0.jpg.json")["Body"].read())
    ident = audit["identity"]
    shipped = json.loads((model_dir / "config.json").read_text())["score_threshold"]
    assert ident["threshold"] == shipped and audit["threshold"] == shipped and audit["threshold_param"] is None
    assert set(ident) == {"source_etag", "weights_sha256", "verifier_sha256", "model_config_sha256", "threshold",
                          "mode", "metadata", "code_version"}
    assert audit["input_sha256"] and ident["metadata"] == "safe"
    assert _mask(s3, settings, spec(), model_dir) == (0, n)  # nothing changed: nothing redone

    # the same weights with another operating threshold in config.json: every photo's result changes
    changed = tmp_path / "model"
    shutil.copytree(model_dir, changed)
    cfg = json.loads((changed / "config.json").read_text())
    cfg["score_threshold"] = 0.35
    (changed / "config.json").write_text(json.dumps(cfg))
    assert _mask(s3, settings, spec(), changed) == (n, 0)
    # the threshold actually applied is what counts: 0.35 given as a Param is the same result
    assert _mask(s3, settings, spec(threshold=0.35), changed) == (0, n)
    # a changed source is redone alone
    s3.copy_object(Bucket=settings.bucket, Key=keys[1], CopySource={"Bucket": settings.bucket, "Key": keys[0]})
    assert _mask(s3, settings, spec(threshold=0.35), changed) == (1, n - 1)
    assert _mask(s3, settings, spec(threshold=0.35, mode="pixelate"), changed) == (n, 0)  # another mode
    assert _mask(s3, settings, spec(threshold=0.35, mode="pixelate", reprocess=True), changed) == (n, 0)  # forced


def test_the_dag_s3_client_retries_adaptively_with_a_pool_for_its_threads(aws_conn):
    from platemask.airflow_support import s3_client

    client = s3_client(Settings(io_workers=12))
    assert client.meta.config.retries["mode"] == "adaptive" and client.meta.config.retries["total_max_attempts"] >= 8
    assert client.meta.config.max_pool_connections == 28
    assert client.list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200  # still reaches the connection's endpoint


def test_late_photos_of_the_days_before_are_picked_up_once_and_reported(photos, model_dir):
    from platemask.runs import aggregate

    s3, settings, keys = photos
    _collected_by_its_run(s3, settings, 17, 18, 19)
    body = s3.get_object(Bucket=settings.bucket, Key=keys[0])["Body"].read()
    late = "raw/DE/2026/11/19/late.jpg"
    for key in (late, "raw/DE/2026/11/19/done.jpg", "raw/DE/2026/11/18/held.jpg", "raw/DE/2026/11/16/too-old.jpg"):
        s3.put_object(Bucket=settings.bucket, Key=key, Body=body)
    etag = s3.head_object(Bucket=settings.bucket, Key="raw/DE/2026/11/19/done.jpg")["ETag"].strip('"')
    s3.put_object(Bucket=settings.bucket, Key="audit/DE/2026/11/19/done.jpg.json",
                  Body=json.dumps({"status": "masked", "source_etag": etag}).encode())
    night_18 = RunSpec(region="DE", run_id="scheduled__18", window_start="2026-11-17T23:00:00+00:00",
                       window_end="2026-11-18T23:00:00+00:00")
    assert acquire_lock(s3, settings, night_18, is_live=lambda lock: True) is None  # that night's run is masking it

    spec = RunSpec(region="DE", run_id="scheduled__20", **WINDOW)
    c = collect(s3, settings, spec)
    manifest = [json.loads(x) for x in s3.get_object(Bucket=settings.bucket, Key=c["manifest"].split("/", 3)[3])["Body"]
                .read().decode().splitlines()]
    assert sorted(e["key"] for e in manifest) == sorted(keys + [late])
    assert [e["key"] for e in manifest if e.get("late")] == [late] and c["late"] == 1 and c["photos_in_window"] == 4
    assert _mask(s3, settings, spec, model_dir) == (5, 0)  # collects again: the same manifest
    (report,) = aggregate(s3, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
    qa = json.loads(s3.get_object(Bucket=settings.bucket, Key=report["report"].split("/", 3)[3])["Body"].read())
    assert qa["late"] == 1 and qa["images"] == 5 and report["passed"]
    assert "masked/DE/2026/11/19/late.jpg" in {o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket)["Contents"]}
    # the next night finds it audited: not late any more (once this run has released its locks)
    assert release_lock(s3, settings, spec)
    assert collect(s3, settings, RunSpec(region="DE", run_id="scheduled__20b", **WINDOW))["late"] == 0


def test_check_wants_a_passing_report_for_every_planned_region():
    from platemask.runs import asset_extra, check_reports, verdict
    from platemask.runspec import RunError

    base = {"collected": True, "not_accounted_for": 0, "duplicate_records": 0, "records_outside_manifest": 0,
            "failure_rate": 0.0, "max_failure_rate": 0.02}
    assert verdict(base) == []
    assert "no record" in verdict(dict(base, not_accounted_for=2))[0]
    assert "more than one record" in verdict(dict(base, duplicate_records=1))[0]
    assert "exceeds" in verdict(dict(base, failure_rate=0.5))[0]
    # every photo failed: never a pass, even at max_failure_rate 1 (one problem, not the rate's too); a dry run
    # has no failed record of its own to judge, a partial run's planned photos are judged like any other
    all_failed = dict(base, images=2, by_status={"masked": 0, "no_plate": 0, "failed": 2}, failure_rate=1.0)
    for limit in (1.0, 0.02):
        (problem,) = verdict(dict(all_failed, max_failure_rate=limit))
        assert "every one of the 2 photo(s) failed" in problem and "max_failure_rate" in problem
    assert "every one" in verdict(dict(all_failed, max_failure_rate=1.0, partial=True))[0]
    assert verdict(dict(base, images=2, by_status={"masked": 1, "no_plate": 0, "failed": 1}, failure_rate=0.5,
                        max_failure_rate=1.0)) == []
    assert verdict(dict(base, images=0, by_status={"masked": 0, "no_plate": 0, "failed": 0}, max_failure_rate=1.0)) == []
    assert "not collected" in verdict(dict(base, collected=False))[0]
    specs = [{"region": "DE", "run_id": "r"}, {"region": "PL", "run_id": "r"}]
    de = {"region": "DE", "window": "w", "run_id": "r", "report": "s3://b/qa/DE/w/runs/k/report.json",
          "html": "s3://b/qa/DE/w/runs/k/report.html", "passed": True, "problems": [], "dry_run": False, "photos": 3,
          "by_status": {"masked": 2, "no_plate": 1, "failed": 0}}
    with pytest.raises(RunError, match="PL: no QA report"):
        check_reports(specs, [de])
    check_reports(specs[:1], [de])
    assert asset_extra(de) == {"region": "DE", "window": "w", "run_id": "r", "report": de["report"],
                               "counts": {"photos": 3, "masked": 2, "no_plate": 1, "failed": 0}, "late": 0}
    assert asset_extra(dict(de, late=1))["late"] == 1
    assert asset_extra(dict(de, dry_run=True)) is None and asset_extra(dict(de, passed=False)) is None


def test_a_photo_that_fails_on_a_rerun_loses_its_old_masked_copy(photos, model_dir):
    """Replaced by a truncated upload after it was masked, a photo's rerun record said failed while
    the old masked copy stayed published, matching no audit record; the run ended green."""
    s3, settings, keys = photos
    assert _mask(s3, settings, RunSpec(region="DE", run_id="manual__1", **WINDOW), model_dir) == (4, 0)
    masked = "masked/DE/2026/11/20/car1.jpg"
    assert s3.head_object(Bucket=settings.bucket, Key=masked)
    body = s3.get_object(Bucket=settings.bucket, Key=keys[1])["Body"].read()
    s3.put_object(Bucket=settings.bucket, Key=keys[1], Body=body[: len(body) // 2])
    assert _mask(s3, settings, RunSpec(region="DE", run_id="manual__2", **WINDOW), model_dir) == (1, 3)
    audit = json.loads(s3.get_object(Bucket=settings.bucket, Key="audit/DE/2026/11/20/car1.jpg.json")["Body"].read())
    assert audit["status"] == "failed" and audit["reason"] in ("truncated", "corrupt")
    assert audit["stale_output_removed"].endswith(masked)
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket, Prefix="masked/")["Contents"]}
    assert masked not in listed and len(listed) == 3


def test_a_photo_re_uploaded_since_its_audit_record_is_picked_up_late(photos):
    """A photo replaced during its night's run failed `source_changed` ("the next run processes the
    new upload"), but late pick-up skipped every photo with an audit record: the new upload was
    never masked and had no record of its own."""
    s3, settings, keys = photos
    _collected_by_its_run(s3, settings, 19)
    body = s3.get_object(Bucket=settings.bucket, Key=keys[0])["Body"].read()
    day = "raw/DE/2026/11/19/"
    for name in ("same.jpg", "replaced.jpg", "failed-then-replaced.jpg", "unreadable-record.jpg"):
        s3.put_object(Bucket=settings.bucket, Key=day + name, Body=body)
    old = s3.head_object(Bucket=settings.bucket, Key=day + "same.jpg")["ETag"].strip('"')
    records = {"same.jpg": {"status": "masked", "source_etag": old},
               "replaced.jpg": {"status": "masked", "source_etag": old},
               "failed-then-replaced.jpg": {"status": "failed", "reason": "source_changed", "source_etag": old}}
    for name, rec in records.items():
        s3.put_object(Bucket=settings.bucket, Key=f"audit/DE/2026/11/19/{name}.json", Body=json.dumps(rec).encode())
    s3.put_object(Bucket=settings.bucket, Key="audit/DE/2026/11/19/unreadable-record.jpg.json", Body=b"{not json")
    for name in ("replaced.jpg", "failed-then-replaced.jpg"):  # the new uploads
        s3.put_object(Bucket=settings.bucket, Key=day + name, Body=body + b"\0")
    spec = RunSpec(region="DE", run_id="scheduled__20", **WINDOW)
    c = collect(s3, settings, spec)
    manifest = [json.loads(x) for x in s3.get_object(Bucket=settings.bucket, Key=c["manifest"].split("/", 3)[3])["Body"]
                .read().decode().splitlines()]
    late = {e["key"]: e["etag"] for e in manifest if e.get("late")}
    assert sorted(late) == [day + "failed-then-replaced.jpg", day + "replaced.jpg", day + "unreadable-record.jpg"]
    assert all(etag != old for k, etag in late.items() if "replaced" in k)


def test_hidden_files_are_named_in_the_qa_report_and_odd_keys_get_a_record(photos, model_dir):
    """A hidden photo and a non-empty object whose key ends in '/' were dropped with no record, no
    count and no mention: QA said 13 photos in a window of 17 objects."""
    from platemask.runs import aggregate

    s3, settings, keys = photos
    body = s3.get_object(Bucket=settings.bucket, Key=keys[0])["Body"].read()
    day = "raw/DE/2026/11/20/"
    s3.put_object(Bucket=settings.bucket, Key=day + ".hidden.jpg", Body=body)
    s3.put_object(Bucket=settings.bucket, Key=day + "sub/._car0.jpg", Body=b"\0\5\26\7 AppleDouble")
    s3.put_object(Bucket=settings.bucket, Key=day + "folder/", Body=b"")  # a console's folder marker
    s3.put_object(Bucket=settings.bucket, Key=day + "photo.jpg/", Body=body)
    spec = RunSpec(region="DE", run_id="manual__odd", **WINDOW)
    c = collect(s3, settings, spec)
    assert c["skipped_hidden"] == {"count": 2, "keys": [day + ".hidden.jpg", day + "sub/._car0.jpg"]}
    assert c["photos_in_window"] == 5  # the four cars and photo.jpg/
    _mask(s3, settings, spec, model_dir)
    (report,) = aggregate(s3, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
    qa = json.loads(s3.get_object(Bucket=settings.bucket, Key=report["report"].split("/", 3)[3])["Body"].read())
    assert qa["skipped_hidden"]["count"] == 2 and qa["images"] == 5
    odd = json.loads(s3.get_object(Bucket=settings.bucket, Key="audit/DE/2026/11/20/photo.jpg/.json")["Body"].read())
    assert odd["key"] == day + "photo.jpg/" and odd["status"] in ("masked", "no_plate")  # a JPEG, whatever its key
    html = s3.get_object(Bucket=settings.bucket, Key=report["html"].split("/", 3)[3])["Body"].read().decode()
    assert "hidden files not masked" in html and ".hidden.jpg" in html


def test_a_mask_task_cleared_after_its_run_ended_takes_the_lock_again_or_refuses(photos, monkeypatch):
    """The failure alert says to clear the failed tasks; the cleared mask task ran without the lock
    (released when the run failed), beside another run of the window, and its QA never became the
    window's latest report."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    import platemask.airflow_support as support
    from platemask.runs import _holds_lock

    s3, settings, _ = photos
    monkeypatch.setattr(support, "s3_client", lambda _settings: s3)
    a = RunSpec(region="DE", run_id="scheduled__a", **WINDOW)
    b = RunSpec(region="DE", run_id="manual__b", **WINDOW)
    live = {b.run_id}
    monkeypatch.setattr(support, "_run_is_live", lambda dag_id: lambda lock: lock.get("run_id") in live)
    context = {"dag_run": SimpleNamespace(dag_id="plate_masking_de")}
    assert acquire_lock(s3, settings, a, is_live=lambda lock: True) is None
    assert release_lock(s3, settings, a)  # run a failed; release (all_done) gave the lock back
    support.hold_lock_to_mask(context, settings, a.as_dict())  # cleared, no other run since: takes it again
    assert _holds_lock(s3, settings, a)  # its QA becomes the latest report; its cleared release gives it back
    support.hold_lock_to_mask(context, settings, a.as_dict())  # re-entrant: the next shard of the same run
    support.hold_lock_to_mask(context, settings, dict(b.as_dict(), dry_run=True))  # a dry run takes no lock
    assert _holds_lock(s3, settings, a)
    assert release_lock(s3, settings, a)
    assert acquire_lock(s3, settings, b, is_live=lambda lock: True) is None  # run b masks the window now
    with pytest.raises(AirflowFailException, match="manual__b.*must not mask one window at once.*rerun the whole"):
        support.hold_lock_to_mask(context, settings, a.as_dict())
    assert not _holds_lock(s3, settings, a)
    live.clear()  # b has finished (or died without releasing): its masking is the window's now, a's is stale
    with pytest.raises(AirflowFailException, match="run manual__b .*has had region DE day 2026-11-20 since this run "
                                                   "released it.*rerun the whole window"):
        support.hold_lock_to_mask(context, settings, a.as_dict())
    assert not _holds_lock(s3, settings, a)


def test_a_max_images_run_is_partial_no_latest_report_no_asset_event(photos, model_dir):
    """A max_images run held the lock, so its QA of 2 of 4 photos replaced the window's latest report
    and its Asset event said the window was masked."""
    from platemask.runs import aggregate, asset_extra

    s3, settings, keys = photos
    for spec, partial in ((RunSpec(region="DE", run_id="manual__two", max_images=2, **WINDOW), True),
                          (RunSpec(region="DE", run_id="manual__all", **WINDOW), False)):
        assert acquire_lock(s3, settings, spec, is_live=lambda lock: False) is None
        _mask(s3, settings, spec, model_dir)
        (report,) = aggregate(s3, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
        release_lock(s3, settings, spec)
        assert report["passed"] and report["partial"] is partial and report["latest"] is not partial
        assert (asset_extra(report) is None) is partial
        assert (report["planned"], report["listed"]) == ((2, 4) if partial else (4, 4))


def test_under_last_modified_a_photo_uploaded_outside_its_partitions_day_has_one_window(photos):
    """time_source=last_modified keeps a photo whose upload time falls in the window. The photos of
    the 20th's partition were uploaded today (moto's LastModified is the put time), days later: no
    window that lists that partition held their upload time, so none masked them (late_days=0 leaves
    no late pick-up either). A late photo goes to the window holding its day's last instant (the last
    to list it, and the one that runs latest after the upload), one uploaded ahead into a later day's
    partition to the window holding that day's midnight: exactly one window each, midnight-aligned
    or not."""
    from datetime import datetime, timedelta, timezone
    from zoneinfo import ZoneInfo

    s3, settings, keys = photos
    settings = dataclasses.replace(settings, time_source="last_modified", late_days=0)
    berlin = ZoneInfo("Europe/Berlin")
    now = datetime.now(timezone.utc)
    today = "raw/DE/{:%Y/%m/%d}/today.jpg".format(now.astimezone(berlin))
    ahead_day = (now.astimezone(berlin) + timedelta(days=2)).date()
    ahead = "raw/DE/{:%Y/%m/%d}/ahead.jpg".format(ahead_day)
    for key in (today, ahead):
        s3.put_object(Bucket=settings.bucket, Key=key, Body=jpeg_bytes(np.full((40, 60, 3), 90, np.uint8)))

    def claimed(start, hours=24):
        spec = RunSpec(region="DE", run_id=f"manual__{uuid.uuid4().hex}", window_start=start.isoformat(),
                       window_end=(start + timedelta(hours=hours)).isoformat())
        c = collect(s3, settings, spec, log=lambda m: None)
        body = s3.get_object(Bucket=settings.bucket, Key=c["manifest"].split("/", 3)[3])["Body"].read().decode()
        return sorted(json.loads(x)["key"] for x in body.splitlines())

    midnight_20th = datetime.fromisoformat(WINDOW["window_start"])  # 2026-11-20 00:00 in Berlin
    assert [claimed(midnight_20th, 12), claimed(midnight_20th + timedelta(hours=12), 12)] == [[], sorted(keys)]
    six = midnight_20th + timedelta(hours=6)  # windows from 06:00 to 06:00: three in a row
    assert [claimed(six - timedelta(days=1)), claimed(six), claimed(six + timedelta(days=1))] == [[], sorted(keys), []]
    # a photo uploaded on its own partition's day stays with the window that holds its upload time
    assert claimed(now - timedelta(minutes=5), 1 / 6) == [today]
    assert today not in claimed(now + timedelta(minutes=5), 1)
    # uploaded ahead: the window holding its partition's midnight, and only it
    m = datetime(ahead_day.year, ahead_day.month, ahead_day.day, tzinfo=berlin)
    # (only where ahead.jpg goes: from 18:00 Berlin the first of these windows also holds today's upload)
    assert [ahead in claimed(m - timedelta(hours=30)), claimed(m - timedelta(hours=6)),
            ahead in claimed(m + timedelta(hours=6))] == [False, [ahead], False]


def test_a_raw_prefix_ending_in_its_day_or_regions_named_twice_are_refused():
    """raw/{region}/{yyyy}/{mm}/{dd} (no '/') was accepted: the 20th's listing '.../20' also took
    '.../20-old/' and '.../201/'. PLATEMASK_REGIONS=DE,PL,DE was accepted: an ALL run planned DE twice
    under one run folder. Both refused when the settings are built, naming the setting."""
    from platemask.settings import Settings

    with pytest.raises(ValueError, match=r"raw_prefix .* ends with a placeholder"):
        Settings(raw_prefix="raw/{region}/{yyyy}/{mm}/{dd}")
    with pytest.raises(ValueError, match=r"regions names DE more than once"):
        Settings(regions=("DE", "PL", "DE"))
    assert Settings(raw_prefix="raw/{region}/{yyyy}{mm}{dd}_").raw_prefix.endswith("_")


@pytest.mark.parametrize("raw_prefix", ["raw/{region}/{yyyy}/{mm}/", "raw/{region}/", "raw/{yyyy}/{mm}/{dd}/",
                                        "raw/{region}/{yyyy}/{mm}/{dd}/{camera}/"])
def test_a_raw_prefix_that_is_not_one_regions_day_partition_is_refused(photos, raw_prefix):
    """raw/{region}/{yyyy}/{mm}/ was accepted: collect listed the month's prefix once per day of the
    window, so a two-day window's manifest held every photo twice, and the nights of the 20th and the
    21st (each under its own day lock) both took every photo of the month. Without {region} every
    region takes every photo; an unknown placeholder fails collect at run time. All refused up front."""
    s3, settings, keys = photos
    with pytest.raises(ValueError, match="raw_prefix"):
        dataclasses.replace(settings, raw_prefix=raw_prefix, regions=("DE", "PL"))
    # the default layout, and one region without {region} in its prefix, are fine
    dataclasses.replace(settings, raw_prefix="photos/{yyyy}/{mm}/{dd}/", regions=("DE",))
    two_days = RunSpec(region="DE", run_id="manual__two-days", window_start="2026-11-19T23:00:00+00:00",
                       window_end="2026-11-21T23:00:00+00:00")
    from platemask.storage import read_json_lines

    manifest = [e["key"] for e in read_json_lines(s3, collect(s3, settings, two_days, log=lambda m: None)["manifest"])]
    assert sorted(manifest) == sorted(keys)  # each photo once


def test_an_object_larger_than_any_photo_is_refused_unread_by_the_mask_step(photos, model_dir, monkeypatch):
    """Every object of a partition is an input, a dashcam video or a disk image too. The CLI refuses
    a local file larger than any image of max_pixels can be (704 MB at 80 MP) unread; the DAG's mask
    step read such an object whole into the worker (several at once, one per reader thread: the
    task killed for memory, every retry, and its whole shard with it). The manifest's listed size
    (what the ETag-pinned read would get) now refuses it unread, ``too_large``, alone."""
    import platemask.pipeline as pipeline

    s3, settings, keys = photos
    big = "raw/DE/2026/11/20/dashcam.mp4"
    s3.put_object(Bucket=settings.bucket, Key=big, Body=np.random.default_rng(0).bytes(3 << 20))
    biggest_photo = max(s3.head_object(Bucket=settings.bucket, Key=k)["ContentLength"] for k in keys)
    monkeypatch.setattr(pipeline, "max_file_bytes", lambda max_pixels: max(biggest_photo, 1 << 20))  # a 1 MB "limit"
    gets: list[str] = []
    s3.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **kw: gets.append(params["Key"]))
    spec = RunSpec(region="DE", run_id="manual__big", **WINDOW)
    recs = _shard_records(s3, dataclasses.replace(settings, shard_size=10), spec, model_dir)
    assert recs[big]["status"] == "failed" and recs[big]["reason"] == "too_large", recs[big]
    assert big not in gets  # never read
    assert [recs[k]["status"] for k in keys] == ["masked"] * len(keys)


def test_the_qa_page_never_shows_another_upload_as_the_photo_that_was_masked(photos):
    """report.html's "before" thumbnail read the original as it is now: a photo re-uploaded after it was
    masked showed the new upload with the old record's polygons beside the old masked copy (a reviewer
    sees a mask that misses its plate, or approves a photo that was never masked). It is read pinned to
    the record's source ETag now; another upload is named, not shown."""
    from platemask.detections import record
    from platemask.qa import build_report
    from platemask.report_html import render_report

    s3, settings, keys = photos
    key = keys[0]
    etag = s3.head_object(Bucket=settings.bucket, Key=key)["ETag"].strip('"')
    masked = key.replace("raw/", "masked/", 1)
    s3.put_object(Bucket=settings.bucket, Key=masked, Body=s3.get_object(Bucket=settings.bucket, Key=keys[1])["Body"].read())
    plate = {"score": 0.95, "polygon": [[10, 10], [60, 10], [60, 30], [10, 30]]}
    rec = dict(record(key, status="masked", width=1280, height=720, review=True, review_reason="low score",
                      source_etag=etag), plates=[plate])
    spec = RunSpec(region="DE", run_id="manual__thumbs", **WINDOW)

    def page():
        report = dict(build_report([rec]), thresholds={"score": 0.5})
        return render_report(report, [rec], client=s3, settings=settings, spec=spec,
                             masked_key=lambda k: k.replace("raw/", "masked/", 1))

    assert page().count("data:image/jpeg;base64") == 2  # before and after
    s3.put_object(Bucket=settings.bucket, Key=key, Body=s3.get_object(Bucket=settings.bucket, Key=keys[2])["Body"].read())
    html = page()
    assert html.count("data:image/jpeg;base64") == 1 and "re-uploaded since" in html and etag in html


def test_an_archived_photo_fails_alone_naming_the_restore_it_needs(photos, model_dir):
    """backend=local: a photo in Glacier failed read_error with S3's "The operation is not valid for the
    object's storage class"; it fails ``archived`` now, naming its class and the restore to start."""
    s3, settings, keys = photos
    cold = "raw/DE/2026/11/20/cold.jpg"
    s3.put_object(Bucket=settings.bucket, Key=cold, Body=s3.get_object(Bucket=settings.bucket, Key=keys[0])["Body"].read(),
                  StorageClass="DEEP_ARCHIVE")
    spec = RunSpec(region="DE", run_id="manual__cold", **WINDOW)
    recs = _shard_records(s3, dataclasses.replace(settings, shard_size=10, late_days=0), spec, model_dir)
    assert recs[cold]["status"] == "failed" and recs[cold]["reason"] == "archived", recs[cold]
    assert "DEEP_ARCHIVE" in recs[cold]["error"] and "RestoreObject" in recs[cold]["error"]
    assert [recs[k]["status"] for k in keys] == ["masked"] * len(keys)


def test_photos_a_retried_mask_task_finds_done_by_its_own_first_attempt_count_as_processed_this_run(photos, model_dir):
    """A mask task that died after masking some photos (a worker lost mid-shard) is retried; the retry
    skips what the first attempt finished. The QA report then said those photos were "skipped (already
    masked with this model)" by an earlier run and left them out of processed_this_run, though this run
    masked them. Only photos another run masked count as skipped now."""
    from platemask.airflow_support import detector_factory
    from platemask.runs import aggregate, mask_shard

    s3, settings, keys = photos
    settings = dataclasses.replace(settings, shard_size=10, late_days=0)
    spec = RunSpec(region="DE", run_id="manual__retried", **WINDOW)
    collect(s3, settings, spec, log=lambda m: None)
    (shard,) = make_shards(s3, settings, [spec.as_dict()], log=lambda m: None)
    factory = detector_factory(settings, str(model_dir))
    mask_shard(s3, settings, shard, factory, log=lambda m: None)  # the first attempt (its end is lost)
    retry = mask_shard(s3, settings, shard, factory, log=lambda m: None)
    assert retry["processed"] == len(keys) and retry["skipped"] == 0, retry
    (report,) = aggregate(s3, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
    bucket, key = report["report"][5:].split("/", 1)
    qa = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert qa["processed_this_run"] == len(keys) and qa["skipped_already_masked"] == 0
    # another run of the window: skipped, already masked by an earlier run
    later = RunSpec(region="DE", run_id="manual__later", **WINDOW)
    collect(s3, settings, later, log=lambda m: None)
    (shard2,) = make_shards(s3, settings, [later.as_dict()], log=lambda m: None)
    again = mask_shard(s3, settings, shard2, factory, log=lambda m: None)
    assert again["processed"] == 0 and again["skipped"] == len(keys)


def test_records_of_a_run_whose_manifest_is_now_empty_are_not_reported_as_the_windows(photos, model_dir):
    """A run masked the window, then was cleared and run again after its photos were removed from raw/
    (collect found none). QA still read the first attempt's records, and their check against the
    manifest was skipped for an empty manifest (meant for dry runs, whose manifest is not read): a
    report of 4 masked photos for a window of 0 passed, with an Asset event. They are records outside
    the manifest now, as they are for a non-empty one."""
    from platemask.airflow_support import detector_factory
    from platemask.runs import aggregate, mask_shard

    s3, settings, keys = photos
    settings = dataclasses.replace(settings, shard_size=10, late_days=0)
    spec = RunSpec(region="DE", run_id="manual__cleared", **WINDOW)
    collect(s3, settings, spec, log=lambda m: None)
    (shard,) = make_shards(s3, settings, [spec.as_dict()], log=lambda m: None)
    mask_shard(s3, settings, shard, detector_factory(settings, str(model_dir)), log=lambda m: None)
    for k in keys:  # moved away, then the whole run cleared and run again
        s3.delete_object(Bucket=settings.bucket, Key=k)
    assert collect(s3, settings, spec, log=lambda m: None)["count"] == 0
    assert make_shards(s3, settings, [spec.as_dict()], log=lambda m: None) == []
    (report,) = aggregate(s3, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
    assert not report["passed"] and any("not in the manifest" in p for p in report["problems"]), report


def test_a_photo_that_failed_for_a_reason_other_than_its_upload_is_tried_again_by_later_nights(photos):
    """A photo whose read was cut short (or whose transform job failed) on its night got a `failed`
    record; the night was green within its failure limit, and late pick-up skipped every photo with
    an unchanged record: it stayed unmasked for good unless someone reran that window. Failures the
    upload causes (a damaged file, a key too long) are left to a new upload."""
    s3, settings, keys = photos
    _collected_by_its_run(s3, settings, 19)
    body = s3.get_object(Bucket=settings.bucket, Key=keys[0])["Body"].read()
    day = "raw/DE/2026/11/19/"
    records = {"cut-read.jpg": {"status": "failed", "reason": "read_error"},
               "job-failed.jpg": {"status": "failed", "reason": "transform_job_failed"},
               "damaged.jpg": {"status": "failed", "reason": "truncated"},
               "masked.jpg": {"status": "masked"}}
    for name, rec in records.items():
        s3.put_object(Bucket=settings.bucket, Key=day + name, Body=body)
        etag = s3.head_object(Bucket=settings.bucket, Key=day + name)["ETag"].strip('"')
        s3.put_object(Bucket=settings.bucket, Key=f"audit/DE/2026/11/19/{name}.json",
                      Body=json.dumps(dict(rec, source_etag=etag)).encode())
    logs = []
    c = collect(s3, settings, RunSpec(region="DE", run_id="scheduled__20", **WINDOW), log=logs.append)
    manifest = [json.loads(x) for x in s3.get_object(Bucket=settings.bucket, Key=c["manifest"].split("/", 3)[3])["Body"]
                .read().decode().splitlines()]
    assert sorted(e["key"] for e in manifest if e.get("late")) == [day + "cut-read.jpg", day + "job-failed.jpg"]
    assert c["late"] == 2 and any("2 whose last try failed" in m for m in logs), logs


def _reasons_decode_raises() -> set[str]:
    """Every reason platemask/imageio.py writes into an ImageError, read from its source (an ``x if c
    else y`` of two reasons counts both)."""
    import ast

    import platemask.imageio as imageio_module

    reasons = set()
    for node in ast.walk(ast.parse(open(imageio_module.__file__, encoding="utf-8").read())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ImageError" and node.args:
            first = node.args[0]
            reasons |= {c.value for c in ast.walk(first) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "reason" for t in node.targets):
            reasons |= {c.value for c in ast.walk(node.value)
                        if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.isidentifier()}
    return reasons


def test_an_upload_decode_refuses_is_left_to_a_new_upload_whatever_the_reason(photos):
    """A WebP with an EXIF orientation failed 'ambiguous_orientation' (a reason decode gained later),
    which runs.UPLOAD_FAULTS did not list: the next late_days nights took the same upload again as
    'failed for a reason other than the upload itself', decoded it and failed it again, each night
    (and their logs said the failure was not the upload's). Every reason decode fails a photo with is
    the upload's own, left to a new upload."""
    s3, settings, keys = photos
    reasons = _reasons_decode_raises()
    assert {"corrupt", "ambiguous_orientation", "too_large"} <= reasons, reasons  # the source read as meant
    _collected_by_its_run(s3, settings, 19)
    body = s3.get_object(Bucket=settings.bucket, Key=keys[0])["Body"].read()
    day = "raw/DE/2026/11/19/"
    for reason in sorted(reasons):
        s3.put_object(Bucket=settings.bucket, Key=f"{day}{reason}.jpg", Body=body)
        etag = s3.head_object(Bucket=settings.bucket, Key=f"{day}{reason}.jpg")["ETag"].strip('"')
        s3.put_object(Bucket=settings.bucket, Key=f"audit/DE/2026/11/19/{reason}.jpg.json",
                      Body=json.dumps({"status": "failed", "reason": reason, "source_etag": etag}).encode())
    c = collect(s3, settings, RunSpec(region="DE", run_id="scheduled__20", **WINDOW), log=lambda m: None)
    manifest = [json.loads(x) for x in s3.get_object(Bucket=settings.bucket, Key=c["manifest"].split("/", 3)[3])["Body"]
                .read().decode().splitlines()]
    assert [e["key"] for e in manifest if e.get("late")] == [] and c["late"] == 0, manifest


def test_late_pick_up_holds_the_days_lock_so_a_backfill_run_of_that_day_waits(photos, model_dir):
    """A backfill of never-masked days runs two nights at once. The 21st's run collected the 20th's photos as late
    (no audit records yet, the 20th's lock not yet taken) and masked them without that day's lock, while the
    20th's own run took the free lock and masked the same photos beside it. Late pick-up now leaves a day no run
    of its own has collected yet to that run; the late photos of a collected day (uploaded after its run) it
    picks up under the day's lock (or leaves the day to the live run holding it), and release gives it back."""
    s3, settings, keys = photos
    settings = dataclasses.replace(settings, late_days=1)
    live = {"backfill__20", "backfill__21", "backfill__21b", "backfill__20b"}
    is_live = lambda lock: lock["run_id"] in live  # noqa: E731
    night_20 = RunSpec(region="DE", run_id="backfill__20", **WINDOW)
    night_21 = RunSpec(region="DE", run_id="backfill__21", window_start="2026-11-20T23:00:00+00:00",
                       window_end="2026-11-21T23:00:00+00:00")
    assert acquire_lock(s3, settings, night_21, is_live=is_live) is None  # the 21st's hold
    logs = []
    queued = lambda d: d == date(2026, 11, 20)  # noqa: E731 - the backfill created the 20th's run, not started yet
    c = collect(s3, settings, night_21, log=logs.append, is_live=is_live, day_pending=queued)
    assert c["late"] == 0 and c["late_days_not_collected"] == ["2026-11-20"]  # the 20th is its own run's
    assert any("2026-11-20: no run of that day has collected it yet" in m and "queued or running" in m
               for m in logs), logs
    assert "runs/DE/locks/2026-11-20.json" not in {o["Key"] for o in s3.list_objects_v2(
        Bucket=settings.bucket, Prefix="runs/DE/locks/").get("Contents", [])}  # not taken: nothing to wait for
    assert acquire_lock(s3, settings, night_20, is_live=is_live) is None  # the 20th's hold, a moment later
    assert _mask(s3, settings, night_20, model_dir) == (4, 0)  # its own day, all of it
    assert release_lock(s3, settings, night_20) and release_lock(s3, settings, night_21)
    # a photo of the 20th without a record now (uploaded after its run): the 21st's next run takes it late,
    # under the 20th's lock, so a rerun of the 20th waits
    s3.delete_object(Bucket=settings.bucket, Key="audit/DE/2026/11/20/car0.jpg.json")
    night_21b = dataclasses.replace(night_21, run_id="backfill__21b")
    assert acquire_lock(s3, settings, night_21b, is_live=is_live) is None
    c = collect(s3, settings, night_21b, log=lambda m: None, is_live=is_live)
    assert c["late"] == 1 and c["late_days_not_collected"] == []
    night_20b = dataclasses.replace(night_20, run_id="backfill__20b")
    held = acquire_lock(s3, settings, night_20b, is_live=is_live)
    assert held is not None and held["run_id"] == "backfill__21b" and held["day"] == "2026-11-20"
    assert _mask(s3, settings, night_21b, model_dir) == (1, 0)  # (collects again: its own lock, the same photo)
    assert release_lock(s3, settings, night_21b)
    assert json.loads(s3.get_object(Bucket=settings.bucket, Key="runs/DE/locks/2026-11-20.json")["Body"].read())[
        "state"] == "released"
    assert acquire_lock(s3, settings, night_20b, is_live=is_live) is None  # now the 20th's rerun goes on
    assert _mask(s3, settings, night_20b, model_dir) == (0, 4)  # done once: nothing masked twice
    # the other way round: the 20th's rerun holds its day, so the 21st leaves its photos to it
    night_21c = dataclasses.replace(night_21, run_id="backfill__21c")
    live.add("backfill__21c")
    s3.delete_object(Bucket=settings.bucket, Key="audit/DE/2026/11/20/car0.jpg.json")
    assert collect(s3, settings, night_21c, log=lambda m: None, is_live=is_live)["late"] == 0
    # a dry run takes no lock: it only looks
    assert release_lock(s3, settings, night_20b)
    dry = dataclasses.replace(night_21, run_id="manual__dry", dry_run=True)
    assert collect(s3, settings, dry, log=lambda m: None, is_live=is_live)["late"] == 1
    assert json.loads(s3.get_object(Bucket=settings.bucket, Key="runs/DE/locks/2026-11-20.json")["Body"].read())[
        "run_id"] == "backfill__20b"


def test_a_cleared_run_cut_into_fewer_shards_is_not_failed_by_its_first_tries_records(photos, model_dir):
    """A run was cleared and run again after one of its photos was removed from raw/ (or shard_size was raised
    in the Variable): its manifest was cut into fewer shards, and the first try's detections of the shard index
    no longer cut stayed under the run's folder. QA read them too: their photos, recorded again by the new
    shards, had two records each, and a run that masked every photo of its window failed, for good (every clear
    failed the same way). Records of shards the current cut no longer has count only where no current shard
    covers their photo (records outside the manifest still fail the run)."""
    from platemask.airflow_support import detector_factory
    from platemask.runs import aggregate, mask_shard

    s3, settings, keys = photos
    body = s3.get_object(Bucket=settings.bucket, Key=keys[0])["Body"].read()
    s3.put_object(Bucket=settings.bucket, Key="raw/DE/2026/11/20/car4.jpg", Body=body)
    settings = dataclasses.replace(settings, late_days=0)
    spec = RunSpec(region="DE", run_id="manual__cleared", **WINDOW)
    factory = detector_factory(settings, str(model_dir))

    def run():
        collect(s3, settings, spec, log=lambda m: None)
        shards = make_shards(s3, settings, [spec.as_dict()], log=lambda m: None)
        for sh in shards:
            mask_shard(s3, settings, sh, factory, log=lambda m: None)
        (report,) = aggregate(s3, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
        return shards, report

    shards, report = run()
    assert len(shards) == 3 and report["passed"] and report["photos"] == 5
    s3.delete_object(Bucket=settings.bucket, Key=keys[0])  # removed from raw/, then the run is cleared
    shards, report = run()
    assert len(shards) == 2
    assert report["passed"], report["problems"]
    assert report["photos"] == 4 and report["by_status"]["failed"] == 0
    qa = json.loads(s3.get_object(Bucket=settings.bucket, Key=report["report"].split("/", 3)[3])["Body"].read())
    assert qa["duplicate_records"] == 0 and qa["records_outside_manifest"] == 0 and len(qa["shards"]) == 2


def test_a_cleared_runs_first_try_record_of_an_earlier_upload_does_not_pass_for_the_new_one(photos, model_dir):
    """A run masked its window, a photo was re-uploaded, and the run was cleared: collect listed the new upload,
    but the new try's task for that photo's shard failed for good. QA read the first try's detections at the
    same shard index: the photo counted as masked (of the old upload), the region's QA passed and its Asset
    event said the window was masked, the new upload unmasked. Only a record of the upload the manifest lists
    counts; this one is shard_failed."""
    from platemask.airflow_support import detector_factory
    from platemask.runs import aggregate, mask_shard

    s3, settings, keys = photos
    settings = dataclasses.replace(settings, late_days=0)
    spec = RunSpec(region="DE", run_id="manual__cleared", **WINDOW)
    factory = detector_factory(settings, str(model_dir))
    collect(s3, settings, spec, log=lambda m: None)
    first = make_shards(s3, settings, [spec.as_dict()], log=lambda m: None)
    mask_shard(s3, settings, first[0], factory, log=lambda m: None)
    mask_shard(s3, settings, first[1], factory, log=lambda m: None)
    body = s3.get_object(Bucket=settings.bucket, Key=keys[1])["Body"].read()
    s3.put_object(Bucket=settings.bucket, Key=keys[0], Body=body)  # re-uploaded, then the run is cleared
    collect(s3, settings, spec, log=lambda m: None)
    again = make_shards(s3, settings, [spec.as_dict()], log=lambda m: None)
    mask_shard(s3, settings, again[1], factory, log=lambda m: None)  # shard 0's task fails for good this time
    (report,) = aggregate(s3, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
    qa = json.loads(s3.get_object(Bucket=settings.bucket, Key=report["report"].split("/", 3)[3])["Body"].read())
    reasons = {i["key"]: reason for reason, f in qa["failures_by_reason"].items() for i in f["items"]}
    assert reasons.get(keys[0]) == "shard_failed", qa["failures_by_reason"]
    assert not report["passed"] and report["by_status"]["masked"] == 3


def test_a_cleared_mask_task_takes_its_late_days_locks_again_or_refuses(photos, monkeypatch):
    """The 21st's run picked up the 20th's photos as late under the 20th's lock, failed, and gave its locks
    back; a run of the 20th then took that day. Clearing the 21st's failed mask task (what the alert says)
    took the 21st's own lock again and masked the 20th's photos beside the 20th's run. The mask step now
    also takes the locks of the days whose late photos its collect picked up, or refuses naming the run;
    a day with no late photo is not kept from its own runs meanwhile."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    import platemask.airflow_support as support

    s3, settings, _ = photos
    settings = dataclasses.replace(settings, late_days=2)
    _collected_by_its_run(s3, settings, 19, 20)  # the 20th's run collected its photos, then failed unrecorded
    monkeypatch.setattr(support, "s3_client", lambda _settings: s3)
    night_21 = RunSpec(region="DE", run_id="scheduled__21", window_start="2026-11-20T23:00:00+00:00",
                       window_end="2026-11-21T23:00:00+00:00")
    night_20 = RunSpec(region="DE", run_id="backfill__20", **WINDOW)
    live = {night_21.run_id}
    is_live = lambda lock: lock.get("run_id") in live  # noqa: E731
    monkeypatch.setattr(support, "_run_is_live", lambda dag_id: is_live)
    context = {"dag_run": SimpleNamespace(dag_id="plate_masking_de")}
    assert acquire_lock(s3, settings, night_21, is_live=is_live) is None
    assert collect(s3, settings, night_21, log=lambda m: None, is_live=is_live)["late"] == 4
    day_19 = json.loads(s3.get_object(Bucket=settings.bucket, Key="runs/DE/locks/2026-11-19.json")["Body"].read())
    assert day_19["state"] == "released"  # no late photo that day: given back at once
    support.hold_lock_to_mask(context, settings, night_21.as_dict())  # its own run: re-entrant
    assert release_lock(s3, settings, night_21)  # the 21st's run failed; release gave its locks back
    support.hold_lock_to_mask(context, settings, night_21.as_dict())  # cleared at once: no other run since
    day_20 = json.loads(s3.get_object(Bucket=settings.bucket, Key="runs/DE/locks/2026-11-20.json")["Body"].read())
    assert (day_20["run_id"], day_20["state"]) == (night_21.run_id, "held")
    assert release_lock(s3, settings, night_21)
    live = {night_20.run_id}
    assert acquire_lock(s3, settings, night_20, is_live=is_live) is None  # the 20th's run masks that day now
    with pytest.raises(AirflowFailException, match="backfill__20.*must not mask one window at once"):
        support.hold_lock_to_mask(context, settings, night_21.as_dict())  # the 21st's mask task, cleared
    live = set()  # the 20th's run has finished: it masked its day, the 21st's late pick-up of it is stale
    assert release_lock(s3, settings, night_20)
    with pytest.raises(AirflowFailException, match="run backfill__20 .*has had region DE day 2026-11-20"):
        support.hold_lock_to_mask(context, settings, night_21.as_dict())
    day_20 = json.loads(s3.get_object(Bucket=settings.bucket, Key="runs/DE/locks/2026-11-20.json")["Body"].read())
    assert (day_20["run_id"], day_20["state"]) == (night_20.run_id, "released")


def test_a_day_masked_before_collect_marked_days_still_has_late_photos(photos, model_dir):
    """Late pick-up takes only days a run of their own has collected, by the marker collect writes. A day masked
    by a version that wrote no marker has none, so a photo uploaded into it late would have waited for a run of
    that day that had long happened: never masked, no record. Its nightly window's latest QA report counts too."""
    from platemask.runs import aggregate, day_collected_key

    s3, settings, keys = photos
    settings = dataclasses.replace(settings, late_days=2)  # the 20th is not the 21st's last late day
    night_20 = RunSpec(region="DE", run_id="scheduled__20", **WINDOW)
    assert acquire_lock(s3, settings, night_20, is_live=lambda lock: True) is None
    assert _mask(s3, settings, night_20, model_dir) == (4, 0)
    (report,) = aggregate(s3, settings, [night_20.as_dict()], run_id=night_20.run_id, log=lambda m: None)
    assert report["latest"] and release_lock(s3, settings, night_20)
    from datetime import date

    s3.delete_object(Bucket=settings.bucket, Key=day_collected_key(settings, "DE", date(2026, 11, 20)))  # as before
    body = s3.get_object(Bucket=settings.bucket, Key=keys[0])["Body"].read()
    s3.put_object(Bucket=settings.bucket, Key="raw/DE/2026/11/20/late.jpg", Body=body)
    night_21 = RunSpec(region="DE", run_id="scheduled__21", window_start="2026-11-20T23:00:00+00:00",
                       window_end="2026-11-21T23:00:00+00:00")
    c = collect(s3, settings, night_21, log=lambda m: None, is_live=lambda lock: False)
    assert c["late"] == 1 and c["late_days_not_collected"] == []


def test_a_missed_night_is_picked_up_as_late_on_the_last_night_that_reaches_it(photos):
    """The nightly DAGs run with catchup off: a night the scheduler missed gets no run. Its day then had
    no marker of a run of its own, and late pick-up left it to that run for ever: its photos were never
    masked and had no record (only report.json's late_days_not_collected named the day). It is now left
    to its own run only while one is queued or running, or a later night can still reach it; the night
    that ends its late days picks it up."""
    s3, settings, keys = photos
    settings = dataclasses.replace(settings, late_days=2)
    night = lambda day, run_id: RunSpec(region="DE", run_id=run_id, window_start=f"2026-11-{day - 1}T23:00:00+00:00",  # noqa: E731
                                        window_end=f"2026-11-{day}T23:00:00+00:00")
    nobody = lambda d: False  # noqa: E731 - no run of the 20th is queued or running: the night was missed
    c = collect(s3, settings, night(21, "scheduled__21"), log=lambda m: None, is_live=lambda lock: False,
                day_pending=nobody)
    assert c["late"] == 0 and c["late_days_not_collected"] == ["2026-11-20"]  # the 22nd's night can still reach it
    logs = []
    queued = collect(s3, settings, night(22, "scheduled__22a"), log=logs.append, is_live=lambda lock: False,
                     day_pending=lambda d: d == date(2026, 11, 20))  # a backfill of the 20th is queued: its own
    assert queued["late"] == 0 and "2026-11-20" in queued["late_days_not_collected"], logs
    release_lock(s3, settings, night(22, "scheduled__22a"))
    logs = []
    c = collect(s3, settings, night(22, "scheduled__22"), log=logs.append, is_live=lambda lock: False,
                day_pending=nobody)
    manifest = [json.loads(x) for x in s3.get_object(Bucket=settings.bucket, Key=c["manifest"].split("/", 3)[3])["Body"]
                .read().decode().splitlines()]
    assert sorted(e["key"] for e in manifest if e.get("late")) == sorted(k for k in keys if "/2026/11/20/" in k)
    assert c["late"] == len(keys) and "2026-11-20" not in c["late_days_not_collected"]
    assert any("2026-11-20: no run of that day has collected it" in m and "last night" in m for m in logs), logs


def test_a_next_nights_look_that_took_nothing_does_not_keep_a_cleared_task_from_its_days(photos, model_dir,
                                                                                         monkeypatch):
    """A cleared mask (or qa) task takes its day locks again only where no other run has had them since. The
    next night's late pick-up takes each late day's lock to look, and gave it back released in its own name
    when it found nothing there: the 20th's failed task, cleared after the 21st's night (a Friday failure
    cleared on Monday), was refused as superseded by a run that had masked nothing of its day. A look that
    took nothing now puts back the lock as it was (naming the 20th's run), with who looked."""
    from types import SimpleNamespace

    from platemask import airflow_support as support

    s3, settings, keys = photos
    settings = dataclasses.replace(settings, late_days=1)
    monkeypatch.setattr(support, "s3_client", lambda _settings: s3)
    monkeypatch.setattr(support, "_run_is_live", lambda dag_id: (lambda lock: False))
    context = {"dag_run": SimpleNamespace(dag_id="plate_masking_de")}
    night_20 = RunSpec(region="DE", run_id="scheduled__20", **WINDOW)
    night_21 = RunSpec(region="DE", run_id="scheduled__21", window_start="2026-11-20T23:00:00+00:00",
                       window_end="2026-11-21T23:00:00+00:00")
    assert acquire_lock(s3, settings, night_20, is_live=lambda lock: False) is None
    assert _mask(s3, settings, night_20, model_dir) == (4, 0)
    assert release_lock(s3, settings, night_20)  # the 20th's run failed later on (say, its qa task): released
    assert acquire_lock(s3, settings, night_21, is_live=lambda lock: False) is None
    logs = []
    assert collect(s3, settings, night_21, log=logs.append, is_live=lambda lock: False)["late"] == 0
    assert release_lock(s3, settings, night_21)
    day_20 = json.loads(s3.get_object(Bucket=settings.bucket, Key="runs/DE/locks/2026-11-20.json")["Body"].read())
    assert (day_20["run_id"], day_20["state"], day_20["looked"]["run_id"]) == (night_20.run_id, "released",
                                                                                night_21.run_id), day_20
    support.hold_lock_to_mask(context, settings, night_20.as_dict())  # the 20th's task, cleared: not refused
    day_20 = json.loads(s3.get_object(Bucket=settings.bucket, Key="runs/DE/locks/2026-11-20.json")["Body"].read())
    assert (day_20["run_id"], day_20["state"]) == (night_20.run_id, "held")
