"""What the sync and the async client share, without I/O: the requests they send, and what to
do with each answer (the document, an error to raise, or a wait before trying again)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any
from urllib.parse import quote

import httpx

from meterlane_sdk.errors import (
    Conflict,
    ConnectionFailed,
    MeterlaneError,
    RateLimited,
    ServiceUnavailable,
    error_for,
)

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
MAX_RETRY_WAIT = 30.0  # a Retry-After longer than this is not waited out: the error is raised
USER_AGENT = "meterlane-sdk-python/0.2"


class Retry(Enum):
    """When a call is tried again (each time at most `max_retries` times)."""

    # the server said it did nothing (a 429 or a 503): a call that must not run twice
    REFUSED = "refused"
    # also after a connection failure or a timeout: reads, and writes that are idempotent on
    # the server (track's idempotency key, settle and release per lease, an Idempotency-Key)
    SAFE = "safe"


@dataclass(frozen=True)
class Call:
    """One request of the API, and how it is retried."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    retry: Retry = Retry.SAFE

    def request(self) -> dict[str, Any]:
        """The arguments of httpx's `request()`, for either client."""
        return {"method": self.method, "url": self.path, "json": self.json,
                "params": self.params, "headers": self.headers}

    @property
    def keyed(self) -> bool:
        return "Idempotency-Key" in self.headers


def write(method: str, path: str, body: Any, idempotency_key: str | None) -> Call:
    """A write that must not run twice: with an Idempotency-Key it may be tried again after a
    lost answer (the server then replays its first answer); without one, only when the server
    says it did nothing."""
    if idempotency_key is None:
        return Call(method, path, json=body, retry=Retry.REFUSED)
    return Call(method, path, json=body, headers={"Idempotency-Key": idempotency_key})


def user_path(user: str | None, what: str) -> str:
    """/v1/me/<what> (an end user's own key) or /v1/users/<user>/<what> (an app key)."""
    return f"/v1/me/{what}" if user is None else f"/v1/users/{quote(user, safe='')}/{what}"


def given(**values: Any) -> dict[str, Any]:
    """The values that were given (None leaves a field out)."""
    return {k: v for k, v in values.items() if v is not None}


def usage(*, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0,
          reasoning_tokens: int = 0, cache_write_tokens: int = 0) -> dict[str, int]:
    out = {"input_tokens": input_tokens, "output_tokens": output_tokens}
    for name, value in (("cached_input_tokens", cached_input_tokens),
                        ("reasoning_tokens", reasoning_tokens),
                        ("cache_write_tokens", cache_write_tokens)):
        if value:
            out[name] = value
    return out


def rfc3339(value: datetime | str) -> str:
    """An event time as the server reads it: RFC 3339 with a zone. A datetime without a zone
    is refused here: guessing the zone would move the call to another hour or day."""
    if isinstance(value, str):
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp needs a time zone (datetime.now(timezone.utc), say)")
    return value.isoformat()


def track_body(*, model: str, input_tokens: int, output_tokens: int, idempotency_key: str,
               user: str | None = None, cached_input_tokens: int = 0,
               reasoning_tokens: int = 0, cache_write_tokens: int = 0,
               timestamp: datetime | str | None = None) -> dict[str, Any]:
    """One reported call, as /v1/meter/track and each event of track/batch take it."""
    body = {"model": model, "idempotency_key": idempotency_key,
            "usage": usage(input_tokens=input_tokens, output_tokens=output_tokens,
                           cached_input_tokens=cached_input_tokens,
                           reasoning_tokens=reasoning_tokens,
                           cache_write_tokens=cache_write_tokens)}
    return {**body, **given(user=user, timestamp=None if timestamp is None
                            else rfc3339(timestamp))}


@dataclass(frozen=True)
class Policy:
    """How answers are read and failures retried (the same for both clients)."""

    max_retries: int
    backoff: float

    def judge(self, call: Call, got: httpx.Response | httpx.TransportError,
              attempt: int) -> dict[str, Any] | float:
        """The document of a success; or how many seconds to wait before attempt + 1; or
        raises the error the caller sees."""
        if isinstance(got, httpx.TransportError):
            if call.retry is Retry.SAFE and attempt < self.max_retries:
                return self.pause(attempt, None)
            raise ConnectionFailed(0, f"{call.method} {call.path}: {got!r}") from got
        if got.status_code < 300:
            return self.document(call, got)
        err = self.error(got)
        if attempt < self.max_retries and self._retryable(call, err):
            wait: float | None = getattr(err, "retry_after", None)
            if wait is None or wait <= MAX_RETRY_WAIT:
                return self.pause(attempt, wait)
        raise err

    @staticmethod
    def _retryable(call: Call, err: MeterlaneError) -> bool:
        if isinstance(err, (RateLimited, ServiceUnavailable)):
            return True  # the server did nothing
        # the first request with this key is still running: its answer comes on a retry
        return call.keyed and isinstance(err, Conflict) and err.key_in_use

    @staticmethod
    def document(call: Call, resp: httpx.Response) -> dict[str, Any]:
        try:
            doc = resp.json() if resp.content else {}
        except ValueError as exc:  # not Meterlane answering (a proxy's page?)
            raise MeterlaneError(resp.status_code, f"{call.method} {call.path}: the answer is "
                                 "not JSON") from exc
        if not isinstance(doc, dict):
            raise MeterlaneError(resp.status_code, f"{call.method} {call.path}: the answer is "
                                 "not a JSON object")
        return doc

    @staticmethod
    def error(resp: httpx.Response) -> MeterlaneError:
        try:
            body = resp.json()
        except ValueError:
            body = {"detail": resp.text}
        return error_for(resp.status_code, body,
                         {k.lower(): v for k, v in resp.headers.items()})

    def pause(self, attempt: int, retry_after: float | None) -> float:
        """What the server asked for, or exponential backoff with jitter."""
        if retry_after is not None:
            return retry_after
        return min(MAX_RETRY_WAIT, self.backoff * 2.0 ** attempt * (0.5 + random.random() / 2))


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT}
