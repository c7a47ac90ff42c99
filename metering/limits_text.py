"""How limits read to people and clients: amounts in their units, reset times, and the
quota headers every gateway response carries."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from core.meters import METER_SCALE, format_units
from metering.pricing import format_usd
from plans.catalog import LimitSpec

if TYPE_CHECKING:
    from metering.leases import Applied, Lease


def unit_of(limit: LimitSpec) -> str:
    if limit.meter is not None:
        return f"{limit.unit or limit.meter}" + (
            f" per {limit.window.spec}" if limit.window.kind != "none" else "")
    return {"tokens": "tokens", "credits": "credits", "requests": "requests", "cost_usd": "USD",
            "concurrent": "concurrent requests"}[limit.metric] + (
        f" per {limit.window.spec}" if limit.window.kind != "none" else "")


def value_of(limit: LimitSpec, amount: int) -> int | str:
    if limit.metric == "cost_usd":
        return format_usd(amount) or "0"
    if limit.meter is not None:  # micro-units: a whole number of units, else its decimals
        return amount // METER_SCALE if amount % METER_SCALE == 0 else format_units(amount)
    return amount


def shown(limit: LimitSpec, amount: int) -> str:
    value = value_of(limit, amount)
    return f"{value:,}" if isinstance(value, int) else str(value)


def utc_iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1h2m3s"."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = int(-(-seconds // 1))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def quota_headers(applied: list[Applied], now: datetime) -> dict[str, str]:
    """X-Meterlane-Quota-* for the tightest quota, and OpenAI's x-ratelimit-* for the
    tightest request and token rate limits."""
    headers: dict[str, str] = {}
    quotas = [a for a in applied if a.state is not None and not a.limit.is_rate]
    if quotas:
        tight = min(quotas, key=lambda a: (a.state.remaining / a.limit.amount  # type: ignore[union-attr]
                                           if a.limit.amount else 0))
        assert tight.state is not None
        headers["X-Meterlane-Quota-Limit"] = tight.limit.id
        headers["X-Meterlane-Quota-Remaining"] = str(value_of(tight.limit,
                                                            max(0, tight.state.remaining)))
        resets = tight.resets_at(now)
        headers["X-Meterlane-Quota-Reset"] = utc_iso(resets) or ""
    for metric, suffix in (("requests", "requests"), ("tokens", "tokens")):
        rates = [a for a in applied if a.state is not None and a.limit.is_rate
                 and a.limit.metric == metric]
        if not rates:
            continue
        tight = min(rates, key=lambda a: a.state.remaining)  # type: ignore[union-attr]
        assert tight.state is not None
        headers[f"x-ratelimit-limit-{suffix}"] = str(tight.limit.amount)
        headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, tight.state.remaining))
        resets = tight.resets_at(now)
        headers[f"x-ratelimit-reset-{suffix}"] = _duration(
            (resets - now).total_seconds() if resets else 0)
    return headers


class QuotaHeaders:
    """A call's quota_headers, worked out once, when first asked for (the gateway asks while
    the upstream works on the call); none without a lease."""

    __slots__ = ("_lease", "_headers")

    def __init__(self, lease: Lease | None) -> None:
        self._lease = lease
        self._headers: dict[str, str] | None = None if lease is not None else {}

    def __call__(self) -> dict[str, str]:
        if self._headers is None:
            assert self._lease is not None
            self._headers = quota_headers(self._lease.applied, self._lease.created)
        return self._headers
