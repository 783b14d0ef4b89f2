"""Fault injection on the nightly path (issue 10, "Proof").

Real parts: moto's S3 server behind a fault-injecting HTTP proxy (tests/fault_proxy.py) that the DAG's
own S3 client reaches through the Airflow connection, ``dag.test()`` for run states and Asset events,
the shipped model, a worker process killed with SIGKILL. Every scenario ends in one invariant check
(``check_run``): the run's final state, every input exactly one record, nothing failed published,
nothing published without its audit record (whose ``output_sha256`` is the published bytes), QA
counts equal to the manifest, originals untouched, Asset events exactly for the regions that passed.

``scripts/fault_table.py`` runs this file and prints the table of outcomes the README carries
(each scenario adds its row through the ``fault_table`` fixture).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import unquote

import numpy as np
import pytest

from conftest import ROOT, jpeg_bytes
from fault_proxy import FaultProxy, Request, always, first_attempt
from platemask.runspec import run_key
from test_dag import _asset_events, _objects, load_dag

DE_20 = "20261119T2300Z-20261120T2300Z"  # 2026-11-20 in Europe/Berlin, in UTC
DE_19 = "20261118T2300Z-20261119T2300Z"
PL_20 = "20261119T2300Z-20261120T2300Z"
NIGHT_OF_20 = datetime(2026, 11, 21, 1, tzinfo=timezone.utc)  # the nightly run that masks the 20th
DE = {"region": "DE", "window_start": "2026-11-20", "window_end": "2026-11-21", "max_failure_rate": 0.5}


# ------------------------------------------------------------------ the scenario's world

@dataclass
class World:
    s3: object  # a direct client to moto (setup and checks never go through the faults)
    bucket: str
    keys: dict
    proxy: FaultProxy
    monkeypatch: object

    def photo(self, key: str, seed: int = 0) -> str:
        from platemask.training.synth import synth_car_scene

        img, _, _ = synth_car_scene(np.random.default_rng(seed), size=(240, 320), plate_width=(50, 70))
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=jpeg_bytes(img))
        return key

    def raw(self) -> dict:
        return {k: v[0] for k, v in _objects(self.s3, self.bucket, "raw/").items()}

    def read(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def json(self, key: str):
        return json.loads(self.read(key))


@pytest.fixture
def world(aws_conn, moto_server, monkeypatch, airflow_db):
    """A bucket of small photos (DE: one on the 19th, two on the 20th; PL: one on the 20th), the DAG's
    S3 connection pointed at a fault proxy in front of moto, one shard per region, no task retries."""
    s3 = aws_conn
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    proxy = FaultProxy(moto_server)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": proxy.url, "region_name": "us-east-1"}}))
    for k, v in {"PLATEMASK_BUCKET": bucket, "PLATEMASK_DEADLINE_HOURS": "0", "PLATEMASK_SHARD_SIZE": "10",
                 "PLATEMASK_LATE_DAYS": "0", "PLATEMASK_RETRIES": "0", "PLATEMASK_IO_WORKERS": "4",
                 "PLATEMASK_LOCK_WAIT_MINUTES": "0", "PLATEMASK_REGIONS": "DE,PL"}.items():
        monkeypatch.setenv(k, v)
    w = World(s3, bucket, {}, proxy, monkeypatch)
    for i, (region, day) in enumerate((("DE", "19"), ("DE", "20"), ("DE", "20"), ("PL", "20"))):
        n = len(w.keys.get((region, day), []))
        w.keys.setdefault((region, day), []).append(w.photo(f"raw/{region}/2026/11/{day}/car{n}.jpg", seed=i))
    yield w
    proxy.close()


@pytest.fixture(scope="session")
def fault_table():
    """Rows of the README's fault table; written as JSON to $PLATEMASK_FAULT_TABLE when set."""
    rows: list[dict] = []
    yield rows
    out = os.environ.get("PLATEMASK_FAULT_TABLE")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)


# ------------------------------------------------------------------ the one invariant check

def _lines(w: World, key: str) -> list[dict]:
    return [json.loads(x) for x in w.read(key).decode().splitlines() if x.strip()]


