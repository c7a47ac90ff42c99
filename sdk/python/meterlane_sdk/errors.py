"""Typed errors, read from Meterlane's answers (problem+json, or OpenAI's envelope)."""

from __future__ import annotations

from typing import Any


class MeterlaneError(Exception):
    """Any answer other than success. `body` is the parsed error document."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 body: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.body = body or {}
        self.headers = headers or {}


class ConnectionFailed(MeterlaneError):
    """The server could not be reached, or did not answer in time (status 0)."""


class BadRequest(MeterlaneError):
    """400 / 422: the request was refused as it is."""


class PermissionDenied(MeterlaneError):
    """401 / 403: the key is missing, wrong, or may not do this."""


class NotFound(MeterlaneError):
    """404."""


class Conflict(MeterlaneError):
    """409: the request clashes with what is recorded (a consent used twice, a lease already
    settled, a subscription checkout without consent). `rule` names the compliance rule at
    fault (CNS-01, ...), when there is one."""

    @property
    def rule(self) -> str | None:
        found = self.body.get("rule")
        return str(found) if found is not None else None

    @property
    def key_in_use(self) -> bool:
        """The first request with this Idempotency-Key is still running."""
        return (self.code or "").replace("-", "_") == "idempotency_key_in_use"

    @property
    def retry_after(self) -> float | None:
        return _seconds(self.headers.get("retry-after"))


class QuotaExceeded(MeterlaneError):
    """402: a quota of the end user's plan is spent. `limit` names it (used, limit,
    resets_at); `paywall` carries the paywall event and offer when the server has one."""

    @property
    def limit(self) -> dict[str, Any]:
        return dict(self._detail().get("limit") or {})

    @property
    def paywall(self) -> dict[str, Any] | None:
        found = self._detail().get("paywall")
        return dict(found) if isinstance(found, dict) else None

    def _detail(self) -> dict[str, Any]:
        inner = self.body.get("error")
        return inner if isinstance(inner, dict) else self.body


class RateLimited(MeterlaneError):
    """429: a rate limit; `retry_after` is how many seconds to wait."""

    @property
    def retry_after(self) -> float | None:
        return _seconds(self.headers.get("retry-after"))


class ServiceUnavailable(MeterlaneError):
    """503: the server (or its limit store) cannot answer now; try again shortly."""

    @property
    def retry_after(self) -> float | None:
        return _seconds(self.headers.get("retry-after"))


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def error_for(status: int, body: Any, headers: dict[str, str]) -> MeterlaneError:
    doc: dict[str, Any] = body if isinstance(body, dict) else {}
    inner = doc.get("error") if isinstance(doc.get("error"), dict) else None
    if inner is not None:  # OpenAI's envelope (gateway routes)
        message, code = str(inner.get("message", "")), inner.get("code")
    else:  # problem+json
        message = str(doc.get("detail") or doc.get("title") or f"HTTP {status}")
        code = doc.get("code") or str(doc.get("type", "")).rsplit("/", 1)[-1] or None
    cls: type[MeterlaneError] = {
        400: BadRequest, 422: BadRequest, 401: PermissionDenied, 403: PermissionDenied,
        404: NotFound, 409: Conflict, 402: QuotaExceeded, 429: RateLimited, 503: ServiceUnavailable,
    }.get(status, MeterlaneError)
    return cls(status, message, code=code, body=doc, headers=headers)
