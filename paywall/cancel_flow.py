"""Cancelling: the one-step cancel (CXL-01, CXL-05), the cancel screen with the save offer the
user's jurisdiction allows, never in the way of the cancel button (CXL-02), and Germany's
cancellation button for users who are not logged in (CXL-03): a declaration identified by
e-mail and contract reference, confirmed on receipt whether or not it matches a contract."""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from babel.dates import format_date, format_datetime
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

from core import i18n
from core.audit import Actor
from core.db import utcnow
from core.errors import DomainError, InvalidRequestError, NotFoundError
from core.events import EventService, new_event_id
from core.models import App
from paywall import offers
from paywall.acknowledge import email_hash, of_subscription
from paywall.models import Acknowledgment, CancelDeclaration
from paywall.service import RETENTION, PaywallService, jsonable
from plans.catalog import Catalog
from plans.subscriptions import SubscriptionService, monthly_price, stripe_customer_of

log = logging.getLogger(__name__)
DECLARATIONS_PER_WINDOW, WINDOW_SECONDS = 10, 600  # per client address and app (CXL-03)
# what no field of the form may hold: C0 and C1 controls, lone surrogates, invisible
# direction and zero-width marks (the free-text reason may break lines)
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\u200b-\u200f"
                     "\u202a-\u202e\u2066-\u2069\ufeff]")
LINE_BREAKS = re.compile("[\t\n\r]")
EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{2,63}")
KINDS = ("ordinary", "extraordinary")


