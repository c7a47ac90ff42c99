"""Request-scope helpers for blueprints (the app's parts, the request id, the calling key) and
the hooks every request goes through (its id, problem+json errors)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from inspect import CO_COROUTINE
from types import FunctionType
from typing import Any, TypeVar, cast

import orjson
from flask import Flask, Response, current_app, g, request
from marshmallow import ValidationError
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from core.audit import Actor
from core.auth import AuthService, Principal
from core.config import Config
from core.errors import (
    DATABASE_UNAVAILABLE,
    DomainError,
    InvalidRequestError,
    PayloadTooLargeError,
    PermissionDeniedError,
    problem,
)
from core.idempotency import Claim, IdempotencyService, check_key, fingerprint, scope_of
from core.parts import Parts
from core.tenancy import TenancyService
from core.text import control_free

T = TypeVar("T")
log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


class App(Flask):
    """Flask, asking whether a hook is a coroutine function the cheap way: Flask asks
    (inspect.iscoroutinefunction) for every hook and view of every request, about 1 us each,
    nine times a gateway call; every hook and view here is a plain function."""

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        if type(func) is FunctionType and not func.__code__.co_flags & CO_COROUTINE \
                and not hasattr(func, "_is_coroutine_marker"):  # (3.12's markcoroutinefunction)
            return func
        return super().ensure_sync(func)


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
    return bearer_of(request.environ)


def bearer_of(environ: dict[str, Any]) -> str | None:
    """bearer_key() of a WSGI environ."""
    header = environ.get("HTTP_AUTHORIZATION")
    if header is None:
        return str(environ.get("HTTP_X_API_KEY", "")).strip() or None
    scheme, _, value = str(header).partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def current_principal() -> Principal:
    """The authenticated caller (raises AuthenticationError); computed once per request."""
    principal = g.get("principal")
    if principal is None:
        principal = part(AuthService).authenticate(bearer_key())
        named = request.args.get("app")
        if principal.app_id is not None and named is not None and named != principal.app_name:
            # on any route: a key bound to one app naming another is refused, never quietly
            # answered for its own app
            raise PermissionDeniedError(
                f"This key acts only in app {principal.app_name!r}; it cannot name another.",
                param="app")
        g.principal = principal
    return cast(Principal, principal)


def current_actor() -> Actor:
    """The calling key as the audit trail names it (its public id, never its secret), with
    this request's id: what a blueprint hands a service that audits its change."""
    return Actor.of_key(current_principal(), request_id())


MAX_TEXT = 65_536  # characters in any one string of a request (copy, disclosures included)
MAX_ARG = 2_000  # characters in a query or path parameter
INT64 = 2**63 - 1


def json_body(*, allow_empty: bool = False) -> Any:
    """The request's JSON body, checked once for what no field may hold: malformed JSON, a
    control character (tab and line breaks aside), a string past MAX_TEXT, an integer outside
    64 bits. Each is a 400 naming where it is, never a 500 or a record the database refuses
    later."""
    raw = request_bytes()
    if not raw.strip() and allow_empty:
        return {}
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}") from exc
    problem = json_problem(doc)
    if problem is not None:
        raise InvalidRequestError(f"The request body is refused: {problem}.")
    return doc


def request_bytes() -> bytes:
    """The request's body, never past the configured limit (MLANE_MAX_BODY_BYTES): a longer
    one is a 413, a chunked one included (werkzeug would cut it at the limit, and the cut
    body then read as bad JSON)."""
    cached = g.get("request_bytes")
    if cached is not None:
        return cast(bytes, cached)
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if request.content_length is not None or limit is None:
        try:
            data = request.get_data()
        except RequestEntityTooLarge:
            raise body_too_large(limit) from None
    else:
        data = request.environ["wsgi.input"].read(limit + 1)
        if len(data) > limit:
            raise body_too_large(limit)
    g.request_bytes = data
    return data


def body_too_large(limit: int | None) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than {limit} bytes "
                                "(MLANE_MAX_BODY_BYTES).")


