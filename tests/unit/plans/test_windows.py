"""Window arithmetic: specs parse strictly, periods tile time (DST too), slots are conservative."""

import re
from datetime import UTC, date, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plans.windows import (
    Period,
    Slots,
    Window,
    WindowError,
    bucket_params,
    epoch_ms,
    from_epoch_ms,
    parse_window,
    period_of,
    rolling_slots,
    slot_end,
)

FAST = settings(deadline=None, max_examples=200)
US = timedelta(microseconds=1)
HOUR = timedelta(hours=1)
# Goose Bay fell back at 00:01 until 2010: local dates ran 00:00 .. 00:01, back to 23:01
DST_ZONES = ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "America/Santiago",
             "America/Havana", "America/Goose_Bay"]
ZONES = ["UTC", "Asia/Kolkata", "Asia/Kathmandu", *DST_ZONES]


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
        second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def month_days(year: int, month: int) -> int:
    if month == 2:
        return 29 if is_leap(year) else 28
    return 30 if month in (4, 6, 9, 11) else 31


@cache
def transitions(zone_name: str) -> list[datetime]:
    """Instants (UTC) where the zone's offset changes, 2000-2040, found straight from zoneinfo:
    a daily scan, then bisection to the second."""
    zone = ZoneInfo(zone_name)
    found = []
    t = utc(2000, 1, 1)
    while t.year < 2040:
        nxt = t + timedelta(days=1)
        if t.astimezone(zone).utcoffset() != nxt.astimezone(zone).utcoffset():
            lo, hi = t, nxt
            while hi - lo > timedelta(seconds=1):
                mid = lo + (hi - lo) / 2
                mid = mid.replace(microsecond=0)
                if mid.astimezone(zone).utcoffset() == lo.astimezone(zone).utcoffset():
                    lo = mid
                else:
                    hi = mid
            found.append(hi)
        t = nxt
    return found


instants = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2099, 12, 1),
                        timezones=st.just(UTC))


@st.composite
def near_transition(draw: st.DrawFn, zone_name: str) -> datetime:
    """An instant within three days of one of the zone's offset changes, or exactly on it."""
    base = draw(st.sampled_from(transitions(zone_name)))
    shift = draw(st.one_of(st.just(0), st.integers(-3 * 86400 * 10**6, 3 * 86400 * 10**6)))
    return base + shift * US


@st.composite
def zone_and_instant(draw: st.DrawFn) -> tuple[str, datetime]:
    zone_name = draw(st.sampled_from(DST_ZONES))
    return zone_name, draw(st.one_of(near_transition(zone_name), instants))


def check_tiles(window: Window, now: datetime, anchor: datetime | None = None) -> Period:
    """The invariants every period obeys; returns the period of now."""
    p = period_of(window, now, anchor)
    assert p.start.tzinfo is UTC and p.end.tzinfo is UTC
    assert p.start <= now < p.end
    nxt = period_of(window, p.end, anchor)
    prev = period_of(window, p.start - US, anchor)
    assert nxt.start == p.end and prev.end == p.start
    assert len({prev.id, p.id, nxt.id}) == 3
    assert period_of(window, p.start, anchor) == p == period_of(window, p.end - US, anchor)
    return p


# -- parsing ------------------------------------------------------------------------------------


def test_parse_accepted_specs() -> None:
    assert parse_window("day", "Europe/Berlin") == Window(
        spec="day", kind="calendar", unit="day", tz="Europe/Berlin")
    assert parse_window("  minute\n") == Window(spec="minute", kind="calendar", unit="minute")
    assert parse_window("cycle") == Window(spec="cycle", kind="cycle")
    assert parse_window("none") == Window(spec="none", kind="none")
    assert parse_window("rolling:5h") == Window(spec="rolling:5h", kind="rolling", seconds=18000)
    assert parse_window("rolling:60s").seconds == 60
    assert parse_window("rolling:400d").seconds == 400 * 86400
    assert parse_window("bucket:1000/1m") == Window(
        spec="bucket:1000/1m", kind="bucket", seconds=60, refill=1000)
    assert parse_window("bucket:1/30s").seconds == 30


