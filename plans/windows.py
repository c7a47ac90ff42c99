"""Window arithmetic for limits: parse a spec, find its period or rolling slots (no I/O)."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CALENDAR_UNITS = ("minute", "hour", "day", "week", "month")
_MIN_ROLLING_S = 60
_MAX_SPAN_S = 400 * 86400
_MAX_SLOTS = 60
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DUR = r"([0-9]{1,9})([smhd])"
_ROLLING = re.compile(r"rolling:" + _DUR)
# N is kept below 2**53: the Redis store does its arithmetic in Lua doubles.
_BUCKET = re.compile(r"bucket:([0-9]{1,15})/" + _DUR)
_ACCEPTED = (
    "accepted: minute, hour, day, week, month, cycle, none, rolling:<n><s|m|h|d> "
    "(60s to 400d, e.g. rolling:5h), bucket:<N>/<n><s|m|h|d> (N >= 1, 1s to 400d, "
    "e.g. bucket:1000/1m)"
)


class WindowError(ValueError):
    """A window spec is malformed; the message says what is accepted."""


@dataclass(frozen=True)
class Window:
    spec: str  # the text it was parsed from, e.g. "day", "rolling:5h", "bucket:1000/1m"
    kind: str  # "calendar" | "cycle" | "rolling" | "bucket" | "none"
    unit: str = ""  # calendar only: "minute" | "hour" | "day" | "week" | "month"
    seconds: int = 0  # rolling: span in seconds; bucket: refill interval in seconds
    refill: int = 0  # bucket only: tokens added per interval
    tz: str = "UTC"  # IANA zone of calendar day/week/month windows


@dataclass(frozen=True)
class Period:
    id: str  # stable, differs between consecutive periods: "d20261122", "w2026W47", ...
    start: datetime  # tz-aware UTC, inclusive
    end: datetime  # tz-aware UTC, exclusive: the counter's resets_at


@dataclass(frozen=True)
class Slots:
    size: int  # seconds per slot
    count: int  # slots current-count+1 .. current (inclusive) are inside the window
    current: int  # the slot holding now: floor(epoch seconds / size)


# -- parsing ------------------------------------------------------------------------------------


def parse_window(text: str, tz: str = "UTC") -> Window:
    """Parse a window spec (see _ACCEPTED); calendar day/week/month are local to zone `tz`."""
    spec = text.strip()
    _check_zone(tz)
    if spec in _CALENDAR_UNITS:
        return Window(spec=spec, kind="calendar", unit=spec, tz=tz)
    if spec in ("cycle", "none"):
        return Window(spec=spec, kind=spec, tz=tz)
    if m := _ROLLING.fullmatch(spec):
        seconds = _duration(spec, m.group(1), m.group(2))
        if not _MIN_ROLLING_S <= seconds <= _MAX_SPAN_S:
            raise WindowError(f"window {spec!r}: a rolling span must be 60s to 400d; {_ACCEPTED}")
        return Window(spec=spec, kind="rolling", seconds=seconds, tz=tz)
    if m := _BUCKET.fullmatch(spec):
        refill = int(m.group(1))
        if refill < 1:
            raise WindowError(f"window {spec!r}: a bucket refills at least 1; {_ACCEPTED}")
        seconds = _duration(spec, m.group(2), m.group(3))
        if seconds > _MAX_SPAN_S:
            raise WindowError(f"window {spec!r}: a bucket interval is at most 400d; {_ACCEPTED}")
        return Window(spec=spec, kind="bucket", seconds=seconds, refill=refill, tz=tz)
    raise WindowError(f"window {spec!r} is not valid; {_ACCEPTED}")


def _duration(spec: str, number: str, unit: str) -> int:
    n = int(number)
    if n < 1:
        raise WindowError(f"window {spec!r}: a duration must be positive; {_ACCEPTED}")
    return n * _UNIT_S[unit]


def _check_zone(tz: str) -> None:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise WindowError(f"unknown time zone {tz!r}: use an IANA name such as "
                          "'UTC' or 'Europe/Berlin'") from None


# -- epoch helpers ------------------------------------------------------------------------------


def epoch_ms(dt: datetime) -> int:
    """Milliseconds since the Unix epoch, floored (exact: no float on the way)."""
    return (_aware(dt, "dt") - _EPOCH) // timedelta(milliseconds=1)


def from_epoch_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def _aware(dt: datetime, name: str) -> datetime:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {dt.isoformat()}")
    return dt


# -- periods ------------------------------------------------------------------------------------


def period_of(window: Window, now: datetime, anchor: datetime | None = None) -> Period:
    """The period of a calendar or cycle window that contains `now` (start <= now < end).

    `anchor` is the billing-cycle start, required for "cycle" windows and ignored otherwise."""
    _aware(now, "now")
    if window.kind == "cycle":
        if anchor is None:
            raise ValueError(f"window {window.spec!r} needs an anchor instant")
        return _cycle_period(now, _aware(anchor, "anchor"))
    if window.kind != "calendar":
        raise ValueError(f"window {window.spec!r} ({window.kind}) has no periods")
    if window.unit in ("minute", "hour"):
        size = timedelta(minutes=1) if window.unit == "minute" else timedelta(hours=1)
        start = _EPOCH + (now - _EPOCH) // size * size
        fmt = "M%Y%m%d%H%M" if window.unit == "minute" else "h%Y%m%d%H"
        return Period(id=_stamp(start, fmt), start=start, end=start + size)
    if window.unit in ("day", "week", "month"):
        return _local_period(window.unit, ZoneInfo(window.tz), now)
    raise ValueError(f"window {window.spec!r} has an unknown calendar unit {window.unit!r}")


def _stamp(dt: datetime, fmt: str) -> str:
    # strftime's %Y does not zero-pad years below 1000 on every platform
    return dt.strftime(fmt.replace("%Y", f"{dt.year:04d}"))


def _local_period(unit: str, zone: ZoneInfo, now: datetime) -> Period:
    """A local day/week/month: from the first instant of its first local date to the next's.

    Local dates are not monotonic around some transitions, so the label found from now's local
    date is adjusted until its period holds now."""
    label = _label(unit, now.astimezone(zone).date())
    start = _first_instant(zone, label)
    while now < start:
        label = _step(unit, label, -1)
        start = _first_instant(zone, label)
    nxt = _step(unit, label, 1)
    end = _first_instant(zone, nxt)
    while now >= end:
        label, start = nxt, end
        nxt = _step(unit, label, 1)
        end = _first_instant(zone, nxt)
    return Period(id=_label_id(unit, label), start=start, end=end)


def _label(unit: str, day: date) -> date:
    if unit == "day":
        return day
    if unit == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _step(unit: str, label: date, k: int) -> date:
    if unit == "day":
        return label + timedelta(days=k)
    if unit == "week":
        return label + timedelta(weeks=k)
    year, month = divmod(label.year * 12 + label.month - 1 + k, 12)
    return date(year, month + 1, 1)


def _label_id(unit: str, label: date) -> str:
    if unit == "day":
        return f"d{label.year:04d}{label.month:02d}{label.day:02d}"
    if unit == "week":
        iso = label.isocalendar()
        return f"w{iso.year:04d}W{iso.week:02d}"
    return f"m{label.year:04d}{label.month:02d}"


def _first_instant(zone: ZoneInfo, day: date) -> datetime:
    """The first instant (UTC) at which the local clock in `zone` reaches midnight of `day`."""
    wall = datetime(day.year, day.month, day.day)
    early = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if _wall(zone, early) == wall:
        return early
    # Midnight falls in a gap: the day starts at the transition, which lies between the two
    # readings of the wall time (fold=1 reads it with the later, larger offset). Transitions
    # fall on whole seconds.
    lo = int((wall.replace(tzinfo=zone, fold=1).astimezone(UTC) - _EPOCH).total_seconds())
    hi = int((early - _EPOCH).total_seconds())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _wall(zone, _EPOCH + timedelta(seconds=mid)) >= wall:
            hi = mid
        else:
            lo = mid
    return _EPOCH + timedelta(seconds=hi)


def _wall(zone: ZoneInfo, instant: datetime) -> datetime:
    return instant.astimezone(zone).replace(tzinfo=None)


def _cycle_period(now: datetime, anchor: datetime) -> Period:
    """Monthly periods from the anchor, computed in UTC; period k starts on the anchor's day
    (clamped to the month's length, always from the original day) of month anchor+k."""
    a = anchor.astimezone(UTC)
    n = now.astimezone(UTC)
    k = (n.year - a.year) * 12 + (n.month - a.month)
    start = _cycle_start(a, k)
    if n < start:
        k -= 1
        start = _cycle_start(a, k)
    end = _cycle_start(a, k + 1)
    return Period(id=f"c{start.year:04d}{start.month:02d}{start.day:02d}", start=start, end=end)


def _cycle_start(anchor: datetime, k: int) -> datetime:
    year, month0 = divmod(anchor.year * 12 + anchor.month - 1 + k, 12)
    day = min(anchor.day, calendar.monthrange(year, month0 + 1)[1])
    return anchor.replace(year=year, month=month0 + 1, day=day)


# -- rolling slots and buckets ------------------------------------------------------------------


def rolling_slots(window: Window, now: datetime) -> Slots:
    """The slot counters of a rolling window at `now`.

    The span is cut into c equal slots (c the largest divisor of the span that is <= 60) and
    one more slot is kept: a slot's usage counts until the whole slot has left the span, so
    usage always counts for at least the full span (conservative: never more than the amount
    in any true rolling span), and for less than span + one slot."""
    _aware(now, "now")
    if window.kind != "rolling" or window.seconds < 1:
        raise ValueError(f"window {window.spec!r} ({window.kind}) is not a rolling window")
    divisions = max(c for c in range(1, _MAX_SLOTS + 1) if window.seconds % c == 0)
    size = window.seconds // divisions
    current = (now - _EPOCH) // timedelta(seconds=size)
    return Slots(size=size, count=divisions + 1, current=current)


def slot_end(slots: Slots, index: int) -> datetime:
    """When usage recorded in slot `index` stops counting: the start of slot index + count."""
    return _EPOCH + timedelta(seconds=(index + slots.count) * slots.size)


def bucket_params(window: Window) -> tuple[int, int]:
    """(tokens added per interval, interval in ms) of a token-bucket window."""
    if window.kind != "bucket":
        raise ValueError(f"window {window.spec!r} ({window.kind}) is not a bucket window")
    return window.refill, window.seconds * 1000
