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


def verify(body: bytes, signature: str, secret: str, *,
           tolerance: int = TOLERANCE_SECONDS, now: float | None = None) -> dict[str, Any]:
    """The event of a delivery whose `Meterlane-Signature` header checks out; raises
    InvalidSignature otherwise. Pass the raw request body, not re-encoded JSON. De-duplicate by
    the event's "id": a delivery may come more than once."""
    fields = dict(part.split("=", 1) for part in signature.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
        given = fields["v1"]
    except (KeyError, ValueError) as exc:
        raise InvalidSignature("malformed Meterlane-Signature header") from exc
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise InvalidSignature("the signature's timestamp is outside the tolerance")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body,
                        hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")):
        raise InvalidSignature("the signature does not match")
    event: dict[str, Any] = json.loads(body)
    return event