@pytest.mark.parametrize(("text", "tz", "named"), [
    ("rolling:0h", "UTC", "rolling:0h"),
    ("rolling:5x", "UTC", "rolling:5x"),
    ("bucket:abc", "UTC", "bucket:abc"),
    ("fortnight", "UTC", "fortnight"),
    ("rolling:30s", "UTC", "rolling:30s"),
    ("rolling:59s", "UTC", "rolling:59s"),
    ("rolling:401d", "UTC", "rolling:401d"),
    ("rolling:-5h", "UTC", "rolling:-5h"),
    ("rolling: 5h", "UTC", "rolling: 5h"),
    ("rolling:5H", "UTC", "rolling:5H"),
    ("Day", "UTC", "Day"),
    ("bucket:0/1m", "UTC", "bucket:0/1m"),
    ("bucket:10/0s", "UTC", "bucket:10/0s"),
    ("bucket:10/1m/2", "UTC", "bucket:10/1m/2"),
    ("bucket:10/401d", "UTC", "bucket:10/401d"),
    ("", "UTC", "''"),
    ("day", "Mars/Olympus", "Mars/Olympus"),
    ("day", "America", "America"),
    ("day", "utc ", "utc "),
    ("rolling:5h", "../etc", "../etc"),
])
def test_parse_errors_name_the_bad_text(text: str, tz: str, named: str) -> None:
    with pytest.raises(WindowError, match=r"(?s)^.*" + re.escape(named)) as err:
        parse_window(text, tz)
    assert isinstance(err.value, ValueError)
    if tz == "UTC":
        assert "accepted: minute, hour, day, week, month, cycle, none" in str(err.value)


@FAST
@given(st.integers(1, 400), st.sampled_from("smhd"), st.integers(1, 10**15 - 1))
def test_durations_parse_to_seconds(n: int, unit: str, refill: int) -> None:
    seconds = n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    spec = f"{n}{unit}"
    if 60 <= seconds <= 400 * 86400:
        assert parse_window(f"rolling:{spec}").seconds == seconds
    else:
        with pytest.raises(WindowError, match=f"rolling:{spec}"):
            parse_window(f"rolling:{spec}")
    window = parse_window(f"bucket:{refill}/{spec}")
    assert bucket_params(window) == (refill, seconds * 1000)


# -- calendar periods: hard facts ---------------------------------------------------------------


@pytest.mark.parametrize(("zone", "day", "start", "hours"), [
    ("Europe/Berlin", date(2026, 3, 29), utc(2026, 3, 28, 23), 23),
    ("Europe/Berlin", date(2026, 10, 25), utc(2026, 10, 24, 22), 25),
    ("America/New_York", date(2026, 11, 1), utc(2026, 11, 1, 4), 25),
    ("America/New_York", date(2026, 3, 8), utc(2026, 3, 8, 5), 23),
    ("Australia/Lord_Howe", date(2026, 10, 4), utc(2026, 10, 3, 13, 30), 23.5),
    ("Australia/Lord_Howe", date(2026, 4, 5), utc(2026, 4, 4, 13), 24.5),
    # Chile springs forward at local midnight: 6 Sep 2026 begins at 01:00 -03 (04:00Z)
    ("America/Santiago", date(2026, 9, 6), utc(2026, 9, 6, 4), 23),
    ("America/Santiago", date(2026, 4, 4), utc(2026, 4, 4, 3), 25),
    # Cuba too: 8 Mar 2026 begins at 01:00 -04 (05:00Z); 1 Nov repeats 00:00-01:00
    ("America/Havana", date(2026, 3, 8), utc(2026, 3, 8, 5), 23),
    ("America/Havana", date(2026, 11, 1), utc(2026, 11, 1, 4), 25),
    ("UTC", date(2026, 11, 22), utc(2026, 11, 22), 24),
    # Toronto 1919 sprang from 23:30 to 00:30: 31 Mar began at 00:30 EDT, mid-gap for midnight
    ("America/Toronto", date(1919, 3, 30), utc(1919, 3, 30, 5), 23.5),
    ("America/Toronto", date(1919, 3, 31), utc(1919, 3, 31, 4, 30), 23.5),
])
def test_local_day_lengths(zone: str, day: date, start: datetime, hours: float) -> None:
    window = parse_window("day", zone)
    p = period_of(window, start + timedelta(hours=hours / 2))
    assert p == Period(id=f"d{day:%Y%m%d}", start=start, end=start + timedelta(hours=hours))