def _run_records(w: World, region: str, window: str, run_id: str) -> list[dict]:
    prefix = f"runs/{region}/{window}/{run_key(run_id)}/detections/"
    return [r for k in sorted(_objects(w.s3, w.bucket, prefix)) if k.endswith(".jsonl") for r in _lines(w, k)]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_run(w: World, fault_table: list, scenario: str, *, run_id: str, state: str, expect_state: str,
              regions: dict[str, str], events: list[str], expect_events: list[str], raw_before: dict,
              expect_failed: dict[str, str] | None = None, not_collected: tuple[str, ...] = (),
              note: str = "") -> dict:
    """Assert the invariants of one run and add its row to the table.

    ``regions``: region -> window the run planned; ``events``: the regions it emitted Asset events
    for; ``expect_failed``: raw key -> reason of the photos that must fail (all others must not).
    """
    expect_failed = expect_failed or {}
    assert state == expect_state, f"{scenario}: run state {state}, expected {expect_state}"
    inputs = records = published = failed = lost = 0
    for region, window in regions.items():
        own = f"qa/{region}/{window}/runs/{run_key(run_id)}/report.json"
        report = w.json(own)
        if region in not_collected:
            assert report["collected"] is False and not report["verdict"]["passed"]
            assert not _objects(w.s3, w.bucket, f"runs/{region}/{window}/{run_key(run_id)}/detections/")
            continue
        manifest = [e["key"] for e in _lines(w, f"runs/{region}/{window}/{run_key(run_id)}/manifest.jsonl")]
        recs = _run_records(w, region, window, run_id)
        by_key: dict[str, list[dict]] = {}
        for r in recs:
            by_key.setdefault(r["key"], []).append(r)
        # every input exactly one record, no record for anything else
        assert sorted(by_key) == sorted(manifest), f"{scenario} {region}: records {sorted(by_key)} != manifest {manifest}"
        assert all(len(v) == 1 for v in by_key.values()), f"{scenario} {region}: duplicate records"
        lost += sum(len(by_key.get(k, [])) != 1 for k in manifest)
        masked = _objects(w.s3, w.bucket, f"masked/{region}/")
        for key, (rec,) in by_key.items():
            out = key.replace("raw/", "masked/", 1)
            if rec["status"] == "failed":
                failed += 1
                assert expect_failed.get(key) == rec["reason"], f"{scenario}: unexpected failure {rec}"
                assert out not in masked, f"{scenario}: failed photo {key} is published"  # fail closed
            else:
                assert key not in expect_failed, f"{scenario}: {key} should have failed: {rec}"
                assert out in masked, f"{scenario}: {key} {rec['status']} but not published"
                assert rec["output_sha256"] == _sha(w.read(out)), f"{scenario}: {out} is not what its record says"
                published += 1
        # QA counts equal the manifest and the records
        counts = {s: sum(r["status"] == s for r in recs) for s in ("masked", "no_plate", "failed")}
        assert report["images"] == len(manifest) == sum(report["by_status"].values())
        assert report["by_status"] == counts and report["not_accounted_for"] == 0 and report["duplicate_records"] == 0
        inputs += len(manifest)
        records += len(recs)
    assert set(expect_failed) <= {k for r, win in regions.items() if r not in not_collected
                                  for k in (x["key"] for x in _run_records(w, r, win, run_id))}
    # nothing published without its record: every masked copy in the bucket has an audit record that
    # describes exactly these bytes
    for out in _objects(w.s3, w.bucket, "masked/"):
        audit = w.json(out.replace("masked/", "audit/", 1) + ".json")
        ok = audit["status"] != "failed" and audit["masked_key"] == out and audit["output_sha256"] == _sha(w.read(out))
        if not ok:
            lost += 1
        assert ok, f"{scenario}: {out} is published without a matching audit record: {audit}"
    assert w.raw() == raw_before, f"{scenario}: originals changed"
    assert sorted(events) == sorted(expect_events), f"{scenario}: Asset events for {events}, expected {expect_events}"
    row = {"scenario": scenario, "state": state, "inputs": inputs, "records": records, "published": published,
           "failed": failed, "lost": lost, "events": ",".join(sorted(set(events))) or "none", "note": note}
    fault_table.append(row)
    return row


