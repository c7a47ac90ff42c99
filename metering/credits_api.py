"""Credits API: an end user's grants and balance (usage accounted first), and new grants."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response

from core.auth import Role, require_role, validate_user_id
from core.openapi import documented
from core.tenancy import UNSEEN, TenancyService
from core.web import (
    app_in_scope,
    current_actor,
    current_principal,
    json_body,
    json_response,
    part,
)
from metering.accrual import AccrualService
from metering.limits_text import utc_iso
from metering.schemas import CreditsSchema, GrantRequestSchema, GrantSchema
from plans.credits import CreditsService, Summary

bp = Blueprint("credits", __name__, url_prefix="/v1")


def _end_user(user: str, *, create: bool = False) -> tuple[int, int, str]:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    user = validate_user_id(user)
    app_id = app_in_scope(principal)
    tenancy = part(TenancyService)
    found = tenancy.ensure_end_user(app_id, user) if create else tenancy.seen_end_user(app_id, user)
    return app_id, found, user


def _body(user: str, summary: Summary, now: Any) -> dict[str, Any]:
    def state(g: Any) -> str:
        if g.expires_at is not None and g.expires_at <= now:
            return "expired"
        return "spent" if g.remaining == 0 else "live"

    return {"user": user, "balance": summary.balance, "granted": summary.granted,
            "burned": summary.burned, "expired": summary.expired,
            "grants": [{"id": g.id, "source": g.source, "amount": g.amount,
                        "remaining": g.remaining, "priority": g.priority,
                        "granted_at": utc_iso(g.granted_at), "expires_at": utc_iso(g.expires_at),
                        "state": state(g)} for g in summary.grants]}


def _credits(app_id: int, end_user_id: int, user: str) -> Response:
    if end_user_id != UNSEEN:
        part(AccrualService).accrue(app_id, end_user_id)  # burns up to the last call
    summary = part(CreditsService).summary(end_user_id)
    return json_response(CreditsSchema().dump(_body(user, summary, part(CreditsService).clock())))


@bp.get("/users/<path:user>/credits")
@documented(summary="An end user's credits: balance, and each grant with what is left",
            response=CreditsSchema, tag="credits")
def user_credits(user: str) -> Response:
    return _credits(*_end_user(user))


@bp.get("/me/credits")
@documented(summary="The calling end user's own credits (user keys)", response=CreditsSchema,
            tag="credits")
def my_credits() -> Response:
    principal = current_principal()
    require_role(principal, Role.USER)
    assert principal.app_id is not None and principal.end_user_id is not None
    return _credits(principal.app_id, principal.end_user_id, principal.end_user or "")


@bp.post("/users/<path:user>/credits/grants")
@documented(summary="Grant credits (a promotion, a refund, a top-up paid elsewhere); once per "
            "external_id", body=GrantRequestSchema, response=GrantSchema, status=201,
            tag="credits")
def grant_credits(user: str) -> Response:
    app_id, end_user_id, _user = _end_user(user, create=True)
    args = GrantRequestSchema().load(json_body())
    grant, created = part(CreditsService).grant(app_id=app_id, end_user_id=end_user_id, **args,
                                                actor=current_actor())
    body = {"id": grant.id, "source": grant.source, "amount": grant.amount,
            "remaining": grant.amount, "priority": grant.priority,
            "granted_at": utc_iso(grant.granted_at), "expires_at": utc_iso(grant.expires_at),
            "state": "live"}
    return json_response(GrantSchema().dump(body), status=201 if created else 200)