def test_day_whose_local_date_runs_backwards() -> None:
    # Goose Bay, 28 Oct 1990: 00:01 ADT (03:01Z) fell back to 23:01 AST on the 27th; the
    # repeated hour belongs to the day already begun, the 28th (00:00 ADT = 03:00Z)
    window = parse_window("day", "America/Goose_Bay")
    day = Period(id="d19901028", start=utc(1990, 10, 28, 3), end=utc(1990, 10, 29, 4))
    assert period_of(window, utc(1990, 10, 28, 3, 30)) == day
    assert period_of(window, utc(1990, 10, 28, 2, 59)).end == day.start


def test_local_week_and_month() -> None:
    # Berlin's ISO week 13 of 2026 holds the spring-forward Sunday: 7 days less an hour
    week = period_of(parse_window("week", "Europe/Berlin"), utc(2026, 3, 29, 12))
    assert week == Period(id="w2026W13", start=utc(2026, 3, 22, 23), end=utc(2026, 3, 29, 22))
    # 1 Jan 2027 is a Friday of ISO week 53 of 2026
    week = period_of(parse_window("week"), utc(2027, 1, 1, 12))
    assert week == Period(id="w2026W53", start=utc(2026, 12, 28), end=utc(2027, 1, 4))
    month = period_of(parse_window("month", "America/New_York"), utc(2026, 3, 15))
    assert month == Period(id="m202603", start=utc(2026, 3, 1, 5), end=utc(2026, 4, 1, 4))
    month = period_of(parse_window("month", "America/New_York"), utc(2027, 1, 1, 3))
    assert month == Period(id="m202612", start=utc(2026, 12, 1, 5), end=utc(2027, 1, 1, 5))


def test_minute_and_hour_are_utc_whatever_the_zone() -> None:
    now = datetime(2026, 11, 22, 21, 42, 30, 500_000, tzinfo=UTC)
    minute = period_of(parse_window("minute", "Asia/Kolkata"), now)
    assert minute == Period(id="M202611222142", start=utc(2026, 11, 22, 21, 42),
                            end=utc(2026, 11, 22, 21, 43))
    hour = period_of(parse_window("hour", "Australia/Lord_Howe"), now)
    assert hour == Period(id="h2026112221", start=utc(2026, 11, 22, 21),
                          end=utc(2026, 11, 22, 22))


def test_now_in_any_zone_is_the_same_instant() -> None:
    window = parse_window("day", "Europe/Berlin")
    now = utc(2026, 3, 28, 23, 30)
    assert period_of(window, now) == period_of(window, now.astimezone(ZoneInfo("Asia/Tokyo")))


# -- calendar periods: properties ---------------------------------------------------------------


@FAST
@given(st.sampled_from(ZONES), instants)
def test_minute_and_hour_periods(zone: str, now: datetime) -> None:
    minute = check_tiles(parse_window("minute", zone), now)
    assert minute.end - minute.start == timedelta(seconds=60)
    hour = check_tiles(parse_window("hour", zone), now)
    assert hour.end - hour.start == HOUR
    assert hour.start.minute == hour.start.second == hour.start.microsecond == 0


