"""CloudEvents ingestion: POST /v1/events takes CloudEvents 1.0 in structured JSON mode, one
event or a batch (as OpenMeter does), onto the same engine and ledger as /v1/meter/track.

`id` and `source` together are the event's idempotency key, `subject` the end user, `time`
the event time, `type` the meter (`meterlane.tokens`, or the id of a [[meters]] entry), `data`
its values."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, request
from marshmallow import ValidationError

from core.auth import Principal, Role, require_role, validate_user_id
from core.config import ModelConfig
from core.db import utcnow
from core.errors import DomainError, InvalidRequestError, PermissionDeniedError
from core.openapi import documented
from core.tenancy import TenancyService
from core.web import (
    app_in_scope,
    config,
    current_actor,
    current_principal,
    json_body,
    json_response,
    part,
)
from core.web import request_id as current_request_id
from metering.cloudevents_schemas import (
    KNOWN_TYPES,
    TOKENS_TYPE,
    CloudEventSchema,
    EventsResultSchema,
    TokensDataSchema,
)
from metering.corrections import Correction
from metering.corrections_api import apply_correction
from metering.eventtime import checked_event_time
from metering.limits_api import _cost, _model, record_calls
from metering.meter_corrections import correct_meter_event
from metering.meters import MeterService
from metering.pricing import TokenUsage, format_usd
from metering.service import DirectCall
from metering.telemetry import line, metered

ONE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
MAX_BATCH = 1000

bp = Blueprint("cloudevents", __name__, url_prefix="/v1")


class UnsupportedMediaTypeError(DomainError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


@dataclass(frozen=True)
class Parsed:
    """One event, checked: what the ledger records of it."""

    id: str
    source: str
    user: str
    model: ModelConfig
    usage: TokenUsage
    at: datetime | None  # None: now

    @property
    def key(self) -> str:  # OpenMeter deduplicates by id and source: so does the ledger
        return f"ce:{self.source}:{self.id}"


@dataclass(frozen=True)
class MeterParsed:
    """One event of a custom meter: its values are read by the meter ([[meters]] field)."""

    id: str
    source: str
    user: str
    meter: str
    data: dict[str, Any]
    at: datetime | None

    @property
    def key(self) -> str:
        return f"ce:{self.source}:{self.id}"


@dataclass(frozen=True)
class CorrectionParsed:
    """An event naming another of its source (extension attributes corrects, correction)."""

    id: str
    source: str
    user: str
    corrects: str
    action: str
    model: ModelConfig | None
    usage: TokenUsage | None
    at: datetime | None
    meter: str | None = None  # an event of a custom meter: its id, and its data
    data: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"ce:{self.source}:{self.id}"

    def correction(self, app_id: int) -> Correction:
        return Correction(app_id, self.key, f"ce:{self.source}:{self.corrects}", self.action,
                          current_request_id(), model=self.model, usage=self.usage,
                          at=self.at, endpoint="events", user=self.user,
                          actor=current_actor())


Parsed_ = Parsed | MeterParsed | CorrectionParsed


@bp.post("/events")
@documented(summary="Ingest CloudEvents 1.0 (application/cloudevents+json, or a JSON array "
            "as application/cloudevents-batch+json): usage onto the same ledger as "
            "/v1/meter/track, each id and source counted once",
            bodies={ONE: CloudEventSchema, BATCH: {
                "type": "array", "items": CloudEventSchema, "minItems": 1,
                "maxItems": MAX_BATCH, "description": "A batch: each event is answered on "
                "its own (one rejected does not refuse the others)"}},
            response=EventsResultSchema, status=201, tag="metering",
            statuses={201: "At least one event was tracked (each event's outcome in data)",
                      200: "None was tracked: each was a duplicate or rejected (see data)"},
            errors={400: "Not one event object (cloudevents+json), or not an array of 1 to "
                         f"{MAX_BATCH} (cloudevents-batch+json)",
                    403: "The key may not report usage for this app",
                    415: "Not application/cloudevents+json nor "
                         "application/cloudevents-batch+json",
                    422: "The one event of a cloudevents+json body is invalid"})
@metered
def events() -> Response:
    principal = current_principal()
    _ingester(principal)
    app_id = app_in_scope(principal)
    if request.mimetype not in (ONE, BATCH):
        raise UnsupportedMediaTypeError(
            f"Send CloudEvents in structured mode: Content-Type {ONE} (one event) or {BATCH} "
            f"(a JSON array), not {request.mimetype or 'none'!r}.")
    body = json_body()
    now, max_age = utcnow(), config().max_event_age_seconds
    if request.mimetype == ONE:
        if not isinstance(body, dict):
            raise InvalidRequestError(f"A {ONE} body is one JSON object; send arrays as "
                                      f"{BATCH}.")
        results: list[Parsed_ | str] = [_parse(body, now, max_age)]  # a 4xx
    else:
        if not isinstance(body, list) or not 1 <= len(body) <= MAX_BATCH:
            raise InvalidRequestError(f"A {BATCH} body is a JSON array of 1 to {MAX_BATCH} "
                                      "events.")
        results = [_checked(event, now, max_age) for event in body]
    return _ingest(app_id, body if isinstance(body, list) else [body], results)


def _ingester(principal: Principal) -> None:
    if principal.role == Role.USER:
        raise PermissionDeniedError("An end-user key cannot report usage; the app's backend "
                                    "does, with its app key.")
    require_role(principal, Role.APP, Role.ADMIN)  # an admin key names the app: ?app=


def _checked(event: Any, now: datetime, max_age: int) -> Parsed_ | str:
    """The event, or why it is rejected (a batch answers each event on its own)."""
    try:
        return _parse(event, now, max_age)
    except ValidationError as exc:
        found = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        return f"invalid: {json.dumps(found, sort_keys=True)}"
    except DomainError as exc:
        return exc.detail


def _parse(event: Any, now: datetime, max_age: int) -> Parsed_:
    if not isinstance(event, dict):
        raise ValidationError("An event is a JSON object.")
    args = CloudEventSchema().load(event)
    meters = [m.id for m in config().meters]
    if args["type"] not in (*KNOWN_TYPES, *meters):
        raise ValidationError({"type": [f"Unknown type {args['type']!r}; known types: "
                                        f"{', '.join((*KNOWN_TYPES, *meters))}."]})
    if not args.get("subject"):
        raise ValidationError({"subject": ["subject names the end user the usage is for."]})
    at = checked_event_time(args.get("time"), now, max_age, "time")
    if "corrects" in args or "correction" in args:
        return _correction(args, at)
    if args.get("data") is None:
        raise ValidationError({"data": ["Missing data for required field."]})
    if args["type"] != TOKENS_TYPE:
        data = args.get("data")
        if data is not None and not isinstance(data, dict):
            raise ValidationError({"data": ["A meter's event data is a JSON object."]})
        return MeterParsed(id=args["id"], source=args["source"],
                           user=validate_user_id(args["subject"]), meter=args["type"],
                           data=data or {}, at=at)
    try:
        data = TokensDataSchema().load(args["data"])
    except ValidationError as exc:
        raise ValidationError({"data": exc.messages}) from exc
    model = data.pop("model")
    return Parsed(id=args["id"], source=args["source"], user=validate_user_id(args["subject"]),
                  model=_model(model), usage=TokenUsage(**data), at=at)


def _correction(args: dict[str, Any], at: datetime | None) -> CorrectionParsed:
    if "corrects" not in args or "correction" not in args:
        raise ValidationError({"corrects": ["A correction names the event (corrects) and what "
                                            "to do (correction: void or amend)."]})
    model, usage = None, None
    if args["correction"] == "void" and args.get("data"):
        raise ValidationError({"data": ["A void takes no data."]})
    if args["type"] != TOKENS_TYPE:  # a custom meter's event: the meter reads the data
        data = args.get("data")
        if data is not None and not isinstance(data, dict):
            raise ValidationError({"data": ["A meter's event data is a JSON object."]})
        return CorrectionParsed(args["id"], args["source"], validate_user_id(args["subject"]),
                                args["corrects"], args["correction"], None, None, at,
                                meter=args["type"], data=data or {})
    if args["correction"] == "amend":
        try:
            data = TokensDataSchema().load(args.get("data") or {})
        except ValidationError as exc:
            raise ValidationError({"data": exc.messages}) from exc
        model, usage = _model(data.pop("model")), TokenUsage(**data)
    return CorrectionParsed(args["id"], args["source"], validate_user_id(args["subject"]),
                            args["corrects"], args["correction"], model, usage, at)


def _correction_row(app_id: int, event: Any, result: CorrectionParsed, *,
                    alone: bool) -> dict[str, Any]:
    """A correction; alone (one event, not a batch), its refusal is the answer (404, 409)."""
    try:
        if result.meter is not None:
            found = correct_meter_event(part(MeterService), result.correction(app_id),
                                        result.meter, None, result.data)
            duplicate, cost = found.duplicate, found.cost_pico_usd
        else:
            done = apply_correction(result.correction(app_id))
            duplicate, cost = done.duplicate, done.cost_pico
    except DomainError as exc:
        if alone:
            raise
        return {**_row(event, "rejected", reason=exc.detail), "recorded": True}
    row = _row(event, "duplicate" if duplicate else "corrected")
    row["cost_usd"] = format_usd(cost)
    row["recorded"] = True
    return row


def _meter_row(app_id: int, event: Any, result: MeterParsed) -> dict[str, Any]:
    """A custom meter's event, through the meter's own engine (its limits, its price)."""
    try:
        done = part(MeterService).record_meter_event(
            app_id, result.user, result.meter, None, result.data, result.key, result.at,
            current_request_id())
    except DomainError as exc:  # a value the meter cannot read, a limit it would pass
        line().event("refused" if line().refused(exc) else "rejected")
        return _row(event, "rejected", reason=exc.detail)
    line().event("duplicate" if done.duplicate else "tracked",
                 part(TenancyService).known_end_user(app_id, result.user),
                 cost=done.cost_pico_usd)
    row = _row(event, "duplicate" if done.duplicate else "tracked", cost=done.cost_pico_usd)
    row["recorded"] = True  # (not one of the token calls the ledger answers below)
    return row


def _ingest(app_id: int, body: list[Any], results: list[Parsed_ | str]) -> Response:
    parsed = [p for p in results if isinstance(p, Parsed)]
    users = part(TenancyService).ensure_end_users(app_id, [p.user for p in parsed])
    seen: set[str] = set()
    later: list[tuple[int, Any, CorrectionParsed]] = []
    calls: list[DirectCall] = []
    rows: list[dict[str, Any]] = []
    for event, result in zip(body, results, strict=True):
        if isinstance(result, str):
            line().event("rejected")
            rows.append(_row(event, "rejected", reason=result))
            continue
        if result.key in seen:  # earlier in this batch: counted once
            line().event("duplicate")
            rows.append(_row(event, "duplicate"))
            continue
        seen.add(result.key)
        if isinstance(result, MeterParsed):
            rows.append(_meter_row(app_id, event, result))
            continue
        if isinstance(result, CorrectionParsed):  # after the batch's events are in
            later.append((len(rows), event, result))
            rows.append({"outcome": "deferred", "recorded": True})
            continue
        try:
            cost = _cost(result.usage, result.model, result.at or utcnow())
        except DomainError as exc:
            line().event("rejected")
            rows.append(_row(event, "rejected", reason=exc.detail))
            continue
        calls.append(DirectCall(app_id, users[result.user], result.model, result.usage, cost,
                                current_request_id(), result.key, result.at, "events"))
        rows.append(_row(event, "tracked", cost=cost))
    written, pending = record_calls(calls, app_id) if calls else ([], 0)
    found = line()
    for call, outcome in zip(calls, written, strict=True):
        found.call(call.end_user_id, call.model.name, call.usage, call.cost_pico, outcome,
                   priced=call.cost_pico is not None)
    for n, event, correction in later:
        rows[n] = _correction_row(app_id, event, correction,
                                  alone=request.mimetype == ONE)
        found.event(rows[n]["outcome"])
    answers = iter(written)
    for row in rows:
        if row.pop("recorded", False):
            continue
        if row["outcome"] == "tracked":
            outcome = next(answers)
            row["outcome"] = "tracked" if outcome in ("written", "spooled") else outcome
    counts = {o: sum(1 for r in rows if r["outcome"] == o)
              for o in ("tracked", "corrected", "duplicate", "rejected")}
    body_out = EventsResultSchema().dump({
        "tracked": counts["tracked"], "corrected": counts["corrected"],
        "duplicates": counts["duplicate"],
        "rejected": counts["rejected"], "limits_pending": pending, "data": rows})
    return json_response(body_out, status=201 if counts["tracked"] or counts["corrected"]
                         else 200)


def _row(event: Any, outcome: str, *, reason: str | None = None,
         cost: int | None = None) -> dict[str, Any]:
    named = event if isinstance(event, dict) else {}
    ident, source = named.get("id"), named.get("source")
    return {"id": ident if isinstance(ident, str) else None,
            "source": source if isinstance(source, str) else None, "outcome": outcome,
            "reason": reason, "cost_usd": format_usd(cost) if outcome == "tracked" else None}
