"""Paywall events: recorded once per threshold and period, sent to the app through the outbox."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from core.audit import Actor, record
from core.config import ModelConfig
from core.db import utcnow
from core.errors import (
    ConflictError,
    DomainError,
    InvalidRequestError,
    NotFoundError,
)
from core.events import EventService, new_event_id
from core.models import EndUser
from core.pagination import trimmed, unknown_cursor
from metering.thresholds import LimitEvent
from paywall import offers
from paywall.models import (
    CancellationRecord,
    ConsentRecord,
    ConsentUse,
    OfferVersion,
    PaywallEvent,
)
from plans.catalog import Catalog

LIMIT_REACHED = "limit_reached"
THRESHOLD_CROSSED = "threshold_crossed"
EVENT_TYPES = {LIMIT_REACHED: "usage.limit_reached", THRESHOLD_CROSSED: "usage.threshold_crossed"}
MAX_PAGE = 500
OFFER_CACHE_SECONDS = 2.0
CONSENT_TYPES = ("auto_renewal", "tos", "eu_early_start", "eu_waiver_ack", "auto_recharge")
# REC-01: at least three years (and a year past the subscription's end: the longer wins).
RETENTION = timedelta(days=3 * 366)
CLAIM_LAPSE = timedelta(hours=1)


class OfferRejectedError(DomainError):
    """An offer that breaks a compliance rule is never published (nor served, nor sold)."""

    status, slug, title = 422, "offer-violates-rules", "The offer breaks compliance rules"


class ConsentRefusedError(DomainError):
    """A consent that does not match what was served (forged, replayed, another offer)."""

    status, slug, title = 409, "consent-refused", "Consent refused"


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

    def create_offer(self, app_id: int, draft: dict[str, Any],
                     actor: Actor | None = None) -> dict[str, Any]:
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
                record(conn, actor, "offer.create", target_type="offer",
                       target_id=f"{offer_id}@{version}", app_id=app_id, after={
                           "status": "draft", "kind": kind, "content_hash": digest,
                           "plan": draft.get("plan"), "pack": draft.get("pack")})
        except IntegrityError as exc:  # another request took this version number
            raise ConflictError(f"Another version of offer {offer_id!r} was created at the "
                                "same time; send it again.") from exc
        return {"offer": offer_id, "version": version, "status": "draft",
                "content_hash": digest, "content": content,
                "violations": [v.as_dict() for v in offers.check(content)]}

    def publish_offer(self, app_id: int, offer_id: str, version: int,
                      actor: Actor | None = None) -> dict[str, Any]:
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
                record(conn, actor, "offer.publish", target_type="offer",
                       target_id=f"{offer_id}@{version}", app_id=app_id,
                       before={"status": row.status},
                       after={"status": "published", "content_hash": row.content_hash})
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

    @staticmethod
    def _servable(content: dict[str, Any], profile: offers.Profile, platform: str) -> bool:
        targets = content.get("jurisdictions") or ["*"]
        return (profile.id in targets or "*" in targets) and \
            platform in (content.get("platforms") or ["web"])

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
            if not self._servable(content, profile, platform):
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
                  trigger: str | None = None, limit: int = 100,
                  starting_after: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """The app's paywall events, newest first (optionally one user's, one trigger's), a
        page at a time: (the page, whether more follow)."""
        where = [PaywallEvent.app_id == app_id]
        if end_user_id is not None:
            where.append(PaywallEvent.end_user_id == end_user_id)
        if trigger is not None:
            where.append(PaywallEvent.trigger == trigger)
        limit = min(limit, MAX_PAGE)
        with self.engine.connect() as conn:
            if starting_after is not None:
                after = conn.execute(select(PaywallEvent.id).where(
                    PaywallEvent.app_id == app_id,
                    PaywallEvent.event_id == starting_after)).scalar()
                if after is None:  # another app's event is no cursor either
                    raise unknown_cursor(starting_after)
                where.append(PaywallEvent.id < after)
            rows = conn.execute(select(PaywallEvent.event_id, PaywallEvent.body,
                                       PaywallEvent.created_at).where(*where).order_by(
                PaywallEvent.id.desc()).limit(limit + 1)).all()
        page, more = trimmed(rows, limit)
        return [{"id": r[0], "created_at": r[2], **orjson.loads(r[1])} for r in page], more


    # -- consent (CNS-01, CNS-02, CNS-04) ------------------------------------------------

    def record_consent(self, app_id: int, end_user_id: int,
                       args: dict[str, Any]) -> dict[str, Any]:
        """Record what the user was shown and agreed to (CNS-02), after checking that it is what
        Meterlane served: the published offer version, its content hash, the disclosure and the
        price rendered for that jurisdiction and locale. Immutable once written."""
        manifest = args["render_manifest"]
        if manifest.get("default_state") != "unchecked":
            raise InvalidRequestError("CNS-01: the consent control must start unchecked "
                                      "(render_manifest.default_state = 'unchecked').",
                                      param="render_manifest", rule="CNS-01")
        if manifest.get("disclosure_in_viewport") is not True:
            raise InvalidRequestError("DSC-02: the disclosure was not in view when the user agreed "
                                      "(render_manifest.disclosure_in_viewport).",
                                      param="render_manifest", rule="DSC-02")
        with self.engine.connect() as conn:
            row = conn.execute(select(OfferVersion.status, OfferVersion.content,
                                      OfferVersion.content_hash).where(
                OfferVersion.app_id == app_id, OfferVersion.offer_id == args["offer"],
                OfferVersion.version == args["version"])).first()
        if row is None or row.status != "published":
            raise ConsentRefusedError(f"Offer {args['offer']!r} v{args['version']} is not a "
                                      "published offer: no consent can be given to it.",
                                      rule="DSC-01")
        if row.content_hash != args["content_hash"]:
            raise ConsentRefusedError("content_hash is not this offer version's: the consent names "
                                      "another version.", rule="CNS-02")
        content = orjson.loads(row.content)
        if args["type"] == "auto_renewal" and content.get("kind") != "subscription":
            raise ConsentRefusedError("An auto_renewal consent is for a subscription offer.")
        profile = offers.resolve(args.get("jurisdiction"))
        platform = args.get("platform", "web")
        with self.engine.connect() as conn:
            latest = conn.execute(select(func.max(OfferVersion.version)).where(
                OfferVersion.app_id == app_id, OfferVersion.offer_id == args["offer"],
                OfferVersion.status == "published")).scalar()
        if not self._servable(content, profile, platform) or latest != args["version"] \
                or self._stale(content):
            raise ConsentRefusedError(
                f"Offer {args['offer']!r} v{args['version']} is not what is served to "
                f"{profile.id} on {platform} (another target, platform or version).",
                rule="CNS-02")
        shown = offers.render(content, profile, args.get("locale"))
        text = shown["disclosure"]
        digest = hashlib.sha256(text.encode()).hexdigest()
        if args["disclosure_sha256"] != digest:
            raise ConsentRefusedError(
                f"The disclosure the user saw is not the one served for {profile.id} and locale "
                f"{shown['locale']!r} (its SHA-256 differs): show the served text.",
                rule="CNS-02")
        label = manifest.get("cta_label")
        if label is not None and label != shown["cta_label"]:
            raise ConsentRefusedError(f"The button the user pressed ({label!r}) is not the one "
                                      f"served ({shown['cta_label']!r}).", rule="CNS-03")
        if args["rendered_price"] != shown["price"]:
            raise ConsentRefusedError(f"rendered_price {args['rendered_price']!r} is not the "
                                      f"price served ({shown['price']!r}).", rule="CNS-02")
        now = self.clock()
        consent_id = "cns_" + secrets.token_hex(12)
        plan = content.get("plan") or {}
        values = {
            "consent_id": consent_id, "app_id": app_id, "end_user_id": end_user_id,
            "type": args["type"], "offer_id": args["offer"], "offer_version": args["version"],
            "content_hash": row.content_hash, "plan_id": plan.get("id"), "disclosure_text": text,
            "disclosure_sha256": digest, "rendered_price": shown["price"],
            "cta_label": str(shown["cta_label"])[:200],
            "locale": shown["locale"], "platform": args.get("platform", "web"),
            "jurisdiction": profile.id, "render_manifest": orjson.dumps(manifest).decode(),
            "ip": args.get("ip"), "user_agent": (args.get("user_agent") or "")[:500] or None,
            "captured_at": now, "retain_until": now + RETENTION}
        with self.engine.begin() as conn:
            conn.execute(insert(ConsentRecord).values(**values))
            user = conn.execute(select(EndUser.external_id).where(
                EndUser.id == end_user_id)).scalar_one()
            self.events.publish_in(conn, app_id, "consent.captured",
                                   {**_consent_view(values), "user": user})
        return _consent_view(values)


    def consent(self, app_id: int, consent_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(ConsentRecord.__table__).where(
                ConsentRecord.app_id == app_id, ConsentRecord.consent_id == consent_id)).first()
            use = conn.execute(select(ConsentUse.checkout_session_id, ConsentUse.used_at).where(
                ConsentUse.consent_id == consent_id)).first() if row else None
        if row is None:
            raise NotFoundError(f"No consent {consent_id!r} in this app.")
        view = _consent_view(dict(row._mapping))
        view["checkout_session_id"] = use[0] if use else None
        return view


    def claim_consent(self, app_id: int, end_user_id: int, consent_id: str | None,
                      plan_id: str) -> dict[str, Any]:
        """The consent a plan checkout needs (CNS-01): this user's auto-renewal consent to an
        offer of this plan, never used before. Claimed here; released if the checkout fails."""
        if not consent_id:
            raise ConflictError("CNS-01: a subscription checkout needs the user's recorded "
                                "auto-renewal consent: POST /v1/paywall/consents, then pass "
                                "consent_id.", code="consent_required", rule="CNS-01")
        with self.engine.connect() as conn:
            row = conn.execute(select(ConsentRecord.__table__).where(
                ConsentRecord.consent_id == consent_id, ConsentRecord.app_id == app_id)).first()
        if row is None or row.end_user_id != end_user_id:
            raise ConsentRefusedError("CNS-01: no such consent by this user.", rule="CNS-01")
        if row.type != "auto_renewal" or row.plan_id != plan_id:
            raise ConsentRefusedError(f"CNS-01: consent {consent_id} is a {row.type} consent to "
                                      f"plan {row.plan_id!r}, not an auto-renewal consent to "
                                      f"{plan_id!r}.", rule="CNS-01")
        current = self.catalog.get(plan_id)
        with self.engine.connect() as conn:
            content = conn.execute(select(OfferVersion.content).where(
                OfferVersion.app_id == app_id, OfferVersion.offer_id == row.offer_id,
                OfferVersion.version == row.offer_version)).scalar_one()
        plan = orjson.loads(content).get("plan") or {}
        if current is None or plan.get("version") != current.version:
            raise ConsentRefusedError("CNS-01: the consent was given to terms of a plan version "
                                      "no longer sold: ask again.", rule="CNS-01")
        now = self.clock()
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(ConsentUse).values(consent_id=consent_id, used_at=now))
        except IntegrityError as exc:
            # A claim whose checkout never got a session (a crash in between) lapses after an
            # hour; one with a session is a use, and a second use is a replay.
            with self.engine.begin() as conn:
                taken = conn.execute(update(ConsentUse).where(
                    ConsentUse.consent_id == consent_id,
                    ConsentUse.checkout_session_id.is_(None),
                    ConsentUse.used_at < now - CLAIM_LAPSE).values(used_at=now)).rowcount
            if taken != 1:
                raise ConsentRefusedError(f"CNS-01: consent {consent_id} was already used for a "
                                          "checkout (a replay).", rule="CNS-01") from exc
        return {"consent_id": consent_id, "disclosure": row.disclosure_text,
                "rendered_price": row.rendered_price}


    def link_consent(self, consent_id: str, session_id: str | None) -> None:
        """Tie the consent to its checkout session (CNS-04), or free it when the checkout did not
        start (session None)."""
        with self.engine.begin() as conn:
            if session_id is None:
                conn.execute(delete(ConsentUse).where(ConsentUse.consent_id == consent_id,
                                                      ConsentUse.checkout_session_id.is_(None)))
            else:
                conn.execute(update(ConsentUse).where(ConsentUse.consent_id == consent_id)
                             .values(checkout_session_id=session_id))

    # -- cancellation (CXL-01, CXL-05) --------------------------------------------------------

    def cancellation_of(self, app_id: int, subscription_id: str) -> dict[str, Any] | None:
        """The confirmed cancellation of a subscription, if it was cancelled here."""
        with self.engine.connect() as conn:
            row = conn.execute(select(CancellationRecord.__table__).where(
                CancellationRecord.app_id == app_id,
                CancellationRecord.subscription_id == subscription_id).order_by(
                CancellationRecord.id.desc()).limit(1)).first()
        return _cancellation_view(dict(row._mapping)) if row is not None else None

    def confirm_cancellation(self, app_id: int, end_user_id: int, subscription_id: str,
                             plan: str, effective_at: datetime | None, channel: str,
                             steps: int, actor: Actor | None = None) -> dict[str, Any]:
        """Record the cancellation and send its confirmation to the app (a webhook the app
        passes on to the user: received at, ends at, no further charges), in one
        transaction. A second confirmation of one subscription returns the first."""
        now = self.clock()
        event_id = new_event_id()
        plan_row = self.catalog.get(*_ref(plan))
        # Metered overage until the end of the period is still billed then.
        usage_billed = bool(plan_row is not None and plan_row.terms.overage is not None)
        values = {"cancellation_id": "cxl_" + secrets.token_hex(12), "app_id": app_id,
                  "end_user_id": end_user_id, "subscription_id": subscription_id,
                  "plan": plan, "mode": "at_period_end", "channel": channel,
                  "steps_count": steps, "requested_at": now, "effective_at": effective_at,
                  "confirmation_event_id": event_id,
                  "retain_until": max(now, effective_at or now) + RETENTION}
        view = _cancellation_view(values, usage_billed)
        with self.engine.begin() as conn:
            user = conn.execute(select(EndUser.external_id).where(
                EndUser.id == end_user_id)).scalar_one()
            conn.execute(insert(CancellationRecord).values(**values))
            record(conn, actor, "subscription.cancel", target_type="subscription",
                   target_id=subscription_id, app_id=app_id,
                   before={"plan": plan, "cancel_at_period_end": False},
                   after={"cancel_at_period_end": True, "effective_at": effective_at,
                          "channel": channel, "user": user,
                          "cancellation_id": values["cancellation_id"]})
            self.events.publish_in(conn, app_id, "cancel.confirmed",
                                   {**jsonable(view), "user": user}, event_id=event_id)
        return view


def _ref(plan: str) -> tuple[str, int | None]:
    """"pro@2" -> ("pro", 2)."""
    name, _, version = plan.partition("@")
    return name, int(version) if version.isdigit() else None


def _cancellation_view(values: dict[str, Any], usage_billed: bool = False) -> dict[str, Any]:
    effective = values.get("effective_at")
    until = (effective.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if effective
             else "the end of the paid period")
    text = (f"Your subscription is cancelled. You keep access until {until}; there will be "
            "no further subscription charges.")
    if usage_billed:
        text += " Usage beyond your allowance until then is billed at the end of the period."
    return {"cancellation_id": values["cancellation_id"],
            "subscription": values["subscription_id"], "plan": values["plan"],
            "mode": values["mode"], "channel": values["channel"],
            "steps_count": values["steps_count"], "received_at": values["requested_at"],
            "effective_at": effective, "access_until": effective,
            "no_further_charges": not usage_billed,
            "confirmation_event_id": values["confirmation_event_id"], "text": text}


def jsonable(view: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in view.items()}


def _block(event_id: str, trigger: str, offers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"event_id": event_id, "trigger": trigger, "offers": offers}


def _parse(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _consent_view(values: dict[str, Any]) -> dict[str, Any]:
    keys = ("consent_id", "type", "offer_id", "offer_version", "content_hash", "plan_id",
            "disclosure_text", "disclosure_sha256", "rendered_price", "cta_label", "locale",
            "platform", "jurisdiction", "ip", "user_agent", "captured_at", "retain_until")
    view = {k: values.get(k) for k in keys}
    manifest = values.get("render_manifest")
    view["render_manifest"] = orjson.loads(manifest) if isinstance(manifest, str) else manifest
    return view
