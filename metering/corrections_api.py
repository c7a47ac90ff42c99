"""Corrections API: POST /v1/meter/corrections voids or amends an event the app reported
(track, or a CloudEvent), and what a correction does to the limits counters."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response

from core.db import utcnow
from core.errors import ServiceUnavailableError
from core.meters import format_units
from core.openapi import documented
from core.web import (
    config,
    current_actor,
    current_principal,
    json_body,
    json_response,
    part,
    request_id,
)
from metering.corrections import Corrected, Correction, correct
from metering.eventtime import checked_event_time
from metering.limits import LimitsService
from metering.limits_api import _model, _reporter
from metering.limits_text import utc_iso
from metering.limits_track import untrack
from metering.meter_corrections import MeterCorrected, correct_meter_event
from metering.meters import MeterService
from metering.pricing import TokenUsage, format_usd
from metering.schemas import CorrectionRequestSchema, CorrectionSchema
from metering.service import MeteringService
from metering.superseded import AMEND
from metering.telemetry import line, metered

log = logging.getLogger(__name__)
bp = Blueprint("corrections", __name__, url_prefix="/v1")


@bp.post("/meter/corrections")
@documented(summary="Void or amend an event the app reported (append-only: a new ledger row "
            "names it; once per event, idempotent per key)", body=CorrectionRequestSchema,
            response=CorrectionSchema, status=201, tag="metering")
@metered
def corrections() -> Response:
    principal = current_principal()
    _reporter(principal)  # before the body: a key that may not report learns nothing more
    args = CorrectionRequestSchema().load(json_body())
    assert principal.app_id is not None
    at = checked_event_time(args.get("timestamp"), utcnow(), config().max_event_age_seconds)
    c = Correction(principal.app_id, args["idempotency_key"], args["corrects"], args["action"],
                   request_id(), model=_model(args["model"]) if args.get("model") else None,
                   usage=_usage(args.get("usage")), at=at, user=args.get("user"),
                   actor=current_actor())
    if "meter" in args:
        found = correct_meter_event(part(MeterService), c, args["meter"], args.get("value"),
                                    args.get("data"))
        line().event("duplicate" if found.duplicate else "corrected", cost=found.cost_pico_usd)
        return json_response(CorrectionSchema().dump(shown_meter(found, c.corrects)),
                             status=200 if found.duplicate else 201)
    done = apply_correction(c)
    line().event("duplicate" if done.duplicate else "corrected", done.original.end_user_id,
                 done.model, done.cost_pico)
    return json_response(CorrectionSchema().dump(shown(done, c.corrects)),
                         status=200 if done.duplicate else 201)


def _usage(given: dict[str, Any] | None) -> TokenUsage | None:
    return TokenUsage(**given) if given is not None else None


def shown(done: Corrected, corrects: str) -> dict[str, Any]:
    return {"idempotency_key": done.key, "corrects": corrects, "action": done.action,
            "outcome": "duplicate" if done.duplicate else "corrected",
            "user": done.original.user,
            "timestamp": utc_iso(done.at), "cost_usd": format_usd(done.cost_pico),
            "corrected_cost_usd": format_usd(done.original.cost_pico)}


def shown_meter(done: MeterCorrected, corrects: str) -> dict[str, Any]:
    return {"idempotency_key": done.key, "corrects": corrects, "action": done.action,
            "outcome": "duplicate" if done.duplicate else "corrected", "user": done.user,
            "timestamp": utc_iso(done.occurred_at), "cost_usd": format_usd(done.cost_pico_usd),
            "corrected_cost_usd": format_usd(done.corrected_cost_pico_usd),
            "meter": done.meter, "value": format_units(done.value_micro)}


def apply_correction(c: Correction) -> Corrected:
    """Record the correction, then give back in the limits what the original counted (in
    the windows still open) and count the amendment: each once, on the first answer only."""
    metering = part(MeteringService)
    done = correct(metering.usage_store.engine, metering, c)
    if done.duplicate:
        return done
    limits = part(LimitsService)
    orig = done.original
    try:
        if not orig.limits_pending:  # (a pending original is skipped by the catch-up)
            untrack(limits, (c.app_id, orig.end_user_id, _model(orig.model), orig.usage,
                             orig.cost_pico, c.key), orig.at)
        if done.action == AMEND:
            limits.track(app_id=c.app_id, end_user_id=orig.end_user_id,
                         model=_model(done.model), usage=done.usage, cost_pico=done.cost_pico,
                         event_id=c.key, at=done.at)
    except ServiceUnavailableError:
        # recorded: the amendment is counted by the catch-up; the give-back is not (the
        # counters keep the original until its window ends: never in the user's favour)
        log.error("limit store unavailable while correcting %s with %s: the correction is "
                  "recorded; its limits are counted when the store is back", orig.key, c.key)
        if done.action == AMEND:
            metering.mark_limits_pending(c.app_id, c.key)
            limits.needs_catch_up()
    return done
