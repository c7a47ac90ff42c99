"""Which plan an end user is on: an explicit assignment, else the catalog's default plan."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from core.audit import Actor, record, user_ref
from core.cache import ReadCache
from core.db import utcnow
from core.errors import InvalidRequestError, NotFoundError
from core.models import EndUser
from plans.catalog import Catalog, Plan
from plans.models import EndUserPlan


@dataclass(frozen=True)
class Assignment:
    plan: Plan
    # The billing-cycle anchor: "cycle" windows run monthly from it (for the default plan,
    # from when the end user was first seen).
    anchored_at: datetime
    explicit: bool


class PlanService:
    """Plan assignments; a worker caches an end user's for `cache_seconds`
    (MLANE_KEY_CACHE_SECONDS), read by one call at a time (ReadCache): an assignment made
    through another worker is seen within that time, one made here at once."""

    def __init__(self, engine: Engine, catalog: Catalog, *, cache_seconds: float = 2.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.catalog = catalog
        self.cache_seconds = cache_seconds
        self._cache: ReadCache[int, Assignment] = ReadCache("plans", cache_seconds,
                                                              clock=monotonic)

    def plan_of(self, end_user_id: int, conn: Connection | None = None) -> Assignment:
        """The end user's plan now. Inside a transaction, pass its connection: the read then
        sees the transaction's own writes, and never waits for a second connection from a
        pool that the transaction's rivals may hold (a deadlock until the pool times out)."""
        if conn is not None:
            return self._resolve(*self._read(conn, end_user_id))
        return self._cache.get(end_user_id, lambda: self._read_own(end_user_id))

    def _read_own(self, end_user_id: int) -> Assignment:
        with self.engine.connect() as own:
            return self._resolve(*self._read(own, end_user_id))

    @staticmethod
    def _read(conn: Connection, end_user_id: int) -> tuple[Any, datetime | None]:
        row = conn.execute(select(EndUserPlan.plan_id, EndUserPlan.anchored_at,
                                  EndUserPlan.plan_version).where(
            EndUserPlan.end_user_id == end_user_id)).first()
        created = None if row else conn.execute(select(EndUser.created_at).where(
            EndUser.id == end_user_id)).scalar_one_or_none()
        return row, created

    def prefetch(self, end_user_ids: list[int]) -> None:
        """Read the plans of many end users in two queries (a batch of reported usage), so
        that plan_of answers them from the cache."""
        now = self._cache.clock()
        wanted = [u for u in dict.fromkeys(end_user_ids) if self._cache.peek(u) is None]
        if not wanted:
            return
        with self.engine.connect() as conn:
            rows = {r[0]: r[1:] for r in conn.execute(select(
                EndUserPlan.end_user_id, EndUserPlan.plan_id, EndUserPlan.anchored_at,
                EndUserPlan.plan_version).where(EndUserPlan.end_user_id.in_(wanted)))}
            missing = [u for u in wanted if u not in rows]
            created = dict(conn.execute(select(EndUser.id, EndUser.created_at).where(
                EndUser.id.in_(missing))).all()) if missing else {}
        for u in wanted:
            self._cache.put(u, self._resolve(rows.get(u), created.get(u)), now)

    def _resolve(self, row: Any, created: datetime | None) -> Assignment:
        default = self.catalog.default
        if row is not None:
            plan_id: str = row[0]
            anchored: datetime = row[1]
            # The version the user bought; if the config no longer has it, the current one.
            plan = self.catalog.get(plan_id, row[2]) or self.catalog.get(plan_id)
            if plan is not None:
                return Assignment(plan, anchored, True)
            # A plan removed from the config: its users fall back to the default plan.
        if default is None:
            raise NotFoundError("No plans are configured.")
        return Assignment(default, created or utcnow(), False)

    def assign(self, app_id: int, end_user_id: int, plan_id: str,
               anchored_at: datetime | None = None, version: int | None = None,
               actor: Actor | None = None) -> Assignment:
        """Put an end user on a plan version (with none, the plan's current version)."""
        plan = self.catalog.get(plan_id, version)
        if plan is None:
            known = ", ".join(p.ref for p in self.catalog.plans) or "none"
            what = f"plan {plan_id!r}" + (f" version {version}" if version else "")
            raise InvalidRequestError(f"Unknown {what}; the plans are: {known}.", param="plan")
        if plan.terms.retired:
            raise InvalidRequestError(f"Plan {plan.ref} is retired: it keeps its subscribers "
                                      "but takes no new ones.", param="plan")
        anchor = anchored_at or utcnow()
        with self.engine.begin() as conn:
            before = conn.execute(select(
                EndUserPlan.plan_id, EndUserPlan.plan_version, EndUserPlan.anchored_at).where(
                EndUserPlan.end_user_id == end_user_id)).first()
            self.assign_in(conn, app_id, end_user_id, plan, anchor)
            record(conn, actor, "plan_assignment.set", target_type="end_user",
                   target_id=user_ref(conn, actor, end_user_id), app_id=app_id,
                   before=None if before is None else {
                       "plan": f"{before.plan_id}@{before.plan_version}",
                       "anchored_at": before.anchored_at},
                   after={"plan": plan.ref, "anchored_at": anchor})
        return Assignment(plan, anchor, True)

    def assign_in(self, conn: Connection, app_id: int, end_user_id: int, plan: Plan,
                  anchor: datetime) -> None:
        """Put an end user on a plan version inside the caller's transaction (billing)."""
        now = utcnow()
        values = {"end_user_id": end_user_id, "app_id": app_id, "plan_id": plan.id,
                  "plan_version": plan.version, "anchored_at": anchor, "updated_at": now}
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(EndUserPlan).values(**values)
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["end_user_id"],
            set_={"plan_id": plan.id, "plan_version": plan.version, "anchored_at": anchor,
                  "updated_at": now}))
        self._cache.drop(end_user_id)

    def unassign_in(self, conn: Connection, end_user_id: int) -> None:
        """Back to the default plan (a subscription past due or canceled)."""
        conn.execute(delete(EndUserPlan).where(EndUserPlan.end_user_id == end_user_id))
        self._cache.drop(end_user_id)


def insert_assignments(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert plan assignments as given (generated demo data; PlanService.assign does the
    rest)."""
    if rows:
        conn.execute(insert(EndUserPlan), list(rows))
