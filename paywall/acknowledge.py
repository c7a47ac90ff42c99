"""What follows a subscription checkout: the acknowledgment the subscriber keeps (ACK-01),
written with the Stripe event that completed the checkout and sent through the app's webhook;
and the check that nothing is billed after a confirmed cancellation (CXL-06).

The acknowledgment is built from the consent the checkout used (the offer version, its
jurisdiction and locale) and the plan version sold: terms, how to cancel, the first charge's
date and amount, and in the EU the withdrawal deadline with the early-start request."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from babel.dates import format_date
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine

from core import i18n
from core.db import utcnow
from core.events import EventService, new_event_id
from core.models import EndUser
from paywall import offers
from paywall.models import (
    Acknowledgment,
    CancellationRecord,
    ConsentRecord,
    OfferVersion,
    Withdrawal,
)
from paywall.service import RETENTION, jsonable
from plans import subscriptions
from plans.catalog import Catalog, Plan
from plans.terms import format_minor, minor_exponent

# ACK-01: what an acknowledgment must carry; EU/UK add the withdrawal right (CRD 8(7)).
TOKENS = ("terms", "auto_renews", "price", "how_to_cancel", "cancel_policy_url",
          "first_charge_date", "first_charge_amount", "contract_ref")
EU_TOKENS = ("withdrawal_deadline", "early_start")


def day(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d") if at else "-"


def _date(at: datetime, loc: str) -> str:
    """A date in the text of a confirmation: ISO in English, as the language writes it
    otherwise ("6. Dezember 2026")."""
    if loc == "en":
        return day(at)
    return str(format_date(at.astimezone(UTC).date(), "long", locale=loc))


def email_hash(email: str) -> str:
    return hashlib.sha256(email.strip().lower().encode()).hexdigest()


class Acknowledger:
    def __init__(self, engine: Engine, events: EventService, catalog: Catalog,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.events = events
        self.catalog = catalog
        self.clock = clock

    def on_stripe_event(self, conn: Connection, kind: str, obj: dict[str, Any], at: datetime,
                        app_id: int, end_user_id: int) -> None:
        """Called in the transaction that applies a Stripe event."""
        if kind == "checkout.session.completed" and obj.get("mode") == "subscription":
            self.acknowledge_in(conn, obj, at, app_id, end_user_id)
        elif kind == "invoice.paid":
            self._charge_after_cancel(conn, obj, at, app_id, end_user_id)

    # -- ACK-01 ------------------------------------------------------------------------------

    def acknowledge_in(self, conn: Connection, session: dict[str, Any], at: datetime,
                       app_id: int, end_user_id: int) -> dict[str, Any] | None:
        """The acknowledgment of one completed checkout (once: a replayed event finds it)."""
        found = conn.execute(select(Acknowledgment.content).where(
            Acknowledgment.checkout_session_id == session["id"])).scalar()
        if found is not None:
            return dict(orjson.loads(found))
        meta = session.get("metadata") or {}
        consent_ref = meta.get("mlane_consent")  # (only a string may reach the query)
        consent = conn.execute(select(ConsentRecord.__table__).where(
            ConsentRecord.consent_id == (consent_ref if isinstance(consent_ref, str) else ""),
            ConsentRecord.app_id == app_id)).first()
        plan = self._plan(meta.get("mlane_plan"), consent.plan_id if consent else None)
        if plan is None or plan.terms.price is None:
            return None  # not a plan this catalog sells: nothing to acknowledge
        content: dict[str, Any] = {}
        if consent is not None:
            row = conn.execute(select(OfferVersion.content).where(
                OfferVersion.app_id == app_id, OfferVersion.offer_id == consent.offer_id,
                OfferVersion.version == consent.offer_version)).scalar()
            content = orjson.loads(row) if row else {}
        profile = offers.resolve(consent.jurisdiction if consent else None)
        # CNS-05: the request to start at once, given to this offer before this checkout
        early = conn.execute(select(ConsentRecord.consent_id).where(
            ConsentRecord.app_id == app_id, ConsentRecord.end_user_id == end_user_id,
            ConsentRecord.type == "eu_early_start",
            ConsentRecord.offer_id == consent.offer_id,
            ConsentRecord.captured_at <= consent.captured_at)).first() \
            if consent is not None else None
        price = plan.terms.price
        trial = plan.terms.trial_days or 0
        first_charge = at + timedelta(days=trial)
        deadline = at + timedelta(days=profile.withdrawal_days) if profile.withdrawal_days \
            else None
        email = ((session.get("customer_details") or {}).get("email")
                 or session.get("customer_email"))
        refs = content.get("policy_refs") or {}
        amount = format_minor(price.amount, price.currency)
        subscription = session.get("subscription")
        sub_id = subscription if isinstance(subscription, str) else (
            (subscription or {}).get("id"))
        user = conn.execute(select(EndUser.external_id).where(
            EndUser.id == end_user_id)).scalar_one()
        ack_id, event_id = "ack_" + secrets.token_hex(12), new_event_id()
        loc = i18n.pick(consent.locale if consent else "en")  # the language of the offer shown
        copy = ((content.get("copy") or {}).get(loc) or {}) if isinstance(
            content.get("copy"), dict) else {}
        how = copy.get("cancel_instructions") or content.get("cancel_instructions")
        when = copy.get("cancel_deadline") or content.get("cancel_deadline")

        def _(message: str, **values: Any) -> str:
            return i18n.gettext(loc, message, **values)

        shown = amount if loc == "en" else i18n.money(price.amount, price.currency,
                                                      minor_exponent(price.currency), loc)
        per = _(price.interval)
        lines = [_("Thank you for subscribing to {plan}.", plan=plan.name),
                 _("{price} per {per}; it renews automatically until you cancel.",
                   price=shown, per=per),
                 _("Your first charge of {price} is on {date}, when your {days}-day free "
                   "trial ends.", price=shown, date=_date(first_charge, loc), days=trial)
                 if trial else _("Your first charge of {price} is on {date}.", price=shown,
                                 date=_date(first_charge, loc)),
                 _("To cancel: {how} ({deadline}). Cancellation policy: {url}.",
                   how=how or _("in your account settings"),
                   deadline=when or _("before the next billing date"),
                   url=refs.get("cancel_policy_url") or "-"),
                 _("Contract reference: {ref}.", ref=sub_id or session["id"])]
        if deadline is not None:
            lines.append(_("You may withdraw within {days} days, until {date}; you asked us "
                           "to start at once, so a withdrawal refunds the unused part.",
                           days=profile.withdrawal_days, date=_date(deadline, loc))
                         if early else
                         _("You may withdraw within {days} days, until {date}; a withdrawal "
                           "refunds what you paid in full.", days=profile.withdrawal_days,
                           date=_date(deadline, loc)))
        ack = {"ack_id": ack_id, "user": user, "subscription": sub_id,
               "checkout_session": session["id"], "consent_id": consent.consent_id
               if consent else None, "contract_ref": sub_id or session["id"],
               "plan": plan.ref, "plan_name": plan.name, "price": shown,
               "amount": price.amount, "currency": price.currency, "interval": price.interval,
               "auto_renews": True, "terms": consent.disclosure_text if consent else None,
               "how_to_cancel": how or _("account settings"),
               "cancel_policy_url": refs.get("cancel_policy_url"),
               "terms_url": refs.get("terms_url"), "refund_policy_url":
               refs.get("refund_policy_url"), "trial_days": trial,
               "trial_end": first_charge if trial else None,
               "first_charge_date": first_charge, "first_charge_amount": shown,
               "jurisdiction": profile.id, "locale": consent.locale if consent else "en",
               "withdrawal_deadline": deadline, "early_start": bool(early) if deadline
               else None, "enrolled_at": at, "text": "\n".join(lines)}
        needed = TOKENS + (EU_TOKENS if deadline is not None else ())
        missing = [t for t in needed if ack.get(t) in (None, "")]
        ack["tokens"] = {"required": list(needed), "missing": missing}
        view = jsonable(ack)
        conn.execute(insert(Acknowledgment).values(
            ack_id=ack_id, app_id=app_id, end_user_id=end_user_id,
            checkout_session_id=session["id"], subscription_id=sub_id,
            consent_id=ack["consent_id"], plan=plan.ref, jurisdiction=profile.id,
            locale=ack["locale"], email_sha256=email_hash(email) if email else None,
            started_at=at, withdrawal_deadline=deadline,
            content=orjson.dumps(view).decode(), event_id=event_id,
            created_at=self.clock(), retain_until=self.clock() + RETENTION))
        self.events.publish_in(conn, app_id, "acknowledgment.sent", view, event_id=event_id)
        if missing:  # sent anyway (the user must have it), and flagged for the operator
            self.events.publish_in(conn, app_id, "compliance.alert", {
                "rule_ids": ["ACK-01"], "subscription": sub_id, "acknowledgment": ack_id,
                "detail": f"the acknowledgment lacks {', '.join(missing)}"})
        return view

    def _plan(self, ref: str | None, plan_id: str | None) -> Plan | None:
        name, _, version = (ref or "").partition("@")
        if name and version.isdigit():
            return self.catalog.get(name, int(version))
        return self.catalog.get(plan_id) if plan_id else None

    # -- CXL-06 ------------------------------------------------------------------------------

    def _charge_after_cancel(self, conn: Connection, invoice: dict[str, Any], at: datetime,
                             app_id: int, end_user_id: int) -> None:
        """An invoice paid for a period that starts after a confirmed cancellation took effect
        (or after a withdrawal) is a charge the user was told would not come: alert the
        operator and the app. A cancellation undone since (the subscription renews again)
        is no longer a promise."""
        sub = ((invoice.get("parent") or {}).get("subscription_details") or {}).get(
            "subscription") or invoice.get("subscription")
        if not isinstance(sub, str) or not int(invoice.get("amount_paid") or 0):
            return
        starts = [int(p["start"]) for line in (invoice.get("lines") or {}).get("data") or []
                  if isinstance(p := line.get("period"), dict) and p.get("start")]
        if not starts and invoice.get("period_start"):
            starts = [int(invoice["period_start"])]
        begins = datetime.fromtimestamp(max(starts), UTC) if starts else at
        ended: tuple[str, datetime] | None = None
        withdrawn = conn.execute(select(Withdrawal.withdrawal_id, Withdrawal.requested_at).where(
            Withdrawal.subscription_id == sub, Withdrawal.app_id == app_id)).first()
        if withdrawn is not None:
            ended = (withdrawn.withdrawal_id, withdrawn.requested_at)
        else:
            state = subscriptions.cancel_state(conn, sub)
            cancelled = conn.execute(select(CancellationRecord.cancellation_id,
                                            CancellationRecord.effective_at).where(
                CancellationRecord.subscription_id == sub,
                CancellationRecord.app_id == app_id).order_by(
                CancellationRecord.id.desc()).limit(1)).first()
            still = state is not None and (state.cancel_at_period_end
                                           or state.status == "canceled")
            if cancelled is not None and cancelled.effective_at is not None and still:
                ended = (cancelled.cancellation_id, cancelled.effective_at)
        if ended is None or begins < ended[1]:
            return
        self.events.publish_in(conn, app_id, "compliance.alert", {
            "rule_ids": ["CXL-06"], "subscription": sub, "invoice": invoice.get("id"),
            "ended_by": ended[0],
            "detail": f"invoice {invoice.get('id')} charged {invoice.get('amount_paid')} for "
                      f"a period from {day(begins)}, after the subscription ended for the "
                      f"user on {day(ended[1])} ({ended[0]}): refund it"})


def of_subscription(conn: Connection, app_id: int, subscription_id: str) -> Any:
    """The acknowledgment row of a subscription (None: not bought through a checkout here)."""
    return conn.execute(select(Acknowledgment.__table__).where(
        Acknowledgment.app_id == app_id,
        Acknowledgment.subscription_id == subscription_id).order_by(
        Acknowledgment.id.desc()).limit(1)).first()