def event_regions(run_id: str, bucket: str) -> list[str]:
    """Regions with both Asset events (masked and qa) from this run; their extra names this run."""
    events = _asset_events(run_id)
    regions = sorted({e["region"] for _, e in events})
    for r in regions:
        assert sorted(u.rstrip("/") for u, e in events if e["region"] == r) == [f"s3://{bucket}/masked", f"s3://{bucket}/qa"]
    assert all(e["run_id"] == run_id for _, e in events)
    return regions


def run_dag(w: World, conf: dict, **kw):
    """One dag.test() run of a freshly parsed DAG (dag.test keeps the last conf in its params)."""
    dr = load_dag(w.monkeypatch).test(run_conf=conf, **kw)
    return dr, event_regions(dr.run_id, w.bucket)


# ------------------------------------------------------------------ transient faults: survived by retries

def _everything(req: Request) -> bool:
    return True


def _storm_on_one_upload(req: Request) -> bool:
    return req.method == "PUT" and req.key == "masked/DE/2026/11/20/car0.jpg"


TRANSIENT = {  # scenario -> its fault policies, made fresh per run (the first that faults a request wins)
    # (throttling: botocore backs off 1 s and adaptive mode slows the client down, so photo writes only)
    "503 SlowDown on every photo write": lambda: [first_attempt(
        lambda r: r.method == "PUT" and r.key.startswith(("masked/", "audit/")), ("status", 503, "SlowDown"))],
    # and ten 500s in a row on one masked copy's upload: more than the client's 9 attempts (8 retries), so the
    # write is retried within the run (S3Store.write) instead of failing the photo
    "500 InternalError on every read, 10 in a row on one upload": lambda: [
        always(_storm_on_one_upload, ("status", 500, "InternalError"), times=10),
        first_attempt(lambda r: r.method in ("GET", "HEAD"), ("status", 500, "InternalError"))],
    "connection reset on every request": lambda: [first_attempt(_everything, "reset")],
    "upload cut mid-body on every write": lambda: [
        first_attempt(lambda r: r.method == "PUT" and int(r.headers.get("content-length") or 0) > 0, "cut")],
    # S3 resets long downloads mid-body; botocore retries a request, never a body half read (nor an error
    # answer half read: a 404 for a photo without an audit record), so the storage layer reads again
    "download cut mid-body on every object read": lambda: [
        first_attempt(lambda r: r.method == "GET" and bool(r.key), "short")],
}


@pytest.mark.parametrize("scenario", list(TRANSIENT))
def test_transient_faults_are_survived_and_the_run_is_complete(world, fault_table, scenario):
    """The first attempt of every matching request fails; the client's retries (and the in-run write
    retry) make the run whole: no photo fails."""
    w = world
    before = w.raw()
    policies = TRANSIENT[scenario]()
    w.proxy.fault = lambda req: next((f for f in (p(req) for p in policies) if f is not None), None)
    dr, events = run_dag(w, DE)
    check_run(w, fault_table, scenario, run_id=dr.run_id, state=dr.state, expect_state="success",
              regions={"DE": DE_20}, events=events, expect_events=["DE"], raw_before=before,
              note=f"{w.proxy.faults()} faults injected")
    assert w.proxy.faults() >= 4, w.proxy.seen  # the faults really hit the run's requests
    if "10 in a row" in scenario:
        assert sum(op == "PUT" and k == "masked/DE/2026/11/20/car0.jpg" and f is not None
                   for op, k, f in w.proxy.seen) == 10


def test_the_in_run_write_retry_is_bounded_and_only_for_transient_errors(world):
    from botocore.config import Config
    from botocore.exceptions import ClientError

    import boto3
    from platemask.storage import S3Store

    w = world
    client = boto3.client("s3", endpoint_url=w.proxy.url, region_name="us-east-1",
                          config=Config(retries={"mode": "adaptive", "total_max_attempts": 2}))
    store = S3Store(w.bucket, client=client)
    store.retry_delay = 0.01

    def puts(key):
        return sum(op == "PUT" and k == key for op, k, _ in w.proxy.seen)

    w.proxy.fault = always(lambda r: r.key == "denied", ("status", 403, "AccessDenied"))
    with pytest.raises(ClientError, match="AccessDenied"):
        store.write("denied", b"x")
    assert puts("denied") == 1  # not transient: not retried at all
    w.proxy.fault = always(lambda r: r.key == "down", ("status", 503, "ServiceUnavailable"))
    with pytest.raises(ClientError, match="ServiceUnavailable"):
        store.write("down", b"x")
    assert puts("down") == 3 * 2  # the client's 2 attempts, 3 times: bounded
    w.proxy.fault = always(lambda r: r.key == "storm", "reset", times=3)
    store.write("storm", b"x")  # 2 resets spend the client's attempts, the in-run retry gets through
    assert w.read("storm") == b"x" and puts("storm") == 4


