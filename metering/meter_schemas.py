"""HTTP schemas of the meter events API ([[meters]])."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from core.schemas import RequestSchema, Timestamp, identifier

MAX_BATCH = 100


class MeterEventRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    user = fields.String(required=True, validate=identifier(256),
                         metadata={"description": "The app's end-user id"})
    meter = fields.String(required=True, validate=identifier(64),
                          metadata={"description": "The id of a [[meters]] meter"})
    value = fields.Raw(load_default=None, metadata={
        "description": "The amount, in the meter's unit: an integer or a decimal string (at "
                       "most 6 decimals). Omitted: read from data[<the meter's field>]; a "
                       "count meter takes none"})
    data = fields.Dict(keys=fields.String(), load_default=None, metadata={
        "description": "The event's fields; the meter reads its field from here"})
    idempotency_key = fields.String(required=True, validate=identifier(300), metadata={
        "description": "Your id for the event: the same key twice records it once"})
    timestamp = Timestamp(load_default=None, metadata={
        "description": "When it happened (default: when received); limits count it when "
                       "received"})


class MeterEventBatchRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    events = fields.List(fields.Dict(), required=True,
                         validate=validate.Length(min=1, max=MAX_BATCH))


class MeterEventSchema(Schema):
    object = fields.Constant("meter.event")
    id = fields.Integer()
    meter = fields.String()
    idempotency_key = fields.String()
    value = fields.String(metadata={"description": "In the meter's unit, exact"})
    cost_usd = fields.String(allow_none=True, metadata={
        "description": "At the meter's price when received; null when it has no price"})
    occurred_at = fields.String()
    outcome = fields.String(metadata={"description": "recorded, or duplicate (the key was "
                                      "seen before: nothing counted again)"})


class MeterEventBatchResultSchema(Schema):
    object = fields.Constant("list")
    recorded = fields.Integer()
    duplicates = fields.Integer()
    data = fields.List(fields.Dict(), metadata={
        "description": "Per event, in order: the event, or its error as problem details"})


class MeterTotalSchema(Schema):
    meter = fields.String()
    unit = fields.String()
    aggregation = fields.String()
    value = fields.String(metadata={"description": "The aggregate in the meter's unit"})
    events = fields.Integer()
    cost_usd = fields.String()


class MeterUsageSchema(Schema):
    object = fields.Constant("meter.usage")
    user = fields.String()
    start = fields.String()
    end = fields.String()
    meters = fields.List(fields.Nested(MeterTotalSchema))


class MeterUsageQuerySchema(RequestSchema):
    class Meta:
        unknown = RAISE

    start = Timestamp(load_default=None, data_key="from")
    end = Timestamp(load_default=None, data_key="to")