class CancelFlow:
    def __init__(self, engine: Engine, events: EventService, catalog: Catalog,
                 subscriptions: SubscriptionService, paywall: PaywallService,
                 clock: Callable[[], datetime] = utcnow, redis: Any = None,
                 redis_prefix: str = "ml:") -> None:
        self.engine = engine
        self.redis = redis
        self.redis_prefix = redis_prefix
        self._seen: dict[tuple[str, str], list[float]] = {}
        self._seen_lock = threading.Lock()
        self.events = events
        self.catalog = catalog
        self.subscriptions = subscriptions
        self.paywall = paywall
        self.clock = clock

    # -- CXL-01 / CXL-05 ----------------------------------------------------------------------

    def cancel(self, app_id: int, sub_id: str, channel: str, steps: int,
               actor: Actor | None = None) -> tuple[dict[str, Any], bool]:
        """Cancel at the end of the paid period and confirm it: (confirmation, whether it was
        cancelled before). While still cancelled, a repeat returns the first confirmation."""
        row = self.subscriptions.state(app_id, sub_id)
        ended = row.cancel_at_period_end or row.status == "canceled"
        done = self.paywall.cancellation_of(app_id, sub_id)
        # Still cancelled (or the webhook saying so has not come yet): the first confirmation.
        if done is not None and (ended or row.last_event_at <= done["received_at"]):
            return done, True
        if ended:  # cancelled at Stripe already (the portal, an earlier try): confirm it here
            plan, effective = f"{row.plan_id}@{row.plan_version}", row.current_period_end
        else:
            change = self.subscriptions.cancel(app_id=app_id, subscription_id=sub_id)
            plan, effective = change.plan, change.effective_at
        return self.paywall.confirm_cancellation(app_id, row.end_user_id, sub_id, plan,
                                                 effective, channel, steps, actor), False

    # -- CXL-02 -------------------------------------------------------------------------------

    def screen(self, app_id: int, sub_id: str, *, jurisdiction: str | None, locale: str | None,
               platform: str, offers_welcome: bool) -> dict[str, Any]:
        """What the cancel screen shows: always the cancel button; a save offer only where the
        jurisdiction allows one (none in the EU and Germany; at most one, next to the cancel
        button, in California and Colorado; Minnesota asks first)."""
        row = self.subscriptions.state(app_id, sub_id)
        with self.engine.connect() as conn:
            ack = of_subscription(conn, app_id, sub_id)
        # where the user bought decides (a query cannot talk a German buyer into a save
        # offer); the query names it only for a subscription not bought here
        profile = offers.resolve(ack.jurisdiction if ack is not None else jurisdiction)
        de = profile.two_step_cancel
        screen: dict[str, Any] = {
            "subscription": sub_id, "jurisdiction": profile.id,
            "save_offer_policy": profile.save_offers,
            "cancel": {"label": "Jetzt kündigen" if de else "Cancel subscription",
                       "method": "POST", "path": f"/v1/subscriptions/{sub_id}/cancel",
                       "steps": 1},
            "ask_permission": None, "save_offer": None}
        if profile.save_offers == "none" or row.status not in ("trialing", "active"):
            return screen
        if profile.save_offers == "ask_first" and not offers_welcome:
            screen["ask_permission"] = {
                "question": "Before you cancel, may we show you one other offer? You can "
                            "cancel now either way.",
                "accept": f"/v1/subscriptions/{sub_id}/cancel-screen?offers=yes"}
            return screen
        current = self.catalog.get(row.plan_id, row.plan_version)
        cheaper = [o for o in self.paywall.served_offers(
            app_id, jurisdiction=profile.id, platform=platform, locale=locale)["data"]
            if o.get("kind") == "subscription" and current is not None
            and (plan := self.catalog.get((o.get("plan") or {}).get("id") or ""))
            is not None and monthly_price(plan) < monthly_price(current)]
        if cheaper:
            offer = cheaper[0]
            screen["save_offer"] = {**offer, "cancel_button_visible": True, "step": 1}
            with self.engine.begin() as conn:
                self.events.publish_in(conn, app_id, "save_offer.shown", {
                    "subscription": sub_id, "offer": offer.get("offer"),
                    "version": offer.get("version"), "jurisdiction": profile.id,
                    "cancel_button_visible": True, "step": 1})
        return screen

    # -- CXL-03 -------------------------------------------------------------------------------

    def allowed(self, app: str, address: str) -> bool:
        """At most DECLARATIONS_PER_WINDOW declarations per address and app in WINDOW_SECONDS:
        counted in Redis when there is one (all workers), else in this process."""
        if self.redis is not None:
            key = f"{self.redis_prefix}kuendigen:{app}:{address}"
            try:
                pipe = self.redis.pipeline()
                pipe.set(key, 0, ex=WINDOW_SECONDS, nx=True)  # the window starts with the first
                pipe.incr(key)
                return int(pipe.execute()[1]) <= DECLARATIONS_PER_WINDOW
            except Exception as exc:  # noqa: BLE001 - the legal button never waits on Redis
                log.warning("kuendigen rate limit unavailable (%s): allowed", exc)
                return True
        now = time.monotonic()
        with self._seen_lock:
            for seen in [k for k, v in self._seen.items() if now - v[-1] >= WINDOW_SECONDS]:
                del self._seen[seen]  # forget addresses gone quiet: bounded memory
            stamps = [t for t in self._seen.get((app, address), []) if now - t < WINDOW_SECONDS]
            stamps.append(now)
            self._seen[(app, address)] = stamps
            return len(stamps) <= DECLARATIONS_PER_WINDOW

    def app_named(self, name: str) -> int:
        with self.engine.connect() as conn:
            app_id = conn.execute(select(App.id).where(App.name == name)).scalar()
        if app_id is None:
            raise NotFoundError(f"No app {name!r}.")
        return int(app_id)

    def declare(self, app_id: int, form: dict[str, str], *,
                throttled: bool = False, lang: str = "de") -> dict[str, Any]:
        """A cancellation declared without a login: recorded and confirmed on receipt; when
        the e-mail and contract reference match a subscription of this app, it is cancelled
        (at the end of its period) and its confirmation says when it ends."""
        def _(message: str) -> str:  # the visitor's language (German by default)
            return i18n.gettext(lang, message)

        name = (form.get("name") or "").strip()
        email = (form.get("email") or "").strip()
        ref = (form.get("contract_ref") or "").strip()
        kind = form.get("kind") or "ordinary"
        reason = (form.get("reason") or "").strip() or None
        if any(CONTROL.search(v) for v in (name, email, ref, reason or "")) \
                or any(LINE_BREAKS.search(v) for v in (name, email, ref)):
            raise InvalidRequestError(_("Please use no control characters."), param="name")
        if not name or len(name) > 200:
            raise InvalidRequestError(_("Please give your name."), param="name")
        if not EMAIL.fullmatch(email):
            raise InvalidRequestError(_("Please give a valid email address."), param="email")
        if not ref or len(ref) > 255:
            raise InvalidRequestError(_("Please give your contract number."),
                                      param="contract_ref")
        if kind not in KINDS:
            raise InvalidRequestError(_("Kind of cancellation: ordinary or extraordinary."),
                                      param="kind")
        if reason is not None and len(reason) > 1000:
            raise InvalidRequestError(_("The reason is too long (1,000 characters at most)."),
                                      param="reason")
        received = self.clock()
        declaration_id, event_id = "dcl_" + secrets.token_hex(12), new_event_id()
        with self.engine.begin() as conn:  # received: recorded before anything is tried
            conn.execute(insert(CancelDeclaration).values(
                declaration_id=declaration_id, app_id=app_id, received_at=received,
                name=name, email_sha256=email_hash(email), contract_ref=ref, kind=kind,
                reason=reason, outcome="received", event_id=event_id,
                retain_until=received + RETENTION))
        outcome, confirmation = ("throttled", None) if throttled else ("unmatched", None)
        if not throttled and self._matches(app_id, ref, email):
            try:
                confirmation, _first = self.cancel(app_id, ref, "de_button", 2)
                outcome = "cancelled"
            except DomainError as exc:  # Stripe down, an unpaid subscription: the app decides
                log.error("declaration %s matched %s but the cancel failed: %s",
                          declaration_id, ref, exc.detail)
                outcome = "failed"
        ends = confirmation["effective_at"] if confirmation else None
        view = {"declaration_id": declaration_id, "received_at": received, "name": name,
                "email": email, "contract_ref": ref, "kind": kind, "reason": reason,
                "matched": confirmation is not None, "outcome": outcome, "ends_at": ends,
                "cancellation_id": confirmation["cancellation_id"] if confirmation else None,
                "locale": i18n.pick(lang),
                "text": _confirmation_text(received, ends, ref, confirmation is not None
                                           and bool(confirmation["no_further_charges"]),
                                           lang)}
        with self.engine.begin() as conn:
            conn.execute(update(CancelDeclaration).where(
                CancelDeclaration.declaration_id == declaration_id).values(
                outcome=outcome, subscription_id=ref if confirmation else None,
                cancellation_id=view["cancellation_id"]))
            # The app sends this to the e-mail given, as the text-form confirmation (§312k(4));
            # one not matched (or whose cancel failed) is for the app to handle by hand.
            self.events.publish_in(conn, app_id, "cancel.declaration_received",
                                   jsonable(view), event_id=event_id)
        return view

    def _matches(self, app_id: int, ref: str, email: str) -> bool:
        """Whether the e-mail is the one of the contract: as Stripe gave it at checkout, or,
        for a subscription bought before acknowledgments were kept, its Stripe customer's."""
        import stripe

        digest = email_hash(email)
        with self.engine.connect() as conn:
            acked = conn.execute(select(Acknowledgment.email_sha256).where(
                Acknowledgment.app_id == app_id,
                Acknowledgment.subscription_id == ref)).scalars().all()
            customer = stripe_customer_of(conn, app_id, ref)
        if digest in acked:
            return True
        if acked and all(a is not None for a in acked) or customer is None:
            return False
        try:
            found = self.subscriptions.client().v1.customers.retrieve(customer).email
        except (stripe.StripeError, DomainError) as exc:
            log.error("could not read the e-mail of customer %s: %s", customer, exc)
            return False
        return bool(found) and email_hash(str(found)) == digest

    def declarations_of(self, app_id: int, subscription_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(
                CancelDeclaration.declaration_id, CancelDeclaration.received_at,
                CancelDeclaration.kind, CancelDeclaration.cancellation_id).where(
                CancelDeclaration.app_id == app_id,
                CancelDeclaration.subscription_id == subscription_id)).all()
        return [dict(r._mapping) for r in rows]


def _confirmation_text(received: datetime, ends: datetime | None, ref: str,
                       no_further_charges: bool, lang: str = "de") -> str:
    """The confirmation on receipt, in the language the visitor used (German by default)."""
    def _(message: str, **values: Any) -> str:
        return i18n.gettext(lang, message, **values)

    if i18n.pick(lang) == "de":
        stamp = received.strftime("%d.%m.%Y um %H:%M Uhr (UTC)")
    else:
        stamp = format_datetime(received, "medium", tzinfo=UTC, locale=i18n.pick(lang)) + \
            " (UTC)"
    if ends is None:
        return _("Your cancellation of contract {ref} was received on {stamp}. We will "
                 "confirm the end of the contract by email.", ref=ref, stamp=stamp)
    end = ends.strftime("%d.%m.%Y") if i18n.pick(lang) == "de" else format_date(
        ends, "medium", locale=i18n.pick(lang))
    after = _("no further payments are taken after that.") if no_further_charges else _(
        "usage beyond your quota until then is billed at the end of the period; no further "
        "payments are taken after that.")
    return _("Your cancellation of contract {ref} was received on {stamp}. The contract ends "
             "on {end}; {after}", ref=ref, stamp=stamp, end=end, after=after)
