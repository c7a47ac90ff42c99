"""Paywall and webhook API shapes (HTTP edge only)."""

from __future__ import annotations

import ipaddress

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from core.pagination import has_more_field, limit_field, starting_after_field
from core.schemas import RequestSchema, Timestamp


class EventsQuerySchema(RequestSchema):
    class Meta:
        unknown = RAISE

    user = fields.String(validate=validate.Length(min=1, max=256))
    trigger = fields.String(validate=validate.OneOf(["limit_reached", "threshold_crossed"]))
    limit = limit_field(default=100, maximum=500)
    starting_after = starting_after_field()
    app = fields.String(metadata={"description": "App name (operator-wide keys only)"})


class PaywallEventSchema(Schema):
    id = fields.String(metadata={"description": "The event id; the webhook carries the same"})
    created_at = Timestamp()
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
    has_more = has_more_field()


class WebhookEndpointRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    url = fields.String(required=True, validate=validate.Length(min=8, max=2000))
    rotate_secret = fields.Boolean(load_default=False)


class WebhookEndpointSchema(Schema):
    url = fields.String()
    secret = fields.String(allow_none=True, metadata={
        "description": "Signs every delivery; shown only when created or rotated"})
    created_at = Timestamp()
    signature = fields.Constant(
        "Meterlane-Signature: t=<unix>,v1=hex(HMAC-SHA256(secret, '<t>.' + body))")


class DeliveriesQuerySchema(RequestSchema):
    class Meta:
        unknown = RAISE

    event = fields.String(validate=validate.Length(min=1, max=40))
    app = fields.String()
    limit = limit_field(default=100, maximum=500)
    starting_after = starting_after_field(integer=True)


class AttemptSchema(Schema):
    attempt = fields.Integer()
    at = Timestamp()
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
    next_attempt_at = Timestamp(allow_none=True)
    delivered_at = Timestamp(allow_none=True)
    created_at = Timestamp()


class DeliveryListSchema(Schema):
    object = fields.Constant("list")
    data = fields.List(fields.Nested(DeliverySchema))
    has_more = has_more_field()


class OfferDraftSchema(RequestSchema):
    """A draft offer: the copy and policies; prices and entitlements come from the plan."""

    class Meta:
        unknown = RAISE

    offer = fields.String(required=True, validate=validate.Regexp(
        r"^[a-z0-9][a-z0-9_.-]{0,63}\Z", error="1-64 lowercase letters, digits, '_', '.', '-'"))
    kind = fields.String(load_default="subscription",
                         validate=validate.OneOf(["subscription", "credits"]))
    plan = fields.String(validate=validate.Length(min=1, max=64))
    pack = fields.String(validate=validate.Length(min=1, max=64))
    auto_renews = fields.Boolean()
    min_commitment = fields.String(validate=validate.Length(max=500), metadata={"multiline": True})
    cancel_instructions = fields.String(validate=validate.Length(max=1000),
                                        metadata={"multiline": True})
    cancel_deadline = fields.String(validate=validate.Length(max=500), metadata={"multiline": True})
    headline = fields.Dict(keys=fields.String())
    equivalents = fields.List(fields.Dict(keys=fields.String()))
    trial = fields.Dict(keys=fields.String())
    tax_behavior = fields.String(validate=validate.OneOf(["inclusive", "exclusive"]))
    fees = fields.List(fields.Dict(keys=fields.String()))
    policy_refs = fields.Dict(keys=fields.String(), values=fields.String())
    copy = fields.Dict(keys=fields.String(validate=validate.Regexp(r"^[a-z]{2}$")),
                       values=fields.Dict(keys=fields.String(), values=fields.String()))
    template = fields.Dict(keys=fields.String())
    claims = fields.List(fields.Dict(keys=fields.String()))
    platforms = fields.List(fields.String(validate=validate.OneOf(["web", "ios", "android"])))
    jurisdictions = fields.List(fields.String(validate=validate.Length(min=1, max=16)))


