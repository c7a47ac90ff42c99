"""Kernel API: keys (an admin manages its keys; an app key mints short-lived end-user keys)
and the audit trail."""

from __future__ import annotations

from datetime import timedelta

from flask import Blueprint, Response

from core.admin_schemas import (
    AuditListSchema,
    AuditQuerySchema,
    IssuedKeySchema,
    KeyCreateRequestSchema,
    KeyListQuerySchema,
    KeyListSchema,
    KeyRotateRequestSchema,
    KeySchema,
    RotatedKeySchema,
)
from core.audit import AuditQuery, AuditService
from core.auth import IssuedKey, Role, require_role, validate_user_id
from core.keys import KeyFilter, KeyService, key_id_of
from core.openapi import documented
from core.schemas import UserKeyRequestSchema, UserKeySchema
from core.tenancy import TenancyService
from core.web import (
    answer_not_kept,
    current_actor,
    current_principal,
    json_body,
    json_response,
    part,
    query_args,
)

bp = Blueprint("keys", __name__, url_prefix="/v1")


@bp.post("/users/<path:user>/keys")
@documented(summary="Mint a short-lived key that acts only as this end user",
            body=UserKeyRequestSchema, response=UserKeySchema, status=201, tag="keys")
@answer_not_kept
def create_user_key(user: str) -> Response:
    """Mint a key that acts only as this end user (for an app's front end or widget)."""
    principal = current_principal()
    require_role(principal, Role.APP)
    user = validate_user_id(user)
    args = UserKeyRequestSchema().load(json_body(allow_empty=True))
    ttl = args["ttl_seconds"]  # none: the default; past user_key_max_ttl_seconds: refused
    assert principal.app_id is not None
    issued = part(KeyService).issue_user_key(
        principal.app_id, user, timedelta(seconds=ttl) if ttl else None, name=args["name"],
        actor=current_actor())
    body = UserKeySchema().dump({"key": issued.key, "role": issued.role.value, "user": user,
                                 "expires_at": issued.expires_at})
    return json_response(body, status=201)


@bp.post("/keys")
@documented(summary="Create a key (shown once): an app-bound admin key makes keys of its own "
            "app only", body=KeyCreateRequestSchema, response=IssuedKeySchema, status=201,
            tag="keys")
@answer_not_kept
def create_key() -> Response:
    require_role(current_principal(), Role.ADMIN)
    args = KeyCreateRequestSchema().load(json_body())
    ttl = args.pop("ttl_seconds")
    issued = part(KeyService).create_key(
        Role(args.pop("role")), args.pop("app", None), **args,
        ttl=timedelta(seconds=ttl) if ttl else None, actor=current_actor())
    return json_response(IssuedKeySchema().dump(_issued_view(issued)), status=201)


def _issued_view(issued: IssuedKey) -> dict[str, object]:
    view = part(KeyService).get_key(current_actor(), key_id_of(issued.key))
    return {**view, "key": issued.key}


@bp.get("/keys")
@documented(summary="The keys this admin key may manage, newest first (never a secret)",
            query=KeyListQuerySchema, response=KeyListSchema, tag="keys")
def list_keys() -> Response:
    require_role(current_principal(), Role.ADMIN)
    args = KeyListQuerySchema().load(query_args())
    role = args.pop("role", None)
    data, more = part(KeyService).list_keys(
        current_actor(), KeyFilter(**args, role=Role(role) if role else None))
    return json_response(KeyListSchema().dump({"data": data, "has_more": more}))


@bp.get("/keys/<key_id>")
@documented(summary="One key (never its secret)", response=KeySchema, tag="keys")
def get_key(key_id: str) -> Response:
    require_role(current_principal(), Role.ADMIN)
    return json_response(KeySchema().dump(part(KeyService).get_key(current_actor(), key_id)))


@bp.delete("/keys/<key_id>")
@documented(summary="Revoke a key at once (idempotent; other workers refuse it within "
            "MLANE_KEY_CACHE_SECONDS)", response=KeySchema, tag="keys")
def revoke_key(key_id: str) -> Response:
    require_role(current_principal(), Role.ADMIN)
    return json_response(KeySchema().dump(part(KeyService).revoke(current_actor(), key_id)))


@bp.post("/keys/<key_id>/rotate")
@documented(summary="A successor key (shown once); the old key keeps working for "
            "overlap_seconds (at most 7 days), then is refused",
            body=KeyRotateRequestSchema, response=RotatedKeySchema, status=201, tag="keys")
@answer_not_kept
def rotate_key(key_id: str) -> Response:
    require_role(current_principal(), Role.ADMIN)
    args = KeyRotateRequestSchema().load(json_body(allow_empty=True))
    ttl = args["ttl_seconds"]
    issued, previous = part(KeyService).rotate(
        current_actor(), key_id, overlap_seconds=args["overlap_seconds"],
        ttl=timedelta(seconds=ttl) if ttl else None)
    body = {**_issued_view(issued), "previous": previous}
    return json_response(RotatedKeySchema().dump(body), status=201)


@bp.get("/audit")
@documented(summary="The audit trail, newest first: every change made with an admin or app "
            "key or the CLI (an app-bound admin key sees its app's rows)",
            query=AuditQuerySchema, response=AuditListSchema, tag="audit")
def audit() -> Response:
    principal = current_principal()
    require_role(principal, Role.ADMIN)
    args = AuditQuerySchema().load(query_args())
    app = args.pop("app", None)
    app_id = principal.app_id
    if app_id is None and app is not None:
        app_id = part(TenancyService).get_app(app)
    data, more = part(AuditService).events(AuditQuery(app_id=app_id, **args))
    return json_response(AuditListSchema().dump({"data": data, "has_more": more}))
