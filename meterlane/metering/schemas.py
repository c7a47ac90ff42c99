"""HTTP schemas of the metering API (usage totals)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate

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
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)


class UsageQuerySchema(Schema):
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
    from_ = fields.AwareDateTime(data_key="from")
    to = fields.AwareDateTime()
    group_by = fields.String(allow_none=True)
    totals = fields.Nested(UsageTotalsSchema)
    groups = fields.List(fields.Nested(UsageTotalsSchema))
