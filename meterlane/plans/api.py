"""Plans API: put an end user on a plan."""

from __future__ import annotations

from flask import Blueprint, Response, request

from meterlane.core.auth import Role, require_role, validate_user_id
from meterlane.core.openapi import documented
from meterlane.core.web import app_in_scope, current_principal, json_body, wiring
from meterlane.plans.schemas import (
    CancelRequestSchema,
    CheckoutRequestSchema,
    CheckoutSessionSchema,
    PlanAssignmentRequestSchema,
    PlanAssignmentSchema,
    SubscriptionChangeRequestSchema,
    SubscriptionChangeSchema,
)

bp = Blueprint("plans", __name__, url_prefix="/v1")


@bp.put("/users/<path:user>/plan")
@documented(summary="Put an end user on a plan (its billing cycle starts at anchored_at)",
            body=PlanAssignmentRequestSchema, response=PlanAssignmentSchema, tag="plans")
def assign_plan(user: str) -> Response:
    """Put an end user on a plan; with no assignment a user is on the default plan."""
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    user = validate_user_id(user)
    args = PlanAssignmentRequestSchema().load(json_body())
    app_id = app_in_scope(principal)
    end_user_id = wiring().tenancy.ensure_end_user(app_id, user)
    assignment = wiring().plans.assign(app_id, end_user_id, args["plan"], args.get("anchored_at"))
    return wiring().json(PlanAssignmentSchema().dump(
        {"user": user, "plan": assignment.plan.id, "anchored_at": assignment.anchored_at}))


@bp.post("/stripe/webhook")
@documented(summary="Stripe webhook endpoint (signed by Stripe; each event handled once)",
            tag="billing")
def stripe_webhook() -> Response:
    """Verify the signature on the raw body, store the event by id, handle it once."""
    outcome = wiring().billing.receive(request.get_data(),
                                       request.headers.get("Stripe-Signature"))
    return wiring().json({"received": True, "outcome": outcome})


@bp.post("/checkout/sessions")
@documented(summary="Start a Stripe Checkout for an end user: a plan or a credit pack",
            body=CheckoutRequestSchema, response=CheckoutSessionSchema, status=201,
            tag="billing")
def create_checkout() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP)
    args = CheckoutRequestSchema().load(json_body())
    app_id = app_in_scope(principal)
    user = validate_user_id(args["user"])
    end_user_id = wiring().tenancy.ensure_end_user(app_id, user)
    consent = None
    plan = wiring().plans.catalog.get(args["plan"]) if args.get("plan") else None
    if plan is not None and plan.terms.price is not None and not plan.terms.retired \
            and args.get("credit_pack") is None:
        wiring().checkout.ensure_not_subscribed(end_user_id)  # before asking for consent
        # CNS-01: no subscription checkout without the user's recorded consent to its terms
        consent = wiring().paywall.claim_consent(app_id, end_user_id, args.get("consent_id"),
                                                 args["plan"])
    try:
        session = wiring().checkout.create(
            app_id=app_id, end_user_id=end_user_id, user=user, plan_id=args.get("plan"),
            pack_id=args.get("credit_pack"), success_url=args["success_url"],
            cancel_url=args["cancel_url"], consent=consent)
    except BaseException:
        if consent is not None:  # the checkout did not start: the consent may be used again
            wiring().paywall.link_consent(consent["consent_id"], None)
        raise
    if consent is not None:
        wiring().paywall.link_consent(consent["consent_id"], session.id)
    return wiring().json(CheckoutSessionSchema().dump(session.__dict__), status=201)


@bp.post("/subscriptions/<sub_id>/change")
@documented(summary="Change a subscription's plan: an upgrade at once (prorated), a "
            "downgrade at the end of the period", body=SubscriptionChangeRequestSchema,
            response=SubscriptionChangeSchema, tag="billing")
def change_subscription(sub_id: str) -> Response:
    principal = current_principal()
    require_role(principal, Role.APP)
    args = SubscriptionChangeRequestSchema().load(json_body())
    change = wiring().subscriptions.change(app_id=app_in_scope(principal),
                                           subscription_id=sub_id, plan_id=args["plan"])
    return wiring().json(SubscriptionChangeSchema().dump(change.__dict__))


@bp.post("/subscriptions/<sub_id>/cancel")
@documented(summary="Cancel a subscription at the end of its paid period",
            response=SubscriptionChangeSchema, tag="billing")
def cancel_subscription(sub_id: str) -> Response:
    """One step (CXL-01): cancel at the end of the paid period, with a confirmation record
    and its event at once (CXL-05). Idempotent: a second cancel changes nothing and returns
    the first confirmation."""
    principal = current_principal()
    require_role(principal, Role.APP)
    args = CancelRequestSchema().load(json_body(allow_empty=True))
    confirmation, before = wiring().cancel_flow.cancel(app_in_scope(principal), sub_id,
                                                       args["channel"], args["steps"])
    return wiring().json(SubscriptionChangeSchema().dump({
        "subscription": sub_id, "action": "cancel_scheduled", "plan": confirmation["plan"],
        "effective_at": confirmation["effective_at"], "already_cancelled": before,
        "confirmation": confirmation}))
