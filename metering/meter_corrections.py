"""Corrections of custom meter events ([[meters]]): a new meter_events row voids or amends
an earlier one of the same meter (append-only, as metering.corrections is for tokens). The
meter's limits give back the corrected event's charge in the windows still open. Audited as
token corrections are (metering.corrections): before, the corrected event's value and cost;
after, the correction's."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.audit import record
from core.errors import ConflictError, InvalidRequestError, NotFoundError
from core.meters import MeterConfig, cost_pico, format_units
from core.models import EndUser
from metering.corrections import Correction
from metering.eventtime import counts_now
from metering.limitstore import Actual
from metering.meters import MeterService, _data_text, _reading
from metering.models import MeterEvent
from metering.outage import LimitStoreUnavailableError, store_errors
from metering.pricing import format_usd
from metering.superseded import VOID
from plans.windows import epoch_ms

log = logging.getLogger(__name__)
_M = MeterEvent


@dataclass(frozen=True)
class MeterCorrected:
    id: int
    key: str
    action: str
    meter: str
    user: str
    value_micro: int
    cost_pico_usd: int | None
    occurred_at: datetime
    corrected_cost_pico_usd: int | None
    duplicate: bool


def correct_meter_event(meters: MeterService, c: Correction, meter_id: str, value: Any,
                        data: dict[str, Any] | None) -> MeterCorrected:
    """Void or amend the meter event the app recorded under `c.corrects` (NotFoundError when
    this app has none, ConflictError when it is of another meter, corrected already, or a
    correction itself, or the key names another event); the same correction again is its
    answer again."""
    meter = meters.config.meter(meter_id)
    if meter is None:
        raise InvalidRequestError(f"No meter {meter_id!r} in [[meters]].", param="meter")
    if c.key == c.corrects:
        raise InvalidRequestError("A correction needs its own idempotency_key.",
                                  param="idempotency_key")
    earlier = _replay(meters, c)
    if earlier is not None:
        return earlier
    original, user = _original(meters, c, meter)
    if c.user is not None and c.user != user:
        raise InvalidRequestError(f"Event {c.corrects!r} is not {c.user!r}'s: a correction "
                                  "keeps the event's end user.", param="user")
    now = meters.clock()
    micro, unique, text = 0, None, None
    if c.action != VOID:
        micro, unique = _reading(meter, value, data)
        text = _data_text(data)
    cost = 0 if c.action == VOID else cost_pico(meter, micro, meters.price_at(meter.id, now))
    occurred: datetime = c.at or original.occurred_at
    row = {"app_id": c.app_id, "end_user_id": original.end_user_id, "meter_id": meter.id,
           "idempotency_key": c.key, "value_micro": micro, "unique_key": unique,
           "cost_pico_usd": cost, "plan_id": original.plan_id, "data": text,
           "occurred_at": occurred, "received_at": now,
           "supersedes_id": original.id, "correction": c.action}
    try:
        with meters.engine.begin() as conn:
            new_id = int(conn.execute(insert(MeterEvent).values(**row)
                                      .returning(MeterEvent.id)).scalar_one())
            record(conn, c.actor, f"correction.{c.action}", target_type="meter_event",
                   target_id=c.corrects, app_id=c.app_id, before={
                       "user": user, "meter": meter.id,
                       "value": format_units(original.value_micro),
                       "cost_usd": format_usd(original.cost_pico_usd),
                       "at": original.occurred_at},
                   after={"idempotency_key": c.key, "value": format_units(micro),
                          "cost_usd": format_usd(cost), "at": occurred})
    except IntegrityError:  # raced: a replay of this key, or another correction won
        again = _replay(meters, c)
        if again is not None:
            return again
        _original(meters, c, meter)  # raises the 409 naming the correction that holds it
        raise
    _recount(meters, c.app_id, original, meter, micro, c.key)
    return MeterCorrected(new_id, c.key, c.action, meter.id, user, micro, cost,
                          occurred, original.cost_pico_usd, False)


def _recount(meters: MeterService, app_id: int, original: MeterEvent, meter: MeterConfig,
             micro: int, key: str) -> None:
    """Give back the original's charge in the meter limits whose window holding now held
    its receipt (a window over is not re-opened), then count the amendment's. A store that
    is away leaves the counters to `meterlane limits rebuild` (which reads what counts)."""
    limits = meters.limits
    if not limits.enabled:
        return
    now = limits.clock()
    assignment = limits.plans.plan_of(original.end_user_id)
    applied = [a for a in limits.checks_for(app_id, original.end_user_id, assignment, None, now,
                                            meter=meter.id, meter_charge=original.value_micro)
               if counts_now(a.limit, assignment.anchored_at, original.received_at, now)]
    for tag in dict.fromkeys(a.tag for a in applied):
        try:
            with store_errors():
                limits.store.commit(tag, f"unmev:{app_id}:{key}", [
                    dataclasses.replace(a.check, fixed=-a.check.fixed)
                    for a in applied if a.tag == tag], Actual(0), now_ms=epoch_ms(now))
        except LimitStoreUnavailableError:
            log.error("limit store unavailable: the charge of meter event %s is not given "
                      "back; run `meterlane limits rebuild` once it is back", original.id)
    if micro:
        meters._count(app_id, original.end_user_id, meter, micro, key)


def _original(meters: MeterService, c: Correction, meter: MeterConfig
              ) -> tuple[MeterEvent, str]:
    with Session(meters.engine) as session:
        found = session.execute(select(MeterEvent, EndUser.external_id).join(
            EndUser, EndUser.id == MeterEvent.end_user_id).where(
            _M.app_id == c.app_id, _M.idempotency_key == c.corrects)).first()
        if found is None:
            raise NotFoundError(f"No meter event {c.corrects!r} was recorded by this app.",
                                param="corrects")
        original, user = found[0], str(found[1])
        if original.meter_id != meter.id:
            raise ConflictError(f"{c.corrects!r} is an event of meter {original.meter_id!r}, "
                                f"not {meter.id!r}.", code="other_meter", param="meter")
        if original.supersedes_id is not None:
            raise ConflictError(f"{c.corrects!r} is itself a correction; a correction is not "
                                "corrected.", code="correction_not_correctable",
                                param="corrects")
        holder = session.execute(select(_M.idempotency_key, _M.correction).where(
            _M.supersedes_id == original.id)).first()
        session.expunge(original)
    if holder is not None:
        raise ConflictError(
            f"Meter event {c.corrects!r} was corrected already ({holder[1]}, by "
            f"{holder[0]!r}); an event is corrected once.", code="already_corrected",
            param="corrects", corrected_by=holder[0])
    return original, user


def _replay(meters: MeterService, c: Correction) -> MeterCorrected | None:
    with Session(meters.engine) as session:
        mine = session.scalars(select(MeterEvent).where(
            _M.app_id == c.app_id, _M.idempotency_key == c.key)).first()
        if mine is None:
            return None
        original = None if mine.supersedes_id is None else session.get(
            MeterEvent, mine.supersedes_id)
        user = session.scalar(select(EndUser.external_id).where(EndUser.id == mine.end_user_id))
    if original is None or original.idempotency_key != c.corrects \
            or mine.correction != c.action:
        raise ConflictError(f"Idempotency key {c.key!r} was used for another event; use a "
                            "new key for each correction.", code="key_reused",
                            param="idempotency_key")
    return MeterCorrected(mine.id, c.key, c.action, mine.meter_id, str(user), mine.value_micro,
                          mine.cost_pico_usd, mine.occurred_at, original.cost_pico_usd, True)
