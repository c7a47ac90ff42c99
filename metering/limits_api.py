"""Limits API: metering without the proxy (reserve, settle, release, track), and quotas."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, request

from core import i18n
from core.auth import Principal, Role, require_role, validate_user_id
from core.config import ModelConfig
from core.db import utcnow
from core.errors import (
    ConflictError,
    DomainError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from core.openapi import documented
from core.tenancy import TenancyService
from core.web import (
    app_in_scope,
    config,
    current_principal,
    json_body,
    json_response,
    part,
    request_id,
)
from metering.eventtime import checked_event_time
from metering.leases import Applied, QuotaLine
from metering.limits import LimitsService
from metering.limits_text import utc_iso, value_of
from metering.pricing import MAX_PICO, TokenUsage, cost_or_none, format_usd
from metering.schemas import (
    LeaseSchema,
    MeterResultSchema,
    QuotaSchema,
    ReleaseRequestSchema,
    ReserveRequestSchema,
    SettleRequestSchema,
    TrackBatchRequestSchema,
    TrackBatchResultSchema,
    TrackRequestSchema,
)
from metering.service import (
    ENDPOINT_CHAT,
    ENDPOINT_COMPLETIONS,
    ENDPOINT_EMBEDDINGS,
    DirectCall,
    MeteringService,
)
from metering.telemetry import line, metered
from plans.catalog import ALLOWANCE_ID, LimitSpec
from plans.service import PlanService

log = logging.getLogger(__name__)
bp = Blueprint("limits", __name__, url_prefix="/v1")


def _reporter(principal: Principal) -> None:
    """Reporting usage is the app's backend's: an end-user key (the kind handed to a browser)
    could report any amount, or none, and spend or spare the limits of everyone on its app."""
    if principal.role == Role.USER:
        raise PermissionDeniedError(
            "An end-user key cannot report usage or hold leases; the app's backend does, with "
            "its app key (end-user keys read their quota and call models).")
    require_role(principal, Role.APP)


def _caller(principal: Principal, user: str | None) -> tuple[int, int, str]:
    """(app id, end user id, user) that a metering call acts for (app keys only)."""
    _reporter(principal)
    if user is None:
        raise InvalidRequestError("Name the end user: set 'user'.", param="user")
    assert principal.app_id is not None
    user = validate_user_id(user)
    return principal.app_id, part(TenancyService).ensure_end_user(principal.app_id, user), user


def _model(name: str) -> ModelConfig:
    """The configured model, or an unpriced stand-in for a model the app calls itself."""
    return config().model(name) or ModelConfig(name=name, upstream="", upstream_model=name)


def _limit_state(limit: LimitSpec, used: int, remaining: int,
                 resets_at: datetime | None, locale: str | None = None) -> dict[str, Any]:
    name = i18n.gettext(locale, "Included credits") if limit.id == ALLOWANCE_ID else \
        i18n.limit_name(limit.metric if limit.meter is None else (
            limit.unit or limit.meter).capitalize(), limit.window.spec, limit.model, locale,
                        limit.name_in(i18n.pick(locale)))
    state = {"id": limit.id, "name": name, "metric": limit.metric, "window": limit.window.spec,
             "scope": limit.scope, "model": limit.model,
             "kind": "rate" if limit.is_rate else "quota", "used": value_of(limit, used),
             "remaining": value_of(limit, max(0, remaining)),
             # what the engine enforces: the allowance grows by credits and overage
             "limit": value_of(limit, used + remaining), "resets_at": utc_iso(resets_at)}
    if limit.id == ALLOWANCE_ID:
        state["included"] = limit.amount
    if limit.meter is not None:
        state["unit"] = limit.unit
    return state


def _applied_states(applied: list[Applied], now: datetime) -> list[dict[str, Any]]:
    return [_limit_state(a.limit, a.state.used, a.state.remaining, a.resets_at(now))
            for a in applied if a.state is not None]


@bp.post("/meter/reserve")
@documented(summary="Reserve a call's tokens before the app makes it itself",
            body=ReserveRequestSchema, response=LeaseSchema, status=201, tag="metering")
@metered
def reserve() -> Response:
    """Reserve against every limit of the user's plan; settle or release the lease after."""
    principal = current_principal()
    _reporter(principal)  # before the body: a key that may not report learns nothing more
    args = ReserveRequestSchema().load(json_body())
    app_id, end_user_id, user = _caller(principal, args.get("user"))
    model = _model(args["model"])
    line().user(end_user_id)
    line().model(model.name)
    prompt = args.get("input_tokens")
    if prompt is None:
        given = [k for k in ("messages", "prompt", "input") if k in args]
        if len(given) != 1:
            raise InvalidRequestError("Give input_tokens, or exactly one of messages, prompt "
                                      "or input to count.", param="input_tokens")
        endpoint = {"messages": ENDPOINT_CHAT, "prompt": ENDPOINT_COMPLETIONS,
                    "input": ENDPOINT_EMBEDDINGS}[given[0]]
        prompt = part(MeteringService).prompt_tokens(model, endpoint, args, app_id)
    want = args.get("max_output_tokens")  # None: the plan's default
    lease = part(LimitsService).reserve(app_id=app_id, end_user_id=end_user_id, model=model,
                                    prompt_tokens=prompt, want_out=want,
                                    min_out=0 if want == 0 else 1, request_id=request_id(),
                                    keep=True)
    line().checked(part(LimitsService).enabled)
    body = {"lease_id": lease.id, "user": user, "model": model.name, "plan": lease.plan.id,
            "input_tokens": prompt, "granted_output_tokens": lease.out,
            "expires_at": utc_iso(lease.expires or lease.created),
            "limits": _applied_states(lease.applied, lease.created)}
    return json_response(LeaseSchema().dump(body), status=201)


