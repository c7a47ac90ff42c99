"""Meter events: what apps meter besides tokens ([[meters]]), recorded once per idempotency
key, priced when received, counted against the plan's meter limits all or nothing.

A meter limit is reserved like a call (one atomic store step per tag: an event that would
pass a hard limit is refused with 402), the event is written, then the reservation is
settled for good (a meter's charge is kept, as a request's is)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.config import Config
from core.errors import ConflictError, InvalidRequestError, ServiceUnavailableError
from core.meters import METER_SCALE, MeterConfig, cost_pico, parse_value
from core.tenancy import TenancyService
from metering.leases import Applied, Lease
from metering.limits import LimitsService
from metering.limitstore import Actual
from metering.models import MeterEvent
from metering.outage import LimitStoreUnavailableError, store_errors
from metering.superseded import meter_counting
from metering.thresholds import LimitEvent, Usage, crossed
from plans.meter_overage import MeterCycle, MeterEventIn, account_in, cycles_of
from plans.windows import epoch_ms

log = logging.getLogger(__name__)
MAX_DATA_BYTES = 4096
Held = tuple[str, list[str], list[LimitEvent]]  # lease id, its tags, thresholds crossed


def now_utc() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class MeterOutcome:
    """A meter event as recorded (or as it was recorded before, for a repeated key)."""

    id: int
    meter: str
    idempotency_key: str
    value_micro: int
    cost_pico_usd: int | None
    occurred_at: datetime
    duplicate: bool


@dataclass(frozen=True)
class MeterTotal:
    meter: MeterConfig
    value_micro: int   # the aggregation's result in micro-units (a count: events x 10**6)
    events: int
    cost_pico_usd: int


class MeterService:
    def __init__(self, engine: Engine, config: Config, tenancy: TenancyService,
                 limits: LimitsService, clock: Callable[[], datetime] = now_utc) -> None:
        self.engine = engine
        self.config = config
        self.tenancy = tenancy
        self.limits = limits
        self.clock = clock
        # The price per unit in force (the finance catalog's; the config's without one).
        self.price_at: Callable[[str, datetime], Decimal | None] = self._config_price

    def _config_price(self, meter_id: str, _at: datetime) -> Decimal | None:
        found = self.config.meter(meter_id)
        return found.price_usd if found else None

    def record_meter_event(self, app_id: int, user: str, meter_id: str, value: Any,
                           data: dict[str, Any] | None, idempotency_key: str,
                           occurred_at: datetime | None = None,
                           request_id: str = "", *, enforce: bool = True) -> MeterOutcome:
        """Record one event of a meter for an end user (once per idempotency key of the
        app). Raises InvalidRequestError for a value the meter cannot read, ConflictError for
        a key reused with another meter, QuotaExceededError / RateLimitedError when a limit
        of the user's plan on the meter would be passed (the event is then not recorded).
        `enforce=False` (what already happened, e.g. the web searches of a call the gateway
        relayed): recorded and counted, never refused; the counters may pass the limit."""
        meter = self.config.meter(meter_id)
        if meter is None:
            known = ", ".join(m.id for m in self.config.meters) or "none are configured"
            raise InvalidRequestError(f"No meter {meter_id!r} in [[meters]] ({known}).",
                                      param="meter")
        micro, unique = _reading(meter, value, data)
        text = _data_text(data)
        end_user_id = self.tenancy.ensure_end_user(app_id, user)
        return self._record(app_id, end_user_id, meter, micro, unique, text, idempotency_key,
                            occurred_at, request_id, enforce=enforce)

    def record_for_user(self, app_id: int, end_user_id: int, meter_id: str,
                        idempotency_key: str, occurred_at: datetime,
                        request_id: str = "") -> MeterOutcome:
        """One event of a meter counting 1 for an end user known by id, that already happened
        (enforce=False): what the gateway records of a call it relayed."""
        meter = self.config.meter(meter_id)
        if meter is None:
            raise InvalidRequestError(f"No meter {meter_id!r} in [[meters]].", param="meter")
        micro, unique = _reading(meter, 1, None)
        if meter.aggregation == "unique_count":
            unique = idempotency_key[:300]  # each event its own value: each counts once
        return self._record(app_id, end_user_id, meter, micro, unique, None, idempotency_key,
                            occurred_at, request_id, enforce=False)

    def _record(self, app_id: int, end_user_id: int, meter: MeterConfig, micro: int,
                unique: str | None, text: str | None, idempotency_key: str,
                occurred_at: datetime | None, request_id: str, *,
                enforce: bool) -> MeterOutcome:
        earlier = self._find(app_id, idempotency_key)
        if earlier is not None:
            return _checked(earlier, meter.id)
        now = self.clock()
        held = self._reserve(app_id, end_user_id, meter, micro,
                             request_id or idempotency_key) if enforce else None
        row = MeterEvent(app_id=app_id, end_user_id=end_user_id, meter_id=meter.id,
                         idempotency_key=idempotency_key, value_micro=micro, unique_key=unique,
                         cost_pico_usd=cost_pico(meter, micro, self.price_at(meter.id, now)),
                         data=text,
                         plan_id=self._plan_of(end_user_id),
                         occurred_at=occurred_at or now, received_at=now)
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                session.add(row)
                self._account(session, row)
        except IntegrityError:  # the same key, recorded at this moment by another request
            self._settle(held, keep=False)
            found = self._find(app_id, idempotency_key)
            if found is None:
                raise
            return _checked(found, meter.id)
        except Exception:  # not recorded (the database is away): nor counted
            self._settle(held, keep=False)
            raise
        self._settle(held, keep=True)
        if not enforce:
            self._count(app_id, end_user_id, meter, micro, idempotency_key)
        if held is not None and held[2] and self.limits.on_limit_event is not None:
            self.limits._emit(held[2])  # the paywall's threshold events (50%, 80%, ...)
        return _outcome(row, duplicate=False)

    def _count(self, app_id: int, end_user_id: int, meter: MeterConfig, micro: int,
               key: str) -> None:
        """Count a recorded event on the meter's limits without a reservation (once per
        key); a store that is away leaves it to `meterlane limits rebuild`."""
        limits = self.limits
        if not limits.enabled:
            return
        now = limits.clock()
        applied = limits.checks_for(app_id, end_user_id, limits.plans.plan_of(end_user_id),
                                    None, now, meter=meter.id, meter_charge=micro)
        for tag in dict.fromkeys(a.tag for a in applied):
            try:
                with store_errors():
                    limits.store.commit(tag, f"mev:{app_id}:{key}",
                                        [a.check for a in applied if a.tag == tag],
                                        Actual(0), now_ms=epoch_ms(now))
            except LimitStoreUnavailableError:
                log.error("limit store unavailable: meter event %s is recorded, not counted; "
                          "run `meterlane limits rebuild` once it is back", key)

    def _account(self, session: Session, row: MeterEvent) -> None:
        """Count the event against the plan's allowance of its meter (its overage, if any,
        written) in the transaction that records it: once, and never one without the other."""
        if not any(p.terms.meter(row.meter_id) for p in self.limits.catalog.plans):
            return  # no plan includes an allowance of this meter
        session.flush()  # (the event's id keys its overage)
        conn = session.connection()
        account_in(conn, self.limits.plans.plan_of(row.end_user_id, conn), MeterEventIn(
            row.id, row.app_id, row.end_user_id, row.meter_id, row.value_micro,
            row.occurred_at, row.received_at))

    def _plan_of(self, end_user_id: int) -> str | None:
        """The user's plan, for finance's margins by plan (None: no plans configured)."""
        if not self.limits.catalog.plans:
            return None
        return self.limits.plans.plan_of(end_user_id).plan.id

    def _find(self, app_id: int, key: str) -> MeterEvent | None:
        with Session(self.engine) as session:
            return session.scalars(select(MeterEvent).where(
                MeterEvent.app_id == app_id, MeterEvent.idempotency_key == key)).first()

    def _reserve(self, app_id: int, end_user_id: int, meter: MeterConfig, micro: int,
                 request_id: str) -> Held | None:
        """Charge the event on every limit of the plan on this meter, all or nothing; the
        lease id and tags holding the charge and the quota thresholds it crossed, or None
        when no limit applies."""
        limits = self.limits
        if not limits.enabled:
            return None
        now = limits.clock()
        assignment = limits.plans.plan_of(end_user_id)
        applied = limits.checks_for(app_id, end_user_id, assignment, None, now,
                                    meter=meter.id, meter_charge=micro)
        if not applied:
            return None
        lease_id = f"ls_{app_id}_{end_user_id}_{uuid.uuid4().hex}"
        lease = Lease(lease_id, assignment.plan, f"meter:{meter.id}", applied, None, now,
                      meta={"app_id": app_id, "end_user_id": end_user_id,
                            "meter": meter.id, "request_id": request_id})
        now_ms = epoch_ms(now)
        expires = now_ms + limits.lease_seconds * 1000
        held: list[str] = []
        states: list[Usage] = []  # where each counter stood before and after the event
        try:
            for tag in lease.tags:
                group = [a for a in applied if a.tag == tag]
                with store_errors():
                    result = limits.store.reserve(
                        tag, lease_id, [a.check for a in group], now_ms=now_ms,
                        expires_ms=expires, want_out=0, min_out=0, clip=False, meta=lease.meta)
                if not result.granted:
                    self._settle((lease_id, held), keep=False)
                    idx = result.refused or 0
                    hit = Applied(group[idx].limit, tag, group[idx].check, result.states[idx])
                    raise limits._refusal(lease, hit, now, app_id, end_user_id, request_id,
                                          hit.check.fixed)
                held.append(tag)
                states.extend(Usage(a.limit, a.check, st.used - a.check.fixed, st.used,
                                    Applied(a.limit, tag, a.check, st).resets_at(now))
                              for a, st in zip(group, result.states, strict=True))
        except LimitStoreUnavailableError as exc:
            self._settle((lease_id, held), keep=False)
            if assignment.plan.on_store_failure == "open":  # as a call: let it through
                log.warning("limit store unavailable: meter event of %s recorded uncounted "
                            "(plan %s fails open): %s", meter.id, assignment.plan.id, exc)
                return None
            raise ServiceUnavailableError(
                "The limits store is unavailable, and this plan does not allow events it "
                "cannot count; try again shortly (with the same idempotency_key).",
                headers={"Retry-After": "1"}) from exc
        return lease_id, held, crossed(app_id, end_user_id, assignment.plan, states,
                                       limits.thresholds, now, request_id)

    def _settle(self, held: Held | tuple[str, list[str]] | None, *, keep: bool) -> None:
        """Keep the charge for good (the event is written), or return it (it is not). A
        store that fails here leaves the reservation to expire: never an error, as the
        event's fate is already decided (a kept charge then returns, in the user's favour)."""
        if held is None:
            return
        lease_id, tags = held[0], held[1]
        now_ms = epoch_ms(self.limits.clock())
        for tag in tags:
            try:
                with store_errors():
                    self.limits.store.settle(tag, lease_id, Actual(0) if keep else None,
                                             now_ms=now_ms)
            except LimitStoreUnavailableError:
                log.warning("could not settle meter lease %s on %s; it will expire",
                            lease_id, tag)

    def period(self, start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
        """[start, end) as given; by default from the start of this month (UTC) to now."""
        now = self.clock()
        start = start or now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = end or now + timedelta(microseconds=1)
        if end <= start:
            raise InvalidRequestError("'to' must be after 'from'.", param="to")
        return start, end

    def totals(self, app_id: int, end_user_id: int, start: datetime,
               end: datetime) -> list[MeterTotal]:
        """Each configured meter's aggregate for an end user over [start, end) (by when the
        events occurred)."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(MeterEvent.meter_id, func.count(), func.sum(MeterEvent.value_micro),
                       func.max(MeterEvent.value_micro),
                       func.count(func.distinct(MeterEvent.unique_key)),
                       func.sum(MeterEvent.cost_pico_usd))
                .where(MeterEvent.app_id == app_id, MeterEvent.end_user_id == end_user_id,
                       MeterEvent.occurred_at >= start, MeterEvent.occurred_at < end,
                       meter_counting())
                .group_by(MeterEvent.meter_id)).all()
        found = {r[0]: r for r in rows}
        out = []
        for meter in self.config.meters:
            _id, events, total, top, distinct, cost = found.get(
                meter.id, (meter.id, 0, 0, 0, 0, 0))
            value = {"sum": total or 0, "count": events * METER_SCALE, "max": top or 0,
                     "unique_count": distinct * METER_SCALE}[meter.aggregation]
            out.append(MeterTotal(meter, int(value), int(events), int(cost or 0)))
        return out


    def cycles(self, end_user_id: int) -> list[MeterCycle]:
        """The allowance, use and overage of each meter the user's plan includes, in the
        open billing cycle."""
        if not self.limits.catalog.plans:
            return []
        return cycles_of(self.engine, end_user_id, self.limits.plans.plan_of(end_user_id),
                         self.clock())


