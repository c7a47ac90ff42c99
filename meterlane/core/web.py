"""Request-scope helpers for blueprints: the wiring, the request id and the calling key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import orjson
from flask import current_app, g, request

from meterlane.core.auth import Principal
from meterlane.core.errors import InvalidRequestError

if TYPE_CHECKING:
    from meterlane.app import Wiring


def wiring() -> Wiring:
    return cast("Wiring", current_app.extensions["wiring"])


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
        principal = wiring().auth.authenticate(bearer_key())
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
    return wiring().tenancy.get_app(app)
