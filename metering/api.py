"""Metering API: usage totals per app or end user."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from flask import Blueprint, Response

from core.auth import Principal, Role, require_role
from core.errors import InvalidRequestError, NotFoundError, PermissionDeniedError
from core.openapi import documented
from core.tenancy import TenancyService
from core.web import current_principal, json_response, part, query_args
from metering.pricing import format_usd
from metering.schemas import (
    RoutingQuerySchema,
    RoutingReportSchema,
    UsageQuerySchema,
    UsageReportSchema,
)
from metering.service import MeteringService
from metering.store import UsageQuery, UsageTotals

bp = Blueprint("metering", __name__, url_prefix="/v1")


@bp.get("/usage")
@documented(summary="Usage totals (requests, tokens by kind, cost) for an app or end user",
            query=UsageQuerySchema, response=UsageReportSchema, tag="usage")
def usage() -> Response:
    """Usage totals (requests, tokens by kind, cost) for an app or one end user."""
    principal = _reader()
    args = UsageQuerySchema().load(query_args())
    app_name, user, query = _query(principal, args)
    totals, groups = part(MeteringService).usage_totals(query)
    report = {"app": app_name, "user": user, "from_": query.start, "to": query.end,
              "group_by": args.get("group_by"), "totals": _dump(totals),
              "groups": [_dump(g) for g in groups]}
    return json_response(UsageReportSchema().dump(report))


@bp.get("/usage/routing")
@documented(summary="What the router saved: routed calls per alias, their cost against the "
                    "most expensive allowed model", query=RoutingQuerySchema,
            response=RoutingReportSchema, tag="usage")
def routing() -> Response:
    """Routed calls per alias: what they cost, what the same tokens would have cost on the
    most expensive model each call's plan allowed, and which models served them."""
    principal = _reader()
    app_name, user, query = _query(principal, RoutingQuerySchema().load(query_args()))
    aliases = part(MeteringService).routing_savings(query)
    cost = sum(a["cost_pico"] for a in aliases)
    baseline = sum(a["baseline_pico"] for a in aliases)
    report = {"app": app_name, "user": user, "from_": query.start, "to": query.end,
              "aliases": [_savings(a) for a in aliases], "cost_usd": format_usd(cost),
              "baseline_usd": format_usd(baseline), "saved_usd": format_usd(baseline - cost)}
    return json_response(RoutingReportSchema().dump(report))


def _savings(entry: dict[str, Any]) -> dict[str, Any]:
    cost, baseline = entry["cost_pico"], entry["baseline_pico"]
    percent = None
    if baseline > 0:  # exact: integer pico-USD, one decimal place
        percent = str((Decimal(baseline - cost) * 100 / baseline).quantize(Decimal("0.1")))
    return {"alias": entry["alias"], "calls": entry["calls"], "cost_usd": format_usd(cost),
            "baseline_usd": format_usd(baseline), "saved_usd": format_usd(baseline - cost),
            "saved_percent": percent, "unpriced_calls": entry["unpriced_calls"],
            "served": [{"model": s["model"], "calls": s["calls"],
                        "cost_usd": format_usd(s["cost_pico"])} for s in entry["served"]]}


def _reader() -> Principal:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN, Role.FINANCE, Role.USER)
    return principal


def _query(principal: Principal, args: dict[str, Any]
           ) -> tuple[str | None, str | None, UsageQuery]:
    """The caller's scope (its app, or any for operator-wide keys; one user) and period."""
    now = datetime.now(UTC)
    start = args.get("from_") or now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = args.get("to") or now
    if end <= start:
        raise InvalidRequestError("'to' must be after 'from'.", param="to")
    app_id, app_name = _app_scope(principal, args.get("app"))
    user = _user_scope(principal, args.get("user"))
    end_user_id = None
    if user is not None and app_id is not None:
        end_user_id = part(TenancyService).find_end_user(app_id, user)
        if end_user_id is None:
            raise NotFoundError(f"No end user {user!r} in this app.")
    elif user is not None:
        raise InvalidRequestError("Name the app (app=) to filter by user.", param="app")
    return app_name, user, UsageQuery(app_id=app_id, end_user_id=end_user_id, start=start,
                                      end=end, group_by=args.get("group_by"))


def _app_scope(principal: Principal, app: str | None) -> tuple[int | None, str | None]:
    if principal.app_id is not None:
        if app is not None and app != principal.app_name:
            raise PermissionDeniedError("This key cannot read another app's usage.")
        return principal.app_id, principal.app_name
    if app is None:
        return None, None  # an operator-wide admin or finance key: every app
    return part(TenancyService).get_app(app), app


def _user_scope(principal: Principal, user: str | None) -> str | None:
    if principal.role != Role.USER:
        return user
    if user is not None and user != principal.end_user:
        raise PermissionDeniedError("An end-user key sees only its own usage.")
    return principal.end_user


def _dump(t: UsageTotals) -> dict[str, Any]:
    return {"key": t.key, "requests": t.requests, "input_tokens": t.input_tokens,
            "cached_input_tokens": t.cached_input_tokens, "output_tokens": t.output_tokens,
            "reasoning_tokens": t.reasoning_tokens, "total_tokens": t.total_tokens,
            "cost_usd": format_usd(t.cost_pico_usd), "unpriced_requests": t.unpriced_requests,
            "counted_requests": t.counted_requests, "failed_requests": t.failed_requests}