# ------------------------------------------------------------------ permanent per-photo faults

def test_a_permanent_audit_write_failure_fails_that_photo_alone_and_unpublishes_it(world, fault_table):
    w = world
    before = w.raw()
    bad = w.keys[("DE", "20")][1]
    audit = bad.replace("raw/", "audit/", 1) + ".json"
    w.proxy.fault = always(lambda r: r.method == "PUT" and r.key == audit, ("status", 500, "InternalError"))
    dr, events = run_dag(w, DE)
    rec = {r["key"]: r for r in _run_records(w, "DE", DE_20, dr.run_id)}[bad]
    assert audit in rec["error"] and "removed" in rec["error"] and not rec.get("unaudited_masked_copy")
    check_run(w, fault_table, "permanent audit-write failure (one photo)", run_id=dr.run_id, state=dr.state,
              expect_state="success", regions={"DE": DE_20}, events=events, expect_events=["DE"], raw_before=before,
              expect_failed={bad: "audit_write_failed"}, note="its masked copy removed; shard goes on")


def test_an_over_long_key_fails_that_photo_alone_before_anything_is_written(world, fault_table):
    w = world
    long_key = w.photo("raw/DE/2026/11/20/" + "x" * 998 + ".jpg", seed=9)  # legal (1,020 bytes); its audit key is not
    before = w.raw()
    dr, events = run_dag(w, DE)
    assert not any(len(k.encode()) > 1024 for _, k, _ in w.proxy.seen)  # never even tried (the proxy refuses like S3)
    check_run(w, fault_table, "over-long key (1,020-byte photo key)", run_id=dr.run_id, state=dr.state,
              expect_state="success", regions={"DE": DE_20}, events=events, expect_events=["DE"], raw_before=before,
              expect_failed={long_key: "key_too_long"})


# ------------------------------------------------------------------ run-level faults

def test_a_plan_failure_fails_the_run_with_nothing_written(world, fault_table):
    w = world
    before = w.raw()
    dr, events = run_dag(w, {"region": "DE", "window_start": "2026-11-21", "window_end": "2026-11-20"})
    assert _objects(w.s3, w.bucket, "runs/") == {} and _objects(w.s3, w.bucket, "qa/") == {}
    check_run(w, fault_table, "plan failure (inverted window)", run_id=dr.run_id, state=dr.state,
              expect_state="failed", regions={}, events=events, expect_events=[], raw_before=before)


def test_a_collect_failure_fails_the_run_and_only_healthy_regions_publish(world, fault_table):
    w = world
    before = w.raw()
    w.proxy.fault = always(lambda r: r.op == "LIST" and "prefix=raw/PL/" in unquote(r.query), ("status", 403, "AccessDenied"))
    dr, events = run_dag(w, {"max_failure_rate": 0.5}, logical_date=NIGHT_OF_20)
    check_run(w, fault_table, "collect failure (PL listing denied)", run_id=dr.run_id, state=dr.state,
              expect_state="failed", regions={"DE": DE_20, "PL": PL_20}, events=events, expect_events=["DE"],
              raw_before=before, not_collected=("PL",), note="PL reported not collected")


def mask_window(w: World, spec) -> list[dict]:
    """The DAG's collect, shard, mask and QA steps for one region-window, through the DAG's S3 client,
    without Airflow (a night's run that is not the scenario itself); returns the QA reports."""
    from platemask.airflow_support import detector_factory, s3_client
    from platemask.runs import aggregate, collect, make_shards, mask_shard
    from platemask.settings import Settings

    settings = Settings.load()
    client, quiet = s3_client(settings), (lambda m: None)
    collect(client, settings, spec, log=quiet)
    for shard in make_shards(client, settings, [spec.as_dict()], log=quiet):
        mask_shard(client, settings, shard, detector_factory(settings), log=quiet)
    return aggregate(client, settings, [spec.as_dict()], run_id=spec.run_id, log=quiet)


