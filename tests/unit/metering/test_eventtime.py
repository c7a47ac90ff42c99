"""Event time: the bounds a reported call's time keeps, and the windows a late call counts in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from metering.eventtime import EventTimeError, age_text, checked_event_time, counts_now
from plans.catalog import LimitSpec
from plans.windows import parse_window

NOW = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
DAY = 35 * 86400


def limit(window: str, tz: str = "UTC") -> LimitSpec:
    return LimitSpec(id="l", metric="tokens", window=parse_window(window, tz), amount=100)


def test_the_bounds_are_35_days_back_and_5_minutes_ahead() -> None:
    assert checked_event_time(None, NOW, DAY) is None  # not given: now, on the engine's clock
    assert checked_event_time(NOW - timedelta(days=35), NOW, DAY) == NOW - timedelta(days=35)
    assert checked_event_time(NOW + timedelta(minutes=5), NOW, DAY) is not None
    with pytest.raises(EventTimeError, match=r"older than \[metering\] max_event_age "
                                             r"\(35 days\)") as old:
        checked_event_time(NOW - timedelta(days=35, seconds=1), NOW, DAY)
    assert old.value.status == 422
    with pytest.raises(EventTimeError, match="5 minutes in the future"):
        checked_event_time(NOW + timedelta(minutes=5, seconds=1), NOW, DAY)
    with pytest.raises(EventTimeError, match=r"^time is older"):
        checked_event_time(NOW - timedelta(days=40), NOW, DAY, "time")


def test_a_bound_is_named_as_a_person_says_it() -> None:
    assert [age_text(s) for s in (DAY, 86400, 7200, 5400, 61)] == [
        "35 days", "1 day", "2 hours", "90 minutes", "61 seconds"]


def test_a_late_call_counts_only_in_a_window_still_holding_it() -> None:
    day = limit("day")
    assert counts_now(day, None, NOW - timedelta(hours=9), NOW)  # today, 01:00
    assert not counts_now(day, None, NOW - timedelta(hours=11), NOW)  # yesterday: over
    # a day in another zone: 23:00 UTC yesterday is today in Berlin (00:00 +01:00)
    berlin = limit("day", "Europe/Berlin")
    assert counts_now(berlin, None, datetime(2026, 11, 19, 23, 30, tzinfo=UTC), NOW)
    assert not counts_now(berlin, None, datetime(2026, 11, 19, 22, 30, tzinfo=UTC), NOW)
    month = limit("month")
    assert counts_now(month, None, datetime(2026, 11, 1, tzinfo=UTC), NOW)
    assert not counts_now(month, None, datetime(2026, 10, 31, 23, 59, tzinfo=UTC), NOW)
    cycle, anchor = limit("cycle"), datetime(2026, 9, 15, 12, tzinfo=UTC)
    assert counts_now(cycle, anchor, datetime(2026, 11, 15, 12, tzinfo=UTC), NOW)
    assert not counts_now(cycle, anchor, datetime(2026, 11, 15, 11, 59, tzinfo=UTC), NOW)
    rolling = limit("rolling:5h")
    assert counts_now(rolling, None, NOW - timedelta(hours=4, minutes=59), NOW)
    assert not counts_now(rolling, None, NOW - timedelta(hours=5), NOW)
    # rate buckets are about calls now: a late call is not charged to them
    bucket = limit("bucket:1000/1m")
    assert not counts_now(bucket, None, NOW - timedelta(minutes=6), NOW)
    # within the clock skew, either way, a call is taken as now and counts everywhere
    for window in (day, rolling, bucket):
        assert counts_now(window, None, NOW - timedelta(minutes=4), NOW)
        assert counts_now(window, None, NOW + timedelta(minutes=4), NOW)
