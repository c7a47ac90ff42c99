"""Upstream clients: pooled HTTP to a model server, foreign errors translated at the boundary."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from core.config import UpstreamConfig
from core.errors import (
    DomainError,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from core.logs import note
from gateway.upstream_http import (
    ConnectFailedError,
    ConnectTimeoutError,
    HTTPPool,
    ReadTimeoutError,
    Response,
    TransportError,
)

log = logging.getLogger(__name__)


class UpstreamClient:
    """One connection pool per upstream; no retries (a retried model call may be paid twice)."""

    def __init__(self, config: UpstreamConfig, *, pool_size: int = 64) -> None:
        self.config = config
        self.name = config.name
        self._pool = HTTPPool(config.base_url, connect_timeout=config.connect_timeout_s,
                              read_timeout=config.read_timeout_s, maxsize=pool_size)
        headers = {"User-Agent": "meterlane", "Accept-Encoding": "identity",
                   "Content-Type": "application/json", "Accept": "application/json"}
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._headers = _header_lines(headers)

    def post(self, path: str, body: bytes, *, stream: bool, request_id: str | None = None,
             extra: dict[str, str] | None = None,
             meanwhile: Callable[[], object] | None = None) -> Response:
        """Send the request; returns the response with its body unread when stream=True (read
        it with `chunks`, then `release` or `close` it). The request id goes along (the
        upstream's logs can name the call the ledger names), and `extra` headers (the trace
        context). `meanwhile` runs once the request is sent, while the upstream works."""
        headers = self._headers
        if request_id is not None:
            headers += _header_lines({"X-Meterlane-Request-Id": request_id})
        if extra:
            headers += _header_lines(extra)
        try:
            return self._pool.post(path, headers, body, preload=not stream,
                                   meanwhile=meanwhile)
        except TransportError as exc:
            raise self.translate(exc) from exc

    def translate(self, exc: Exception) -> UpstreamError:
        """A transport failure as a domain error that names the upstream (not its address:
        that is the operator's, and goes to the log)."""
        where = f"upstream '{self.name}'"
        note(log, logging.WARNING, "upstream %s (%s): %s", self.name, self.config.base_url, exc)
        if isinstance(exc, ConnectFailedError):
            reason = "connection refused" if exc.refused else "could not open a connection"
            return UpstreamUnavailableError(f"Could not connect to {where}: {reason}.")
        if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
            return UpstreamTimeoutError(f"Timed out waiting for {where}.")
        return UpstreamUnavailableError(f"Connection to {where} failed: {exc.__class__.__name__}.")

    def chunks(self, resp: Response) -> Iterator[bytes]:
        """The body as it arrives: one item per HTTP chunk (or per socket read)."""
        try:
            yield from resp.chunks()
        except TransportError as exc:
            resp.close()
            raise self.translate(exc) from exc

    def close(self) -> None:
        """Close the idle connections."""
        self._pool.close()


def _header_lines(headers: dict[str, str]) -> bytes:
    """'Name: value\\r\\n' lines; a header whose value would break the request (a line
    break, a character latin-1 lacks) is left out rather than failing the call."""
    out = b""
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            continue
        try:
            out += f"{name}: {value}\r\n".encode("latin-1")
        except UnicodeEncodeError:
            continue
    return out


def error_from_response(upstream: str, status: int, body: bytes, headers: Any,
                        request_id: str = "") -> DomainError:
    """An upstream's error answer, mapped to the status that fits the gateway's client. The
    client reads a fixed message (the upstream, its status, the request id); the operator's
    log the status, the error's type and code, and the body's length: never the upstream's
    words, which quote the request (a validation error echoes the prompt) or hold a key."""
    note(log, logging.WARNING, "request %s: upstream %s answered HTTP %d: %s", request_id,
         upstream, status, error_summary(_error_of(body), len(body)))
    text = (f"Upstream '{upstream}' returned HTTP {status}"
            + (f" (request {request_id})" if request_id else "")
            + f": {_CLIENT_TEXT.get(status, 'the model server failed')}.")
    if status == 429:
        retry = headers.get("Retry-After") if headers is not None else None
        return RateLimitedError(text, headers={"Retry-After": retry} if retry else None)
    if status == 404:
        return NotFoundError(text)
    if status in (400, 409, 413, 422):
        err = InvalidRequestError(text)
        err.status = status
        return err
    if status in (408, 504):
        return UpstreamTimeoutError(text)
    # 401/403 mean the gateway's own upstream credentials are wrong: not the client's fault.
    return UpstreamError(text)


_CLIENT_TEXT = {
    400: "it refused the request as invalid", 404: "it does not know the model or route",
    409: "it refused the request as conflicting", 413: "the request is too large for it",
    422: "it could not process the request", 429: "it is rate limiting; retry later",
    401: "the gateway's credentials for it were refused", 408: "it timed out",
    403: "the gateway's credentials for it were refused", 504: "it timed out",
}


def malformed_answer(upstream: str, status: int, request_id: str, body: bytes) -> UpstreamError:
    """A 2xx whose body is not the answer asked for (not JSON, or not a completion)."""
    note(log, logging.WARNING, "request %s: upstream %s answered HTTP %d with a body that is "
         "not an answer (%d bytes; its text is not logged: it may be a completion)",
         request_id, upstream, status, len(body))
    return UpstreamError(f"Upstream '{upstream}' returned HTTP {status} with a body that is "
                         f"not a model answer (request {request_id}).")


_WORD = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")


def error_summary(error: Any, size: int | None = None) -> str:
    """What the log says of an upstream's error: its type and code when each is one short
    word (an identifier, never a sentence: that could quote the request), and the size of
    the body that carried it. Never its message."""
    found: list[str] = []
    if isinstance(error, dict):
        for name in ("type", "code"):
            value = error.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if isinstance(value, str) and _WORD.fullmatch(value):
                found.append(f"{name}={value}")
    if size is not None:
        found.append(f"{size} bytes")
    return " ".join(found) if found else "no error type or code"


def _error_of(body: bytes) -> Any:
    """The error object of an error answer (OpenAI's and Anthropic's `error`), if any."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return doc.get("error") if isinstance(doc, dict) else None