def _reading(meter: MeterConfig, value: Any,
             data: dict[str, Any] | None) -> tuple[int, str | None]:
    """(the event's charge in micro-units, its unique key) as the meter reads it."""
    if data is not None and not isinstance(data, dict):
        raise InvalidRequestError("data must be an object of the event's fields.", param="data")
    field = meter.field
    given = value if value is not None else (data or {}).get(field) if field else None
    if meter.aggregation == "count":
        if value is not None and parse_value(value) != METER_SCALE:
            raise InvalidRequestError(f"Meter {meter.id!r} counts events: send no value (or 1).",
                                      param="value")
        return METER_SCALE, None
    if meter.aggregation == "unique_count":
        if not isinstance(given, (str, int)) or isinstance(given, bool) \
                or not 0 < len(str(given)) <= 300:
            raise InvalidRequestError(
                f"Meter {meter.id!r} counts distinct values of data.{field}: set it to a string "
                "or integer (at most 300 characters).", param=f"data.{field}")
        return METER_SCALE, str(given)
    micro = parse_value(given)
    if micro is None or micro < 0:
        raise InvalidRequestError(
            f"Meter {meter.id!r} reads a number of {meter.unit} from value or data.{field}: an "
            "integer or a decimal string with at most 6 decimals, at least 0, at most "
            f"1,000,000,000; got {given!r}.", param="value" if value is not None
            else f"data.{field}")
    return micro, None


