"""The finance service: prices, roll-ups and reports, with the roll-ups brought up to date
before a report is read (at most every `max_age`; one refresh at a time across processes)."""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import insert, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from core.background import background_runner
from core.config import Config
from core.db import utcnow
from core.errors import ServiceUnavailableError
from finance.meter_prices import MeterPriceBook
from finance.models import RollupState
from finance.prices import PriceBook
from finance.reports import Reports
from finance.rollup import RollupRun, Rollups
from metering import reads as ledger

log = logging.getLogger(__name__)
LOCK_KEY = 0x6D6C616E  # "mlan": the advisory lock of roll-up refreshes (Postgres)
ROW_LOCK_SECONDS = 900
FIRST_ROLLUP_INLINE = 1_000_000  # events a first report may wait to have rolled up


class FinanceService:
    def __init__(self, engine: Engine, config: Config, prices: PriceBook,
                 plan_of: Callable[[int], str], clock: Callable[[], datetime] = utcnow,
                 max_age: timedelta = timedelta(seconds=30)) -> None:
        self.engine = engine
        self.prices = prices
        self.meter_prices = MeterPriceBook(engine, config.meters,
                                           refresh_seconds=prices.refresh_seconds, clock=clock)
        self.rollups = Rollups(engine, config, prices, plan_of, clock)
        self.reports = Reports(engine, config, clock)
        self.clock = clock
        self.max_age = max_age
        self._lock = threading.Lock()
        self._background = background_runner()

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
                token = self._take_row_lock()
                if token is None:
                    return None  # another process is at it
                try:
                    return self.rollups.refresh(progress)
                finally:
                    with self.engine.begin() as conn:  # only our own lock
                        conn.execute(update(RollupState).where(
                            RollupState.name == "lock", RollupState.last_id == token)
                            .values(last_id=0))
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

    def _take_row_lock(self) -> int | None:
        """The refresh lock where there are no advisory locks (SQLite, shared by the serve
        workers): a row holding the holder's token, its expiry in ms plus a random part (a
        killed holder's lock lapses); the token, or None when another process holds it."""
        now_ms = int(time.time() * 1000)
        token = (now_ms + ROW_LOCK_SECONDS * 1000) * 1000 + secrets.randbelow(1000)
        try:
            with self.engine.begin() as conn:
                taken = conn.execute(update(RollupState).where(
                    RollupState.name == "lock", RollupState.last_id < now_ms * 1000).values(
                    last_id=token, updated_at=self.clock())).rowcount
                if taken:
                    return token
                if conn.execute(select(RollupState.name).where(
                        RollupState.name == "lock")).first() is not None:
                    return None
                conn.execute(insert(RollupState).values(name="lock", last_id=token,
                                                        updated_at=self.clock()))
                return token
        except IntegrityError:  # taken at the same moment by another process
            return None

    def fresh(self) -> str | None:
        """When the roll-ups were brought up to date. Never rolled up: now, and the report
        waits for it; older than max_age: refreshed beside the request (a greenlet under
        serve), and this report reads the roll-ups as they are."""
        at = self.rolled_up_at()
        if at is None:
            with self.engine.connect() as conn:
                events = ledger.last_event_id(conn)
            if events > FIRST_ROLLUP_INLINE:  # minutes of work: not inside a request
                self._background(functools.partial(self._refresh_quietly, wait=False))
                raise ServiceUnavailableError(
                    f"The finance roll-ups are being built for the first time (about "
                    f"{events:,} usage events): try again in a few minutes, or run "
                    "`meterlane finance rollup`.", headers={"Retry-After": "60"})
            self._refresh_quietly(wait=True)
            at = self.rolled_up_at()
        elif self.clock() - at > self.max_age:
            self._background(functools.partial(self._refresh_quietly, wait=False))
        return at.isoformat() if at is not None else None

    def _refresh_quietly(self, wait: bool) -> None:
        try:
            self.refresh(wait=wait)
        except Exception:  # noqa: BLE001 - a report of slightly older roll-ups still helps
            log.exception("the finance roll-up failed; reports show the last one")