def test_a_late_upload_is_masked_by_the_next_night(world, fault_table):
    from platemask.runspec import RunSpec

    w = world
    w.monkeypatch.setenv("PLATEMASK_LATE_DAYS", "3")
    (night_19,) = mask_window(w, RunSpec(region="DE", run_id="scheduled__2026-11-20T01:00:00+00:00",
                                         window_start="2026-11-18T23:00:00+00:00", window_end="2026-11-19T23:00:00+00:00"))
    assert night_19["passed"] and night_19["photos"] == 1
    late = w.photo("raw/DE/2026/11/19/late.jpg", seed=5)  # uploaded after the 19th's run
    before = w.raw()
    dr, events = run_dag(w, {"region": "DE", "max_failure_rate": 0.5}, logical_date=NIGHT_OF_20)
    report = w.json(f"qa/DE/{DE_20}/runs/{run_key(dr.run_id)}/report.json")
    assert report["late"] == 1 and late in {r["key"] for r in _run_records(w, "DE", DE_20, dr.run_id)}
    assert w.json(late.replace("raw/", "audit/", 1) + ".json")["run_id"] == dr.run_id
    check_run(w, fault_table, "late upload (into the 19th, after its run)", run_id=dr.run_id, state=dr.state,
              expect_state="success", regions={"DE": DE_20}, events=events, expect_events=["DE"], raw_before=before,
              note="picked up by the next night (late: 1)")


# ------------------------------------------------------------------ concurrency

def _db_is_live(lock: dict) -> bool:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.query(DagRun).filter(DagRun.run_id == lock.get("run_id"),
                                            DagRun.state.in_(["queued", "running"])).count() > 0


def _second_run(w: World, conf: dict, run_id: str) -> dict:
    """What the DAG's plan and hold steps do for a second run of the window (without Airflow's
    scheduler: dag.test runs one run at a time): plan, then take the region-window lock or fail
    naming the run that holds it; a dry run takes no lock and collects and shards its own manifest."""
    from platemask.airflow_support import lock_wait_message
    from platemask.runs import acquire_lock, aggregate, collect, make_shards
    from platemask.runspec import plan_runs
    from platemask.settings import Settings

    settings = Settings.load()
    specs = plan_runs(settings, conf, run_id=run_id, data_interval_end=NIGHT_OF_20)
    blocking = [held for s in specs if not s.dry_run
                and (held := acquire_lock(w.s3, settings, s, is_live=_db_is_live, log=lambda m: None)) is not None]
    if blocking:
        return {"state": "failed", "message": lock_wait_message(blocking, settings)}
    collected = [collect(w.s3, settings, s, log=lambda m: None)["count"] for s in specs]
    make_shards(w.s3, settings, [s.as_dict() for s in specs], log=lambda m: None)
    reports = aggregate(w.s3, settings, [s.as_dict() for s in specs], run_id=run_id, log=lambda m: None)
    return {"state": "success", "collected": collected, "reports": reports}


def _during_masking(w: World, *others) -> list[dict]:
    """Run each of ``others`` once, in order, while the nightly run uploads its first masked copy."""
    out: list[dict] = []

    def policy(req: Request):
        if not out and req.method == "PUT" and req.key.startswith("masked/"):
            out.extend(run() for run in others)
        return None

    w.proxy.fault = policy
    return out


@pytest.mark.parametrize("scenario", ["two concurrent runs of one window", "manual max_images run during the nightly"])
def test_a_second_run_of_the_window_never_shortens_the_nightly_one(world, fault_table, scenario):
    w = world
    before = w.raw()
    other = f"manual__second-{uuid.uuid4().hex[:6]}"
    manual = "max_images" in scenario
    conf = {"region": "DE", "max_images": 1} if manual else {"region": "DE"}
    others = [lambda: _second_run(w, conf, other)]
    if manual:  # and a manual dry run with max_images at the same time: no lock, its own files
        others.append(lambda: _second_run(w, dict(conf, dry_run=True), other + "-dry"))
    seconds = _during_masking(w, *others)
    dr, events = run_dag(w, {"region": "DE", "max_failure_rate": 0.5}, logical_date=NIGHT_OF_20)
    assert len(seconds) == len(others), "the second run never ran during the nightly one"
    b = seconds[0]
    assert b["state"] == "failed" and f"is being masked by run {dr.run_id}" in b["message"], b
    assert not _objects(w.s3, w.bucket, f"runs/DE/{DE_20}/{run_key(other)}/")  # the blocked run wrote nothing
    if manual:
        d = seconds[1]
        assert d["state"] == "success" and d["collected"] == [1] and d["reports"][0]["dry_run"], d
    lock = w.json("runs/DE/locks/2026-11-20.json")
    assert lock["run_id"] == dr.run_id and lock["state"] == "released"
    assert w.json(f"qa/DE/{DE_20}/report.json")["run_id"] == dr.run_id  # the latest report is the nightly's
    row = check_run(w, fault_table, scenario, run_id=dr.run_id, state=f"{dr.state} / second: {b['state']}",
                    expect_state="success / second: failed", regions={"DE": DE_20}, events=events,
                    expect_events=["DE"], raw_before=before,
                    note="the second run fails naming the holder" + ("; a dry run alongside: own files" if manual else ""))
    assert row["inputs"] == len(w.keys[("DE", "20")])  # full coverage


