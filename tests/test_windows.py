from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from platemask.windows import Window, nightly_window, parse_instant, resolve_window

UTC = timezone.utc


def test_nightly_window_is_the_previous_local_day():
    w = resolve_window(tz="Europe/Berlin", data_interval_end=datetime(2026, 11, 21, 2, tzinfo=UTC))
    assert w.start == datetime(2026, 11, 20, tzinfo=ZoneInfo("Europe/Berlin"))
    assert w.end == datetime(2026, 11, 21, tzinfo=ZoneInfo("Europe/Berlin"))
    assert w.partition_days("Europe/Berlin") == [date(2026, 11, 20)]
    assert w.id == "20261119T2300Z-20261120T2300Z"


def test_empty_cron_interval_still_gives_a_full_day():
    t = datetime(2026, 11, 21, 2, tzinfo=UTC)
    w = resolve_window(tz="UTC", data_interval_end=t)  # a cron trigger: start == end
    assert (w.start, w.end) == (datetime(2026, 11, 20, tzinfo=ZoneInfo("UTC")), datetime(2026, 11, 21, tzinfo=ZoneInfo("UTC")))


def test_time_zones_west_of_utc_lag_a_day():
    # 02:00 UTC is still the evening before in New York: only the day that has fully ended is taken
    w = nightly_window(datetime(2026, 11, 21, 2, tzinfo=UTC), "America/New_York")
    assert w.partition_days("America/New_York") == [date(2026, 11, 19)]
    w = nightly_window(datetime(2026, 11, 21, 2, tzinfo=UTC), "Asia/Bangkok")
    assert w.partition_days("Asia/Bangkok") == [date(2026, 11, 20)]


@pytest.mark.parametrize("run_end,expected", [
    (datetime(2026, 3, 1, 3, tzinfo=UTC), date(2026, 2, 28)),  # month end, non-leap year
    (datetime(2028, 3, 1, 3, tzinfo=UTC), date(2028, 2, 29)),  # leap day
    (datetime(2027, 1, 1, 3, tzinfo=UTC), date(2026, 12, 31)),  # year end
])
def test_month_and_year_ends(run_end, expected):
    assert nightly_window(run_end, "Europe/Warsaw").partition_days("Europe/Warsaw") == [expected]


def test_dst_day_is_23_hours_long():
    w = nightly_window(datetime(2026, 3, 30, 3, tzinfo=UTC), "Europe/Berlin")  # DST began 2026-03-29
    assert w.end - w.start == timedelta(hours=23)
    assert w.partition_days("Europe/Berlin") == [date(2026, 3, 29)]


def test_manual_override_in_region_time_and_with_offsets():
    w = resolve_window(tz="Asia/Bangkok", window_start="2026-11-01", window_end="2026-11-04")
    assert w.start == datetime(2026, 11, 1, tzinfo=ZoneInfo("Asia/Bangkok"))
    assert w.partition_days("Asia/Bangkok") == [date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)]
    w = resolve_window(tz="UTC", window_start="2026-11-01T06:00+01:00", window_end="2026-11-01T18:00+01:00")
    assert w.start == datetime(2026, 11, 1, 5, tzinfo=UTC)
    assert w.partition_days("UTC") == []  # no midnight inside
    assert w.days("UTC") == [date(2026, 11, 1)]  # but it touches that day (for last_modified filtering)


@pytest.mark.parametrize("start,end,msg", [
    ("2026-11-05", "2026-11-01", "before"),
    ("2026-11-01", None, "both"),
    ("yesterday", "2026-11-01", "ISO"),
    ("2026-01-01", "2026-03-01", "longer"),
])
def test_bad_overrides(start, end, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_window(tz="UTC", window_start=start, window_end=end)


def test_a_window_at_the_edge_of_the_calendar_is_refused_with_a_reason():
    """0001-01-01 in Berlin is before the first instant Python has in UTC: plan failed with a bare
    OverflowError ("date value out of range"). Now a ValueError that names the window."""
    with pytest.raises(ValueError, match="'0001-01-01' .. '0001-01-02' lies outside the dates a window can have"):
        resolve_window(tz="Europe/Berlin", window_start="0001-01-01", window_end="0001-01-02")


def test_window_requires_tz():
    with pytest.raises(ValueError, match="aware"):
        Window(datetime(2026, 1, 1), datetime(2026, 1, 2))
    assert parse_instant("2026-01-01T00:00Z", "Asia/Bangkok").tzinfo is not None


def test_windows_seconds_apart_never_share_an_id():
    """Ids were cut to the minute: a manual window 30 s off the 20th's night got the 20th's id, took
    its lock and replaced its QA report and Asset events while masking the 21st."""
    from platemask.layout import WINDOW_ID

    night = Window(datetime(2026, 11, 20, tzinfo=timezone.utc), datetime(2026, 11, 21, tzinfo=timezone.utc))
    assert night.id == "20261120T0000Z-20261121T0000Z"  # whole minutes keep the short form
    shifted = [Window(night.start + d, night.end + d) for d in
               (timedelta(seconds=30), timedelta(seconds=59), timedelta(microseconds=1), timedelta(milliseconds=500))]
    ids = [night.id] + [w.id for w in shifted]
    assert len(set(ids)) == len(ids), ids
    assert all(WINDOW_ID.match(i) for i in ids), ids  # the QA view still finds them
    assert all(i == i.strip() and "/" not in i and ":" not in i for i in ids)  # key-safe
