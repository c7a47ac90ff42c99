"""Corrections: an event the app reported is voided or amended by a new ledger row naming it.

Append-only: the original row is never changed. The correction row carries `supersedes_id`
(the original's id) and `correction` ("void" or "amend"); every reader of usage counts a
superseded row as its correction says (`counting`). An event is corrected at most once (a
unique index holds that rule), a correction is not corrected itself, and a correction's own
idempotency key replays it.

A correction changes billed usage: the key that makes it (an app key, or an admin key
naming the app) is recorded in the audit trail in the correction's transaction
(`correction.void` / `correction.amend`, before: the corrected event's figures, after: the
correction's), whether it came as POST /v1/meter/corrections or as a CloudEvent naming the
event it corrects. A replay changes nothing and records nothing."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from core.audit import Actor
from core.audit import record as audit
from core.config import ModelConfig
from core.errors import ConflictError, InvalidRequestError, NotFoundError
from core.models import EndUser
from metering.models import UsageEvent
from metering.pricing import MAX_PICO, TokenUsage, cost_or_none, format_usd
from metering.records import CallRecord, problem_of
from metering.superseded import ACTIONS, AMEND, VOID

if TYPE_CHECKING:  # (metering.service reads the ledger through modules that import this)
    from metering.service import MeteringService

_E = UsageEvent


@dataclass(frozen=True)
class Correction:
    """What the app asks: void or amend the event it reported under `corrects`."""

    app_id: int
    key: str                  # the correction's own idempotency key
    corrects: str             # the original's idempotency key
    action: str               # void | amend
    request_id: str
    model: ModelConfig | None = None   # amend: the model (default: the original's)
    usage: TokenUsage | None = None    # amend: the usage that counts instead
    at: datetime | None = None         # amend: when it happened (default: the original's time)
    endpoint: str = "meter.correction"
    user: str | None = None            # when given: must be the original's end user
    actor: Actor | None = None         # the key that asks (audited); None: not recorded


@dataclass(frozen=True)
class Original:
    """The corrected row, as the limits counted it."""

    id: int
    key: str
    end_user_id: int
    user: str
    model: str
    upstream: str | None
    usage: TokenUsage
    cost_pico: int | None
    at: datetime
    limits_pending: bool


@dataclass(frozen=True)
class Corrected:
    id: int
    key: str
    action: str
    original: Original
    model: str
    usage: TokenUsage
    cost_pico: int | None
    at: datetime
    duplicate: bool  # this correction was made before (a replay of its key)


def correct(engine: Engine, metering: MeteringService, c: Correction) -> Corrected:
    """Write the correction row (once per key), or raise NotFoundError (no such event of this
    app) / ConflictError (corrected already, a correction itself, the key used otherwise)."""
    if c.action not in ACTIONS:
        raise InvalidRequestError("action must be void or amend.", param="action")
    if c.key == c.corrects:
        raise InvalidRequestError("A correction needs its own idempotency_key, not the key of "
                                  "the event it corrects.", param="idempotency_key")
    earlier = _replay(engine, c)
    if earlier is not None:
        return earlier
    original = _original(engine, c)
    if c.user is not None and c.user != original.user:
        raise InvalidRequestError(f"Event {c.corrects!r} is not {c.user!r}'s: a correction "
                                  "keeps the event's end user.", param="user")
    usage = TokenUsage() if c.action == VOID else c.usage or TokenUsage()
    at = original.at if c.action == VOID or c.at is None else c.at
    model_name = c.model.name if c.model is not None and c.action == AMEND else original.model
    # the upstream that served it (a local GPU's hours are shared by the calls it served)
    upstream = (c.model.upstream or None) if c.model is not None and c.action == AMEND \
        else original.upstream
    cost: int | None = 0
    priced = True
    if c.action == AMEND:
        model = c.model or ModelConfig(name=original.model, upstream="",
                                       upstream_model=original.model)
        price = metering.price_of(model, at)
        cost, priced = cost_or_none(usage, price), price is not None
        if cost is not None and cost > MAX_PICO:
            raise InvalidRequestError(
                f"At {model.name}'s price this usage costs more than the ledger holds for one "
                "call (2^63 pico-USD); check the token counts.", param="usage")
    with engine.connect() as conn:
        plan_id = conn.execute(select(_E.plan_id).where(_E.id == original.id)).scalar()
    record = CallRecord(
        app_id=c.app_id, end_user_id=original.end_user_id, request_id=c.request_id,
        idempotency_key=c.key, endpoint=c.endpoint, requested_model=model_name,
        upstream=upstream, upstream_model=model_name, stream=False,
        input_tokens=usage.input_tokens, cached_input_tokens=usage.cached_input_tokens,
        output_tokens=usage.output_tokens, reasoning_tokens=usage.reasoning_tokens,
        usage_source="reported", cost_pico_usd=cost, priced=priced, status="ok",
        http_status=200, error=None, latency_ms=0, ttft_ms=None, created_at=at,
        cache_write_tokens=usage.cache_write_tokens, plan_id=plan_id,
        credits_pending=metering.accounted(plan_id), supersedes_id=original.id,
        correction=c.action)
    row = record.row()
    why = problem_of(row)
    if why is not None:
        raise InvalidRequestError(f"The correction cannot be recorded: {why}.")
    try:
        with engine.begin() as conn:
            new_id = int(conn.execute(insert(UsageEvent).values(**row)
                                      .returning(UsageEvent.id)).scalar_one())
            audit(conn, c.actor, f"correction.{c.action}", target_type="usage_event",
                  target_id=c.corrects, app_id=c.app_id, before={
                      "user": original.user, "model": original.model,
                      **asdict(original.usage), "cost_usd": format_usd(original.cost_pico),
                      "at": original.at},
                  after={"idempotency_key": c.key, "model": model_name, **asdict(usage),
                         "cost_usd": format_usd(cost), "at": at})
    except IntegrityError:  # raced: the same key (a replay), or another correction won
        again = _replay(engine, c)
        if again is not None:
            return again
        _original(engine, c)  # raises the 409 naming the correction that holds it
        raise
    return Corrected(new_id, c.key, c.action, original, model_name, usage, cost, at, False)


def _original(engine: Engine, c: Correction) -> Original:
    with engine.connect() as conn:
        found = conn.execute(_with_user().where(
            _E.app_id == c.app_id, _E.idempotency_key == c.corrects)).first()
        if found is None:  # another app's event reads exactly as one that does not exist
            raise NotFoundError(f"No event {c.corrects!r} was reported by this app.",
                                param="corrects")
        if not (found.endpoint.startswith("meter.") or found.endpoint == "events"):
            raise ConflictError(
                f"{c.corrects!r} is a call the gateway measured ({found.endpoint}), not usage "
                "the app reported: only reported events are corrected.",
                code="not_correctable", param="corrects")
        if found.supersedes_id is not None:
            raise ConflictError(
                f"{c.corrects!r} is itself a correction ({found.correction}); a correction is "
                "not corrected. Report the usage as a new event if it is still wrong.",
                code="correction_not_correctable", param="corrects")
        holder = conn.execute(select(_E.idempotency_key, _E.correction).where(
            _E.supersedes_id == found.id)).first()
    if holder is not None:
        raise ConflictError(
            f"Event {c.corrects!r} was corrected already ({holder[1]}, by {holder[0]!r}); an "
            "event is corrected once.", code="already_corrected", param="corrects",
            corrected_by=holder[0])
    return _as_original(found)


def _with_user() -> Any:
    return select(_E.__table__, EndUser.external_id.label("user")).join(
        EndUser, EndUser.id == _E.end_user_id)


def _as_original(row: Any) -> Original:
    usage = TokenUsage(input_tokens=row.input_tokens, cached_input_tokens=row.cached_input_tokens,
                       output_tokens=row.output_tokens, reasoning_tokens=row.reasoning_tokens,
                       cache_write_tokens=row.cache_write_tokens)
    return Original(int(row.id), row.idempotency_key, int(row.end_user_id), row.user,
                    row.requested_model, row.upstream,
                    usage, row.cost_pico_usd, row.created_at, bool(row.limits_pending))


def _replay(engine: Engine, c: Correction) -> Corrected | None:
    """The correction made before under this key (its answer again), None when the key is
    new; ConflictError when the key names another event or another correction."""
    with engine.connect() as conn:
        mine = conn.execute(select(_E.__table__).where(
            _E.app_id == c.app_id, _E.idempotency_key == c.key)).first()
        if mine is None:
            return None
        original = None
        if mine.supersedes_id is not None:
            original = conn.execute(_with_user().where(
                _E.id == mine.supersedes_id)).first()
    if original is None or original.idempotency_key != c.corrects \
            or mine.correction != c.action:
        raise ConflictError(f"Idempotency key {c.key!r} was used for another event; use a "
                            "new key for each correction.", code="key_reused",
                            param="idempotency_key")
    usage = TokenUsage(input_tokens=mine.input_tokens,
                       cached_input_tokens=mine.cached_input_tokens,
                       output_tokens=mine.output_tokens, reasoning_tokens=mine.reasoning_tokens,
                       cache_write_tokens=mine.cache_write_tokens)
    return Corrected(int(mine.id), c.key, c.action, _as_original(original),
                     mine.requested_model, usage, mine.cost_pico_usd, mine.created_at, True)
