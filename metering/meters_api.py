"""Meter events API: events of the [[meters]] meters, one at a time or in batches, and each
end user's totals."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from flask import Blueprint, Response, request
from marshmallow import ValidationError

from core.auth import Role, require_role, validate_user_id
from core.errors import DomainError, PermissionDeniedError, problem
from core.meters import format_units
from core.openapi import documented
from core.tenancy import TenancyService
from core.web import app_in_scope, current_principal, json_body, json_response, part, request_id
from metering.limits import LimitsService
from metering.meter_schemas import (
    MeterEventBatchRequestSchema,
    MeterEventBatchResultSchema,
    MeterEventRequestSchema,
    MeterEventSchema,
    MeterUsageQuerySchema,
    MeterUsageSchema,
)
from metering.meters import MeterOutcome, MeterService
from metering.pricing import format_usd
from metering.telemetry import line, metered
from plans.meter_overage import MeterCycle

bp = Blueprint("meters", __name__, url_prefix="/v1")


def _app_id() -> int:
    """Meter events are the app's backend's to report (as tracked usage is)."""
    principal = current_principal()
    if principal.role == Role.USER:
        raise PermissionDeniedError("An end-user key cannot report meter events; the app's "
                                    "backend does, with its app key.")
    require_role(principal, Role.APP)
    assert principal.app_id is not None
    return principal.app_id


def _record(app_id: int, args: dict[str, Any]) -> MeterOutcome:
    user = validate_user_id(args["user"])
    found = part(MeterService).record_meter_event(
        app_id, user, args["meter"], args["value"], args["data"], args["idempotency_key"],
        args["timestamp"], request_id())
    meters = line()  # the line: the end user (known by now: cached; never a read), its cost
    meters.event("duplicate" if found.duplicate else "recorded",
                 part(TenancyService).known_end_user(app_id, user), cost=found.cost_pico_usd)
    if not found.duplicate:
        meters.checked(part(LimitsService).enabled)
    return found


def _shown(found: MeterOutcome) -> dict[str, Any]:
    shown: dict[str, Any] = MeterEventSchema().dump({
        "id": found.id, "meter": found.meter, "idempotency_key": found.idempotency_key,
        "value": format_units(found.value_micro), "cost_usd": format_usd(found.cost_pico_usd),
        "occurred_at": found.occurred_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "outcome": "duplicate" if found.duplicate else "recorded"})
    return shown


@bp.post("/meter/events")
@documented(summary="Record an event of a custom meter (idempotent per key); 402 when a "
            "limit of the user's plan on the meter would be passed",
            body=MeterEventRequestSchema, response=MeterEventSchema, status=201, tag="metering")
@metered
def record_event() -> Response:
    app_id = _app_id()
    found = _record(app_id, MeterEventRequestSchema().load(json_body()))
    return json_response(_shown(found), status=200 if found.duplicate else 201)


@bp.post("/meter/events/batch")
@documented(summary="Record up to 100 meter events; each is recorded, a duplicate, or "
            "refused on its own (its problem details in its place)",
            body=MeterEventBatchRequestSchema, response=MeterEventBatchResultSchema,
            tag="metering")
@metered
def record_batch() -> Response:
    app_id = _app_id()
    events = MeterEventBatchRequestSchema().load(json_body())["events"]
    data: list[dict[str, Any]] = []
    for n, event in enumerate(events):
        try:
            data.append(_shown(_record(app_id, MeterEventRequestSchema().load(event))))
        except ValidationError as exc:
            line().event("rejected")
            data.append(problem(422, "Validation failed", f"events[{n}] is not a meter event",
                                slug="validation", instance=f"events/{n}",
                                extra={"errors": exc.messages}))
        except DomainError as exc:
            line().event("refused" if line().refused(exc) else "rejected")
            data.append(problem(exc.status, exc.title, exc.detail, slug=exc.slug,
                                instance=f"events/{n}", extra=dict(exc.extra)))
    recorded = sum(1 for d in data if d.get("outcome") == "recorded")
    return json_response(MeterEventBatchResultSchema().dump({
        "recorded": recorded, "duplicates": sum(1 for d in data if d.get("outcome")
                                                == "duplicate"), "data": data}))


@bp.get("/users/<path:user>/meters")
@documented(summary="An end user's total of each meter over a period (default: this month, "
            "UTC), aggregated as each meter says; and the plan's allowance of it in the open "
            "billing cycle: included, used, overage", query=MeterUsageQuerySchema,
            response=MeterUsageSchema, tag="quota")
def user_meters(user: str) -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    app_id = app_in_scope(principal)
    user = validate_user_id(user)
    args = MeterUsageQuerySchema().load(request.args.to_dict())
    meters = part(MeterService)
    start, end = meters.period(args["start"], args["end"])
    end_user_id = part(TenancyService).seen_end_user(app_id, user)
    totals = meters.totals(app_id, end_user_id, start, end)
    cycles = {c.meter: _allowance(c) for c in meters.cycles(end_user_id)}
    return json_response(MeterUsageSchema().dump({
        "user": user, "start": start.isoformat(), "end": end.isoformat(),
        "meters": [{"meter": t.meter.id, "unit": t.meter.unit,
                    "aggregation": t.meter.aggregation, "value": format_units(t.value_micro),
                    "events": t.events, "cost_usd": format_usd(t.cost_pico_usd),
                    "allowance": cycles.get(t.meter.id)} for t in totals]}))


def _allowance(c: MeterCycle) -> dict[str, Any]:
    return {"included": format_units(c.included), "used": format_units(c.used),
            "remaining": format_units(max(0, c.included - c.used)),
            "overage": format_units(c.overage),
            "overage_price": None if c.overage_price is None else str(c.overage_price),
            "overage_amount": f"{c.overage_minor.normalize():f}", "currency": c.currency,
            "cycle_start": c.cycle_start.isoformat(), "cycle_end": c.cycle_end.isoformat()}
