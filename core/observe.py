"""What every request leaves for an operator: one log line when it ends (a stream's when the
stream ends), its SERVER span, and the `x-request-id` header. A blueprint that knows more
about its request (the gateway: the call's model, tokens, cost) attaches a RequestDetail,
which adds its fields to the line and its headers to the response.

The line holds what was already computed; never a body, a prompt, a completion or a key."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from flask import Flask, Response, g, request
from opentelemetry.trace import Span, StatusCode
from werkzeug.wsgi import ClosingIterator

from core.logs import event
from core.tracing import Tracing

REQUEST_LOG = logging.getLogger("meterlane.request")
MAX_CLIENT_ID = 128  # a client's own x-request-id longer than this is left off its line
log = logging.getLogger(__name__)


class RequestDetail(Protocol):
    def response_headers(self) -> dict[str, str]:
        """Headers for the response (read once it is built)."""
        ...

    def finish(self, fields: dict[str, Any], span: Span | None) -> None:
        """The request has ended: add its fields to the line, end its own spans."""
        ...


def attach(detail: RequestDetail) -> None:
    g.request_detail = detail


def request_span() -> Span | None:
    """This request's SERVER span (None when tracing is off)."""
    span: Span | None = g.get("request_span")
    return span


@dataclass
class Ended:
    """What the line needs, taken while the request context is there (the line is written
    once the response is closed, after it)."""

    request_id: str
    client_request_id: str | None  # the client's own x-request-id, as it sent it
    method: str
    route: str | None
    status: int
    app: str | None
    role: str | None
    started: float
    span: Span | None
    detail: RequestDetail | None


def install(app: Flask, tracing: Tracing) -> None:
    """The hooks; installed before any other, so that the clock starts first."""

    @app.before_request
    def start_request() -> None:
        g.request_started = time.perf_counter()
        if tracing.tracer is not None:
            rule = request.url_rule
            g.request_span = tracing.start_request(
                request.method, rule.rule if rule is not None else None,
                cast(Mapping[str, str], request.headers))

    @app.after_request
    def end_request(response: Response) -> Response:
        detail: RequestDetail | None = g.get("request_detail")
        if detail is not None:
            response.headers.update(detail.response_headers())
        principal = g.get("principal")
        rule = request.url_rule
        ended = Ended(request_id=g.get("request_id", ""),
                      client_request_id=request.environ.get("HTTP_X_REQUEST_ID"),
                      method=request.method,
                      route=rule.rule if rule is not None else None,
                      status=response.status_code,
                      app=getattr(principal, "app_name", None),
                      role=getattr(getattr(principal, "role", None), "value", None),
                      started=g.get("request_started", time.perf_counter()),
                      span=g.get("request_span"), detail=detail)
        close = line_closer(ended)
        if response.direct_passthrough:  # a stream: werkzeug hands the server its body as
            # it is, without the response's close callbacks; the line comes at its end
            response.response = ClosingIterator(cast(Iterable[bytes], response.response), close)
        else:
            response.call_on_close(close)
        return response


def line_closer(ended: Ended) -> Callable[[], None]:
    """What writes the request's line (and ends its span) once its response is closed."""
    return functools.partial(_close, ended)


def _close(ended: Ended) -> None:
    """The response is sent (a stream: to its end, or the client left): the line."""
    fields: dict[str, Any] = {
        "request_id": ended.request_id, "method": ended.method, "route": ended.route,
        "status": ended.status, "app": ended.app, "role": ended.role,
        "duration_ms": int((time.perf_counter() - ended.started) * 1000)}
    theirs = ended.client_request_id
    if theirs and len(theirs) <= MAX_CLIENT_ID and theirs.isprintable():
        fields["client_request_id"] = theirs  # theirs, to find the call by (never the ledger's)
    span = ended.span
    try:
        if ended.detail is not None:
            ended.detail.finish(fields, span)
    except Exception:  # noqa: BLE001 - the response is sent: the line goes out as it is
        log.exception("request %s: its call's telemetry failed", ended.request_id)
    finally:
        if span is not None:
            span.set_attribute("http.response.status_code", ended.status)
            span.set_attribute("meterlane.request_id", ended.request_id)
            if ended.status >= 500:
                span.set_status(StatusCode.ERROR)
            span.end()
        event(REQUEST_LOG, "request", fields)
