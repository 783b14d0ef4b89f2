"""The nightly run's steps on S3: collect, shard, mask a shard, aggregate QA.

Plain functions over a boto3 S3 client and a ``Settings``; the DAG only wires them. Everything a
step passes on is an S3 URI or a small dict, never a key list or pixels.

Layout (all under ``settings.bucket``):
  raw/{region}/{yyyy}/{mm}/{dd}/...            originals (read only, never modified)
  masked/{region}/{yyyy}/{mm}/{dd}/...         masked copies, same relative path
  audit/{region}/{yyyy}/{mm}/{dd}/....json     one audit record per photo (source ETag, model, result)
  runs/{region}/{window}/manifest.jsonl        what the run covers: key, size, ETag
  runs/{region}/{window}/shards/NNNN.jsonl     the manifest cut into shards
  runs/{region}/{window}/detections/NNNN.jsonl detection records per shard (+ NNNN.summary.json)
  qa/{region}/{window}/report.json|report.html QA; the HTML embeds thumbnails of originals, so
                                               it stays in the QA prefix with its access rules
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from .imageio import ImageError, extension_supported
from .settings import Settings
from .storage import S3Store, parse_s3_uri
from .windows import Window, resolve_window

BACKENDS = ("local", "sagemaker")
MODES = ("gaussian", "pixelate", "solid")


class RunError(Exception):
    """A run-level problem an operator must act on (bad parameters, failure rate over the limit)."""


@dataclass(frozen=True)
class RunSpec:
    region: str
    window_start: str
    window_end: str
    run_id: str = "manual"
    backend: str = "local"
    mode: str = "gaussian"
    threshold: float | None = None
    reprocess: bool = False
    dry_run: bool = False
    max_images: int | None = None
    max_failure_rate: float = 0.02

    @property
    def window(self) -> Window:
        return Window(datetime.fromisoformat(self.window_start), datetime.fromisoformat(self.window_end))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(**d)


def plan_runs(settings: Settings, params: dict, *, run_id: str, data_interval_start: datetime | None,
              data_interval_end: datetime | None) -> list[RunSpec]:
    """Validate the run's Params and turn them into one RunSpec per region (pure)."""
    region = params.get("region") or "ALL"
    regions = list(settings.regions) if region == "ALL" else [region]
    for r in regions:
        if r not in settings.regions:
            raise RunError(f"region {r!r} is not configured; configured regions: {', '.join(settings.regions)}")
    backend = params.get("backend") or "local"
    if backend not in BACKENDS:
        raise RunError(f"backend must be one of {BACKENDS}, got {backend!r}")
    mode = params.get("mode") or "gaussian"
    if mode not in MODES:
        raise RunError(f"mode must be one of {MODES}, got {mode!r}")
    threshold = params.get("threshold")
    if threshold is not None and not 0 <= float(threshold) <= 1:
        raise RunError(f"threshold must be within [0, 1], got {threshold}")
    if threshold is not None and not params.get("unsafe_threshold"):
        from .model import load_config
        from .pipeline import check_threshold

        try:
            check_threshold(float(threshold), load_config(params.get("model") or settings.model_dir).score_threshold)
        except (FileNotFoundError, ValueError) as exc:
            raise RunError(str(exc)) from None
    max_images = params.get("max_images")
    if max_images is not None and int(max_images) < 1:
        raise RunError(f"max_images must be >= 1 or empty, got {max_images}")
    mfr = params.get("max_failure_rate")
    mfr = settings.max_failure_rate if mfr is None else float(mfr)
    if not 0 <= mfr <= 1:
        raise RunError(f"max_failure_rate must be within [0, 1], got {mfr}")
    specs = []
    for r in regions:
        try:
            w = resolve_window(tz=settings.region_timezones[r], window_start=params.get("window_start"),
                               window_end=params.get("window_end"), data_interval_start=data_interval_start,
                               data_interval_end=data_interval_end)
        except ValueError as exc:
            raise RunError(f"region {r}: {exc}") from None
        specs.append(RunSpec(region=r, window_start=w.start.isoformat(), window_end=w.end.isoformat(), run_id=run_id,
                             backend=backend, mode=mode, threshold=None if threshold is None else float(threshold),
                             reprocess=bool(params.get("reprocess")), dry_run=bool(params.get("dry_run")),
                             max_images=None if max_images is None else int(max_images), max_failure_rate=mfr))
    return specs


