"""HTTP schemas of key management (/v1/keys) and the audit trail (/v1/audit)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from core.keys import MAX_OVERLAP_SECONDS
from core.schemas import RequestSchema, Timestamp, identifier

ROLES = ["admin", "app", "user", "finance"]
MAX_TTL_SECONDS = 10 * 366 * 24 * 3600


class KeyCreateRequestSchema(RequestSchema):
    role = fields.String(required=True, validate=validate.OneOf(ROLES))
    app = fields.String(validate=identifier(100), metadata={
        "description": "The app the key acts in (created if new). An app-bound admin key "
                       "may name only its own app (the default); no app: operator-wide "
                       "(admin and finance keys of an operator-wide admin only)"})
    user = fields.String(validate=identifier(256),
                         metadata={"description": "The end user (user keys only)"})
    name = fields.String(load_default=None, validate=validate.Length(max=200))
    description = fields.String(load_default=None, validate=validate.Length(max=500))
    ttl_seconds = fields.Integer(load_default=None,
                                 validate=validate.Range(min=60, max=MAX_TTL_SECONDS),
                                 metadata={"description": "Expire the key after this long "
                                                          "(a user key: default and at most "
                                                          "as a key an app mints)"})


class KeyListQuerySchema(RequestSchema):
    app = fields.String(validate=identifier(100))
    role = fields.String(validate=validate.OneOf(ROLES))
    include_revoked = fields.Boolean(load_default=False)
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    starting_after = fields.String(validate=identifier(100), metadata={
        "description": "The id of the last key of the previous page"})


class KeyRotateRequestSchema(RequestSchema):
    overlap_seconds = fields.Integer(
        load_default=3600, validate=validate.Range(min=0, max=MAX_OVERLAP_SECONDS),
        metadata={"description": "How long the old key keeps working (at most 7 days)"})
    ttl_seconds = fields.Integer(load_default=None,
                                 validate=validate.Range(min=60, max=MAX_TTL_SECONDS),
                                 metadata={"description": "The new key's lifetime (default: "
                                                          "the old key's, or none; a user "
                                                          "key's at most as a key an app "
                                                          "mints)"})


class KeySchema(Schema):
    object = fields.Constant("api_key")
    id = fields.String(metadata={"description": "The key's public id (the hex after mlk_)"})
    prefix = fields.String(metadata={"description": "mlk_<id>: how the key starts"})
    role = fields.String()
    app = fields.String(allow_none=True)
    user = fields.String(allow_none=True)
    name = fields.String(allow_none=True)
    description = fields.String(allow_none=True)
    created_at = Timestamp()
    last_used_at = Timestamp(allow_none=True, metadata={
        "description": "Exact to about a minute (written at most once a minute per worker)"})
    expires_at = Timestamp(allow_none=True)
    revoked_at = Timestamp(allow_none=True)
    state = fields.String(validate=validate.OneOf(["active", "expired", "revoked"]))
    rotated_from = fields.String(allow_none=True)


class IssuedKeySchema(KeySchema):
    key = fields.String(metadata={"description": "The whole key: shown only this once"})


class RotatedKeySchema(IssuedKeySchema):
    previous = fields.Nested(KeySchema, metadata={
        "description": "The old key, now expiring at the end of the overlap"})


class KeyListSchema(Schema):
    object = fields.Constant("list")
    data = fields.List(fields.Nested(KeySchema))
    has_more = fields.Boolean()


class AuditQuerySchema(RequestSchema):
    app = fields.String(validate=identifier(100))
    action = fields.String(validate=identifier(64), metadata={
        "description": "price.create, or a family without a dot: price"})
    actor_key = fields.String(validate=identifier(100),
                              metadata={"description": "The acting key's id or prefix"})
    target_type = fields.String(validate=identifier(32))
    target_id = fields.String(validate=identifier(300))
    since = Timestamp()
    until = Timestamp()
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    starting_after = fields.Integer(validate=validate.Range(min=1, max=2**63 - 1), metadata={
        "description": "The id of the last row of the previous page"})


class AuditActorSchema(Schema):
    role = fields.String(metadata={"description": "admin, app, ... or cli"})
    key_id = fields.String(allow_none=True)
    key = fields.String(allow_none=True, metadata={"description": "mlk_<id>, never a secret"})
    name = fields.String(allow_none=True, metadata={"description": "The OS user (cli)"})


class AuditTargetSchema(Schema):
    type = fields.String()
    id = fields.String()


class AuditEventSchema(Schema):
    object = fields.Constant("audit_event")
    id = fields.Integer()
    at = Timestamp()
    action = fields.String()
    app = fields.String(allow_none=True)
    actor = fields.Nested(AuditActorSchema)
    target = fields.Nested(AuditTargetSchema)
    before = fields.Dict(allow_none=True)
    after = fields.Dict(allow_none=True)
    request_id = fields.String(allow_none=True)


class AuditListSchema(Schema):
    object = fields.Constant("list")
    data = fields.List(fields.Nested(AuditEventSchema))
    has_more = fields.Boolean()