@FAST
@given(zone_and_instant(), st.sampled_from(["day", "week", "month"]))
def test_local_periods_tile_across_dst(zone_now: tuple[str, datetime], unit: str) -> None:
    zone_name, now = zone_now
    zone = ZoneInfo(zone_name)
    p = check_tiles(parse_window(unit, zone_name), now)
    first = p.start.astimezone(zone)
    before = (p.start - US).astimezone(zone)
    # start is the first instant of its local date, and that date opens the day/week/month
    assert first.date() > before.date()
    assert first.time() < datetime.min.replace(hour=2).time()
    days = (p.end.astimezone(zone).date() - first.date()).days
    hours = (p.end - p.start) / HOUR
    if unit == "day":
        # (clocks have moved by up to 2 hours at once: Goose Bay's "double daylight time"
        # of 1988, Hypothesis found)
        assert p.id == f"d{first:%Y%m%d}" and days == 1 and abs(hours - 24) <= 2 \
            and hours * 2 == int(hours * 2)
    elif unit == "week":
        assert first.weekday() == 0 and days == 7 and abs(hours - 168) <= 2
        assert p.id == "w{}W{:02d}".format(*first.isocalendar()[:2])
    else:
        assert first.day == 1 and days == month_days(first.year, first.month)
        assert p.id == f"m{first:%Y%m}"


@settings(deadline=None, max_examples=300)
@given(st.sampled_from(sorted(available_timezones())), st.sampled_from(["day", "week", "month"]),
       st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1),
                    timezones=st.just(UTC)))
def test_every_zone_tiles(zone: str, unit: str, now: datetime) -> None:
    check_tiles(parse_window(unit, zone), now)


# -- billing cycles -----------------------------------------------------------------------------


def test_cycle_from_month_end_never_drifts() -> None:
    anchor = utc(2024, 1, 31, 10)
    cycle = parse_window("cycle")
    assert period_of(cycle, utc(2024, 3, 15), anchor) == Period(
        id="c20240229", start=utc(2024, 2, 29, 10), end=utc(2024, 3, 31, 10))
    assert period_of(cycle, utc(2024, 4, 1), anchor) == Period(
        id="c20240331", start=utc(2024, 3, 31, 10), end=utc(2024, 4, 30, 10))
    assert period_of(cycle, utc(2024, 2, 29, 10) - US, anchor).start == anchor
    assert period_of(cycle, utc(2023, 3, 1), utc(2023, 1, 31, 10)).start == utc(2023, 2, 28, 10)


def test_cycle_before_anchor_counts_backwards_and_anchor_zone_is_converted() -> None:
    cycle = parse_window("cycle")
    assert period_of(cycle, utc(2024, 2, 10), utc(2024, 3, 31)) == Period(
        id="c20240131", start=utc(2024, 1, 31), end=utc(2024, 2, 29))
    # 1 Feb 00:30 in Berlin is 31 Jan 23:30 UTC: the cycle runs on the 31st (clamped) in UTC
    anchor = datetime(2024, 2, 1, 0, 30, tzinfo=ZoneInfo("Europe/Berlin"))
    assert period_of(cycle, utc(2024, 3, 1), anchor).start == utc(2024, 2, 29, 23, 30)


def test_cycle_needs_an_aware_anchor() -> None:
    with pytest.raises(ValueError, match="anchor"):
        period_of(parse_window("cycle"), utc(2024, 1, 1))
    with pytest.raises(ValueError, match="anchor"):
        period_of(parse_window("cycle"), utc(2024, 1, 1), datetime(2023, 1, 1))


@FAST
@given(st.integers(1972, 2098), st.integers(0, 23), st.integers(0, 59),
       st.integers(0, 28 * 86400 - 1))
def test_cycle_from_jan_31_lands_on_feb_28_or_29(year: int, hour: int, minute: int,
                                                 late: int) -> None:
    anchor = utc(year, 1, 31, hour, minute)
    feb = utc(year, 2, 29 if is_leap(year) else 28, hour, minute)
    p = check_tiles(parse_window("cycle"), feb + timedelta(seconds=late), anchor)
    assert p.start == feb and p.end == utc(year, 3, 31, hour, minute)


