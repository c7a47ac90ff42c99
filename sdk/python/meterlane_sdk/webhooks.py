"""Checking the signature of a webhook Meterlane sent (a paywall event, ...)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

TOLERANCE_SECONDS = 300


class InvalidSignature(Exception):
    """The delivery is not from Meterlane, was altered, or is too old (a replay)."""


def verify(body: bytes, signature: str | None, secret: str, *,
           tolerance: float = TOLERANCE_SECONDS, now: float | None = None) -> dict[str, Any]:
    """The event of a delivery whose `Meterlane-Signature` header checks out; raises
    InvalidSignature otherwise (and for nothing else). Pass the raw request body, not
    re-encoded JSON. De-duplicate by the event's "id": a delivery may come more than once.

    The header is `t=<unix seconds>,v1=<hex>`: comma-separated `name=value` parts (spaces
    around a part are ignored); exactly one `t`; one or more `v1`, any of which may match
    HMAC-SHA256(secret, "<t>." + body) (compared in constant time); other parts are ignored.
    A `t` more than `tolerance` seconds from `now` (default: the clock), before or after, is
    refused; exactly `tolerance` away is accepted."""
    if not signature:
        raise InvalidSignature("no Meterlane-Signature header")
    parts = [p.strip().split("=", 1) for p in signature.split(",")]
    stamps = [p[1] for p in parts if len(p) == 2 and p[0] == "t"]
    given = [p[1] for p in parts if len(p) == 2 and p[0] == "v1"]
    if len(stamps) != 1 or not (stamps[0].isascii() and stamps[0].isdigit()) or not given:
        raise InvalidSignature("malformed Meterlane-Signature header: it needs one t=<unix "
                               "seconds> and a v1=<hex>")
    timestamp = int(stamps[0])
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise InvalidSignature("the signature's timestamp is outside the tolerance")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body,
                        hashlib.sha256).hexdigest().encode()
    # every candidate is compared (no early exit): the time taken says nothing about which
    matched = [hmac.compare_digest(expected, v.encode("utf-8", "replace")) for v in given]
    if not any(matched):
        raise InvalidSignature("the signature does not match")
    try:
        event = json.loads(body)
    except ValueError as exc:
        raise InvalidSignature("the signed body is not JSON") from exc
    if not isinstance(event, dict):
        raise InvalidSignature("the signed body is not a JSON object")
    return event