class ViolationSchema(Schema):
    rule = fields.String(metadata={"description": "The rule id of COMPLIANCE.md (DSC-04, ...)"})
    field = fields.String()
    message = fields.String()
    target = fields.String(metadata={"description": "jurisdiction/platform"})


class OfferVersionSchema(Schema):
    offer = fields.String()
    version = fields.Integer()
    status = fields.String()
    content_hash = fields.String()
    content = fields.Dict()
    violations = fields.List(fields.Nested(ViolationSchema), metadata={
        "description": "What publishing would refuse, as of now"})


class OffersQuerySchema(RequestSchema):
    class Meta:
        unknown = RAISE

    user = fields.String(validate=validate.Length(min=1, max=256))
    jurisdiction = fields.String(validate=validate.Length(max=16), metadata={
        "description": "US-CA, DE, FR, EU-FR, ...; unknown or absent: the strictest profile"})
    platform = fields.String(load_default="web",
                             validate=validate.OneOf(["web", "ios", "android"]))
    locale = fields.String(validate=validate.Length(max=16))
    app = fields.String()


class ServedOffersSchema(Schema):
    object = fields.Constant("list")
    jurisdiction = fields.String(metadata={"description": "The profile the rules applied"})
    platform = fields.String()
    data = fields.List(fields.Dict())


class RenderManifestSchema(RequestSchema):
    disclosure_in_viewport = fields.Boolean(required=True, truthy={True}, falsy={False})
    default_state = fields.String(required=True, metadata={
        "description": "How the consent control started: 'unchecked' (CNS-01)"})
    cta_label = fields.String(validate=validate.Length(max=200))
    dismiss_present = fields.Boolean(truthy={True}, falsy={False})
    template_version = fields.String(validate=validate.Length(max=64))
    app_version = fields.String(validate=validate.Length(max=64))


