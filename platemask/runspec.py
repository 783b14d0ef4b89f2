"""A run's parameters: the Params a run was triggered with, validated into one ``RunSpec`` per region (pure).

``run_key(run_id)`` is the key-safe name of a run that every run-keyed S3 file is under.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from .constants import BACKENDS, DEFAULT_BACKEND, DEFAULT_MASK_MODE, MASK_MODES
from .settings import Settings
from .windows import Window, resolve_window


def run_key(run_id: str) -> str:
    """A readable, key-safe, stable name for a run: its run_id with unsafe characters replaced, plus a
    short hash of the exact run_id (two run_ids never share a key), e.g.
    ``manual__2026-11-25T10-00-00.123-00-00-1a2b3c4d``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-.")[:80] or "run"
    return f"{safe}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


class RunError(Exception):
    """A run-level problem an operator must act on (bad parameters, failure rate over the limit)."""


@dataclass(frozen=True)
class RunSpec:
    region: str
    window_start: str
    window_end: str
    run_id: str = "manual"
    backend: str = DEFAULT_BACKEND
    mode: str = DEFAULT_MASK_MODE
    threshold: float | None = None
    reprocess: bool = False
    dry_run: bool = False
    max_images: int | None = None
    max_failure_rate: float = 0.02

    @property
    def window(self) -> Window:
        return Window(datetime.fromisoformat(self.window_start), datetime.fromisoformat(self.window_end))

    @property
    def run_key(self) -> str:
        return run_key(self.run_id)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(**d)


INTERVAL_RUN_TYPES = ("scheduled", "backfill")  # runs that stand for their data interval: their night is their window


def plan_runs(settings: Settings, params: dict, *, run_id: str, data_interval_end: datetime | None,
              now: datetime | None = None, run_type: str | None = None) -> list[RunSpec]:
    """Validate the run's Params and turn them into one RunSpec per region (pure). With ``now`` (the DAG's
    plan passes it), a manual run's window that has not ended by then (an explicit one, or the night before a
    logical date ahead) is refused: photos still arrive in it, yet its QA report would become the window's
    latest and its Asset events would say it is masked. A scheduled
    or backfill run (``run_type``) masks its own night: an explicit window (a backfill's --dag-run-conf) is
    refused, or each night's run would mask that window instead and end green, its night unmasked."""
    if run_type in INTERVAL_RUN_TYPES and (params.get("window_start") or params.get("window_end")):
        night = "" if data_interval_end is None else \
            f" (the local day that ended at {data_interval_end.isoformat()})"
        raise RunError(f"this is the {run_type} run of the night{night}; window_start/window_end "
                       f"({params.get('window_start')!r} .. {params.get('window_end')!r}) would mask that window "
                       "instead, and this night's run would end green with its night unmasked. Leave them out of "
                       "the backfill's --dag-run-conf; to mask an explicit window, trigger the DAG by hand "
                       "(plate_masking) with it")
    region = params.get("region") or "ALL"
    regions = list(settings.regions) if region == "ALL" else [region]
    for r in regions:
        if r not in settings.regions:
            raise RunError(f"region {r!r} is not configured; configured regions: {', '.join(settings.regions)}")
    backend = params.get("backend") or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise RunError(f"backend must be one of {BACKENDS}, got {backend!r}")
    mode = params.get("mode") or DEFAULT_MASK_MODE
    if mode not in MASK_MODES:
        raise RunError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    threshold = params.get("threshold")
    if threshold is not None and not 0 <= float(threshold) <= 1:
        raise RunError(f"threshold must be within [0, 1], got {threshold}")
    from .model import load_config

    model_dir = params.get("model") or settings.model_dir
    try:  # found here, not by every mask task after the window was collected, locked and sharded
        cfg = load_config(model_dir)
        if not (Path(model_dir) / cfg.weights).is_file():
            raise FileNotFoundError(f"model folder {model_dir} has config.json but not its weights {cfg.weights!r}: "
                                    "copy the whole folder, or re-export it")
    except (FileNotFoundError, ValueError) as exc:
        raise RunError(f"model: {exc}") from None
    if threshold is not None and not params.get("unsafe_threshold"):
        from .pipeline import check_threshold

        try:
            check_threshold(float(threshold), cfg.score_threshold)
        except ValueError as exc:
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
                               window_end=params.get("window_end"), data_interval_end=data_interval_end)
        except ValueError as exc:
            raise RunError(f"region {r}: {exc}") from None
        tz = settings.region_timezones[r]
        if now is not None and run_type not in INTERVAL_RUN_TYPES and w.end > now:
            raise RunError(f"region {r}: window {w.start.astimezone(ZoneInfo(tz)).isoformat()} .. "
                           f"{w.end.astimezone(ZoneInfo(tz)).isoformat()} has not ended yet (now "
                           f"{now.astimezone(ZoneInfo(tz)).isoformat(timespec='seconds')}): photos still arrive in it, "
                           "so a run would report it masked while it is not; "
                           + ("give a window_end no later than now (the photos after it are the next run's), or "
                              "trigger it once it has ended" if params.get("window_end") else
                              "trigger without a logical date (the local day that ended before the trigger), or with "
                              "one no later than now"))
        if settings.time_source == "partition" and not w.partition_days(tz):
            raise RunError(f"region {r}: window {w.start.astimezone(ZoneInfo(tz)).isoformat()} .. "
                           f"{w.end.astimezone(ZoneInfo(tz)).isoformat()} contains no local midnight, so it covers no "
                           "day partition and would mask nothing while reporting success (time_source 'partition': "
                           "a photo's time is its day's midnight); widen it to include one, or use time_source "
                           "'last_modified' for windows within a day")
        specs.append(RunSpec(region=r, window_start=w.start.isoformat(), window_end=w.end.isoformat(), run_id=run_id,
                             backend=backend, mode=mode, threshold=None if threshold is None else float(threshold),
                             reprocess=bool(params.get("reprocess")), dry_run=bool(params.get("dry_run")),
                             max_images=None if max_images is None else int(max_images), max_failure_rate=mfr))
    return specs

