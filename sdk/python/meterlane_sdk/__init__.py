"""Meterlane's Python SDK: speaks HTTP to a Meterlane server, never imports it."""

from meterlane_sdk._api import Lease
from meterlane_sdk.aio import AsyncMeteredCall, AsyncMeterlane
from meterlane_sdk.client import MeteredCall, Meterlane
from meterlane_sdk.errors import (
    BadRequest,
    Conflict,
    ConnectionFailed,
    MeterlaneError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
)
from meterlane_sdk.webhooks import InvalidSignature, verify

__all__ = ["AsyncMeteredCall", "AsyncMeterlane", "BadRequest", "Conflict", "ConnectionFailed",
           "InvalidSignature", "Lease", "MeteredCall", "Meterlane", "MeterlaneError", "NotFound",
           "PermissionDenied", "QuotaExceeded", "RateLimited", "ServiceUnavailable", "verify"]