# ---------------------------------------------------------------- key layout

def raw_root(settings: Settings, region: str) -> str:
    return settings.raw_prefix.split("{yyyy}")[0].format(region=region)


def masked_key(settings: Settings, region: str, raw_key: str) -> str:
    root = raw_root(settings, region)
    if not raw_key.startswith(root):
        raise ValueError(f"key {raw_key!r} is not under {root!r}")
    return settings.masked_root.format(region=region) + raw_key[len(root):]


def audit_key(settings: Settings, region: str, raw_key: str) -> str:
    return settings.audit_root.format(region=region) + raw_key[len(raw_root(settings, region)):] + ".json"


def run_prefix(settings: Settings, spec: RunSpec) -> str:
    return settings.runs_root.format(region=spec.region, window=spec.window.id)


def qa_prefix(settings: Settings, spec: RunSpec) -> str:
    return settings.qa_root.format(region=spec.region, window=spec.window.id)


def _uri(settings: Settings, key: str) -> str:
    return f"s3://{settings.bucket}/{key}"


def _put_json(client, settings: Settings, key: str, obj: Any, *, lines: bool = False) -> str:
    body = ("".join(json.dumps(o, sort_keys=True) + "\n" for o in obj) if lines else json.dumps(obj, indent=2, sort_keys=True))
    S3Store(settings.bucket, client=client, sse=settings.sse, kms_key_id=settings.kms_key_id).write(
        key, body.encode(), "application/x-ndjson" if lines else "application/json")
    return _uri(settings, key)


def _get_lines(client, uri: str) -> list[dict]:
    bucket, key = parse_s3_uri(uri)
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


# ---------------------------------------------------------------- collect

