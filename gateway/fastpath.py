"""The gateway's OpenAI calls without Flask's request machinery (issue 20).

A call through Flask pays for a request context, URL routing, nine hooks, a werkzeug Request
and Response with their header objects, and some forty context-local lookups: about 400 us of
CPU of the 1.2 ms a metered call costs in a worker (`python bench/call_cpu.py`), none of it
metering. This WSGI layer sits in front of the Flask app and serves the hot routes itself,
doing what those hooks and the blueprint do for them, in the same order, with the same
answers:

- the request id (`req_<hex>`, never the client's), on the response as
  `X-Meterlane-Request-Id` and `x-request-id`;
- the caller's key (core/web.py's rules), then the body (at most MAX_CONTENT_LENGTH: a 413),
  then the gateway service's call, whose errors are answered in OpenAI's envelope by the same
  function as the blueprint's (gateway/api.py `openai_answer`);
- the call's telemetry (its CallTrace) and the request's log line once the response is closed
  (core/observe.py `line_closer`), the settling of its limits before that line.

Everything else goes to Flask untouched: another method or path, a query string (`?app=`),
an `Idempotency-Key` (the replay store is Flask's hook), a body without a Content-Length
(chunked), and every request while tracing is on (the request span is Flask's hook). So does
Anthropic's /v1/messages (its own envelope). tests/integration/test_fast_path.py holds the
two paths to the same answers. Flask's hooks that a gateway call passes through are listed in
MIRRORED_HOOKS: a hook added later and not listed turns the fast path off (install)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from flask import Flask
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import ClosingIterator, get_input_stream

from core.auth import AuthService, Principal
from core.metrics import Metrics
from core.observe import Ended, line_closer
from core.parts import Parts
from core.tracing import Tracing
from core.web import bearer_of, body_too_large
from gateway.api import openai_answer
from gateway.service import CallContext, GatewayResponse, GatewayService
from gateway.telemetry import CallTrace
from metering.service import ENDPOINT_CHAT, ENDPOINT_COMPLETIONS, ENDPOINT_EMBEDDINGS

log = logging.getLogger(__name__)
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Serve = Callable[[GatewayService, CallContext, bytes], GatewayResponse]


def _endpoint(name: str) -> Serve:
    return lambda service, ctx, raw: service.call(ctx, name, raw)


ROUTES: dict[str, Serve] = {
    "/v1/chat/completions": _endpoint(ENDPOINT_CHAT),
    "/v1/completions": _endpoint(ENDPOINT_COMPLETIONS),
    "/v1/embeddings": _endpoint(ENDPOINT_EMBEDDINGS),
    "/v1/responses": lambda service, ctx, raw: service.responses(ctx, raw),
}
_STATUS_LINES: dict[int, str] = {}


def status_line(code: int) -> str:
    """`402 PAYMENT REQUIRED`, as werkzeug writes it."""
    line = _STATUS_LINES.get(code)
    if line is None:
        line = _STATUS_LINES[code] = f"{code} {HTTP_STATUS_CODES.get(code, 'UNKNOWN').upper()}"
    return line


class GatewayFastPath:
    """The WSGI app in front of `app.wsgi_app` (see the module's text)."""

    def __init__(self, app: Flask, flask_wsgi: WSGIApp) -> None:
        self.app = app
        self.flask_wsgi = flask_wsgi
        self.enabled = True  # False: every request goes through Flask (the tests compare)

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        serve = ROUTES.get(environ.get("PATH_INFO", ""))
        length = environ.get("CONTENT_LENGTH", "")
        if serve is None or environ.get("REQUEST_METHOD") != "POST" or not self.enabled \
                or environ.get("QUERY_STRING") or "HTTP_IDEMPOTENCY_KEY" in environ \
                or "HTTP_TRANSFER_ENCODING" in environ \
                or not (length.isascii() and length.isdigit()) \
                or self._parts().get(Tracing).tracer is not None:
            return self.flask_wsgi(environ, start_response)
        return self._serve(environ, start_response, serve)

    def _parts(self) -> Parts:
        parts: Parts = self.app.extensions["parts"]
        return parts

    def _serve(self, environ: dict[str, Any], start_response: Callable[..., Any],
               serve: Serve) -> Iterable[bytes]:
        started = time.perf_counter()
        request_id = f"req_{uuid.uuid4().hex}"
        parts = self._parts()
        principal: Principal | None = None
        trace: CallTrace | None = None
        closers: list[Callable[[], None]] = []
        try:
            # the order of the blueprint's view: the caller, then the body, then the call
            principal = parts.get(AuthService).authenticate(bearer_of(environ))
            trace = CallTrace(parts.get(Metrics), app=principal.app_name)
            raw = self._body(environ)
            result = serve(parts.get(GatewayService), CallContext(
                principal=principal, request_id=request_id,
                user_header=environ.get("HTTP_X_METERLANE_USER"), idempotency_key=None,
                trace=trace), raw)
            status, body, headers = result.status, result.body, result.headers
            if result.after is not None:
                closers.append(result.after)
        except Exception as exc:  # noqa: BLE001 - answered as the blueprint answers it
            status, doc, extra = openai_answer(exc, request_id)
            body = orjson.dumps(doc)
            headers = {"Content-Type": "application/json", **(extra or {})}
        closers.append(line_closer(Ended(
            request_id=request_id, client_request_id=environ.get("HTTP_X_REQUEST_ID"),
            method="POST", route=environ["PATH_INFO"], status=status,
            app=principal.app_name if principal is not None else None,
            role=principal.role.value if principal is not None else None,
            started=started, span=None, detail=trace)))
        try:
            added = trace.response_headers() if trace is not None else {}
            added["X-Meterlane-Request-Id"] = added["x-request-id"] = request_id
            if isinstance(body, bytes):
                added["Content-Length"] = str(len(body))
            start_response(status_line(status), _merged(headers, added))
        except BaseException:  # the answer cannot go out: its settle and line all the same
            ClosingIterator((), closers).close()
            raise
        return ClosingIterator([body] if isinstance(body, bytes) else body, closers)

    def _body(self, environ: dict[str, Any]) -> bytes:
        """The body, as core/web.py's request_bytes reads it (through werkzeug's input
        stream, as Flask's request does: what a server that ends the stream itself, like
        gunicorn, passes; a reset read as the client gone, a 400): past the limit, a 413."""
        limit = self.app.config.get("MAX_CONTENT_LENGTH")
        length = int(environ["CONTENT_LENGTH"])
        if "wsgi.input_terminated" in environ and (limit is None or length <= limit):
            # the server ends the body at its length (gunicorn): what werkzeug's stream would
            # read, without its two 64 KB buffers a call (45 us)
            try:
                raw: bytes = environ["wsgi.input"].read(length)
            except (OSError, ValueError) as exc:
                raise ClientDisconnected() from exc
            return raw
        try:
            return get_input_stream(environ, max_content_length=limit).read()
        except RequestEntityTooLarge:
            raise body_too_large(limit) from None


def _merged(headers: dict[str, str], added: dict[str, str]) -> list[tuple[str, str]]:
    """The response's headers: `added` replacing any of `headers` by the same name in any
    case (as werkzeug's Headers would), each value a string."""
    names = {name.lower() for name in added}
    out = [(k, str(v)) for k, v in headers.items() if k.lower() not in names]
    out.extend(added.items())
    return out


# The Flask hooks a gateway call goes through, each mirrored above or doing nothing for these
# routes (no query, no Idempotency-Key, the gateway's blueprint skipped, no CORS path).
MIRRORED_HOOKS = frozenset({
    "core.observe.start_request", "core.observe.end_request", "core.web.assign_request_id",
    "core.web.tag_response", "core.web.replay_or_claim", "core.web.keep_answer",
    "core.web.let_go", "metering.unwritten.see_answered_calls", "paywall.api.cors"})


def unmirrored_hooks(app: Flask) -> list[str]:
    """The hooks a gateway call would run in Flask that the fast path does not mirror."""
    found = []
    for registry in (app.before_request_funcs, app.after_request_funcs,
                     app.teardown_request_funcs, app.url_value_preprocessors):
        for scope in (None, "gateway"):
            for fn in registry.get(scope, ()):
                name = f"{fn.__module__}.{fn.__name__}"
                if name not in MIRRORED_HOOKS:
                    found.append(name)
    return found


def install(app: Flask) -> None:
    """Put the fast path in front of the app's WSGI callable (before any middleware that
    wraps the whole app, such as ProxyFix, so that those still see every request first).
    A Flask hook it does not mirror (one added later) turns it off, said at start: calls
    then go through Flask, slower but never answered differently."""
    fast = GatewayFastPath(app, app.wsgi_app)
    unknown = unmirrored_hooks(app)
    if unknown:
        log.warning("the gateway's fast path is off: Flask hooks it does not mirror: %s",
                    ", ".join(unknown))
        fast.enabled = False
    app.extensions["gateway_fast_path"] = fast
    app.wsgi_app = fast  # type: ignore[method-assign]