def json_problem(doc: Any, path: str = "body") -> str | None:
    """What in a JSON document no request may hold (None: nothing)."""
    stack = [(path, doc)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            if len(value) > MAX_TEXT:
                return f"{where} is longer than {MAX_TEXT} characters"
            if not control_free(value):
                return f"{where} holds a control character"
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            continue
        elif isinstance(value, int):
            if not -INT64 <= value <= INT64:
                return f"{where} is an integer outside 64 bits"
        elif isinstance(value, dict):
            for key, item in value.items():
                if len(key) > MAX_TEXT or not control_free(key, multiline=False):
                    return f"a key of {where} holds a control character or is too long"
                stack.append((f"{where}.{key[:40]}", item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return None


def check_request_text() -> None:
    """Query and path parameters: one line of printable text each, at most MAX_ARG long
    (run before every request; a bad one is a 400 in the route's own envelope)."""
    if not request.environ.get("QUERY_STRING") and not request.view_args:
        return  # nothing to check (a gateway call): no query to parse
    values = list(request.args.items(multi=True))
    values += [(k, v) for k, v in (request.view_args or {}).items() if isinstance(v, str)]
    for name, value in values:
        if len(value) > MAX_ARG or not control_free(value, multiline=False):
            raise InvalidRequestError(
                f"The parameter {name[:40]!r} must be one line of printable text of at most "
                f"{MAX_ARG} characters.", param=name[:40])


def query_args() -> dict[str, Any]:
    return {k: v for k, v in request.args.items()}


def app_in_scope(principal: Principal) -> int:
    """The app a request acts in: the key's own, or `?app=NAME` for an operator-wide key. A
    key bound to one app that names another is refused, never quietly given its own."""
    if principal.app_id is not None:
        named = request.args.get("app")
        if named is not None and named != principal.app_name:
            raise PermissionDeniedError(
                f"This key acts only in app {principal.app_name!r}; it cannot name another.",
                param="app")
        return principal.app_id
    app = request.args.get("app")
    if not app:
        raise InvalidRequestError("An admin key names the app: ?app=NAME.", param="app")
    return part(TenancyService).get_app(app)


def install_hooks(app: Flask) -> None:
    """The request id on every response, and every error as problem+json (RFC 9457); the
    gateway's blueprints answer their own errors in their providers' envelopes. Each request's
    log line and span (core/observe.py) first."""
    from core.observe import install
    from core.tracing import Tracing

    install(app, cast(Parts, app.extensions["parts"]).get(Tracing))

    @app.before_request
    def assign_request_id() -> None:
        g.request_id = f"req_{uuid.uuid4().hex}"
        check_request_text()

    install_idempotency(app)

    @app.after_request
    def tag_response(response: Response) -> Response:
        # x-request-id as OpenAI's answers carry it (SDKs and proxies read that name);
        # never taken from the client: it is the ledger's request id, and the default
        # idempotency key of a call
        rid = g.get("request_id", "")
        response.headers["X-Meterlane-Request-Id"] = rid
        response.headers["x-request-id"] = rid
        return response

    @app.errorhandler(DomainError)
    def domain_error(exc: DomainError) -> Response:
        extra = {**exc.extra, "param": exc.param} if exc.param else exc.extra
        return _problem(exc.status, exc.title, exc.detail, slug=exc.slug,
                        extra=extra, headers=exc.headers)

    @app.errorhandler(OperationalError)
    @app.errorhandler(PoolTimeoutError)
    def database_down(exc: Exception) -> Response:
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


IDEMPOTENT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_NOT_KEPT = "__idempotency_answer_not_kept__"
F = TypeVar("F", bound=Callable[..., Any])


def answer_not_kept(view: F) -> F:
    """A view whose answer shows a secret once (a new key, a webhook's secret): it is never
    kept for an Idempotency-Key replay; a retry with the key is a 409, not the secret again."""
    setattr(view, _NOT_KEPT, True)
    return view


def install_idempotency(app: Flask) -> None:
    """Idempotency-Key on every write (core/idempotency.py): a retry of a request that
    succeeded is answered from what was kept before the route runs (registered after the
    request id; its after_request runs before the request id and the log line are added, so
    a replay has its own)."""

    @app.before_request
    def replay_or_claim() -> Response | None:
        key = request.headers.get("Idempotency-Key")
        if key is None or request.method not in IDEMPOTENT_METHODS or request.url_rule is None:
            return None
        try:
            principal = current_principal()
        except DomainError:
            return None  # no caller to scope the key by: the route refuses the key itself
        found = part(IdempotencyService).begin(
            scope_of(principal), check_key(key), fingerprint((
                request.method.encode(), request.path.encode(), request.query_string,
                request.headers.get("X-Meterlane-User", "").encode(), request_bytes())),
            request_id())
        if isinstance(found, Claim):
            g.idempotency_claim = found
            return None
        return Response(found.body, status=found.status, headers={
            **found.headers, "Idempotent-Replayed": "true", "Original-Request": found.request_id})

    @app.after_request
    def keep_answer(response: Response) -> Response:
        claim: Claim | None = g.pop("idempotency_claim", None)
        if claim is None:
            return response
        service = part(IdempotencyService)
        try:
            if not 200 <= response.status_code < 300:
                service.release(claim)  # an error is not kept: a retry runs again
                return response
            view = current_app.view_functions.get(request.endpoint or "")
            streamed = response.is_streamed or response.direct_passthrough
            service.finish(claim, status=response.status_code, headers=dict(response.headers),
                           body=None if streamed or getattr(view, _NOT_KEPT, False)
                           else response.get_data())
        except Exception:  # noqa: BLE001 - the answer goes out; the key lapses (or expires)
            log.exception("request %s: keeping its answer for Idempotency-Key failed",
                          g.get("request_id"))
        return response

    @app.teardown_request
    def let_go(_exc: BaseException | None) -> None:
        claim: Claim | None = g.pop("idempotency_claim", None)
        if claim is not None:  # the response was never made: a retry may run
            try:
                part(IdempotencyService).release(claim)
            except Exception:  # noqa: BLE001 - it lapses by itself
                log.exception("request %s: letting its Idempotency-Key go failed",
                              g.get("request_id"))


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
