"""Event time: when a reported call happened (it may be reported late), the bounds it must
keep, and which limit windows a late call still counts in."""

from __future__ import annotations

from datetime import datetime, timedelta

from core.errors import DomainError
from plans.catalog import LimitSpec
from plans.windows import period_of

FUTURE_SKEW = timedelta(minutes=5)  # clocks drift: an event this far ahead is taken as now
_UNITS = ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second"))


class EventTimeError(DomainError):
    status, slug, title = 422, "event-time-out-of-range", "Event time out of range"


def age_text(seconds: int) -> str:
    """A duration as a person says it: 3024000 -> "35 days", 5400 -> "90 minutes"."""
    for size, unit in _UNITS:
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds} seconds"  # pragma: no cover - the last unit always divides


def checked_event_time(at: datetime | None, now: datetime, max_age_seconds: int,
                       param: str = "timestamp") -> datetime | None:
    """The event's time as given (None: not given, it happens now on the engine's clock), or
    an EventTimeError naming the bound it breaks: at most `[metering] max_event_age` in the
    past, 5 minutes in the future."""
    if at is None:
        return None
    if at < now - timedelta(seconds=max_age_seconds):
        raise EventTimeError(
            f"{param} is older than [metering] max_event_age ({age_text(max_age_seconds)}): "
            f"{at.isoformat()} is before {(now - timedelta(seconds=max_age_seconds)).isoformat()}"
            ".", param=param, max_event_age_seconds=max_age_seconds)
    if at > now + FUTURE_SKEW:
        raise EventTimeError(
            f"{param} is more than 5 minutes in the future: {at.isoformat()} (the server's "
            f"clock says {now.isoformat()}).", param=param)
    return at


def counts_now(limit: LimitSpec, anchor: datetime | None, at: datetime, now: datetime) -> bool:
    """Whether an event that happened at `at` counts in the limit's window holding `now`.

    A late event counts only in a window it belongs to that is still open: the period of a
    calendar or cycle window that holds both times, a rolling window it still lies in. A
    window already over is not re-opened (the event is recorded and reported, not limited);
    rate buckets and concurrency are about calls in flight, and count only what happens now.
    An event within FUTURE_SKEW of now, ahead or behind, is taken as now."""
    if at >= now - FUTURE_SKEW:
        return True
    w = limit.window
    if w.kind == "calendar" or (w.kind == "cycle" and anchor is not None):
        return period_of(w, at, anchor).start == period_of(w, now, anchor).start
    if w.kind == "rolling":
        return at > now - timedelta(seconds=w.seconds)
    return False
