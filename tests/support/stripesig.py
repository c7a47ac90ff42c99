"""Stripe's webhook signature, computed as Stripe does (HMAC-SHA256 of "timestamp.payload"
with the endpoint's secret), for tests that deliver events as Stripe would."""

from __future__ import annotations

import hashlib
import hmac
import time


def stripe_headers(payload: bytes, secret: str, at: int | None = None) -> dict[str, str]:
    """The Stripe-Signature header (and JSON content type) of one delivery."""
    t = str(at or int(time.time()))
    sig = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"}