def _ip_address(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError as exc:
        raise ValidationError("Not an IPv4 or IPv6 address.") from exc


class ConsentRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    user = fields.String(validate=validate.Length(min=1, max=256), metadata={
        "description": "The end user (app keys; a user key consents for itself)"})
    type = fields.String(required=True, validate=validate.OneOf(
        ["auto_renewal", "tos", "eu_early_start", "eu_waiver_ack", "auto_recharge"]))
    offer = fields.String(required=True, validate=validate.Length(min=1, max=64))
    version = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    content_hash = fields.String(required=True, validate=validate.Length(equal=64))
    disclosure_sha256 = fields.String(required=True, validate=validate.Length(equal=64),
                                      metadata={"description": "SHA-256 (hex) of the "
                                                "disclosure text as shown"})
    rendered_price = fields.String(required=True, validate=validate.Length(max=64))
    jurisdiction = fields.String(validate=validate.Length(max=16))
    locale = fields.String(validate=validate.Length(max=16))
    platform = fields.String(load_default="web",
                             validate=validate.OneOf(["web", "ios", "android"]))
    render_manifest = fields.Nested(RenderManifestSchema, required=True)
    ip = fields.String(validate=_ip_address, metadata={
        "description": "The end user's address, as the app saw it (app keys)"})
    user_agent = fields.String(validate=validate.Length(max=500))


class ConsentSchema(Schema):
    consent_id = fields.String()
    type = fields.String()
    offer_id = fields.String()
    offer_version = fields.Integer()
    content_hash = fields.String()
    plan_id = fields.String(allow_none=True)
    disclosure_text = fields.String()
    disclosure_sha256 = fields.String()
    rendered_price = fields.String()
    cta_label = fields.String()
    locale = fields.String()
    platform = fields.String()
    jurisdiction = fields.String()
    render_manifest = fields.Dict()
    ip = fields.String(allow_none=True)
    user_agent = fields.String(allow_none=True)
    captured_at = Timestamp()
    retain_until = Timestamp()
    checkout_session_id = fields.String(allow_none=True)


# -- subscription lifecycle: cancel screen, withdrawal, price changes, evidence -------------------


class CancelScreenQuerySchema(RequestSchema):
    class Meta:
        unknown = RAISE

    jurisdiction = fields.String(validate=validate.Length(max=16), metadata={
        "description": "Where the user is (default: where they bought; unknown: strictest)"})
    locale = fields.String(validate=validate.Length(max=16))
    platform = fields.String(load_default="web", validate=validate.OneOf(["web", "ios",
                                                                          "android"]))
    offers = fields.String(load_default="no", validate=validate.OneOf(["yes", "no"]), metadata={
        "description": "yes: the user agreed to see an offer (where one must be asked first)"})
    app = fields.String(metadata={"description": "App name (operator-wide keys only)"})


class CancelScreenSchema(Schema):
    subscription = fields.String()
    jurisdiction = fields.String()
    save_offer_policy = fields.String(metadata={
        "description": "none | one_with_cancel | ask_first (CXL-02)"})
    cancel = fields.Dict(metadata={"description": "The cancel button: always shown"})
    ask_permission = fields.Dict(allow_none=True)
    save_offer = fields.Dict(allow_none=True, metadata={
        "description": "At most one, shown with the cancel button (cancel_button_visible)"})


class WithdrawalRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    subscription = fields.String(required=True, validate=validate.Length(min=1, max=255))


class WithdrawalSchema(Schema):
    withdrawal_id = fields.String()
    subscription = fields.String()
    requested_at = Timestamp()
    deadline = Timestamp()
    early_start = fields.Boolean()
    days_used = fields.Integer()
    term_days = fields.Integer()
    paid = fields.Integer(metadata={"description": "Minor units"})
    refund = fields.Integer(metadata={"description": "Minor units refunded"})
    currency = fields.String()
    refund_ref = fields.String(allow_none=True)
    calculation = fields.String()
    text = fields.String()
    event_id = fields.String()
    already_withdrawn = fields.Boolean()


class PriceChangeRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    plan = fields.String(required=True, validate=validate.Length(min=1, max=64))
    to_version = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    from_version = fields.Integer(strict=True, validate=validate.Range(min=1))
    effective_at = Timestamp(required=True)


class PriceChangeSchema(Schema):
    change_id = fields.String()
    plan_id = fields.String()
    from_version = fields.Integer()
    to_version = fields.Integer()
    effective_at = Timestamp()
    created_at = Timestamp()
    notice_from = Timestamp()
    old_price = fields.String()
    new_price = fields.String()


class PriceChangeQuerySchema(RequestSchema):
    class Meta:
        unknown = RAISE

    limit = limit_field()
    starting_after = starting_after_field()


class PriceChangeListSchema(Schema):
    object = fields.Constant("list")
    data = fields.List(fields.Nested(PriceChangeSchema))
    has_more = has_more_field()


class EvidenceQuerySchema(RequestSchema):
    class Meta:
        unknown = RAISE

    subscription = fields.String(required=True, validate=validate.Length(min=1, max=255))
    app = fields.String(metadata={"description": "App name (operator-wide keys only)"})


class EvidenceSchema(Schema):
    subscription = fields.Dict()
    consent = fields.Dict(allow_none=True)
    stripe_consent = fields.Dict(allow_none=True)
    other_consents = fields.List(fields.Dict())
    acknowledgment = fields.Dict(allow_none=True)
    notices = fields.List(fields.Dict())
    cancellations = fields.List(fields.Dict())
    cancel_declarations = fields.List(fields.Dict())
    withdrawal = fields.Dict(allow_none=True)
    paywall_events = fields.List(fields.Dict())
    access_activity = fields.Dict()
    deliveries = fields.List(fields.Dict())
    charged_after_end = fields.List(fields.String(), metadata={
        "description": "Invoices paid for a period after the cancellation took effect"})
    declarations_not_matched = fields.List(fields.String(), metadata={
        "description": "German cancel declarations naming this contract, not matched to it"})
    stripe_evidence = fields.Dict(metadata={"description": "Stripe's dispute evidence fields"})