def _data_text(data: dict[str, Any] | None) -> str | None:
    if data is None:
        return None
    text = json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)
    if len(text.encode()) > MAX_DATA_BYTES:
        raise InvalidRequestError(f"data is more than {MAX_DATA_BYTES} bytes as JSON.",
                                  param="data")
    return text


def _checked(row: MeterEvent, meter_id: str) -> MeterOutcome:
    if row.meter_id != meter_id:
        raise ConflictError(f"Idempotency key {row.idempotency_key!r} was used for an event of "
                            f"meter {row.meter_id!r}; use a new key for each event.")
    return _outcome(row, duplicate=True)


def _outcome(row: MeterEvent, *, duplicate: bool) -> MeterOutcome:
    return MeterOutcome(row.id, row.meter_id, row.idempotency_key, row.value_micro,
                        row.cost_pico_usd, row.occurred_at, duplicate)


METER_GROUPS = {"plan": MeterEvent.plan_id, "user": MeterEvent.end_user_id,
                "model": MeterEvent.meter_id, "day": func.date(MeterEvent.occurred_at)}


def meter_costs(engine: Engine, app_id: int, start: datetime, end: datetime,
                group_by: str | None = None) -> dict[Any, tuple[int, int]]:
    """Finance's read of meter events occurred in [start, end): (events, cost in pico-USD)
    per plan, end user, meter ("model": a meter's key is "meter:<id>") or day (a date), or
    all together under None."""
    key = METER_GROUPS[group_by] if group_by else None
    keys = [key] if key is not None else []
    with engine.connect() as conn:
        rows = conn.execute(
            select(*keys, func.count(), func.coalesce(func.sum(MeterEvent.cost_pico_usd), 0))
            .where(MeterEvent.app_id == app_id, MeterEvent.occurred_at >= start,
                   MeterEvent.occurred_at < end, meter_counting()).group_by(*keys)).all()
    out: dict[Any, tuple[int, int]] = {}
    for row in rows:
        found = row[0] if key is not None else None
        if group_by == "model":
            found = f"meter:{found}"
        elif group_by == "day":  # SQLite's date() is text, Postgres's a date
            found = date.fromisoformat(str(found)[:10])
        out[found] = (int(row[-2]), int(row[-1]))
    return out
