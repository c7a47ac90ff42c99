"""Paywall and webhook API shapes (HTTP edge only)."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate


class EventsQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    user = fields.String(validate=validate.Length(min=1, max=256))
    trigger = fields.String(validate=validate.OneOf(["limit_reached", "threshold_crossed"]))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=500))
    app = fields.String(metadata={"description": "App name (operator-wide keys only)"})


class PaywallEventSchema(Schema):
    id = fields.String(metadata={"description": "The event id; the webhook carries the same"})
    created_at = fields.AwareDateTime()
    user = fields.String()
    trigger = fields.String()
    threshold = fields.Integer(allow_none=True, metadata={"description": "Percent crossed"})
    limit = fields.Dict(metadata={"description": "The limit as a 402 shows it"})
    plan = fields.Dict()
    request_id = fields.String(allow_none=True)
    offers = fields.List(fields.Dict())


class EventListSchema(Schema):
    object = fields.Constant("list")
    data = fields.List(fields.Nested(PaywallEventSchema))


class WebhookEndpointRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    url = fields.String(required=True, validate=validate.Length(min=8, max=2000))
    rotate_secret = fields.Boolean(load_default=False)


class WebhookEndpointSchema(Schema):
    url = fields.String()
    secret = fields.String(allow_none=True, metadata={
        "description": "Signs every delivery; shown only when created or rotated"})
    created_at = fields.AwareDateTime()
    signature = fields.Constant(
        "Meterlane-Signature: t=<unix>,v1=hex(HMAC-SHA256(secret, '<t>.' + body))")


class DeliveriesQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    event = fields.String(validate=validate.Length(min=1, max=40))
    app = fields.String()


class AttemptSchema(Schema):
    attempt = fields.Integer()
    at = fields.AwareDateTime()
    status = fields.Integer(allow_none=True)
    error = fields.String(allow_none=True)
    duration_ms = fields.Integer()


class DeliverySchema(Schema):
    id = fields.Integer()
    event_id = fields.String()
    type = fields.String()
    url = fields.String()
    state = fields.String(metadata={"description": "pending, delivered or failed"})
    attempts = fields.List(fields.Nested(AttemptSchema))
    next_attempt_at = fields.AwareDateTime(allow_none=True)
    delivered_at = fields.AwareDateTime(allow_none=True)
    created_at = fields.AwareDateTime()


class DeliveryListSchema(Schema):
    object = fields.Constant("list")
    data = fields.List(fields.Nested(DeliverySchema))
