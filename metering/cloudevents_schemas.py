"""HTTP schemas of CloudEvents ingestion (POST /v1/events): CloudEvents 1.0, structured JSON."""

from __future__ import annotations

from marshmallow import EXCLUDE, Schema, fields, validate

from core.schemas import RequestSchema, Timestamp, identifier
from metering.schemas import UsageSchema

TOKENS_TYPE = "meterlane.tokens"  # the token meter; custom meters add their own types
KNOWN_TYPES = (TOKENS_TYPE,)


class TokensDataSchema(UsageSchema):
    """`data` of a meterlane.tokens event: the model and its token counts, as track's usage."""

    model = fields.String(required=True, validate=identifier(200))


class CloudEventSchema(RequestSchema):
    class Meta:
        # CloudEvents lets a producer add extension attributes (OpenMeter's SDKs do):
        # they are read past, never stored.
        unknown = EXCLUDE

    specversion = fields.String(required=True, validate=validate.Equal(
        "1.0", error="specversion must be \"1.0\" (CloudEvents 1.0)."))
    id = fields.String(required=True, validate=identifier(128), metadata={
        "description": "Unique per source: the same id and source twice count once"})
    source = fields.String(required=True, validate=identifier(160))
    type = fields.String(required=True, validate=identifier(200), metadata={
        "description": f"The meter: {', '.join(KNOWN_TYPES)}, or the id of a [[meters]] "
                       "entry"})
    subject = fields.String(validate=identifier(256), metadata={
        "description": "The end user (required here)"})
    time = Timestamp(metadata={"description": "When it happened (RFC 3339; default: now), "
                               "at most [metering] max_event_age ago and 5 minutes ahead"})
    datacontenttype = fields.String(validate=validate.Equal(
        "application/json", error="datacontenttype must be application/json."))
    dataschema = fields.String(validate=validate.Length(max=2000))
    corrects = fields.String(validate=identifier(128), metadata={
        "description": "Extension attribute: the id of an event of the same source that this "
                       "one corrects (meterlane.tokens only)"})
    correction = fields.String(validate=validate.OneOf(("void", "amend")), metadata={
        "description": "Extension attribute, with corrects: void (the event stops counting; "
                       "no data) or amend (this event's data counts instead)"})
    data = fields.Dict(load_default=None, metadata={
        "description": "meterlane.tokens: {model, input_tokens, output_tokens, "
                       "cached_input_tokens, reasoning_tokens, cache_write_tokens}; a custom "
                       "meter: the object its field is read from"})


class EventOutcomeSchema(Schema):
    id = fields.String(allow_none=True)
    source = fields.String(allow_none=True)
    outcome = fields.String(metadata={"description": "tracked, duplicate (this id and source "
                                      "were counted before, or earlier in the batch), "
                                      "corrected (a correction made), quarantined, or "
                                      "rejected (see reason)"})
    reason = fields.String(allow_none=True)
    cost_usd = fields.String(allow_none=True)


class EventsResultSchema(Schema):
    object = fields.Constant("events.result")
    tracked = fields.Integer()
    corrected = fields.Integer(metadata={"description": "Corrections made (corrects)"})
    duplicates = fields.Integer()
    rejected = fields.Integer()
    limits_pending = fields.Integer()
    data = fields.List(fields.Nested(EventOutcomeSchema),
                       metadata={"description": "Per event, in order"})
