"""The finance service: prices, roll-ups and reports, with the roll-ups brought up to date
before a report is read (at most every `max_age`; one refresh at a time across processes)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from meterlane.core.config import Config
from meterlane.core.db import utcnow
from meterlane.finance.models import RollupState
from meterlane.finance.prices import PriceBook
from meterlane.finance.reports import Reports
from meterlane.finance.rollup import RollupRun, Rollups

log = logging.getLogger(__name__)
LOCK_KEY = 0x6D6C616E  # "mlan": the advisory lock of roll-up refreshes (Postgres)


class FinanceService:
    def __init__(self, engine: Engine, config: Config, prices: PriceBook,
                 plan_of: Callable[[int], str], clock: Callable[[], datetime] = utcnow,
                 max_age: timedelta = timedelta(seconds=30)) -> None:
        self.engine = engine
        self.prices = prices
        self.rollups = Rollups(engine, config, prices, plan_of, clock)
        self.reports = Reports(engine, config, clock)
        self.clock = clock
        self.max_age = max_age
        self._lock = threading.Lock()

    def rolled_up_at(self) -> datetime | None:
        with self.engine.connect() as conn:
            found: datetime | None = conn.execute(select(RollupState.updated_at).where(
                RollupState.name == "usage")).scalar()
        return found

    def refresh(self, progress: Callable[[int, int], None] | None = None,
                wait: bool = True) -> RollupRun | None:
        """Bring the roll-ups up to date; None when another process is at it (wait=False)."""
        if not self._lock.acquire(blocking=wait):
            return None
        try:
            if self.engine.dialect.name != "postgresql":
                return self.rollups.refresh(progress)
            with self.engine.connect() as conn:  # held for the whole refresh
                fn = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
                got = conn.execute(text(f"SELECT {fn}(:k)"), {"k": LOCK_KEY}).scalar()
                if got is False:
                    return None
                try:
                    return self.rollups.refresh(progress)
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                    conn.commit()
        finally:
            self._lock.release()

    def fresh(self) -> str | None:
        """Refresh when the roll-ups are older than max_age; when they were rolled up."""
        at = self.rolled_up_at()
        if at is None or self.clock() - _aware(at) > self.max_age:
            try:
                self.refresh(wait=at is None)
            except Exception:  # noqa: BLE001 - a report of slightly older roll-ups still helps
                log.exception("the finance roll-up failed; reporting the last one")
            at = self.rolled_up_at()
        return _aware(at).isoformat() if at is not None else None


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
