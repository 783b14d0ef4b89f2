"""Time windows: which photos a run covers. Half-open [start, end), time-zone aware, pure."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

MAX_WINDOW = timedelta(days=31)


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    def __post_init__(self):
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("window bounds must be time-zone aware")
        # kept in UTC: arithmetic between aware datetimes of one zone ignores DST shifts
        object.__setattr__(self, "start", self.start.astimezone(timezone.utc))
        object.__setattr__(self, "end", self.end.astimezone(timezone.utc))
        if not self.start < self.end:
            raise ValueError(f"window start {self.start.isoformat()} must be before its end {self.end.isoformat()}")
        if self.end - self.start > MAX_WINDOW:
            raise ValueError(f"window {self.start.isoformat()} .. {self.end.isoformat()} is longer than "
                             f"{MAX_WINDOW.days} days; split it (a backfill runs one window per night)")

    @property
    def id(self) -> str:
        """Stable, key-safe name, one per window: UTC bounds to the minute, e.g.
        20261120T0000Z-20261121T0000Z; to the second (and microsecond) when a bound has them, so
        two windows seconds apart never share a lock, a QA folder or Asset events."""
        whole = all(t.second == 0 and t.microsecond == 0 for t in (self.start, self.end))
        f = "%Y%m%dT%H%MZ" if whole else "%Y%m%dT%H%M%S"

        def one(t: datetime) -> str:
            text = f"{t:{f}}"
            return text if whole else text + (f".{t.microsecond:06d}" if t.microsecond else "") + "Z"

        return f"{one(self.start)}-{one(self.end)}"

    def contains(self, t: datetime) -> bool:
        return self.start <= t < self.end

    def days(self, tz: str | ZoneInfo) -> list[date]:
        """Calendar days (in ``tz``) that the window touches."""
        z = ZoneInfo(tz) if isinstance(tz, str) else tz
        first = self.start.astimezone(z).date()
        last = (self.end - timedelta(microseconds=1)).astimezone(z).date()
        return [first + timedelta(days=i) for i in range((last - first).days + 1)]

    def partition_days(self, tz: str | ZoneInfo) -> list[date]:
        """Days (in ``tz``) whose midnight falls inside the window: a nightly window is exactly one."""
        z = ZoneInfo(tz) if isinstance(tz, str) else tz
        return [d for d in self.days(tz) if self.contains(datetime(d.year, d.month, d.day, tzinfo=z))]

    def as_dict(self) -> dict:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(), "id": self.id}


def parse_instant(value: str, tz: str) -> datetime:
    """ISO date or date-time; a value without offset is read in the region's time zone."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO date or date-time (e.g. 2026-11-20 or 2026-11-20T06:00+01:00)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=ZoneInfo(tz))
    return dt


def nightly_window(run_end: datetime, tz: str) -> Window:
    """The local calendar day that ended at or before ``run_end`` (in ``tz``): [midnight-1d, midnight)."""
    z = ZoneInfo(tz)
    local = run_end.astimezone(z)
    end_day = local.date()
    end = datetime(end_day.year, end_day.month, end_day.day, tzinfo=z)
    prev = end_day - timedelta(days=1)
    return Window(datetime(prev.year, prev.month, prev.day, tzinfo=z), end)


def resolve_window(*, tz: str, window_start: str | None = None, window_end: str | None = None,
                   data_interval_end: datetime | None = None) -> Window:
    """The window for a run.

    Explicit ``window_start``/``window_end`` (a manual run) win; either alone is an error. Otherwise
    the run's data interval (nightly and backfill runs), re-cut to the region's local days: the
    local day that ended at or before the interval's end. When the interval is empty (a plain cron
    trigger gives start == end) the same rule applies to its end.
    """
    if window_start or window_end:
        if not (window_start and window_end):
            raise ValueError("give both window_start and window_end, or neither")
        try:
            return Window(parse_instant(window_start, tz), parse_instant(window_end, tz))
        except OverflowError:  # e.g. 0001-01-01 in a zone east of UTC: before the first instant Python has
            raise ValueError(f"window {window_start!r} .. {window_end!r} lies outside the dates a window can have "
                             "(years 1 to 9999 in UTC): give the window's real dates") from None
    if data_interval_end is None:
        raise ValueError("no window: the run has no data interval and no window_start/window_end")
    return nightly_window(data_interval_end, tz)