# ------------------------------------------------------------------ a worker killed mid-shard

WORKER = """
import json, sys
from platemask import runs
from platemask.airflow_support import detector_factory, s3_client
from platemask.settings import Settings
settings = Settings.load()
runs.mask_shard(s3_client(settings), settings, json.loads(sys.argv[1]), detector_factory(settings))
"""


def test_a_worker_killed_mid_shard_then_retried_leaves_every_photo_exactly_one_record(world, fault_table):
    """SIGKILL while the worker writes the second photo's audit record (its masked copy already
    uploaded), then the task's retry: the retry redoes what has no matching record, and the run
    ends with every photo exactly one record and nothing published without one."""
    from platemask.airflow_support import detector_factory, s3_client
    from platemask.runs import aggregate, asset_extra, check_reports, collect, make_shards, mask_shard
    from platemask.runspec import RunSpec
    from platemask.settings import Settings

    w = world
    for i in range(2, 4):
        w.photo(f"raw/DE/2026/11/20/car{i}.jpg", seed=10 + i)
    before = w.raw()
    settings = Settings.load()
    spec = RunSpec(region="DE", run_id="scheduled__2026-11-21T01:00:00+00:00", max_failure_rate=0.5,
                   window_start="2026-11-19T23:00:00+00:00", window_end="2026-11-20T23:00:00+00:00")
    collect(w.s3, settings, spec, log=lambda m: None)
    (shard,) = make_shards(w.s3, settings, [spec.as_dict()], log=lambda m: None)
    victim = "audit/DE/2026/11/20/car1.jpg.json"
    w.proxy.fault = lambda req: "hold" if req.method == "PUT" and req.key == victim else None
    w.proxy.hold()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    worker = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(shard)], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert w.proxy.held.wait(240), worker.stderr.read().decode()[-3000:] if worker.poll() is not None else "no hold"
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(30) == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            worker.kill()
        w.proxy.release(drop=True)  # its in-flight audit write dies with it
    # killed mid-shard: car1's masked copy is out without its record, the shard has no detections
    assert "masked/DE/2026/11/20/car1.jpg" in _objects(w.s3, w.bucket, "masked/")
    assert victim not in _objects(w.s3, w.bucket, "audit/")
    assert not _objects(w.s3, w.bucket, f"runs/DE/{DE_20}/{run_key(spec.run_id)}/detections/")

    w.proxy.fault = lambda req: None  # the retry of the mask task, on a healthy worker
    out = mask_shard(s3_client(settings), settings, shard, detector_factory(settings), log=lambda m: None)
    assert out["processed"] >= 1 and out["photos"] == 4
    reports = aggregate(w.s3, settings, [spec.as_dict()], run_id=spec.run_id, log=lambda m: None)
    try:
        check_reports([spec.as_dict()], reports)
        state = "success"
    except Exception:  # noqa: BLE001 - the state is asserted by check_run
        state = "failed"
    events = [r["region"] for r in reports if asset_extra(r) is not None]
    check_run(w, fault_table, "SIGKILL of a worker mid-shard, then retry", run_id=spec.run_id, state=state,
              expect_state="success", regions={"DE": DE_20}, events=events, expect_events=["DE"], raw_before=before,
              note=f"retry redid {out['processed']}, skipped {out['skipped']}")

