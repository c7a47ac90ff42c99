"""Usage accounted against plan allowances, credits and overage: the ledger's events of an
end user not yet accounted (marked credits_pending), each once, fed to the plans package's
credit accounting, which clears their marks in the transaction that accounts them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.engine import Connection, Engine

from core.config import ModelConfig
from metering.models import UsageEvent
from plans.credits import CreditsService, UsageCredits
from plans.service import Assignment, PlanService

BATCH = 5000


class AccrualService:
    def __init__(self, engine: Engine, credits: CreditsService, plans: PlanService,
                 models: tuple[ModelConfig, ...]) -> None:
        self.engine = engine
        self.credits = credits
        self.plans = plans
        self.tiers = {m.name: m.tier for m in models}

    def accrue(self, app_id: int, end_user_id: int, now: datetime | None = None) -> int:
        """Account the end user's usage not yet accounted (the rows marked credits_pending,
        whatever order they committed in); returns how many events."""
        assignment = self.plans.plan_of(end_user_id)
        terms = assignment.plan.terms
        done = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(UsageEvent.id, UsageEvent.input_tokens, UsageEvent.output_tokens,
                           UsageEvent.requested_model, UsageEvent.created_at,
                           UsageEvent.supersedes_id)
                    .where(UsageEvent.end_user_id == end_user_id,
                           UsageEvent.credits_pending.is_(True))
                    .order_by(UsageEvent.id).limit(BATCH)).all()
            if not rows and terms.allowance is None:
                return done  # (no cycles to close on a plan without allowance)
            events = [UsageCredits(r.id, (r.input_tokens + r.output_tokens) * terms
                                   .credits_per_token(self.tiers.get(r.requested_model,
                                                                     "standard")),
                                   r.created_at, r.input_tokens + r.output_tokens,
                                   r.supersedes_id)
                      for r in rows]
            # (with no events too: cycles that ended since are closed, their rollover made)
            accounted = self.credits.account(app_id, end_user_id, assignment, events, now,
                                             mark=_clear)
            done += accounted
            if accounted == 0 or len(rows) < BATCH:  # done, or another run took them
                return done

    def extra_allowance(self, app_id: int, end_user_id: int, assignment: Assignment,
                        now: datetime) -> int:
        """What the limits engine may let the user's allowance grow by (credits, overage),
        with their usage accounted first."""
        return self.credits.extra_allowance(
            end_user_id, assignment, now, refresh=lambda: self.accrue(app_id, end_user_id, now))

    def accrue_all(self, now: datetime, progress: Callable[[int], None] | None = None) -> int:
        """Accrue every end user with usage not yet accounted (however old: it repairs any
        event left behind); returns how many events."""
        with self.engine.connect() as conn:
            users = conn.execute(
                select(UsageEvent.app_id, UsageEvent.end_user_id).distinct()
                .where(UsageEvent.credits_pending.is_(True))).all()
        done = 0
        for i, (app_id, end_user_id) in enumerate(users, start=1):
            done += self.accrue(app_id, end_user_id, now)
            if progress is not None:
                progress(i)
        return done


def _clear(conn: Connection, event_ids: list[int]) -> int:
    """Mark events accounted, in the caller's transaction; returns how many were still
    pending (fewer than asked: another run accounted some first)."""
    return int(conn.execute(update(UsageEvent).where(
        UsageEvent.id.in_(event_ids), UsageEvent.credits_pending.is_(True))
        .values(credits_pending=False)).rowcount)