def collect(client, settings: Settings, spec: RunSpec, log: Callable[[str], None] = print) -> dict:
    """List only the partitions the window covers, keep supported images in it, write the manifest."""
    w = spec.window
    tz = settings.region_timezones[spec.region]
    days = w.partition_days(tz) if settings.time_source == "partition" else w.days(tz)
    entries = []
    paginator = client.get_paginator("list_objects_v2")
    for d in days:
        prefix = settings.raw_prefix.format(region=spec.region, yyyy=f"{d.year:04d}", mm=f"{d.month:02d}", dd=f"{d.day:02d}")
        n_listed = 0
        for page in paginator.paginate(Bucket=settings.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                n_listed += 1
                key = obj["Key"]
                if key.endswith("/") or key.rsplit("/", 1)[-1].startswith("."):
                    continue
                if settings.time_source == "last_modified" and not w.contains(obj["LastModified"]):
                    continue
                entries.append({"key": key, "size": int(obj["Size"]), "etag": obj["ETag"].strip('"'),
                                "supported": extension_supported(key)})
        log(f"{spec.region}: listed {n_listed} objects under s3://{settings.bucket}/{prefix}")
    entries.sort(key=lambda e: e["key"])
    skipped_ext = [e["key"] for e in entries if not e["supported"]]
    # unsupported extensions stay in the manifest: they are accounted for (and fail with a reason)
    if spec.max_images:
        entries = entries[: spec.max_images]
    key = run_prefix(settings, spec) + "manifest.jsonl"
    uri = _put_json(client, settings, key, entries, lines=True)
    log(f"{spec.region} window {w.id}: {len(entries)} photos in {len(days)} partition(s) -> {uri}"
        + (f" ({len(skipped_ext)} with unsupported extensions)" if skipped_ext else ""))
    return {"spec": spec.as_dict(), "manifest": uri, "count": len(entries)}


def make_shards(client, settings: Settings, collected: list[dict], log: Callable[[str], None] = print) -> list[dict]:
    """Cut each manifest into shards; the total stays under ``max_shards`` (Airflow maps < 1024)."""
    total = sum(c["count"] for c in collected)
    sagemaker = any(c["spec"]["backend"] == "sagemaker" for c in collected)
    base = settings.sagemaker_shard_size if sagemaker else settings.shard_size  # a shard is one transform job
    size = max(base, math.ceil(total / settings.max_shards)) if total else base
    shards = []
    for c in collected:
        if not c["count"]:
            continue
        spec = RunSpec.from_dict(c["spec"])
        entries = _get_lines(client, c["manifest"])
        for i in range(0, len(entries), size):
            key = run_prefix(settings, spec) + f"shards/{i // size:04d}.jsonl"
            uri = _put_json(client, settings, key, entries[i: i + size], lines=True)
            shards.append({"spec": c["spec"], "shard": uri, "index": i // size, "count": len(entries[i: i + size])})
    log(f"{total} photos in {len(shards)} shard(s) of up to {size}")
    return shards


# ---------------------------------------------------------------- mask one shard

def _read_audit(client, settings: Settings, key: str) -> dict | None:
    from botocore.exceptions import ClientError

    try:
        body = client.get_object(Bucket=settings.bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise
    try:
        return json.loads(body)
    except ValueError:
        return None  # a broken audit record is redone, not trusted


def _already_done(client, settings: Settings, spec: RunSpec, entry: dict, audit: dict | None, model_info: dict) -> bool:
    if audit is None or audit.get("status") == "failed":
        return False
    masked_by = audit.get("model") or {}
    if audit.get("source_etag") != entry["etag"] or any(
            masked_by.get(k) != model_info.get(k) for k in ("weights_sha256", "verifier_sha256")):
        return False
    if audit.get("mode") != spec.mode or audit.get("threshold") != spec.threshold:
        return False
    return S3Store(settings.bucket, client=client).exists(masked_key(settings, spec.region, entry["key"]))


class ManifestSource:
    """The originals exactly as the manifest listed them (fail closed on any change).

    Every read is pinned to the listed ETag (S3 ``IfMatch``): a photo re-uploaded since it was
    listed is not read at all. Where the detection was made elsewhere (SageMaker's ``.out``
    records carry the SHA-256 of the bytes the container saw), the bytes read must have that
    hash too. Either way a mismatch is ``ImageError("source_changed")``: the photo's record is
    ``failed``, nothing is published, and the next run (which lists the new ETag) picks it up.
    """

    def __init__(self, store: S3Store, etags: dict[str, str], expected_sha256: dict[str, str] | None = None):
        self.store, self.etags, self.expected = store, etags, expected_sha256 or {}
        self.uri = store.uri

    def read(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        etag = self.etags[key]
        try:
            data = self.store.read(key, if_match=f'"{etag}"')
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412"):
                raise
            raise ImageError("source_changed", f"{self.describe(key)} changed since it was listed (ETag {etag} "
                             "no longer matches): not masked; the next run processes the new upload") from None
        want = self.expected.get(key)
        if want and hashlib.sha256(data).hexdigest() != want:
            raise ImageError("source_changed", f"{self.describe(key)}: the bytes read (ETag {etag}) are not the bytes "
                             "the detector saw (input_sha256 differs): not masking with another photo's polygons; "
                             "the next run processes it again")
        return data

    def describe(self, key: str) -> str:
        return self.store.describe(key)


def mask_shard(client, settings: Settings, shard: dict, detector_factory: Callable, *,
               log: Callable[[str], None] = print) -> dict:
    """Mask one shard: skip what is already done for this source ETag and model, do the rest.

    ``detector_factory(spec, entries) -> (detect, model_info, cfg)`` builds the backend's detector
    (the local model, or SageMaker's .out files) once per shard. Originals are read through
    ``ManifestSource`` (pinned to the manifest's ETags; a detector that knows the hashes of the
    bytes it detected on exposes them as ``detect.expected_sha256``).
    """
    from .mask import MaskStyle
    from .pipeline import JobOptions, Progress, Timings, run_job

    spec = RunSpec.from_dict(shard["spec"])
    entries = _get_lines(client, shard["shard"])
    detect, model_info, cfg = detector_factory(spec, entries, shard)
    threshold = cfg.score_threshold if spec.threshold is None else spec.threshold
    with ThreadPoolExecutor(settings.io_workers) as pool:
        audits = list(pool.map(lambda e: _read_audit(client, settings, audit_key(settings, spec.region, e["key"])), entries))
        done = [False] * len(entries)
        if not spec.reprocess:
            done = list(pool.map(lambda ea: _already_done(client, settings, spec, ea[0], ea[1], model_info),
                                 zip(entries, audits)))
    todo = [e for e, d in zip(entries, done) if not d]
    etags = {e["key"]: e["etag"] for e in entries}
    records: list[dict] = [dict(a, skipped=True) for a, d in zip(audits, done) if d]
    log(f"shard {shard['shard']}: {len(entries)} photos, {len(records)} already masked with this model, {len(todo)} to do")
    store = S3Store(settings.bucket, client=client, sse=settings.sse, kms_key_id=settings.kms_key_id)
    timings = Timings()
    t0 = time.perf_counter()
    if spec.dry_run:
        log(f"dry run: would mask {len(todo)} photos; nothing written")
        new = []
    else:
        opts = JobOptions(threshold=threshold, review_low=min(cfg.review_low, threshold),
                          review_high=max(cfg.review_high, threshold), style=MaskStyle(mode=spec.mode),
                          batch_size=settings.batch_size, read_workers=settings.io_workers,
                          write_workers=max(2, settings.io_workers // 2))

        def write_audit(rec: dict):
            rec.update(source_etag=etags[rec["key"]], run_id=spec.run_id, window=spec.window.id, mode=spec.mode,
                       threshold=spec.threshold, backend=spec.backend,
                       masked_key=masked_key(settings, spec.region, rec["key"]) if rec["status"] != "failed" else None,
                       processed_at=datetime.now(timezone.utc).isoformat())
            store.write(audit_key(settings, spec.region, rec["key"]), json.dumps(rec, sort_keys=True).encode(),
                        "application/json")

        source = ManifestSource(store, etags, getattr(detect, "expected_sha256", None))
        new = run_job(source, store, [e["key"] for e in todo], detect, opts, model=model_info, timings=timings,
                      on_record=write_audit, progress=Progress(len(todo), every=10.0, emit=log),
                      dst_key=lambda k: masked_key(settings, spec.region, k))
    wall = time.perf_counter() - t0
    records.extend(new)
    order = {e["key"]: i for i, e in enumerate(entries)}
    records.sort(key=lambda r: order.get(r["key"], 0))
    base = run_prefix(settings, spec) + f"detections/{shard['index']:04d}"
    det_uri = _put_json(client, settings, base + ".jsonl", records, lines=True)
    summary = {"shard": shard["shard"], "index": shard["index"], "photos": len(entries), "processed": len(new),
               "skipped": len(entries) - len(todo), "wall_seconds": round(wall, 3),
               "images_per_second": round(len(new) / wall, 3) if new and wall > 0 else None,
               "timings_s": {k: round(v, 3) for k, v in timings.as_dict().items()}, "model": model_info,
               "failed": sum(r["status"] == "failed" for r in new), "dry_run": spec.dry_run, "threshold": threshold,
               "run_id": spec.run_id, "backend": spec.backend, "transform": shard.get("transform"),
               "would_process": len(todo) if spec.dry_run else 0}
    sum_uri = _put_json(client, settings, base + ".summary.json", summary)
    log(f"shard {shard['index']}: {summary['processed']} processed ({summary['failed']} failed), "
        f"{summary['skipped']} skipped, {summary['images_per_second'] or 0:.2f} images/s")
    return {"spec": shard["spec"], "detections": det_uri, "summary": sum_uri, **{k: summary[k] for k in ("photos", "processed", "skipped", "failed")}}


# ---------------------------------------------------------------- QA

def _run_shard_results(client, settings: Settings, spec: RunSpec, run_id: str) -> tuple[list[dict], list[dict]]:
    """Records and summaries this run wrote for the region's window (older runs' files are ignored)."""
    bucket = settings.bucket
    prefix = run_prefix(settings, spec) + "detections/"
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    records, summaries = [], []
    for key in sorted(k for k in keys if k.endswith(".summary.json")):
        summary = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        if summary.get("run_id") != run_id:
            continue
        summaries.append(summary)
        records.extend(_get_lines(client, _uri(settings, key[: -len(".summary.json")] + ".jsonl")))
    return records, summaries


def aggregate(client, settings: Settings, collected: list[dict], *, run_id: str,
              log: Callable[[str], None] = print) -> list[dict]:
    """Per region: merge this run's shard records into qa/{region}/{window}/report.json and report.html.

    Photos of the manifest without a record (their shard's task failed for good) count as failed.
    """
    from .qa import build_report, headline
    from .report_html import render_report

    out = []
    for c in collected:
        spec = RunSpec.from_dict(c["spec"])
        records, summaries = _run_shard_results(client, settings, spec, run_id)
        accounted = {rec["key"] for rec in records}
        unrecorded = 0
        if c["count"] > len(accounted) and not spec.dry_run:
            # a shard's task failed for good: its photos are failures, listed by key, never published
            from .detections import record

            for e in _get_lines(client, c["manifest"]):
                if e["key"] not in accounted:
                    unrecorded += 1
                    records.append(record(e["key"], status="failed", reason="shard_failed",
                                          error=f"the masking task for this photo's shard failed in run {run_id}; "
                                                "see the task log and rerun the window"))
        processed = [rec for rec in records if not rec.get("skipped")]
        wall = sum(s["wall_seconds"] for s in summaries)
        timings: dict[str, float] = {}
        for s in summaries:
            for k, v in s["timings_s"].items():
                timings[k] = timings.get(k, 0.0) + v
        model = next((s["model"] for s in summaries), None)
        report = build_report(records, timings=timings, model=model, extra={
            "region": spec.region, "window": spec.window.as_dict(), "run_id": spec.run_id, "backend": spec.backend,
            "mode": spec.mode, "manifest": c["manifest"], "photos_in_window": c["count"],
            "not_accounted_for": unrecorded, "processed_this_run": len(processed),
            "would_process": sum(s.get("would_process", 0) for s in summaries) if spec.dry_run else None,
            "skipped_already_masked": len(records) - len(processed), "dry_run": spec.dry_run,
            "shards": sorted(summaries, key=lambda s: s["index"]),
            "mask_images_per_second": round(len(processed) / wall, 3) if wall > 0 and processed else None,
            "max_failure_rate": spec.max_failure_rate,
        })
        report["thresholds"] = {"score": next((s["threshold"] for s in summaries), spec.threshold)}
        qa = qa_prefix(settings, spec)
        report_uri = _put_json(client, settings, qa + "report.json", report)
        html = render_report(report, records, client=client, settings=settings, spec=spec,
                             masked_key=lambda k: masked_key(settings, spec.region, k),
                             samples=settings.review_samples, rng=random.Random(spec.window.id))
        S3Store(settings.bucket, client=client, sse=settings.sse, kms_key_id=settings.kms_key_id).write(
            qa + "report.html", html.encode(), "text/html; charset=utf-8")
        log(f"{spec.region} {spec.window.id}: " + headline(report) + f" -> {report_uri}")
        out.append({"region": spec.region, "window": spec.window.id, "report": report_uri,
                    "html": _uri(settings, qa + "report.html"), "failure_rate": report["failure_rate"],
                    "max_failure_rate": spec.max_failure_rate, "by_status": report["by_status"],
                    "review": report["review"]["count"], "plates": report["plates"]})
    return out


def check_failure_rate(reports: list[dict]) -> None:
    bad = [r for r in reports if r["failure_rate"] > r["max_failure_rate"]]
    if bad:
        raise RunError("; ".join(f"{r['region']} {r['window']}: failure rate {r['failure_rate']:.1%} exceeds "
                                 f"{r['max_failure_rate']:.1%} (see {r['html']})" for r in bad))
