"""Usage accounted against plan allowances, credits and overage: the ledger's events of an
end user, in order and each once, fed to the plans package's credit accounting."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.config import ModelConfig
from metering.models import UsageEvent
from plans.credits import CreditsService, UsageCredits
from plans.service import Assignment, PlanService

BATCH = 5000
ACTIVE_DAYS = 62  # accrue_all looks at end users with usage this recent


class AccrualService:
    def __init__(self, engine: Engine, credits: CreditsService, plans: PlanService,
                 models: tuple[ModelConfig, ...]) -> None:
        self.engine = engine
        self.credits = credits
        self.plans = plans
        self.tiers = {m.name: m.tier for m in models}

    def accrue(self, app_id: int, end_user_id: int, now: datetime | None = None) -> int:
        """Account the end user's usage not yet accounted; returns how many events."""
        assignment = self.plans.plan_of(end_user_id)
        terms = assignment.plan.terms
        if terms.allowance is None:
            return 0
        done = 0
        while True:
            after = self.credits.cursor_of(end_user_id)
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(UsageEvent.id, UsageEvent.input_tokens, UsageEvent.output_tokens,
                           UsageEvent.requested_model, UsageEvent.created_at)
                    .where(UsageEvent.end_user_id == end_user_id, UsageEvent.id > after)
                    .order_by(UsageEvent.id).limit(BATCH)).all()
            events = [UsageCredits(r.id, (r.input_tokens + r.output_tokens) * terms
                                   .credits_per_token(self.tiers.get(r.requested_model,
                                                                     "standard")),
                                   r.created_at) for r in rows]
            accounted = self.credits.account(app_id, end_user_id, assignment, events, now)
            done += accounted
            if len(rows) < BATCH or accounted == 0:
                return done

    def extra_allowance(self, app_id: int, end_user_id: int, assignment: Assignment,
                        now: datetime) -> int:
        """What the limits engine may let the user's allowance grow by (credits, overage),
        with their usage accounted first."""
        return self.credits.extra_allowance(
            end_user_id, assignment, now, refresh=lambda: self.accrue(app_id, end_user_id, now))

    def accrue_all(self, now: datetime, progress: Callable[[int], None] | None = None) -> int:
        """Accrue every end user with recent usage; returns how many events."""
        with self.engine.connect() as conn:
            users = conn.execute(
                select(UsageEvent.app_id, UsageEvent.end_user_id).distinct()
                .where(UsageEvent.created_at >= now - timedelta(days=ACTIVE_DAYS))).all()
        done = 0
        for i, (app_id, end_user_id) in enumerate(users, start=1):
            done += self.accrue(app_id, end_user_id, now)
            if progress is not None:
                progress(i)
        return done
