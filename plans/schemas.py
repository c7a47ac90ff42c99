"""HTTP schemas of the plans API."""

from __future__ import annotations

from marshmallow import RAISE, Schema, fields, validate

from core.schemas import RequestSchema, Timestamp


class PlanAssignmentRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    plan = fields.String(required=True, validate=validate.Length(min=1, max=64))
    anchored_at = Timestamp(metadata={
        "description": "Start of the billing cycle, with a zone (default: now)"})


class PlanAssignmentSchema(Schema):
    object = fields.Constant("plan.assignment")
    user = fields.String()
    plan = fields.String()
    anchored_at = Timestamp()


class CheckoutRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    user = fields.String(required=True, validate=validate.Length(min=1, max=200))
    plan = fields.String(validate=validate.Length(min=1, max=64))
    credit_pack = fields.String(validate=validate.Length(min=1, max=64))
    success_url = fields.Url(required=True, require_tld=False)
    cancel_url = fields.Url(required=True, require_tld=False)
    consent_id = fields.String(validate=validate.Length(min=1, max=40), metadata={
        "description": "A plan (subscription) checkout: the user's auto-renewal consent "
                       "(POST /v1/paywall/consents); without it the checkout is refused (CNS-01)"})


class CheckoutSessionSchema(Schema):
    object = fields.Constant("checkout.session")
    id = fields.String()
    url = fields.String(metadata={"description": "Send the end user here to pay"})
    mode = fields.String(metadata={"description": "subscription (a plan) or payment (a pack)"})
    item = fields.String(metadata={"description": "The plan version or credit pack bought"})


class SubscriptionChangeRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    plan = fields.String(required=True, validate=validate.Length(min=1, max=64))


class SubscriptionChangeSchema(Schema):
    object = fields.Constant("subscription.change")
    subscription = fields.String()
    action = fields.String(metadata={"description": "upgraded (at once, prorated), "
                                     "downgrade_scheduled or cancel_scheduled (at the end of "
                                     "the period)"})
    plan = fields.String()
    effective_at = Timestamp(allow_none=True)
    already_cancelled = fields.Boolean(metadata={
        "description": "A cancel: true when it was cancelled before (nothing changed)"})
    confirmation = fields.Dict(metadata={
        "description": "A cancel: the confirmation (received_at, effective_at, access_until, "
                       "no_further_charges, text), also sent to the app as cancel.confirmed"})


class CancelRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    channel = fields.String(load_default="api", validate=validate.Length(min=1, max=32),
                            metadata={"description": "Where the user cancelled: settings, "
                                      "email_link, ..."})
    steps = fields.Integer(load_default=1, strict=True, validate=validate.Range(min=1, max=20),
                           metadata={"description": "Interactions it took (CXL-01: at most 2)"})
