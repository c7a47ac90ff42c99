"""Plans API: put an end user on a plan, change a subscription, receive Stripe's webhooks."""

from __future__ import annotations

from flask import Blueprint, Response, request

from core.auth import Role, require_role, validate_user_id
from core.openapi import documented
from core.tenancy import TenancyService
from core.web import (
    app_in_scope,
    current_actor,
    current_principal,
    json_body,
    json_response,
    part,
    request_bytes,
)
from plans.billing import BillingService
from plans.schemas import (
    PlanAssignmentRequestSchema,
    PlanAssignmentSchema,
    SubscriptionChangeRequestSchema,
    SubscriptionChangeSchema,
)
from plans.service import PlanService
from plans.subscriptions import SubscriptionService

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
    end_user_id = part(TenancyService).ensure_end_user(app_id, user)
    assignment = part(PlanService).assign(app_id, end_user_id, args["plan"],
                                          args.get("anchored_at"), actor=current_actor())
    return json_response(PlanAssignmentSchema().dump(
        {"user": user, "plan": assignment.plan.id, "anchored_at": assignment.anchored_at}))


@bp.post("/stripe/webhook")
@documented(summary="Stripe webhook endpoint (signed by Stripe; each event handled once)",
            tag="billing")
def stripe_webhook() -> Response:
    """Verify the signature on the raw body, store the event by id, handle it once."""
    outcome = part(BillingService).receive(request_bytes(),
                                       request.headers.get("Stripe-Signature"))
    return json_response({"received": True, "outcome": outcome})


@bp.post("/subscriptions/<sub_id>/change")
@documented(summary="Change a subscription's plan: an upgrade at once (prorated), a "
            "downgrade at the end of the period", body=SubscriptionChangeRequestSchema,
            response=SubscriptionChangeSchema, tag="billing")
def change_subscription(sub_id: str) -> Response:
    principal = current_principal()
    require_role(principal, Role.APP)
    args = SubscriptionChangeRequestSchema().load(json_body())
    change = part(SubscriptionService).change(app_id=app_in_scope(principal),
                                              subscription_id=sub_id, plan_id=args["plan"],
                                              actor=current_actor())
    return json_response(SubscriptionChangeSchema().dump(change.__dict__))
