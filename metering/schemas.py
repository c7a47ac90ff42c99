"""HTTP schemas of the metering API (usage totals)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from core.schemas import RequestSchema, Timestamp, bounded_time, identifier
from plans.credits import DEFAULT_PRIORITY, MAX_GRANT

# A '+' in a query string arrives as a space: "...T10:00:00 02:00" means +02:00.
_ZONE_SPACE = re.compile(r" (\d\d:?\d\d)$")


class Instant(fields.Field):  # type: ignore[type-arg]
    """An ISO 8601 date or datetime; a value without a zone is taken as UTC."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        if not isinstance(value, str):
            raise ValidationError("Expected an ISO 8601 date or datetime string.")
        try:
            parsed = datetime.fromisoformat(_ZONE_SPACE.sub(r"+\1", value.replace("Z", "+00:00")))
        except ValueError as exc:
            raise ValidationError(
                f"Not an ISO 8601 date or datetime: {value!r} (e.g. 2026-11-01).") from exc
        return bounded_time(parsed, attr or "time")


class RoutingQuerySchema(RequestSchema):
    """Whose usage and when: an app (operator-wide keys), one end user, a period."""

    class Meta:
        unknown = RAISE

    user = fields.String(validate=validate.Length(min=1, max=256),
                         metadata={"description": "The app's end-user id"})
    app = fields.String(validate=validate.Length(min=1, max=100),
                        metadata={"description": "App name (operator-wide keys only)"})
    from_ = Instant(data_key="from", metadata={
        "description": "Start, inclusive (ISO 8601 date or datetime, UTC if no zone); "
                       "default: start of the current UTC month"})
    to = Instant(metadata={"description": "End, exclusive (ISO 8601); default: now"})


class UsageQuerySchema(RoutingQuerySchema):
    group_by = fields.String(validate=validate.OneOf(["model", "day"]))


class UsageTotalsSchema(Schema):
    key = fields.String(allow_none=True, metadata={"description": "Model name or UTC day"})
    requests = fields.Integer()
    input_tokens = fields.Integer()
    cached_input_tokens = fields.Integer()
    output_tokens = fields.Integer()
    reasoning_tokens = fields.Integer()
    total_tokens = fields.Integer()
    cost_usd = fields.String(metadata={"description": "Exact decimal USD of priced calls"})
    unpriced_requests = fields.Integer(
        metadata={"description": "Calls to models without a price: no cost recorded"})
    counted_requests = fields.Integer(
        metadata={"description": "Calls whose tokens were counted by the tokenizer"})
    failed_requests = fields.Integer()


class UsageReportSchema(Schema):
    object = fields.Constant("usage.report")
    app = fields.String(allow_none=True)
    user = fields.String(allow_none=True)
    from_ = Timestamp(data_key="from")
    to = Timestamp()
    group_by = fields.String(allow_none=True)
    totals = fields.Nested(UsageTotalsSchema)
    groups = fields.List(fields.Nested(UsageTotalsSchema))


class ServedModelSchema(Schema):
    model = fields.String()
    calls = fields.Integer()
    cost_usd = fields.String()


class AliasSavingsSchema(Schema):
    alias = fields.String()
    calls = fields.Integer()
    cost_usd = fields.String(metadata={"description": "What the routed calls cost"})
    baseline_usd = fields.String(metadata={
        "description": "What the same tokens would have cost, each call on the most expensive "
                       "model of the alias its plan allowed"})
    saved_usd = fields.String()
    saved_percent = fields.String(allow_none=True)
    unpriced_calls = fields.Integer(metadata={
        "description": "Calls served by a model with no list price (a local GPU), counted at "
                       "zero cost"})
    served = fields.List(fields.Nested(ServedModelSchema))


class RoutingReportSchema(Schema):
    object = fields.Constant("routing.savings")
    app = fields.String(allow_none=True)
    user = fields.String(allow_none=True)
    from_ = Timestamp(data_key="from")
    to = Timestamp()
    aliases = fields.List(fields.Nested(AliasSavingsSchema))
    cost_usd = fields.String()
    baseline_usd = fields.String()
    saved_usd = fields.String()


# -- limits: reserve / settle / release / track, and the quota a user sees ----------------

MAX_TOKENS_PER_CALL = 100_000_000


class UsageSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    input_tokens = fields.Integer(required=True, strict=True,
                                  validate=validate.Range(0, MAX_TOKENS_PER_CALL))
    output_tokens = fields.Integer(load_default=0, strict=True,
                                   validate=validate.Range(0, MAX_TOKENS_PER_CALL))
    cached_input_tokens = fields.Integer(load_default=0, strict=True,
                                         validate=validate.Range(0, MAX_TOKENS_PER_CALL))
    reasoning_tokens = fields.Integer(load_default=0, strict=True,
                                      validate=validate.Range(0, MAX_TOKENS_PER_CALL))
    cache_write_tokens = fields.Integer(load_default=0, strict=True,
                                        validate=validate.Range(0, MAX_TOKENS_PER_CALL),
                                        metadata={"description": "Of the input, written to a "
                                                  "prompt cache (priced at cache_write)"})

    @validates_schema
    def _parts_within_totals(self, data: dict[str, Any], **_: Any) -> None:
        """Cached and cache-written tokens are part of the input, reasoning of the output."""
        inp = data.get("input_tokens", 0)
        if data.get("cached_input_tokens", 0) + data.get("cache_write_tokens", 0) > inp:
            raise ValidationError("cached_input_tokens and cache_write_tokens are part of "
                                  "input_tokens: together at most input_tokens.",
                                  "cached_input_tokens")
        if data.get("reasoning_tokens", 0) > data.get("output_tokens", 0):
            raise ValidationError("reasoning_tokens are part of output_tokens: at most "
                                  "output_tokens.", "reasoning_tokens")


class ReserveRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    user = fields.String(validate=identifier(256), metadata={
        "description": "The end user (app keys; a user key acts as its own user)"})
    model = fields.String(required=True, validate=identifier(200))
    input_tokens = fields.Integer(strict=True, validate=validate.Range(0, MAX_TOKENS_PER_CALL),
                                  metadata={"description": "Prompt tokens, if the app counted "
                                            "them; else give messages, prompt or input"})
    messages = fields.List(fields.Dict(), metadata={"description": "Chat messages to count"})
    prompt = fields.Raw(metadata={"description": "A completions prompt to count"})
    input = fields.Raw(metadata={"description": "Embeddings input to count"})
    max_output_tokens = fields.Integer(strict=True, validate=validate.Range(
        0, MAX_TOKENS_PER_CALL), metadata={"description": "Output the call may generate "
                                           "(default: the plan's default_max_output_tokens)"})


class LimitStateSchema(Schema):
    id = fields.String()
    name = fields.String(metadata={"description": "A readable name (\"Tokens per day\"), "
                                   "in the language of ?locale= (en, de, fr)"})
    metric = fields.String()
    window = fields.String()
    scope = fields.String()
    model = fields.String(allow_none=True)
    kind = fields.String(metadata={"description": "quota (402 when spent) or rate (429)"})
    used = fields.Raw(metadata={"description": "Integer, or a decimal USD string for cost_usd"})
    remaining = fields.Raw()
    limit = fields.Raw(metadata={"description": "What is enforced now: for the allowance, "
                                 "the plan's included credits plus the credits and overage "
                                 "that may follow them"})
    unit = fields.String(metadata={"description": "A meter limit only: the meter's unit"})
    included = fields.Integer(metadata={"description": "The allowance only: credits the plan "
                                        "includes per billing cycle"})
    resets_at = fields.String(allow_none=True, metadata={
        "description": "When it frees up (UTC, RFC 3339); null for concurrency"})


class LeaseSchema(Schema):
    object = fields.Constant("meter.lease")
    lease_id = fields.String()
    user = fields.String()
    model = fields.String()
    plan = fields.String()
    input_tokens = fields.Integer()
    granted_output_tokens = fields.Integer(allow_none=True, metadata={
        "description": "Cap the call's output at this (null: no limit bounds it)"})
    expires_at = fields.String()
    limits = fields.List(fields.Nested(LimitStateSchema))


class SettleRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    lease_id = fields.String(required=True, validate=identifier(200))
    usage = fields.Nested(UsageSchema, required=True)


class ReleaseRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    lease_id = fields.String(required=True, validate=identifier(200))


class TrackRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    user = fields.String(validate=identifier(256))
    model = fields.String(required=True, validate=identifier(200))
    usage = fields.Nested(UsageSchema, required=True)
    idempotency_key = fields.String(required=True, validate=identifier(255))
    timestamp = Timestamp(metadata={
        "description": "When the call happened (RFC 3339 with a zone; default: now): at most "
                       "[metering] max_event_age (35 days) ago and 5 minutes ahead. The call "
                       "counts in its own day and billing cycle"})


class CorrectionRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    idempotency_key = fields.String(required=True, validate=identifier(255), metadata={
        "description": "The correction's own key: the same key again replays it"})
    corrects = fields.String(required=True, validate=identifier(300), metadata={
        "description": "The idempotency_key the event to correct was tracked under (a "
                       "CloudEvent: ce:<source>:<id>)"})
    action = fields.String(required=True, validate=validate.OneOf(("void", "amend")),
                           metadata={"description": "void: the event stops counting; amend: "
                                     "it stops counting and these values count instead"})
    user = fields.String(validate=identifier(256), metadata={
        "description": "Optional check: the event's end user (a correction never moves "
                       "usage to another user)"})
    model = fields.String(validate=identifier(200), metadata={
        "description": "amend: the model (default: the event's)"})
    usage = fields.Nested(UsageSchema, metadata={
        "description": "amend of a token event: required"})
    meter = fields.String(validate=identifier(64), metadata={
        "description": "The event is a custom meter's (/v1/meter/events): its id"})
    value = fields.Raw(metadata={"description": "amend of a meter event: its value (as "
                                 "/v1/meter/events takes it)"})
    data = fields.Dict(keys=fields.String(), metadata={
        "description": "amend of a meter event: its data (the meter's field is read here)"})
    timestamp = Timestamp(metadata={
        "description": "amend: when the call happened (default: the event's time), within "
                       "[metering] max_event_age"})

    @validates_schema
    def _amend_has_usage(self, data: dict[str, Any], **_: Any) -> None:
        if "meter" in data:
            if any(k in data for k in ("usage", "model")):
                raise ValidationError("A meter event's amendment gives value or data, not "
                                      "usage or model.", "meter")
        elif any(k in data for k in ("value", "data")):
            raise ValidationError("value and data are a meter event's: name the meter.",
                                  "meter")
        elif data.get("action") == "amend" and "usage" not in data:
            raise ValidationError("An amendment gives the usage that counts instead.", "usage")
        if data.get("action") == "void" and any(k in data for k in (
                "usage", "model", "timestamp", "value", "data")):
            raise ValidationError("A void takes no usage, model, value, data or timestamp.",
                                  "action")


class CorrectionSchema(Schema):
    object = fields.Constant("meter.correction")
    idempotency_key = fields.String()
    corrects = fields.String()
    action = fields.String()
    outcome = fields.String(metadata={"description": "corrected, or duplicate (this "
                                      "correction was made before: nothing changed again)"})
    user = fields.String()
    timestamp = fields.String(metadata={"description": "When the usage that counts now "
                                        "happened"})
    cost_usd = fields.String(allow_none=True, metadata={
        "description": "What counts now: the amendment's cost (\"0\" for a void; null: "
                       "unpriced)"})
    corrected_cost_usd = fields.String(allow_none=True, metadata={
        "description": "The corrected event's cost, which no longer counts"})
    meter = fields.String(metadata={"description": "A meter event's correction: the meter"})
    value = fields.String(metadata={"description": "A meter event's correction: the value "
                                    "that counts now, in the meter's unit"})


class TrackBatchRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    events = fields.List(fields.Nested(TrackRequestSchema), required=True,
                         validate=validate.Length(min=1, max=1000),
                         metadata={"description": "Up to 1,000 calls, each as /v1/meter/track"})


class TrackBatchResultSchema(Schema):
    object = fields.Constant("meter.batch_result")
    tracked = fields.Integer()
    duplicates = fields.Integer()
    limits_pending = fields.Integer(metadata={
        "description": "Recorded, but not yet counted into the limits (store unavailable): "
                       "counted when it is back"})
    data = fields.List(fields.Dict(), metadata={
        "description": "Per event, in order: idempotency_key, outcome, cost_usd"})


class MeterResultSchema(Schema):
    object = fields.Constant("meter.result")
    lease_id = fields.String(allow_none=True)
    idempotency_key = fields.String(allow_none=True)
    outcome = fields.String(metadata={"description": "settled, released, tracked, duplicate, "
                                      "or quarantined (the ledger refused the record: kept "
                                      "for an operator, not counted)"})
    cost_usd = fields.String(allow_none=True)


class QuotaSchema(Schema):
    object = fields.Constant("quota")
    user = fields.String()
    plan = fields.Dict()
    limits = fields.List(fields.Nested(LimitStateSchema))


# -- credits ----------------------------------------------------------------------------

class GrantRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    amount = fields.Integer(required=True, strict=True,
                            validate=validate.Range(min=1, max=MAX_GRANT))
    source = fields.String(required=True, validate=validate.OneOf(("promotion", "refund",
                                                                   "topup")))
    external_id = fields.String(required=True, validate=validate.Length(min=1, max=200),
                                metadata={"description": "Your id for the grant: the same id "
                                          "twice grants once"})
    priority = fields.Integer(strict=True, load_default=DEFAULT_PRIORITY,
                              validate=validate.Range(min=0, max=10_000),
                              metadata={"description": "Lower burns first"})
    expires_at = Timestamp(allow_none=True, load_default=None)
    note = fields.String(allow_none=True, load_default=None,
                         validate=validate.Length(max=500), metadata={"multiline": True})


class GrantSchema(Schema):
    id = fields.Integer()
    source = fields.String()
    amount = fields.Integer()
    remaining = fields.Integer()
    priority = fields.Integer()
    granted_at = fields.String()
    expires_at = fields.String(allow_none=True)
    state = fields.String(metadata={"description": "live, spent, expired or pending"})


class CreditsSchema(Schema):
    object = fields.Constant("credits")
    user = fields.String()
    balance = fields.Integer(metadata={"description": "Credits usable now"})
    granted = fields.Integer()
    burned = fields.Integer()
    expired = fields.Integer()
    grants = fields.List(fields.Nested(GrantSchema))
