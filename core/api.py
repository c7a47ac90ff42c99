"""Kernel API: an app key mints short-lived keys for its end users."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, Response

from core.auth import Role, require_role, validate_user_id
from core.errors import InvalidRequestError
from core.keys import KeyService
from core.openapi import documented
from core.schemas import UserKeyRequestSchema, UserKeySchema
from core.web import config, current_principal, json_body, json_response, part

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
    settings = config()
    ttl = args["ttl_seconds"] or settings.user_key_ttl_seconds
    if ttl > settings.user_key_max_ttl_seconds:
        raise InvalidRequestError(
            f"ttl_seconds may be at most {settings.user_key_max_ttl_seconds}.",
            param="ttl_seconds")
    assert principal.app_id is not None
    issued = part(KeyService).issue_user_key(principal.app_id, user, timedelta(seconds=ttl),
                                          name=args["name"])
    body = UserKeySchema().dump({"key": issued.key, "role": issued.role.value, "user": user,
                                 "expires_at": issued.expires_at})
    return json_response(body, status=201)
