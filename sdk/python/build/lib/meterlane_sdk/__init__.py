"""Meterlane's Python SDK: speaks HTTP to a Meterlane server, never imports it."""

from meterlane_sdk.client import Lease, MeteredCall, Meterlane
from meterlane_sdk.errors import (
    BadRequest,
    MeterlaneError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
)

__all__ = ["BadRequest", "Lease", "MeteredCall", "Meterlane", "MeterlaneError", "NotFound",
           "PermissionDenied", "QuotaExceeded", "RateLimited", "ServiceUnavailable"]