@FAST
@given(st.integers(1971, 2098), st.integers(1, 31), st.integers(0, 23))
def test_cycle_rolls_over_the_year(year: int, day: int, hour: int) -> None:
    anchor = utc(year, 12, day, hour)
    cycle = parse_window("cycle")
    dec = check_tiles(cycle, anchor + US, anchor)
    assert dec.start == anchor and dec.end == utc(year + 1, 1, day, hour)
    jan = check_tiles(cycle, dec.end, anchor)
    assert jan.end == utc(year + 1, 2, min(day, month_days(year + 1, 2)), hour)
    assert jan.id == f"c{year + 1}01{day:02d}"


@FAST
@given(instants, st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2099, 1, 1),
                              timezones=st.sampled_from([UTC, ZoneInfo("Asia/Kolkata")])))
def test_cycle_periods(now: datetime, anchor: datetime) -> None:
    p = check_tiles(parse_window("cycle"), now, anchor)
    a = anchor.astimezone(UTC)
    for edge in (p.start, p.end):
        assert edge.day == min(a.day, month_days(edge.year, edge.month))
        assert edge.time() == a.time()
    months = (p.end.year - p.start.year) * 12 + p.end.month - p.start.month
    assert months == 1


# -- rolling slots, buckets, errors -------------------------------------------------------------


@FAST
@given(st.integers(60, 400 * 86400), instants)
def test_rolling_slots_are_conservative(seconds: int, now: datetime) -> None:
    slots = rolling_slots(Window(spec="rolling", kind="rolling", seconds=seconds), now)
    assert 2 <= slots.count <= 61 and slots.size * (slots.count - 1) == seconds
    at = (now - from_epoch_ms(0)) / timedelta(seconds=1)
    assert slots.size * slots.current <= at < slots.size * (slots.current + 1)
    oldest = slots.current - slots.count + 1
    covered = now - (slot_end(slots, oldest) - timedelta(seconds=slots.count * slots.size))
    assert timedelta(seconds=seconds) <= covered < timedelta(seconds=seconds + slots.size)
    assert slot_end(slots, slots.current) > now + timedelta(seconds=seconds)
    assert slot_end(slots, oldest) > now >= slot_end(slots, oldest - 1)


@FAST
@given(instants, st.integers(0, 10 * 3600 * 10**6))
def test_rolling_usage_counts_for_the_whole_span(used_at: datetime, later_us: int) -> None:
    window = parse_window("rolling:5h")
    then = rolling_slots(window, used_at)
    now = rolling_slots(window, used_at + later_us * US)
    counts = then.current >= now.current - now.count + 1
    assert counts == (used_at + later_us * US < slot_end(then, then.current))
    if later_us < 5 * 3600 * 10**6:
        assert counts


def test_rolling_slot_sizes() -> None:
    now = utc(2026, 1, 1)
    assert rolling_slots(parse_window("rolling:5h"), now) == Slots(
        size=300, count=61, current=int(now.timestamp()) // 300)
    assert rolling_slots(parse_window("rolling:60s"), now).size == 1
    assert rolling_slots(parse_window("rolling:7d"), now).size == 7 * 86400 // 60
    assert rolling_slots(parse_window("rolling:61s"), now).size == 61


def test_wrong_kind_and_naive_times_raise() -> None:
    with pytest.raises(ValueError, match="no periods"):
        period_of(parse_window("rolling:5h"), utc(2026, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        period_of(parse_window("day"), datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="not a rolling"):
        rolling_slots(parse_window("day"), utc(2026, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        rolling_slots(parse_window("rolling:5h"), datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="not a bucket"):
        bucket_params(parse_window("none"))
    with pytest.raises(ValueError, match="naive"):
        epoch_ms(datetime(2026, 1, 1))


@FAST
@given(st.datetimes(timezones=st.sampled_from([UTC, ZoneInfo("America/Havana")])))
def test_epoch_ms_round_trips(dt: datetime) -> None:
    ms = epoch_ms(dt)
    back = from_epoch_ms(ms)
    assert back.tzinfo is UTC and back <= dt < back + timedelta(milliseconds=1)
    assert epoch_ms(utc(1970, 1, 1, 0, 0, 1)) == 1000 and from_epoch_ms(-1) < utc(1970, 1, 1)