def _own_lease(principal: Principal, lease_id: str) -> dict[str, Any]:
    _reporter(principal)
    meta = part(LimitsService).lease_info(lease_id)
    # Someone else's lease is reported exactly like one that does not exist.
    if meta is None or meta.get("app_id") != principal.app_id:
        raise NotFoundError(f"No lease {lease_id!r} for this key (or it ended over an hour "
                            "ago).", param="lease_id")
    return meta


@bp.post("/meter/settle")
@documented(summary="Settle a lease with the call's real usage (records it in the ledger)",
            body=SettleRequestSchema, response=MeterResultSchema, tag="metering")
@metered
def settle() -> Response:
    principal = current_principal()
    _reporter(principal)  # before the body: a key that may not report learns nothing more
    args = SettleRequestSchema().load(json_body())
    lease_id = args["lease_id"]
    meta = _own_lease(principal, lease_id)
    usage = TokenUsage(**args["usage"])
    model = _model(meta["model"])
    cost = _cost(usage, model, utcnow())
    result = part(LimitsService).settle_by_id(lease_id, meta.get("tags", []), usage, cost,
                                          credits_per_token=int(meta.get("w", 1)))
    if result.outcome == "expired":
        raise ConflictError(f"Lease {lease_id} expired before it was settled, and its "
                            "reservation was returned. Record the call with POST "
                            "/v1/meter/track instead.", code="lease_expired")
    if result.outcome == "already_released":
        raise ConflictError(f"Lease {lease_id} was released; it cannot be settled.",
                            code="lease_released")
    recorded = result.actual or {}
    if result.outcome == "already_settled" and (recorded.get("tokens"), recorded.get("cost")) != (
            usage.total_tokens, cost or 0):
        raise ConflictError(f"Lease {lease_id} was already settled with other usage.",
                            code="lease_settled")
    written = part(MeteringService).record_direct(
        app_id=meta["app_id"], end_user_id=meta["end_user_id"], model=model, usage=usage,
        cost_pico=cost, request_id=request_id(), idempotency_key=lease_id,
        endpoint="meter.settle")
    line().call(meta["end_user_id"], model.name, usage, cost, written, priced=cost is not None)
    return json_response(MeterResultSchema().dump({
        "lease_id": lease_id, "idempotency_key": None, "outcome": "settled",
        "cost_usd": format_usd(cost)}))


@bp.post("/meter/release")
@documented(summary="Release a lease: the call did not happen", body=ReleaseRequestSchema,
            response=MeterResultSchema, tag="metering")
