"""HTTP schemas of the plans API."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate


class PlanAssignmentRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    plan = fields.String(required=True, validate=validate.Length(min=1, max=64))
    anchored_at = fields.AwareDateTime(metadata={
        "description": "Start of the billing cycle, with a zone (default: now)"})


class PlanAssignmentSchema(Schema):
    object = fields.Constant("plan.assignment")
    user = fields.String()
    plan = fields.String()
    anchored_at = fields.AwareDateTime()
