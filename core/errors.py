"""Domain errors: each carries its HTTP status, a slug and a title (RFC 9457 problem details)."""

from __future__ import annotations

from typing import Any

PROBLEM_BASE = "https://meterlane.dev/problems"


class DomainError(Exception):
    """Base of every error a service raises on purpose; views never build errors."""

    status = 400
    slug = "bad-request"
    title = "Bad request"
    # OpenAI envelope fields, used on gateway routes.
    openai_type = "invalid_request_error"
    openai_code: str | None = None

    def __init__(self, detail: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.param = param
        self.headers = headers or {}
        self.extra = extra


class InvalidRequestError(DomainError):
    status, slug, title = 400, "invalid-request", "Invalid request"
    openai_code = "invalid_request"


class AuthenticationError(DomainError):
    status, slug, title = 401, "unauthenticated", "Missing or invalid API key"
    openai_type, openai_code = "authentication_error", "invalid_api_key"


class PermissionDeniedError(DomainError):
    status, slug, title = 403, "forbidden", "Not allowed for this key"
    openai_type, openai_code = "permission_error", "permission_denied"


class NotFoundError(DomainError):
    status, slug, title = 404, "not-found", "Not found"
    openai_code = "not_found"


class ConflictError(DomainError):
    status, slug, title = 409, "conflict", "Conflict"
    openai_code = "conflict"


class PayloadTooLargeError(DomainError):
    status, slug, title = 413, "payload-too-large", "Request body too large"
    openai_code = "request_too_large"


class QuotaExceededError(DomainError):
    status, slug, title = 402, "quota-exceeded", "Quota exceeded"
    openai_type, openai_code = "insufficient_quota", "quota_exceeded"


class RateLimitedError(DomainError):
    status, slug, title = 429, "rate-limited", "Rate limited"
    openai_type, openai_code = "rate_limit_error", "rate_limited"


class UpstreamError(DomainError):
    """The model provider answered with an error; status mirrors what fits the client."""

    status, slug, title = 502, "upstream-error", "Upstream error"
    openai_type, openai_code = "upstream_error", "upstream_error"


class UpstreamUnavailableError(UpstreamError):
    status, slug, title = 502, "upstream-unavailable", "Upstream unreachable"
    openai_code = "upstream_unavailable"


class UpstreamTimeoutError(UpstreamError):
    status, slug, title = 504, "upstream-timeout", "Upstream timed out"
    openai_code = "upstream_timeout"


class ServiceUnavailableError(DomainError):
    status, slug, title = 503, "unavailable", "Service unavailable"
    openai_type, openai_code = "service_unavailable", "service_unavailable"


DATABASE_UNAVAILABLE = ServiceUnavailableError(
    "The database is unavailable; try again shortly.", headers={"Retry-After": "1"})


def problem(status: int, title: str, detail: str, *, slug: str | None, instance: str,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An RFC 9457 problem document."""
    doc: dict[str, Any] = {
        "type": f"{PROBLEM_BASE}/{slug}" if slug else "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if extra:
        doc.update(extra)
    return doc


def openai_error(message: str, *, type_: str, code: str | None,
                 param: str | None = None, **extra: Any) -> dict[str, Any]:
    """OpenAI's error envelope."""
    body: dict[str, Any] = {"message": message, "type": type_, "param": param, "code": code}
    body.update(extra)
    return {"error": body}