@metered
def release() -> Response:
    principal = current_principal()
    _reporter(principal)  # before the body: a key that may not report learns nothing more
    args = ReleaseRequestSchema().load(json_body())
    lease_id = args["lease_id"]
    meta = _own_lease(principal, lease_id)
    line().user(meta["end_user_id"])
    line().model(meta["model"])
    result = part(LimitsService).settle_by_id(lease_id, meta.get("tags", []), None, None)
    if result.outcome == "already_settled":
        raise ConflictError(f"Lease {lease_id} was settled; it cannot be released.",
                            code="lease_settled")
    outcome = "expired" if result.outcome == "expired" else "released"
    return json_response(MeterResultSchema().dump({
        "lease_id": lease_id, "idempotency_key": None, "outcome": outcome, "cost_usd": None}))


@bp.post("/meter/track")
@documented(summary="Record a call the app made itself, without a lease (idempotent)",
            body=TrackRequestSchema, response=MeterResultSchema, status=201, tag="metering")
@metered
def track() -> Response:
    principal = current_principal()
    _reporter(principal)  # before the body: a key that may not report learns nothing more
    args = TrackRequestSchema().load(json_body())
    app_id, end_user_id, _user = _caller(principal, args.get("user"))
    model = _model(args["model"])
    usage = TokenUsage(**args["usage"])
    now = utcnow()
    at = checked_event_time(args.get("timestamp"), now, config().max_event_age_seconds)
    cost = _cost(usage, model, at or now)
    key = args["idempotency_key"]
    written = part(MeteringService).record_direct(
        app_id=app_id, end_user_id=end_user_id, model=model, usage=usage, cost_pico=cost,
        request_id=request_id(), idempotency_key=key, endpoint="meter.track", at=at)
    line().call(end_user_id, model.name, usage, cost, written, priced=cost is not None)
    fresh = written in ("written", "spooled")  # in the ledger, or on its way there
    if fresh:  # the ledger keeps keys for good: a repeat is never counted twice
        try:
            part(LimitsService).track(app_id=app_id, end_user_id=end_user_id, model=model,
                                  usage=usage, cost_pico=cost, event_id=key, at=at)
        except ServiceUnavailableError:
            part(MeteringService).mark_limits_pending(app_id, key)
            part(LimitsService).needs_catch_up()
            raise
    outcome = "tracked" if fresh else written  # duplicate, or quarantined (not counted)
    return json_response(MeterResultSchema().dump({
        "lease_id": None, "idempotency_key": key, "outcome": outcome,
        "cost_usd": format_usd(cost)}), status=201 if fresh else 200)


@bp.post("/meter/track/batch")
@documented(summary="Record up to 1,000 calls the app made itself, in one request "
            "(idempotent per event)", body=TrackBatchRequestSchema,
            response=TrackBatchResultSchema, tag="metering")
@metered
def track_batch() -> Response:
    principal = current_principal()
    require_role(principal, Role.APP)  # the app's backend; an end user reports one at a time
    args = TrackBatchRequestSchema().load(json_body())
    now = utcnow()
    keys = [e["idempotency_key"] for e in args["events"]]
    if len(set(keys)) != len(keys):
        raise InvalidRequestError("Each event of a batch needs its own idempotency_key.",
                                  param="events")
    calls = []
    metering = part(MeteringService)
    named = [validate_user_id(e["user"]) for e in args["events"] if e.get("user")]
    part(TenancyService).ensure_end_users(app_in_scope(principal), named)  # looked up together
    max_age = config().max_event_age_seconds
    for n, event in enumerate(args["events"]):
        app_id, end_user_id, _user = _caller(principal, event.get("user"))
        model = _model(event["model"])
        usage = TokenUsage(**event["usage"])
        at = checked_event_time(event.get("timestamp"), now, max_age,
                                f"events[{n}].timestamp")
        calls.append(DirectCall(app_id, end_user_id, model, usage,
                                _cost(usage, model, at or now, metering),
                                request_id(), event["idempotency_key"], at))
    written, pending = record_calls(calls, app_in_scope(principal))
    found = line()
    for call, outcome in zip(calls, written, strict=True):
        found.call(call.end_user_id, call.model.name, call.usage, call.cost_pico, outcome,
                   priced=call.cost_pico is not None)
    data = [{"idempotency_key": c.idempotency_key,
             "outcome": "tracked" if outcome in ("written", "spooled") else outcome,
             "cost_usd": format_usd(c.cost_pico)} for c, outcome in zip(calls, written,
                                                                         strict=True)]
    tracked = sum(1 for d in data if d["outcome"] == "tracked")
    return json_response(TrackBatchResultSchema().dump({
        "tracked": tracked, "duplicates": sum(1 for d in data if d["outcome"] == "duplicate"),
        "limits_pending": pending, "data": data}), status=201 if tracked else 200)


