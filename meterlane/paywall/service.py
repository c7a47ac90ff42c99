"""Paywall events: recorded once per threshold and period, sent to the app through the outbox."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from meterlane.core.db import utcnow
from meterlane.core.events import EventService, new_event_id
from meterlane.core.models import EndUser
from meterlane.metering.limits import LimitEvent
from meterlane.paywall.models import PaywallEvent

LIMIT_REACHED = "limit_reached"
THRESHOLD_CROSSED = "threshold_crossed"
EVENT_TYPES = {LIMIT_REACHED: "usage.limit_reached", THRESHOLD_CROSSED: "usage.threshold_crossed"}
MAX_PAGE = 500


class PaywallService:
    def __init__(self, engine: Engine, events: EventService,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.events = events
        self.clock = clock

    def on_limit_event(self, event: LimitEvent) -> dict[str, Any]:
        """Record the event (once per threshold and period) with its webhook, in one
        transaction; returns the paywall block a 402 carries."""
        trigger = LIMIT_REACHED if event.threshold is None else THRESHOLD_CROSSED
        dedupe = (f"{event.app_id}:{event.end_user_id}:{event.limit.id}:{event.period}:"
                  f"{trigger}:{event.threshold or ''}")
        existing = self._by_dedupe(dedupe)
        if existing is not None:
            return existing
        offers: list[dict[str, Any]] = []  # offers come from the offer catalog (issue 5, part 2)
        event_id = new_event_id()
        try:
            with self.engine.begin() as conn:
                user = conn.execute(select(EndUser.external_id).where(
                    EndUser.id == event.end_user_id)).scalar_one()
                data = {"paywall_event_id": event_id, "user": user, "trigger": trigger,
                        "threshold": event.threshold, "limit": event.info,
                        "plan": {"id": event.plan.id, "version": event.plan.version},
                        "request_id": event.request_id or None, "offers": offers}
                conn.execute(insert(PaywallEvent).values(
                    event_id=event_id, app_id=event.app_id, end_user_id=event.end_user_id,
                    trigger=trigger, threshold=event.threshold, limit_id=event.limit.id,
                    used=event.used, amount=event.amount,
                    resets_at=_parse(event.info.get("resets_at")), plan_id=event.plan.id,
                    plan_version=event.plan.version, dedupe_key=dedupe,
                    body=orjson.dumps(data).decode(), created_at=self.clock()))
                self.events.publish_in(conn, event.app_id, EVENT_TYPES[trigger], data,
                                       event_id=event_id)
        except IntegrityError:  # another worker recorded it first
            found = self._by_dedupe(dedupe)
            if found is None:
                raise
            return found
        return _block(event_id, trigger, offers)

    def _by_dedupe(self, dedupe: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(PaywallEvent.event_id, PaywallEvent.trigger,
                                      PaywallEvent.body).where(
                PaywallEvent.dedupe_key == dedupe)).first()
        if row is None:
            return None
        return _block(row[0], row[1], orjson.loads(row[2]).get("offers", []))

    def events_of(self, app_id: int, end_user_id: int | None = None,
                  trigger: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The app's paywall events, newest first (optionally one user's, one trigger's)."""
        where = [PaywallEvent.app_id == app_id]
        if end_user_id is not None:
            where.append(PaywallEvent.end_user_id == end_user_id)
        if trigger is not None:
            where.append(PaywallEvent.trigger == trigger)
        with self.engine.connect() as conn:
            rows = conn.execute(select(PaywallEvent.event_id, PaywallEvent.body,
                                       PaywallEvent.created_at).where(*where).order_by(
                PaywallEvent.id.desc()).limit(min(limit, MAX_PAGE))).all()
        return [{"id": r[0], "created_at": r[2], **orjson.loads(r[1])} for r in rows]


def _block(event_id: str, trigger: str, offers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"event_id": event_id, "trigger": trigger, "offers": offers}


def _parse(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
