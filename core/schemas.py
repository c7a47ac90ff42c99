"""HTTP schemas of the kernel API (end-user keys)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate


class UserKeyRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    ttl_seconds = fields.Integer(
        load_default=None, validate=validate.Range(min=60),
        metadata={"description": "Lifetime of the key; default 1 hour, at most 7 days"})
    name = fields.String(load_default=None, validate=validate.Length(max=200))


class UserKeySchema(Schema):
    object = fields.Constant("user_key")
    key = fields.String(metadata={"description": "Shown once; store it client-side"})
    role = fields.String()
    user = fields.String()
    expires_at = fields.AwareDateTime()


class ProblemSchema(Schema):
    type = fields.String()
    title = fields.String()
    status = fields.Integer()
    detail = fields.String()
    instance = fields.String()
