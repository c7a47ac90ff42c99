"""Kernel API: an app key mints short-lived keys for its end users."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, Response

from meterlane.core.auth import Role, require_role, validate_user_id
from meterlane.core.errors import InvalidRequestError
from meterlane.core.openapi import documented
from meterlane.core.schemas import UserKeyRequestSchema, UserKeySchema
from meterlane.core.web import current_principal, json_body, wiring

bp = Blueprint("keys", __name__, url_prefix="/v1")


@bp.post("/users/<path:user>/keys")
@documented(summary="Mint a short-lived key that acts only as this end user",
            body=UserKeyRequestSchema, response=UserKeySchema, status=201, tag="keys")
def create_user_key(user: str) -> Response:
    """Mint a key that acts only as this end user (for an app's front end or widget)."""
    principal = current_principal()
    require_role(principal, Role.APP)
    user = validate_user_id(user)
    args = UserKeyRequestSchema().load(json_body(allow_empty=True))
    config = wiring().config
    ttl = args["ttl_seconds"] or config.user_key_ttl_seconds
    if ttl > config.user_key_max_ttl_seconds:
        raise InvalidRequestError(
            f"ttl_seconds may be at most {config.user_key_max_ttl_seconds}.",
            param="ttl_seconds")
    assert principal.app_id is not None
    issued = wiring().keys.issue_user_key(principal.app_id, user, timedelta(seconds=ttl),
                                          name=args["name"])
    body = UserKeySchema().dump({"key": issued.key, "role": issued.role.value, "user": user,
                                 "expires_at": issued.expires_at})
    return wiring().json(body, status=201)
