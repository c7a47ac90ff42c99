"""Paywall events: recorded once per threshold and period, sent to the app through the outbox."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from meterlane.core.config import ModelConfig
from meterlane.core.db import utcnow
from meterlane.core.errors import (
    ConflictError,
    DomainError,
    InvalidRequestError,
    NotFoundError,
)
from meterlane.core.events import EventService, new_event_id
from meterlane.core.models import EndUser
from meterlane.metering.limits import LimitEvent
from meterlane.paywall import offers
from meterlane.paywall.models import OfferVersion, PaywallEvent
from meterlane.plans.catalog import Catalog

LIMIT_REACHED = "limit_reached"
THRESHOLD_CROSSED = "threshold_crossed"
EVENT_TYPES = {LIMIT_REACHED: "usage.limit_reached", THRESHOLD_CROSSED: "usage.threshold_crossed"}
MAX_PAGE = 500
OFFER_CACHE_SECONDS = 2.0


class OfferRejectedError(DomainError):
    """An offer that breaks a compliance rule is never published (nor served, nor sold)."""

    status, slug, title = 422, "offer-violates-rules", "The offer breaks compliance rules"


class PaywallService:
    def __init__(self, engine: Engine, events: EventService, catalog: Catalog | None = None,
                 models: tuple[ModelConfig, ...] = (),
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.events = events
        self.catalog = catalog or Catalog()
        self.models = models
        self.clock = clock
        self._offer_cache: dict[tuple[int, str], tuple[float, list[dict[str, Any]]]] = {}

    # -- offers ------------------------------------------------------------------------------

    def create_offer(self, app_id: int, draft: dict[str, Any]) -> dict[str, Any]:
        """A new version of an offer (its first, or the next: a version never changes)."""
        offer_id = draft["offer"]
        kind = draft.get("kind", "subscription")
        if kind == "subscription" and self.catalog.get(str(draft.get("plan"))) is None:
            raise InvalidRequestError(f"Unknown plan {draft.get('plan')!r}.", param="plan")
        if kind == "credits" and self.catalog.pack(str(draft.get("pack"))) is None:
            raise InvalidRequestError(f"Unknown credit pack {draft.get('pack')!r}.",
                                      param="pack")
        unknown = [t for t in draft.get("jurisdictions") or [] if not offers.known(t)]
        if unknown:
            raise InvalidRequestError(
                f"Unknown jurisdiction {unknown[0]!r}; use one of {', '.join(offers.TARGETS)} "
                "or a country code.", param="jurisdictions")
        content = offers.build(draft, self.catalog, self.models)
        digest = offers.content_hash(content)
        try:
            with self.engine.begin() as conn:
                last = conn.execute(select(OfferVersion.version).where(
                    OfferVersion.app_id == app_id, OfferVersion.offer_id == offer_id).order_by(
                    OfferVersion.version.desc()).limit(1).with_for_update()).scalar()
                version = (last or 0) + 1
                conn.execute(insert(OfferVersion).values(
                    app_id=app_id, offer_id=offer_id, version=version, status="draft",
                    content=orjson.dumps(content).decode(), content_hash=digest,
                    created_at=self.clock()))
        except IntegrityError as exc:  # another request took this version number
            raise ConflictError(f"Another version of offer {offer_id!r} was created at the "
                                "same time; send it again.") from exc
        return {"offer": offer_id, "version": version, "status": "draft",
                "content_hash": digest, "content": content,
                "violations": [v.as_dict() for v in offers.check(content)]}

    def publish_offer(self, app_id: int, offer_id: str, version: int) -> dict[str, Any]:
        """Run every rule for every target; publish, or refuse with the rule ids (422)."""
        with self.engine.begin() as conn:
            row = conn.execute(select(OfferVersion.status, OfferVersion.content,
                                      OfferVersion.content_hash).where(
                OfferVersion.app_id == app_id, OfferVersion.offer_id == offer_id,
                OfferVersion.version == version).with_for_update()).first()
            if row is None:
                raise NotFoundError(f"No version {version} of offer {offer_id!r}.")
            content = orjson.loads(row.content)
            result = {"offer": offer_id, "version": version, "content_hash": row.content_hash}
            if row.status == "published":
                return {**result, "status": "published"}
            violations = offers.check(content) + self._stale(content)
            if violations:
                listed = [v.as_dict() for v in violations]
                self.events.publish_in(conn, app_id, "compliance.offer_publish_rejected",
                                       {**result, "violations": listed})
            else:
                conn.execute(update(OfferVersion).where(
                    OfferVersion.app_id == app_id, OfferVersion.offer_id == offer_id,
                    OfferVersion.version == version).values(
                    status="published", published_at=self.clock()))
        if violations:
            rules = sorted({v.rule for v in violations})
            raise OfferRejectedError(
                f"Offer {offer_id!r} v{version} breaks {', '.join(rules)}; it stays a draft.",
                violations=listed, rules=rules)
        return {**result, "status": "published"}

    def _stale(self, content: dict[str, Any]) -> list[offers.Violation]:
        """An offer of a plan version that is no longer the one sold (DSC-04, DSC-05)."""
        plan = content.get("plan")
        if not isinstance(plan, dict):
            return []
        current = self.catalog.get(str(plan.get("id")))
        if current is not None and current.version == plan.get("version") \
                and not current.terms.retired:
            return []
        return [offers.Violation("DSC-05", "plan", f"plan {plan.get('id')!r} v"
                                 f"{plan.get('version')} is no longer the version sold: create "
                                 "a new offer version from the current plan", "*")]

    def served_offers(self, app_id: int, *, jurisdiction: str | None, platform: str,
                      locale: str | None, current_plan: str | None = None) -> dict[str, Any]:
        """The latest published version of each offer that targets this jurisdiction and
        platform, rendered with the disclosure and call to action it requires; unknown
        jurisdiction: the strictest profile (GEN-01)."""
        profile = offers.resolve(jurisdiction)
        with self.engine.connect() as conn:
            rows = conn.execute(select(OfferVersion.offer_id, OfferVersion.version,
                                       OfferVersion.content, OfferVersion.content_hash).where(
                OfferVersion.app_id == app_id, OfferVersion.status == "published").order_by(
                OfferVersion.offer_id, OfferVersion.version.desc())).all()
        latest: dict[str, Any] = {}
        for row in rows:
            latest.setdefault(row.offer_id, row)
        out = []
        for row in latest.values():
            content = orjson.loads(row.content)
            targets = content.get("jurisdictions") or ["*"]
            if profile.id not in targets and "*" not in targets:
                continue
            if platform not in (content.get("platforms") or ["web"]):
                continue
            plan = content.get("plan") or {}
            if current_plan is not None and plan.get("id") == current_plan:
                continue  # what the user already has is no offer
            if self._stale(content):
                continue  # the plan changed since: its copy no longer says what is sold
            out.append({"offer": row.offer_id, "version": row.version,
                        "content_hash": row.content_hash, "kind": content.get("kind"),
                        "plan": content.get("plan"), "billing": content.get("billing"),
                        "entitlements": content.get("entitlements"),
                        **offers.render(content, profile, locale)})
        return {"jurisdiction": profile.id, "platform": platform, "data": out}

    def on_limit_event(self, event: LimitEvent) -> dict[str, Any]:
        """Record the event (once per threshold and period) with its webhook, in one
        transaction; returns the paywall block a 402 carries."""
        trigger = LIMIT_REACHED if event.threshold is None else THRESHOLD_CROSSED
        # Per plan version and amount too: a user who upgrades or buys credits and runs out
        # again in the same period gets a new event.
        dedupe = (f"{event.app_id}:{event.end_user_id}:{event.plan.ref}:{event.limit.id}:"
                  f"{event.amount}:{event.period}:{trigger}:{event.threshold or ''}")
        # What the user may take now: published offers other than their plan, rendered for an
        # unknown location (the strictest profile) until the app asks with the user's own.
        offers = self._offers_for(event.app_id, event.plan.id)
        existing = self._by_dedupe(dedupe)
        if existing is not None:
            return {**existing, "offers": offers}
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

    def _offers_for(self, app_id: int, plan_id: str) -> list[dict[str, Any]]:
        """The offers a 402 carries (cached a few seconds: a burst of refusals renders once)."""
        key = (app_id, plan_id)
        now = time.monotonic()
        hit = self._offer_cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        listed = [{k: o[k] for k in ("offer", "version", "content_hash", "price", "interval",
                                     "disclosure", "cta_label", "decline_label")}
                  for o in self.served_offers(app_id, jurisdiction=None, platform="web",
                                              locale=None, current_plan=plan_id)["data"]]
        if len(self._offer_cache) > 10_000:
            self._offer_cache.clear()
        self._offer_cache[key] = (now + OFFER_CACHE_SECONDS, listed)
        return listed

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
