"""The monthly reconciliation of overage billing against the raw ledger: per end user, every
call on a plan with an allowance has been accounted (with the tokens the ledger has), each
accounted split adds up (credits = allowance + burned + overage + uncharged), the overage
those splits leave equals what was accounted as overage, what was reported to Stripe, and
what Stripe's meter summed. And the repair: calls found unaccounted are marked for the
accounting again."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import Row, select, update

from metering.accrual import AccrualService
from metering.models import UsageEvent
from plans.credits import UseFigures
from plans.overage import OverageReporter, month_of

SAMPLE = 5  # event ids shown per end user and kind of fault


@dataclass(frozen=True)
class ReconcileLine:
    end_user_id: int
    customer: str | None
    events: int                 # the ledger's calls on a plan with an allowance
    unaccounted: tuple[int, ...]  # of which never accounted (the first few ids)
    unaccounted_count: int
    mismatched: tuple[int, ...]   # accounted with other tokens, or a split not adding up
    mismatched_count: int
    ledger: int                 # overage the accounted splits of the ledger's calls leave
    accounted: int              # overage accounted (what is sent to Stripe)
    reported: int               # of which sent
    stripe: int | None          # what Stripe's meter summed (None: not asked, no customer)

    @property
    def state(self) -> str:
        if self.unaccounted_count:
            return "UNACCOUNTED"
        if self.mismatched_count:
            return "MISMATCH"
        if not (self.ledger or self.accounted or self.reported or self.stripe):
            return "ok"
        if self.customer is None:
            return "no Stripe customer"
        if self.ledger == self.accounted == self.reported == self.stripe:
            return "ok"
        return "DIFFERENCE"

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass
class _Audit:
    end_user_id: int
    events: int = 0
    unaccounted: list[int] | None = None
    mismatched: list[int] | None = None
    ledger: int = 0


class Reconciliation:
    def __init__(self, accrual: AccrualService, overage: OverageReporter) -> None:
        self.accrual = accrual
        self.overage = overage
        self.engine = accrual.engine

    def reconcile(self, period: str, *, ask_stripe: bool = True) -> list[ReconcileLine]:
        """One line per end user with calls on a plan with an allowance, or overage, in the
        month (bad input: InvalidRequestError)."""
        month_of(period)
        audits = {a.end_user_id: a for a in self._audit(period)}
        billed = {o.end_user_id: o for o in self.overage.by_user(period, ask_stripe=ask_stripe)}
        lines = []
        for end_user_id in sorted(audits.keys() | billed.keys()):
            audit = audits.get(end_user_id) or _Audit(end_user_id)
            bill = billed.get(end_user_id)
            unaccounted, mismatched = audit.unaccounted or [], audit.mismatched or []
            lines.append(ReconcileLine(
                end_user_id, bill.customer if bill else None, audit.events,
                tuple(unaccounted[:SAMPLE]), len(unaccounted), tuple(mismatched[:SAMPLE]),
                len(mismatched), audit.ledger, bill.accounted if bill else 0,
                bill.reported if bill else 0, bill.stripe if bill else None))
        return lines

    def repair(self, period: str) -> int:
        """Mark for the accounting again the month's calls that were never accounted (their
        mark lost); returns how many. `credits accrue` then accounts them."""
        marked = 0
        for audit in self._audit(period):
            if audit.unaccounted:
                with self.engine.begin() as conn:
                    marked += conn.execute(update(UsageEvent).where(
                        UsageEvent.id.in_(audit.unaccounted),
                        UsageEvent.credits_pending.is_(False))
                        .values(credits_pending=True)).rowcount
        return marked

    def _audit(self, period: str) -> Iterator[_Audit]:
        start, end = month_of(period)
        catalog = self.accrual.plans.catalog
        plans = sorted({p.id for p in catalog.plans if catalog.has_allowance(p.id)})
        if not plans:
            return
        with self.engine.connect() as conn:
            users = conn.execute(
                select(UsageEvent.end_user_id).distinct()
                .where(UsageEvent.created_at >= start, UsageEvent.created_at < end,
                       UsageEvent.plan_id.in_(plans))
                .order_by(UsageEvent.end_user_id)).scalars().all()
        for end_user_id in users:
            # the ledger first, then the accounting: an event seen accounted here had its
            # split committed with the mark's clearing, so the second read finds it
            with self.engine.connect() as conn:
                calls = conn.execute(
                    select(UsageEvent.id, UsageEvent.input_tokens + UsageEvent.output_tokens)
                    .where(UsageEvent.end_user_id == end_user_id,
                           UsageEvent.created_at >= start, UsageEvent.created_at < end,
                           UsageEvent.plan_id.in_(plans))).all()
            uses = self.accrual.credits.uses_of(end_user_id, start, end)
            yield _check(end_user_id, calls, uses)


def _check(end_user_id: int, calls: Sequence[Row[int, int]],
           uses: dict[int, UseFigures]) -> _Audit:
    audit = _Audit(end_user_id, events=len(calls), unaccounted=[], mismatched=[])
    assert audit.unaccounted is not None and audit.mismatched is not None
    for event_id, tokens in calls:
        use = uses.get(event_id)
        if use is None:  # (still pending too: the accounting has not run or is failing)
            audit.unaccounted.append(event_id)
        elif use.tokens != tokens or not use.balanced:
            audit.mismatched.append(event_id)
    for use in uses.values():
        if use.credits is None:  # accounted before the splits were kept: as accounted
            audit.ledger += use.overage
        else:
            audit.ledger += use.credits - use.allowance - use.burned - use.uncharged
    return audit
