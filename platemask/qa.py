"""QA summary from detection records: a pure function, so shards can be merged by concatenation."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any, Iterable

import numpy as np

from .geometry import polygon_area

SCORE_BINS = [round(x * 0.1, 1) for x in range(11)]
# failed photos a DAG run's report.json names per reason (each photo's audit record names it anyway): a
# night of 33,000 failed uploads made a report over the Plate QA view's 8 MB read limit, so the night
# every photo failed was the one the view could not show. The CLI's report names them all.
MAX_FAILURES_LISTED = 500
# failures decided before a photo is read: it went through no stage, so it takes no share of their time
NOT_TIMED_REASONS = frozenset({"shard_failed", "key_too_long", "not_a_file", "unreadable_folder", "output_collision",
                               "archived"})


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"count": int(a.size), "mean": float(a.mean()), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "max": float(a.max()), "min": float(a.min())}


def build_report(records: Iterable[dict[str, Any]], *, timings: dict[str, float] | None = None,
                 wall_seconds: float | None = None, model: dict | None = None,
                 thresholds: dict[str, float] | None = None, review_limit: int = 500,
                 failure_limit: int | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report of ``records``: counts, failures by reason (the first ``failure_limit`` of each named,
    ``truncated`` when more; all when None), the review list (the first ``review_limit``), scores,
    mask areas, the models that made the records, stage timings."""
    records = list(records)
    by_status = Counter(r["status"] for r in records)
    failures: dict[str, list[dict[str, str]]] = {}
    for r in records:
        if r["status"] == "failed":
            failures.setdefault(r.get("reason", "error"), []).append({"key": r["key"], "error": r.get("error", "")})
    done = [r for r in records if r["status"] != "failed"]
    plates_per_image = Counter(len(r["plates"]) for r in done)
    scores = [p["score"] for r in done for p in r["plates"]]
    hist, _ = np.histogram(scores, bins=SCORE_BINS) if scores else (np.zeros(10, int), None)
    review = [
        {"key": r["key"], "scores": [p["score"] for p in r["plates"]],
         "near_miss_scores": [p["score"] for p in r.get("near_misses", [])],
         "why": r.get("review_reason", "")}
        for r in done if r.get("review")
    ]
    area_px, area_frac = [], []
    for r in done:
        if r["plates"] and r.get("width") and r.get("height"):
            masked = r.get("masked_area_px") or sum(polygon_area(np.asarray(p["polygon"])) for p in r["plates"])
            area_px.append(float(masked))
            area_frac.append(float(masked) / (r["width"] * r["height"]))
    # the models that made the records: a shard (or a retried task) run with other weights than the first
    # shard's made photos the report named no model for (the report's "model" is the run's first shard's)
    made_by = Counter(json.dumps(r["model"], sort_keys=True) for r in records if isinstance(r.get("model"), dict))
    n = len(records)
    report: dict[str, Any] = {
        "images": n,
        "by_status": {s: by_status.get(s, 0) for s in ("masked", "no_plate", "failed")},
        "failure_rate": (by_status.get("failed", 0) / n) if n else 0.0,
        "failures_by_reason": {k: {"count": len(v), "items": v[:failure_limit],
                                   "truncated": failure_limit is not None and len(v) > failure_limit}
                               for k, v in sorted(failures.items())},
        "plates": len(scores),
        "plates_per_image": {str(k): v for k, v in sorted(plates_per_image.items())},
        "score_histogram": {"bins": SCORE_BINS, "counts": [int(c) for c in hist]},
        "review": {"count": len(review), "items": review[:review_limit], "truncated": len(review) > review_limit},
        "mask_area": {"pixels": _stats(area_px), "fraction_of_image": _stats(area_frac)},
        "model": model,
        "models": [{**json.loads(m), "photos": k} for m, k in made_by.most_common()],
        "thresholds": thresholds,
    }
    if timings is not None:
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        # the stage times are of the photos this job ran through them: a rerun's photos skipped as already
        # done (or an earlier run's records kept, or a failed shard's) took none of them
        timed = sum(not (r.get("skipped") or r.get("from_earlier_run") or r.get("earlier_attempt")
                         or r.get("reason") in NOT_TIMED_REASONS) for r in records)
        if timed:
            report["timings_ms_per_image"] = {k: round(1000 * v / timed, 1) for k, v in timings.items()}
    if wall_seconds is not None:
        report["wall_seconds"] = round(wall_seconds, 3)
        report["images_per_second"] = round(n / wall_seconds, 3) if wall_seconds > 0 else None
    if extra:
        report.update(extra)
    return report


def headline(report: dict[str, Any]) -> str:
    s = report["by_status"]
    line = (f"{report['images']} images: {s['masked']} masked, {s['no_plate']} no plate, {s['failed']} failed; "
            f"{report['plates']} plates; {report['review']['count']} for review")
    if report.get("images_per_second"):
        line += f"; {report['images_per_second']:.2f} images/s"
    return line

