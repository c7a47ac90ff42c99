"""One call's ledger record, and the checks every record passes before a write: a record no
database would take is refused here (and quarantined by the writer), never sent to one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

from core.text import control_free, redacted, storable
from metering.quarantine import describe

INT64 = 2**63 - 1
INT32 = 2**31 - 1
MAX_TOKENS_PER_CALL = 10**9  # DESIGN.md §9: tokens per call 0..10^9
# identifiers: refused (the record is quarantined) when they do not fit, never changed
_IDENTIFIERS = {"request_id": 40, "idempotency_key": 300, "endpoint": 32,
                "requested_model": 200, "upstream": 100, "upstream_model": 200,
                "usage_source": 16, "status": 32, "route_alias": 100, "plan_id": 64}
_REQUIRED = ("request_id", "idempotency_key", "endpoint", "requested_model", "usage_source",
             "status")
# free text (an upstream's words among them): made storable and kept
_FREE_TEXT = {"error": 500, "route_reason": 500, "usage_note": 200}
_TOKENS = ("input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
           "cache_write_tokens")


@dataclass(frozen=True)
class CallRecord:
    """Everything the ledger keeps about one model call (never prompt or completion text)."""

    app_id: int
    end_user_id: int
    request_id: str
    idempotency_key: str
    endpoint: str
    requested_model: str
    upstream: str | None
    upstream_model: str | None
    stream: bool
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    usage_source: str
    cost_pico_usd: int | None
    priced: bool
    status: str
    http_status: int
    error: str | None
    latency_ms: int
    ttft_ms: int | None
    created_at: datetime
    limits_pending: bool = False
    route_alias: str | None = None
    route_reason: str | None = None
    baseline_cost_pico_usd: int | None = None
    cache_write_tokens: int = 0
    plan_id: str | None = None
    usage_note: str | None = None
    credits_pending: bool = False  # to be accounted against the plan's allowance
    supersedes_id: int | None = None  # a correction: the row it voids or amends
    correction: str | None = None     # void | amend (metering.corrections)

    def row(self) -> dict[str, Any]:
        values = dict(self.__dict__)  # all fields are scalars: no deep copy needed
        return cleaned(values)


def cleaned(row: dict[str, Any]) -> dict[str, Any]:
    """Free text made storable: control characters out, cut to its column; an error text
    without anything that looks like a key or an address (it may be an upstream's words)."""
    for name, cap in _FREE_TEXT.items():
        value = row.get(name)
        if isinstance(value, str):
            row[name] = storable(redacted(value) if name == "error" else value, cap)
    return row


def problem_of(row: dict[str, Any]) -> str | None:
    """Why the ledger cannot store this record as it is (None: it can). Checked before every
    write, so a record no database would take never reaches one."""
    for name in ("app_id", "end_user_id"):
        value = row.get(name)
        if not is_int(value) or not 1 <= value <= INT64:
            return f"{name} is not a row id: {describe(value)}"
    for name, cap in _IDENTIFIERS.items():
        value = row.get(name)
        if value is None and name not in _REQUIRED:
            continue
        if not isinstance(value, str) or not value or len(value) > cap \
                or not control_free(value, multiline=False):
            return f"{name} is not 1 to {cap} printable characters: {describe(value)}"
    for name in _FREE_TEXT:
        if row.get(name) is not None and not isinstance(row[name], str):
            return f"{name} is not text: {describe(row[name])}"
    for name in _TOKENS:
        value = row.get(name, 0)
        if not is_int(value) or not 0 <= value <= MAX_TOKENS_PER_CALL:
            return f"{name} is not a token count from 0 to 10^9: {describe(value)}"
    if row.get("cached_input_tokens", 0) + row.get("cache_write_tokens", 0) \
            > row.get("input_tokens", 0) \
            or row.get("reasoning_tokens", 0) > row.get("output_tokens", 0):
        return "token counts contradict: cached and cache-written above input, or " \
               "reasoning above output"
    for name in ("cost_pico_usd", "baseline_cost_pico_usd"):
        value = row.get(name)
        if value is not None and (not is_int(value) or not 0 <= value <= INT64):
            return f"{name} is outside 64-bit pico-USD: {describe(value)}"
    for name in ("http_status", "latency_ms", "ttft_ms"):
        value = row.get(name)
        if (value is not None or name != "ttft_ms") and (
                not is_int(value) or not 0 <= value <= INT32):
            return f"{name} is not a 32-bit count: {describe(value)}"
    for name in ("stream", "priced", "limits_pending", "credits_pending"):
        if not isinstance(row.get(name, False), bool):
            return f"{name} is not true or false: {describe(row.get(name))}"
    at = row.get("created_at")
    if not isinstance(at, datetime) or at.tzinfo is None or not 1970 <= at.year <= 9998:
        return f"created_at is not a time from 1970 to 9998 with a zone: {describe(at)}"
    return None


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
