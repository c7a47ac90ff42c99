"""The evidence of one subscription, for a dispute or a regulator (NET-02): the consent (what
was shown and agreed to), Stripe's consent link, the acknowledgment, every notice, the
cancellations and withdrawal, the paywall events that led to the purchase, the use made of the
service, and the delivery log of every message; with the fields of Stripe's dispute evidence
filled from them."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.models import EndUser, WebhookDelivery
from metering import reads as ledger
from paywall.acknowledge import day, of_subscription
from paywall.cancel_flow import CancelFlow
from paywall.models import (
    CancelDeclaration,
    CancellationRecord,
    ConsentRecord,
    ConsentUse,
    PaywallEvent,
)
from paywall.notices import NoticeService
from paywall.service import PaywallService, _cancellation_view, _consent_view, jsonable
from paywall.withdrawals import WithdrawalService
from plans import revenue
from plans.subscriptions import SubscriptionService


class EvidenceService:
    def __init__(self, engine: Engine, subscriptions: SubscriptionService,
                 paywall: PaywallService, notices: NoticeService,
                 withdrawals: WithdrawalService, cancel_flow: CancelFlow) -> None:
        self.engine = engine
        self.subscriptions = subscriptions
        self.paywall = paywall
        self.notices = notices
        self.withdrawals = withdrawals
        self.cancel_flow = cancel_flow

    def bundle(self, app_id: int, subscription_id: str) -> dict[str, Any]:
        sub = self.subscriptions.state(app_id, subscription_id)  # 404: another app's
        with self.engine.connect() as conn:
            ack = of_subscription(conn, app_id, subscription_id)
            consent = conn.execute(select(ConsentRecord.__table__).where(
                ConsentRecord.consent_id == ack.consent_id)).first() \
                if ack is not None and ack.consent_id else None
            use = conn.execute(select(ConsentUse.checkout_session_id, ConsentUse.used_at).where(
                ConsentUse.consent_id == consent.consent_id)).first() if consent else None
            others = conn.execute(select(ConsentRecord.__table__).where(
                ConsentRecord.app_id == app_id, ConsentRecord.end_user_id == sub.end_user_id,
                ConsentRecord.type != "auto_renewal")).all()
            cancellations = conn.execute(select(CancellationRecord.__table__).where(
                CancellationRecord.app_id == app_id,
                CancellationRecord.subscription_id == subscription_id).order_by(
                CancellationRecord.id)).all()
            started = ack.started_at if ack is not None else sub.billing_anchor
            # Stripe stamps to the second: what happened here before the acknowledgment was
            # written is before the purchase
            since = ack.created_at if ack is not None else started
            paywall = conn.execute(select(PaywallEvent.event_id, PaywallEvent.trigger,
                                          PaywallEvent.limit_id, PaywallEvent.created_at).where(
                PaywallEvent.app_id == app_id, PaywallEvent.end_user_id == sub.end_user_id,
                PaywallEvent.created_at <= since).order_by(
                PaywallEvent.created_at.desc()).limit(20)).all()
            usage = ledger.usage_since(conn, app_id, sub.end_user_id, since)
            user = conn.execute(select(EndUser.external_id).where(
                EndUser.id == sub.end_user_id)).scalar_one()
            # what was charged after the subscription ended for the user (CXL-06)
            ended = cancellations[-1].effective_at if cancellations else None
            after = revenue.invoices_for_periods_from(conn, app_id, sub.end_user_id, ended) \
                if ended else []
            unmatched = conn.execute(select(CancelDeclaration.declaration_id).where(
                CancelDeclaration.app_id == app_id, CancelDeclaration.contract_ref == sub.id,
                CancelDeclaration.outcome != "cancelled")).scalars().all()
        ack_view = orjson.loads(ack.content) if ack is not None else None
        notices = self.notices.of_subscription(app_id, subscription_id)
        withdrawal = self.withdrawals.of_subscription(app_id, subscription_id)
        cancels = [_cancellation_view(dict(r._mapping)) for r in cancellations]
        declarations = self.cancel_flow.declarations_of(app_id, subscription_id)
        event_ids = ([ack.event_id] if ack is not None else []) \
            + [c["confirmation_event_id"] for c in cancels] \
            + ([withdrawal["event_id"]] if withdrawal else [])
        with self.engine.connect() as conn:
            deliveries = conn.execute(select(
                WebhookDelivery.event_id, WebhookDelivery.state, WebhookDelivery.attempts,
                WebhookDelivery.last_status, WebhookDelivery.delivered_at).where(
                WebhookDelivery.app_id == app_id,
                WebhookDelivery.event_id.in_(event_ids + [n.get("event_id") for n in notices
                                                         if n.get("event_id")]))).all() \
                if event_ids or notices else []
        consent_view = _consent_view(dict(consent._mapping)) if consent is not None else None
        activity = {"calls": int(usage[0]), "first_at": usage[1], "last_at": usage[2],
                    "tokens": int(usage[3])}
        bundle = {
            "subscription": jsonable({
                "id": sub.id, "user": user, "plan": f"{sub.plan_id}@{sub.plan_version}",
                "status": sub.status, "started_at": started,
                "current_period_end": sub.current_period_end,
                "cancel_at_period_end": sub.cancel_at_period_end}),
            "consent": jsonable(consent_view) if consent_view else None,
            "stripe_consent": jsonable({"checkout_session": use.checkout_session_id,
                                        "used_at": use.used_at}) if use else None,
            "other_consents": [jsonable(_consent_view(dict(r._mapping))) for r in others],
            "acknowledgment": ack_view, "notices": notices,
            "cancellations": [jsonable(c) for c in cancels],
            "cancel_declarations": [jsonable(d) for d in declarations],
            "withdrawal": jsonable(withdrawal) if withdrawal else None,
            "paywall_events": [jsonable(dict(r._mapping)) for r in paywall],
            "access_activity": jsonable(activity),
            "deliveries": [jsonable(dict(r._mapping)) for r in deliveries],
        }
        bundle["charged_after_end"] = list(after)
        bundle["declarations_not_matched"] = list(unmatched)
        bundle["stripe_evidence"] = _stripe_fields(bundle, activity)
        return bundle


def _stripe_fields(b: dict[str, Any], activity: dict[str, Any]) -> dict[str, Any]:
    """Stripe's dispute evidence fields (Dispute.evidence), filled from the records."""
    consent, ack = b["consent"] or {}, b["acknowledgment"] or {}
    cancels = b["cancellations"]
    refs = {k: ack.get(k) for k in ("terms_url", "cancel_policy_url", "refund_policy_url")}
    # Only what the records show: an invoice after the end, or a declaration not matched to
    # the contract, is said, not argued away.
    if not cancels:
        rebuttal = "No cancellation of this subscription is recorded."
    else:
        last = cancels[-1]
        rebuttal = (f"Cancellation received on {last['received_at']}, effective "
                    f"{last['effective_at']}. ")
        rebuttal += ("Invoices paid for periods after that date: "
                     + ", ".join(b["charged_after_end"]) + "." if b["charged_after_end"]
                     else "No invoice was paid for a period after that date.")
    if b["declarations_not_matched"]:
        rebuttal += (" Cancellation declarations naming this contract that were not matched "
                     "to it: " + ", ".join(b["declarations_not_matched"]) + ".")
    return {
        "customer_purchase_ip": consent.get("ip"),
        "service_date": ack.get("enrolled_at"),
        "cancellation_policy_disclosure": (
            f"{ack.get('how_to_cancel')}; policy: {refs['cancel_policy_url']}") if ack else None,
        "cancellation_rebuttal": rebuttal,
        "refund_policy_disclosure": refs["refund_policy_url"],
        "access_activity_log": (
            f"{activity['calls']} metered calls ({activity['tokens']} tokens) from "
            f"{day(activity['first_at'])} to {day(activity['last_at'])}")
        if activity["calls"] else "no metered calls",
        "uncategorized_text": (
            f"Consent {consent.get('consent_id')} captured {consent.get('captured_at')} "
            f"(jurisdiction {consent.get('jurisdiction')}, offer {consent.get('offer_id')} "
            f"v{consent.get('offer_version')}, control unchecked by default); acknowledgment "
            f"{ack.get('ack_id')} sent; {len(b['notices'])} notice(s) sent.")
        if consent else None,
    }
