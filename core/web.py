"""Request-scope helpers for blueprints (the app's parts, the request id, the calling key) and
the hooks every request goes through (its id, problem+json errors)."""

from __future__ import annotations

import logging
import uuid
from typing import Any, TypeVar, cast

import orjson
from flask import Flask, Response, current_app, g, request
from marshmallow import ValidationError
from sqlalchemy.exc import DataError, OperationalError
from werkzeug.exceptions import HTTPException

from core.auth import AuthService, Principal
from core.config import Config
from core.errors import DATABASE_UNAVAILABLE, DomainError, InvalidRequestError, problem
from core.parts import Parts
from core.tenancy import TenancyService

T = TypeVar("T")
log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


def part(kind: type[T]) -> T:
    """This app's long-lived part of that type (a service, the engine, the metrics)."""
    return cast(Parts, current_app.extensions["parts"]).get(kind)


def config() -> Config:
    return part(Config)


def json_response(body: Any, *, status: int = 200, headers: dict[str, str] | None = None,
                  mimetype: str = "application/json") -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers, mimetype=mimetype)


def request_id() -> str:
    return cast(str, g.request_id)


def bearer_key() -> str | None:
    """The key of `Authorization: Bearer <key>`, or of `X-Api-Key` (Anthropic's SDK)."""
    header = request.headers.get("Authorization")
    if header is None:
        return request.headers.get("X-Api-Key", "").strip() or None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def current_principal() -> Principal:
    """The authenticated caller (raises AuthenticationError); computed once per request."""
    principal = g.get("principal")
    if principal is None:
        principal = part(AuthService).authenticate(bearer_key())
        g.principal = principal
    return cast(Principal, principal)


def json_body(*, allow_empty: bool = False) -> Any:
    """The request's JSON body; malformed JSON is a 400, never a 500."""
    raw = request.get_data()
    if not raw.strip() and allow_empty:
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from exc


def query_args() -> dict[str, Any]:
    return {k: v for k, v in request.args.items()}


def app_in_scope(principal: Principal) -> int:
    """The app a request acts in: the key's own, or `?app=NAME` for an operator-wide key."""
    if principal.app_id is not None:
        return principal.app_id
    app = request.args.get("app")
    if not app:
        raise InvalidRequestError("An admin key names the app: ?app=NAME.", param="app")
    return part(TenancyService).get_app(app)


def install_hooks(app: Flask) -> None:
    """The request id on every response, and every error as problem+json (RFC 9457); the
    gateway's blueprints answer their own errors in their providers' envelopes."""

    @app.before_request
    def assign_request_id() -> None:
        g.request_id = f"req_{uuid.uuid4().hex}"

    @app.after_request
    def tag_response(response: Response) -> Response:
        response.headers["X-Meterlane-Request-Id"] = g.get("request_id", "")
        return response

    @app.errorhandler(DomainError)
    def domain_error(exc: DomainError) -> Response:
        return _problem(exc.status, exc.title, exc.detail, slug=exc.slug,
                        extra=exc.extra, headers=exc.headers)

    @app.errorhandler(OperationalError)
    def database_down(exc: OperationalError) -> Response:
        log.error("database unavailable in request %s: %s", g.get("request_id"), exc)
        return domain_error(DATABASE_UNAVAILABLE)

    @app.errorhandler(DataError)
    def unstorable(exc: DataError) -> Response:
        # the database refused a value (a NUL character, text too long): the input's fault
        log.info("request %s: the database refused a value: %s", g.get("request_id"), exc.orig)
        return domain_error(InvalidRequestError(
            "The request holds a value that cannot be stored (a NUL character, or text too "
            "long)."))

    @app.errorhandler(ValidationError)
    def validation_error(exc: ValidationError) -> Response:
        return _problem(422, "Invalid request", "The request did not validate.",
                        slug="validation", extra={"errors": _string_keys(exc.messages)})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _problem(exc.code or 500, exc.name, exc.description or exc.name, slug=None)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error in request %s", g.get("request_id"))
        return _problem(500, "Internal error",
                        "Something went wrong on our side; the request id identifies it.",
                        slug="internal")


def _string_keys(value: Any) -> Any:
    """marshmallow names a list item by its index (an int): JSON keys are strings."""
    if isinstance(value, dict):
        return {str(k): _string_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_string_keys(v) for v in value]
    return value


def _problem(status: int, title: str, detail: str, *, slug: str | None,
             extra: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> Response:
    doc = problem(status, title, detail, slug=slug,
                  instance=f"urn:uuid:{g.get('request_id', 'req_')[4:]}", extra=extra)
    return json_response(doc, status=status, headers=headers, mimetype=PROBLEM_JSON)
