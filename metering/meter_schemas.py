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


class MeterAllowanceSchema(Schema):
    included = fields.String(metadata={"description": "Included per billing cycle, in the "
                                       "meter's unit"})
    used = fields.String(metadata={"description": "Counted in the open cycle (when received)"})
    remaining = fields.String(metadata={"description": "Of the allowance, left this cycle"})
    overage = fields.String(metadata={"description": "Past the allowance this cycle: billed "
                                      "as overage (0 on a plan with a hard stop)"})
    overage_price = fields.String(allow_none=True, metadata={
        "description": "Minor units of the plan's currency per unit past the allowance "
                       "(null: the allowance is a hard stop)"})
    overage_amount = fields.String(metadata={"description": "What this cycle's overage costs, "
                                             "exact minor units of currency"})
    currency = fields.String(allow_none=True)
    cycle_start = fields.String()
    cycle_end = fields.String()


class MeterTotalSchema(Schema):
    meter = fields.String()
    unit = fields.String()
    aggregation = fields.String()
    value = fields.String(metadata={"description": "The aggregate in the meter's unit"})
    events = fields.Integer()
    cost_usd = fields.String()
    allowance = fields.Nested(MeterAllowanceSchema, allow_none=True, metadata={
        "description": "What the user's plan includes of the meter in the open billing cycle "
                       "(null: none)"})


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
