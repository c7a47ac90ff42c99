"""Credits: grants (append-only) that usage past the plan's allowance burns, in the order
priority -> soonest expiry -> oldest; overage past every credit; rollover of unused
allowance at the end of a billing cycle. The balance is derived, never stored:
granted = burned + expired + balance.

Usage is accounted per end user, each event once, whatever order its row committed in: the
metering package feeds the events and marks them accounted in the transaction that accounts
them (plans never reads the ledger itself). Each accounted event keeps its split (a
CreditUse): credits = allowance + burned + overage + uncharged."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import aliased

from core.audit import Actor, record, user_ref
from core.cache import ReadCache
from core.db import utcnow
from core.errors import ConflictError, InvalidRequestError
from plans.models import (
    AllowanceOffset,
    CreditBurn,
    CreditCursor,
    CreditGrant,
    CreditOverage,
    CreditUse,
)
from plans.reversals import accounted_of, cancel_overage, difference, net_burns
from plans.service import Assignment
from plans.windows import parse_window, period_of

log = logging.getLogger(__name__)
SOURCES = ("topup", "promotion", "refund", "rollover")
DEFAULT_PRIORITY = 100
MAX_GRANT = 10**15
_FAR = datetime.max.replace(tzinfo=None)
_CYCLE = parse_window("cycle", "UTC")
MAX_EMPTY_CYCLES = 36  # rollover of cycles without usage is worked out this far back at most


@dataclass
class GrantBalance:
    id: int
    amount: int
    priority: int
    granted_at: datetime
    expires_at: datetime | None
    source: str = "promotion"
    burned: int = 0

    @property
    def remaining(self) -> int:
        return self.amount - self.burned

    def live_at(self, at: datetime) -> bool:
        return self.granted_at <= at and (self.expires_at is None or at < self.expires_at)

    def order_key(self) -> tuple[Any, ...]:
        expiry = self.expires_at.replace(tzinfo=None) if self.expires_at else _FAR
        return (self.priority, expiry, self.granted_at, self.id)


def burn(grants: list[GrantBalance], credits: int, at: datetime) -> list[tuple[int, int]]:
    """Take up to `credits` from the grants live at `at`, in burn order; updates their
    `burned` and returns (grant id, amount) for each grant drawn on."""
    taken: list[tuple[int, int]] = []
    for grant in sorted((g for g in grants if g.live_at(at) and g.remaining > 0),
                        key=GrantBalance.order_key):
        if credits <= 0:
            break
        amount = min(credits, grant.remaining)
        grant.burned += amount
        credits -= amount
        taken.append((grant.id, amount))
    return taken


@dataclass(frozen=True)
class Summary:
    granted: int
    burned: int
    expired: int
    balance: int
    grants: tuple[GrantBalance, ...]


def summarise(grants: list[GrantBalance], now: datetime) -> Summary:
    """Totals at `now` of the grants given by then: granted = burned + expired + balance."""
    given = [g for g in grants if g.granted_at <= now]
    expired = sum(g.remaining for g in given if g.expires_at is not None and g.expires_at <= now)
    balance = sum(g.remaining for g in given if g.live_at(now))
    return Summary(sum(g.amount for g in given), sum(g.burned for g in given), expired,
                   balance, tuple(given))


@dataclass(frozen=True)
class UsageCredits:
    """One ledger event, in credits (tokens x the credit multiplier of its model's tier)."""

    event_id: int
    credits: int
    at: datetime
    tokens: int = 0  # input + output, as the ledger had them
    supersedes: int | None = None  # a correction: the event it voids or amends


@dataclass(frozen=True)
class UseFigures:
    """How one usage event was accounted (credits None: before the splits were kept)."""

    tokens: int
    credits: int | None
    allowance: int
    burned: int
    overage: int
    uncharged: int

    @property
    def balanced(self) -> bool:
        return self.credits is None or self.credits == (
            self.allowance + self.burned + self.overage + self.uncharged)


class _RacedError(Exception):
    """Another accounting run moved the cursor first."""


class CreditsService:
    def __init__(self, engine: Engine, *, cache_seconds: float = 2.0,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.cache_seconds = cache_seconds
        self.clock = clock
        # read by one call at a time per key, re-read before it lapses (ReadCache)
        self._cache: ReadCache[tuple[int, datetime], int] = ReadCache("credit allowances",
                                                                      cache_seconds)

    # -- grants -----------------------------------------------------------------------------

    def grant(self, *, app_id: int, end_user_id: int, amount: int, source: str,
              external_id: str, priority: int = DEFAULT_PRIORITY,
              expires_at: datetime | None = None, granted_at: datetime | None = None,
              note: str | None = None, actor: Actor | None = None
              ) -> tuple[GrantBalance, bool]:
        """Add a grant once per (app, external_id); returns it and whether it is new. The
        same id with other terms is a conflict, never a second grant."""
        if not 1 <= amount <= MAX_GRANT:
            raise InvalidRequestError(f"amount must be 1 to {MAX_GRANT:,} credits",
                                      param="amount")
        if source not in SOURCES:
            raise InvalidRequestError(f"source must be one of {', '.join(SOURCES)}",
                                      param="source")
        if external_id.startswith("rollover:"):
            raise InvalidRequestError("external_id may not start with 'rollover:' (Meterlane's "
                                      "own rollover grants use it)", param="external_id")
        at = granted_at or self.clock()
        if expires_at is not None and expires_at <= at:
            raise InvalidRequestError("expires_at must be after the grant", param="expires_at")
        values = {"app_id": app_id, "end_user_id": end_user_id, "amount": amount,
                  "source": source, "priority": priority, "granted_at": at,
                  "expires_at": expires_at, "external_id": external_id, "note": note}
        try:
            with self.engine.begin() as conn:
                new_id = conn.execute(insert(CreditGrant).values(**values)
                                      .returning(CreditGrant.id)).scalar_one()
                record(conn, actor, "credit_grant.create", target_type="credit_grant",
                       target_id=new_id, app_id=app_id, after={
                           **{k: v for k, v in values.items() if k != "app_id"},
                           "user": user_ref(conn, actor, end_user_id)})
        except IntegrityError:
            existing = self._grant_by_external_id(app_id, external_id)
            if existing is None:
                raise
            row, same = existing
            if row.end_user_id != end_user_id or row.amount != amount or row.source != source:
                raise ConflictError(f"Grant {external_id!r} was already made with other terms.",
                                    code="grant_conflict") from None
            return same, False
        self._forget(end_user_id)
        return GrantBalance(new_id, amount, priority, at, expires_at, source), True

    def grant_in(self, conn: Connection, *, app_id: int, end_user_id: int, amount: int,
                 source: str, external_id: str, granted_at: datetime,
                 note: str | None = None) -> bool:
        """A grant inside the caller's transaction (a webhook's), once per external id."""
        exists = conn.execute(select(CreditGrant.id).where(
            CreditGrant.app_id == app_id, CreditGrant.external_id == external_id)).first()
        if exists is not None:
            return False
        conn.execute(insert(CreditGrant).values(
            app_id=app_id, end_user_id=end_user_id, amount=amount, source=source,
            priority=DEFAULT_PRIORITY, granted_at=granted_at, expires_at=None,
            external_id=external_id, note=note))
        self._forget(end_user_id)
        return True

    def _grant_by_external_id(self, app_id: int, external_id: str
                              ) -> tuple[Any, GrantBalance] | None:
        with self.engine.connect() as conn:
            g = conn.execute(select(CreditGrant.__table__).where(
                CreditGrant.app_id == app_id, CreditGrant.external_id == external_id)).first()
        if g is None:
            return None
        return g, GrantBalance(g.id, g.amount, g.priority, g.granted_at, g.expires_at, g.source)

    def balances(self, end_user_id: int, conn: Connection | None = None) -> list[GrantBalance]:
        """Every grant of the end user with what has been burned from it."""
        burned = (select(CreditBurn.grant_id, func.sum(CreditBurn.amount).label("burned"))
                  .where(CreditBurn.end_user_id == end_user_id)
                  .group_by(CreditBurn.grant_id).subquery())
        query = (select(CreditGrant.id, CreditGrant.amount, CreditGrant.priority,
                        CreditGrant.granted_at, CreditGrant.expires_at, CreditGrant.source,
                        func.coalesce(burned.c.burned, 0))
                 .outerjoin(burned, burned.c.grant_id == CreditGrant.id)
                 .where(CreditGrant.end_user_id == end_user_id).order_by(CreditGrant.id))
        if conn is None:
            with self.engine.connect() as own:
                rows = own.execute(query).all()
        else:
            rows = conn.execute(query).all()
        return [GrantBalance(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6])) for r in rows]

    def summary(self, end_user_id: int) -> Summary:
        return summarise(self.balances(end_user_id), self.clock())

    # -- what the limits engine may let through past the allowance --------------------------

    def extra_allowance(self, end_user_id: int, assignment: Assignment, now: datetime,
                        refresh: Callable[[], object] | None = None) -> int:
        """Credits the allowance counter of the current cycle may grow by: the credits burned
        in this cycle plus the balance (their sum does not move as usage is accounted), plus
        what the overage spend cap buys. Cached for a moment, like plan assignments."""
        cycle = period_of(_CYCLE, now, assignment.anchored_at)
        return self._cache.get((end_user_id, cycle.start), lambda: self._read_extra(
            end_user_id, assignment, now, cycle.start, refresh))

    def _read_extra(self, end_user_id: int, assignment: Assignment, now: datetime,
                    cycle_start: datetime, refresh: Callable[[], object] | None) -> int:
        grants = self.balances(end_user_id)
        if refresh is not None and grants:
            with self.engine.connect() as conn:
                cursor = conn.execute(select(CreditCursor.cycle_start).where(
                    CreditCursor.end_user_id == end_user_id)).first()
            if cursor is None or cursor[0] is None or cursor[0] < cycle_start:
                # Account first: credits an earlier cycle burned but nobody has accounted
                # yet would otherwise count as balance again in this one. (Within a cycle
                # the sum burned-this-cycle + balance does not move as usage is accounted.)
                try:
                    refresh()
                except OperationalError:
                    log.exception("accounting end user %s before reading credits failed",
                                  end_user_id)
                grants = self.balances(end_user_id)
        with self.engine.connect() as conn:
            burned_in_cycle = conn.execute(
                select(func.coalesce(func.sum(CreditBurn.amount), 0)).where(
                    CreditBurn.end_user_id == end_user_id,
                    CreditBurn.burned_at >= cycle_start)).scalar_one()
            offset = conn.execute(select(AllowanceOffset.credits).where(
                AllowanceOffset.end_user_id == end_user_id,
                AllowanceOffset.cycle_start == cycle_start)).scalar_one_or_none() or 0
        extra = int(burned_in_cycle) + int(offset) + summarise(grants, now).balance
        if assignment.plan.terms.overage is not None:
            extra += assignment.plan.terms.overage.headroom_credits
        return extra

    def set_offset_in(self, conn: Connection, end_user_id: int, cycle_start: datetime,
                      credits: int) -> None:
        """Usage of the cycle so far no longer counts against its allowance (an upgrade that
        does not carry usage over); a later such upgrade in the cycle moves it up."""
        current = conn.execute(select(AllowanceOffset.credits).where(
            AllowanceOffset.end_user_id == end_user_id,
            AllowanceOffset.cycle_start == cycle_start)).scalar_one_or_none()
        if current is None:
            conn.execute(insert(AllowanceOffset).values(
                end_user_id=end_user_id, cycle_start=cycle_start, credits=credits))
        elif credits > current:
            conn.execute(update(AllowanceOffset).where(
                AllowanceOffset.end_user_id == end_user_id,
                AllowanceOffset.cycle_start == cycle_start).values(credits=credits))
        self._forget(end_user_id)

    def _forget(self, end_user_id: int) -> None:
        self._cache.forget(lambda key: key[0] == end_user_id)

    def uses_of(self, end_user_id: int, start: datetime, end: datetime
                ) -> dict[int, UseFigures]:
        """By usage event id: how each event of the end user that happened in [start, end)
        was accounted, with its burns and overage."""
        burned = (select(CreditBurn.usage_event_id, func.sum(CreditBurn.amount).label("amount"))
                  .where(CreditBurn.end_user_id == end_user_id,
                         CreditBurn.burned_at >= start, CreditBurn.burned_at < end)
                  .group_by(CreditBurn.usage_event_id).subquery())
        # a correction's overage is its own less the overage it cancelled (of the event it
        # corrects): its figures are differences (plans.reversals)
        cancelled = aliased(CreditOverage)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(CreditUse.usage_event_id, CreditUse.tokens, CreditUse.credits,
                       CreditUse.allowance, CreditUse.uncharged, burned.c.amount,
                       CreditOverage.credits, cancelled.credits)
                .outerjoin(burned, burned.c.usage_event_id == CreditUse.usage_event_id)
                .outerjoin(CreditOverage,
                           CreditOverage.usage_event_id == CreditUse.usage_event_id)
                .outerjoin(cancelled, and_(cancelled.usage_event_id == CreditUse.supersedes_id,
                                           cancelled.cancelled_at.is_not(None)))
                .where(CreditUse.end_user_id == end_user_id,
                       CreditUse.happened_at >= start, CreditUse.happened_at < end)).all()
        return {int(r[0]): UseFigures(int(r[1]), None if r[2] is None else int(r[2]),
                                      int(r[3] or 0), int(r[5] or 0),
                                      int(r[6] or 0) - int(r[7] or 0), int(r[4] or 0))
                for r in rows}

    # -- accounting usage against allowance, credits and overage ----------------------------

    def cursor_of(self, end_user_id: int) -> int:
        """The last usage event id accounted for the end user (0: none yet)."""
        with self.engine.connect() as conn:
            last = conn.execute(select(CreditCursor.last_event_id).where(
                CreditCursor.end_user_id == end_user_id)).scalar_one_or_none()
        return int(last or 0)

    def account(self, app_id: int, end_user_id: int, assignment: Assignment,
                events: list[UsageCredits], now: datetime | None,
                mark: Callable[[Connection, list[int]], int]) -> int:
        """Account events (each not accounted before) against the allowance of their cycle,
        then the credits live when each happened, then overage; close the cycles that ended
        (rolling unused allowance over). One transaction, in which `mark` (the metering
        package's) marks the events accounted: if another run marked any first, this one
        changes nothing. On a plan without an allowance the events are accounted as
        uncharged. Returns events done."""
        now = now or self.clock()
        try:
            if assignment.plan.terms.allowance is None:
                with self.engine.begin() as conn:
                    if mark(conn, [ev.event_id for ev in events]) != len(events):
                        raise _RacedError
                    pending: dict[str, list[dict[str, Any]]] = {
                        "uses": [], "burns": [], "overages": []}
                    for ev in events:
                        use = _use(end_user_id, ev, allowance=0, uncharged=ev.credits)
                        old = None if ev.supersedes is None else accounted_of(
                            conn, ev.supersedes, pending)
                        if old is not None and ev.supersedes is not None:
                            # (the user was on a plan with an allowance before)
                            pending["burns"] += net_burns(ev.event_id, end_user_id, [],
                                                          old.burns)
                            cancel_overage(conn, ev.supersedes, pending, now)
                            use = difference(use, old, ev.supersedes)
                        pending["uses"].append(use)
                    if pending["burns"]:
                        conn.execute(insert(CreditBurn), pending["burns"])
                    if events:
                        conn.execute(insert(CreditUse), pending["uses"])
                return len(events)
            done = self._account(app_id, end_user_id, assignment, events, now, mark)
        except _RacedError:
            return 0  # another run accounted these first (its rows are committed, these not)
        except IntegrityError:
            # Two first runs creating the cursor at once: the other won. Anything else that
            # lands here recurs, so it is logged where an operator sees it.
            log.exception("accounting the usage of end user %s was refused by the database",
                          end_user_id)
            return 0
        self._forget(end_user_id)
        return done

    def _account(self, app_id: int, end_user_id: int, assignment: Assignment,
                 events: list[UsageCredits], now: datetime,
                 mark: Callable[[Connection, list[int]], int]) -> int:
        plan, terms = assignment.plan, assignment.plan.terms
        assert terms.allowance is not None
        with self.engine.begin() as conn:
            cursor = conn.execute(select(CreditCursor.__table__).where(
                CreditCursor.end_user_id == end_user_id).with_for_update()).first()
            last = cursor.last_event_id if cursor else 0
            cycle_start = cursor.cycle_start if cursor else None
            used = cursor.cycle_used if cursor else 0
            grants = self.balances(end_user_id, conn)
            offsets = dict(conn.execute(select(AllowanceOffset.cycle_start,
                                               AllowanceOffset.credits).where(
                AllowanceOffset.end_user_id == end_user_id)).all())
            burns: list[dict[str, Any]] = []
            overages: list[dict[str, Any]] = []
            uses: list[dict[str, Any]] = []
            if mark(conn, [ev.event_id for ev in events]) != len(events):
                raise _RacedError  # another run accounted some of them: it has them all
            pending = {"uses": uses, "burns": burns, "overages": overages}
            for ev in events:
                old = None if ev.supersedes is None else accounted_of(conn, ev.supersedes,
                                                                      pending)
                if old is not None and ev.supersedes is not None:
                    # give back what the corrected event was charged, before charging this
                    for grant in grants:
                        grant.burned -= sum(a for g, a, _at in old.burns if g == grant.id)
                    cancel_overage(conn, ev.supersedes, pending, now)
                    if cycle_start is not None and cycle_start == period_of(
                            _CYCLE, old.at, assignment.anchored_at).start:
                        # the allowance it took, back to the cycle still open (a closed
                        # cycle is not re-opened: its rollover is made)
                        limit = terms.allowance + int(offsets.get(cycle_start, 0))
                        used = max(0, min(used, limit) - old.allowance)
                first_burn = len(burns)
                if ev.at < assignment.anchored_at:
                    # usage from before the user came onto this plan is not charged to it
                    uses.append(_use(end_user_id, ev, allowance=0, uncharged=ev.credits))
                    last = max(last, ev.event_id)
                    continue
                start = period_of(_CYCLE, ev.at, assignment.anchored_at).start
                if cycle_start is not None and start > cycle_start:
                    self._close_cycles(conn, app_id, end_user_id, assignment, cycle_start, used,
                                       start, grants)
                    used = 0
                elif cycle_start is not None and start < cycle_start:
                    start = cycle_start  # a late event of a closed cycle counts in the open one
                # ... as of the open cycle's start at the earliest: the credits live then
                # burn, and its overage is reported then, never into an invoice already
                # closed (as Stripe does)
                at = max(ev.at, start)
                cycle_start = start
                allowance = terms.allowance + int(offsets.get(start, 0))
                from_allowance = min(ev.credits, max(0, allowance - used))
                used += ev.credits
                rest = ev.credits - from_allowance
                for grant_id, amount in burn(grants, rest, at):
                    burns.append({"grant_id": grant_id, "end_user_id": end_user_id,
                                  "usage_event_id": ev.event_id, "amount": amount,
                                  "burned_at": at})
                    rest -= amount
                if rest > 0 and terms.overage is not None:
                    overages.append({"usage_event_id": ev.event_id, "end_user_id": end_user_id,
                                     "plan_id": plan.id, "plan_version": plan.version,
                                     "credits": rest, "happened_at": at,
                                     "cancelled_at": None})
                    rest = 0
                uses.append(_use(end_user_id, ev, allowance=from_allowance, uncharged=rest))
                last = max(last, ev.event_id)
                if old is not None and ev.supersedes is not None:
                    burns[first_burn:] = net_burns(ev.event_id, end_user_id,
                                                   burns[first_burn:], old.burns)
                    uses[-1] = difference(uses[-1], old, ev.supersedes)
            now_start = period_of(_CYCLE, now, assignment.anchored_at).start
            if cycle_start is not None and now_start > cycle_start:
                self._close_cycles(conn, app_id, end_user_id, assignment, cycle_start, used,
                                   now_start, grants)
                cycle_start, used = now_start, 0
            if burns:
                conn.execute(insert(CreditBurn), burns)
            if overages:
                conn.execute(insert(CreditOverage), overages)
            if uses:
                conn.execute(insert(CreditUse), uses)
            values = {"last_event_id": last, "cycle_start": cycle_start, "cycle_used": used}
            if cursor is None:
                conn.execute(insert(CreditCursor).values(end_user_id=end_user_id, **values))
            else:
                moved = conn.execute(update(CreditCursor).where(
                    CreditCursor.end_user_id == end_user_id,
                    CreditCursor.last_event_id == cursor.last_event_id,
                    CreditCursor.cycle_start == cursor.cycle_start,
                    CreditCursor.cycle_used == cursor.cycle_used).values(**values))
                if moved.rowcount != 1:  # another run accounted first: leave it to that one
                    raise _RacedError
        return len(events)

    def _close_cycles(self, conn: Connection, app_id: int, end_user_id: int,
                      assignment: Assignment, start: datetime, used: int, until: datetime,
                      grants: list[GrantBalance]) -> None:
        """Roll the unused allowance of each cycle from `start` up to (not including) the one
        starting at `until` over into a credit grant, capped, live for the next cycle."""
        terms = assignment.plan.terms
        if not terms.rollover_cap or terms.allowance is None:
            return
        cycle = period_of(_CYCLE, start, assignment.anchored_at)
        for _ in range(MAX_EMPTY_CYCLES):
            if cycle.start >= until:
                break
            following = period_of(_CYCLE, cycle.end, assignment.anchored_at)
            amount = min(max(0, terms.allowance - used), terms.rollover_cap)
            external = f"rollover:{end_user_id}:{cycle.start.isoformat()}"
            exists = conn.execute(select(CreditGrant.id).where(
                CreditGrant.app_id == app_id, CreditGrant.external_id == external)).first()
            if amount > 0 and exists is None:
                new_id = conn.execute(insert(CreditGrant).values(
                    app_id=app_id, end_user_id=end_user_id, amount=amount, source="rollover",
                    priority=DEFAULT_PRIORITY, granted_at=cycle.end,
                    expires_at=following.end, external_id=external,
                    note=f"unused allowance of the cycle from {cycle.start.date()}")
                    .returning(CreditGrant.id)).scalar_one()
                grants.append(GrantBalance(new_id, amount, DEFAULT_PRIORITY, cycle.end,
                                           following.end, "rollover"))
            used = 0
            cycle = following


def _use(end_user_id: int, ev: UsageCredits, *, allowance: int, uncharged: int
         ) -> dict[str, Any]:
    return {"usage_event_id": ev.event_id, "end_user_id": end_user_id, "tokens": ev.tokens,
            "credits": ev.credits, "allowance": allowance, "uncharged": uncharged,
            "happened_at": ev.at, "supersedes_id": None}
