"""OpenAI-compatible routes; errors here use OpenAI's envelope, not problem+json."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, request
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException

from core import observe
from core.errors import DATABASE_UNAVAILABLE, DomainError, openai_error
from core.metrics import Metrics
from core.tracing import Tracing
from core.web import current_principal, json_response, part, request_bytes, request_id
from gateway import anthropic
from gateway.service import CallContext, GatewayResponse, GatewayService
from gateway.telemetry import CallTrace
from metering.service import ENDPOINT_CHAT, ENDPOINT_COMPLETIONS, ENDPOINT_EMBEDDINGS

log = logging.getLogger(__name__)
bp = Blueprint("gateway", __name__, url_prefix="/v1")


def _context() -> CallContext:
    """The call's context: its caller, ids, and telemetry (its log line's fields, its spans)."""
    principal = current_principal()
    trace = CallTrace(part(Metrics), app=principal.app_name, tracer=part(Tracing).tracer,
                      parent=observe.request_span())
    observe.attach(trace)
    return CallContext(principal=principal, request_id=request_id(),
                       user_header=request.headers.get("X-Meterlane-User"),
                       idempotency_key=request.headers.get("Idempotency-Key"), trace=trace)


def _call(endpoint: str) -> Response:
    return _response(part(GatewayService).call(_context(), endpoint, request_bytes()))


def _response(result: GatewayResponse) -> Response:
    response = Response(result.body, status=result.status, headers=result.headers,
                        direct_passthrough=result.streaming)
    if result.after is not None:
        response.call_on_close(result.after)
    return response


@bp.post("/chat/completions")
def chat_completions() -> Response:
    return _call(ENDPOINT_CHAT)


@bp.post("/completions")
def completions() -> Response:
    return _call(ENDPOINT_COMPLETIONS)


@bp.post("/embeddings")
def embeddings() -> Response:
    return _call(ENDPOINT_EMBEDDINGS)


@bp.post("/responses")
def responses() -> Response:
    return _response(part(GatewayService).responses(_context(), request_bytes()))


@bp.get("/models")
def models() -> Response:
    current_principal()
    return json_response(part(GatewayService).list_models())


def openai_answer(exc: Exception, request_id: str) -> tuple[int, dict[str, Any],
                                                          dict[str, str] | None]:
    """An error of a gateway call in OpenAI's envelope: its status, body and headers (the
    blueprint's handlers and the fast path, gateway/fastpath.py, answer with this)."""
    if isinstance(exc, (OperationalError, PoolTimeoutError)):
        log.error("database unavailable in gateway request %s: %s", request_id, exc)
        exc = DATABASE_UNAVAILABLE
    if isinstance(exc, DomainError):
        return exc.status, openai_error(exc.detail, type_=exc.openai_type, code=exc.openai_code,
                                        param=exc.param, **exc.extra), exc.headers
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        code = "request_too_large" if status == 413 else \
            (exc.name or "error").lower().replace(" ", "_")
        return status, openai_error(exc.description or exc.name, type_="invalid_request_error",
                                    code=code), None
    log.exception("unhandled error in gateway request %s", request_id)
    return 500, openai_error("Internal error in the gateway; the request id identifies it.",
                             type_="server_error", code="internal_error"), None


@bp.errorhandler(Exception)  # DomainError, HTTPException, the database down, any other
def gateway_error(exc: Exception) -> Response:
    status, body, headers = openai_answer(exc, request_id())
    return json_response(body, status=status, headers=headers)


# Anthropic's Messages API: its own blueprint, so that its errors use Anthropic's envelope.
anthropic_bp = Blueprint("anthropic", __name__, url_prefix="/v1")


@anthropic_bp.post("/messages")
def messages() -> Response:
    return _response(part(GatewayService).messages(_context(), request_bytes()))


@anthropic_bp.after_request
def anthropic_request_id(response: Response) -> Response:
    """The gateway's request id under Anthropic's header name too (its SDKs read that)."""
    response.headers["request-id"] = request_id()
    return response


def _anthropic_error(status: int, message: str, headers: dict[str, str] | None = None,
                     **extra: Any) -> Response:
    return json_response(anthropic.error_body(status, message, **extra), status=status,
                         headers=headers)


@anthropic_bp.errorhandler(DomainError)
def messages_domain_error(exc: DomainError) -> Response:
    return _anthropic_error(exc.status, exc.detail, exc.headers, **exc.extra)


@anthropic_bp.errorhandler(OperationalError)
@anthropic_bp.errorhandler(PoolTimeoutError)
def messages_database_down(exc: Exception) -> Response:
    log.error("database unavailable in gateway request %s: %s", request_id(), exc)
    return messages_domain_error(DATABASE_UNAVAILABLE)


@anthropic_bp.errorhandler(HTTPException)
def messages_http_error(exc: HTTPException) -> Response:
    return _anthropic_error(exc.code or 500, exc.description or exc.name)


@anthropic_bp.errorhandler(Exception)
def messages_unexpected(exc: Exception) -> Response:
    log.exception("unhandled error in gateway request %s", request_id())
    return _anthropic_error(500, "Internal error in the gateway; the request id identifies it.")