def record_calls(calls: list[DirectCall], app_id: int) -> tuple[list[str], int]:
    """Record calls the app reports in the ledger (group commits) and count the new ones into
    the limits: each call's ledger answer, and how many wait for the limit store."""
    try:
        part(PlanService).prefetch([c.end_user_id for c in calls])
    except DomainError:  # no plans configured: each call says so as it would alone
        pass
    try:
        written = part(MeteringService).record_direct_many(calls)  # all or nothing
    except ValueError as exc:
        raise InvalidRequestError(f"The batch was not recorded: {exc}.",
                                  param="events") from exc
    # the ledger keeps keys for good: a repeat is never counted twice
    new = [c for c, outcome in zip(calls, written, strict=True)
           if outcome in ("written", "spooled")]
    pending = 0
    try:  # a row spooled (the database down) is counted here all the same
        part(LimitsService).track_many([(c.app_id, c.end_user_id, c.model, c.usage, c.cost_pico,
                              c.idempotency_key) for c in new], [c.at for c in new])
    except ServiceUnavailableError:  # recorded; flagged, counted when the store is back
        pending = len(new)
        flagged = part(MeteringService).mark_limits_pending_many(app_id,
                                                      [c.idempotency_key for c in new])
        part(LimitsService).needs_catch_up()  # after the flags: a catch-up then finds them
        if flagged < pending:  # spooled rows too: replayed unflagged, counted by a rebuild
            log.error("%d reported calls were spooled while the limit store was down: run "
                      "`meterlane limits rebuild` once both are back", pending - flagged)
    return written, pending


def _quota(app_id: int, end_user_id: int, user: str) -> Response:
    plan, lines = part(LimitsService).quota(app_id, end_user_id)
    locale = request.args.get("locale")  # the limits' names in the user's language
    body = {"user": user, "plan": {"id": plan.id, "name": plan.name},
            "limits": [_line(line, locale) for line in lines]}
    return json_response(QuotaSchema().dump(body))


def _line(line: QuotaLine, locale: str | None = None) -> dict[str, Any]:
    return _limit_state(line.limit, line.used, line.remaining, line.resets_at, locale)


@bp.get("/users/<path:user>/quota")
@documented(summary="Every limit of an end user: used, remaining, limit, when it resets",
            response=QuotaSchema, tag="quota")
def user_quota(user: str) -> Response:
    principal = current_principal()
    require_role(principal, Role.APP, Role.ADMIN)
    user = validate_user_id(user)
    app_id = app_in_scope(principal)
    return _quota(app_id, part(TenancyService).seen_end_user(app_id, user), user)


@bp.get("/me/quota")
@documented(summary="The calling end user's own limits (user keys)", response=QuotaSchema,
            tag="quota")
def my_quota() -> Response:
    principal = current_principal()
    require_role(principal, Role.USER)
    assert principal.app_id is not None and principal.end_user_id is not None
    return _quota(principal.app_id, principal.end_user_id, principal.end_user or "")


def _cost(usage: TokenUsage, model: ModelConfig, at: datetime,
          metering: MeteringService | None = None) -> int | None:
    """The call's cost at the price in force; past what the ledger holds, a 400 (never
    wrapped or cut)."""
    cost = cost_or_none(usage, (metering or part(MeteringService)).price_of(model, at))
    if cost is not None and cost > MAX_PICO:
        raise InvalidRequestError(
            f"At {model.name}'s price this usage costs more than the ledger holds for one call "
            "(2^63 pico-USD); check the token counts.", param="usage")
    return cost
