"""Meterlane's Python SDK: speaks HTTP to a Meterlane server, never imports it."""

from meterlane_sdk.client import Lease, MeteredCall, Meterlane
from meterlane_sdk.errors import (
    BadRequest,
    ConnectionFailed,
    MeterlaneError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
)
from meterlane_sdk.webhooks import InvalidSignature, verify

__all__ = ["BadRequest", "ConnectionFailed", "InvalidSignature", "Lease", "MeteredCall",
           "Meterlane", "MeterlaneError", "NotFound", "PermissionDenied", "QuotaExceeded",
           "RateLimited", "ServiceUnavailable", "verify"]
