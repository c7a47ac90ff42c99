"""The paywall's chain end to end, for a user in California, Germany, France and nowhere known:
a quota reached -> paywall event -> offer -> consent -> checkout -> acknowledgment (ACK-01) ->
cancel (the jurisdiction's way: a save offer next to the button in California, Germany's
button without a login, none elsewhere) -> confirmation; every step's webhook delivered signed
to a receiver on loopback; then the evidence bundle read back (NET-02)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest

from paywall.acknowledge import TOKENS
from tests.support.consent import publish_offer
from tests.support.lifecycle import World, open_world

pytestmark = pytest.mark.integration


world = pytest.fixture(name="world")(open_world)


def _types(sent: list[dict[str, Any]], user: str) -> list[str]:
    return [e["type"] for e in sent if e["data"].get("user") == user]


@pytest.mark.parametrize("where", ["US-CA", "EU-DE", "EU-FR", None],
                         ids=["california", "germany", "france", "unknown"])
def test_the_chain_from_an_exhausted_quota_to_a_confirmed_cancellation(
        world: World, where: str | None) -> None:
    w, user = world, f"user-{(where or 'nowhere').lower()}"
    offer = publish_offer(w.as_call(), "pro")
    lite = publish_offer(w.as_call(), "lite")  # a cheaper plan: what a save offer may show
    # 1. the quota runs out: a 402 with the paywall event and the offers
    paywall = w.exhaust(user)
    assert paywall["trigger"] == "limit_reached"
    assert {o["offer"] for o in paywall["offers"]} >= {offer, lite}
    # 2-4. the offer as served there, consent to it, the checkout, Stripe's events
    sub_id, session_id = w.subscribe(user, "pro", where, email=f"{user}@example.com",
                                     offer_id=offer)
    assert w.chat(user)[0] == 200  # on the plan bought: calls go through again
    sent = w.sent()
    ack = next(e["data"] for e in sent if e["type"] == "acknowledgment.sent"
               and e["data"]["user"] == user)
    assert ack["subscription"] == sub_id and ack["checkout_session"] == session_id
    assert ack["tokens"]["missing"] == [], ack["tokens"]
    assert set(TOKENS) <= set(ack["tokens"]["required"])
    renews = {"en": "renews automatically", "de": "verlängert sich automatisch",
              "fr": "renouvelé automatiquement"}[ack["locale"]]  # in the offer's language
    assert ack["price"] in ack["text"] and renews in ack["text"]
    assert ack["cancel_policy_url"] == "https://app.example/cancel/v1"
    eu = where != "US-CA"  # the EU and an unknown place (the strictest profile) have it
    assert (ack["withdrawal_deadline"] is not None) is eu
    assert ack["jurisdiction"] == {"US-CA": "US-CA", "EU-DE": "EU-DE", "EU-FR": "EU-FR",
                                   None: "STRICTEST"}[where]
    # 5. the cancel screen: a save offer only in California, next to the cancel button
    status, screen = w.call("GET", f"/v1/subscriptions/{sub_id}/cancel-screen")
    assert status == 200, screen
    assert screen["cancel"]["path"] == f"/v1/subscriptions/{sub_id}/cancel"
    if where == "US-CA":
        assert screen["save_offer"]["offer"] == lite
        assert screen["save_offer"]["cancel_button_visible"] is True
    else:
        assert screen["save_offer"] is None and screen["save_offer_policy"] == "none"
    # 6. cancel: Germany's button without a login; elsewhere the one-step cancel
    if where == "EU-DE":
        page = w.app.test_client().get("/kuendigen/acme")
        assert page.status_code == 200 and "Verträge hier kündigen" in page.text
        form = w.app.test_client().get("/kuendigen/acme/bestaetigen")
        assert "jetzt kündigen" in form.text and 'name="contract_ref"' in form.text
        done = w.app.test_client().post("/kuendigen/acme/bestaetigen", data={
            "name": "Erika Mustermann", "email": f"{user.upper()}@Example.com",
            "contract_ref": sub_id, "kind": "ordinary"})
        assert done.status_code == 200, done.text
        assert "Kündigung eingegangen" in done.text and "Vertragsende: <strong>" in done.text
        assert re.search(r"<time datetime=\"\d{4}-\d\d-\d\dT", done.text)
    else:
        status, cancel = w.call("POST", f"/v1/subscriptions/{sub_id}/cancel",
                                {"channel": "settings", "steps": 2})
        assert status == 200 and cancel["already_cancelled"] is False, cancel
    assert w.stripe.v1.subscriptions.retrieve(sub_id).cancel_at_period_end is True
    sent = w.sent()
    types = _types(sent, user)
    chain = ["usage.limit_reached", "consent.captured", "acknowledgment.sent",
             "cancel.confirmed"]
    assert [t for t in types if t in chain] == chain
    confirmed = next(e["data"] for e in sent if e["type"] == "cancel.confirmed"
                     and e["data"]["user"] == user)
    assert confirmed["channel"] == ("de_button" if where == "EU-DE" else "settings")
    assert confirmed["effective_at"] and confirmed["received_at"]
    if where == "EU-DE":
        [declared] = [e["data"] for e in sent if e["type"] == "cancel.declaration_received"]
        assert declared["matched"] is True and declared["cancellation_id"] == \
            confirmed["cancellation_id"]
    if where == "US-CA":
        assert any(e["type"] == "save_offer.shown" and e["data"]["cancel_button_visible"]
                   for e in sent)
    # 7. the evidence bundle: what was shown, agreed, acknowledged and cancelled
    status, bundle = w.call("GET", f"/v1/compliance/evidence?subscription={sub_id}")
    assert status == 200, bundle
    assert bundle["consent"]["offer_id"] == offer
    assert bundle["consent"]["ip"] == "203.0.113.9"
    assert bundle["stripe_consent"]["checkout_session"] == session_id
    assert bundle["acknowledgment"]["ack_id"] == ack["ack_id"]
    assert [c["cancellation_id"] for c in bundle["cancellations"]] == [
        confirmed["cancellation_id"]]
    assert bundle["paywall_events"][0]["event_id"] == paywall["event_id"]
    assert bundle["access_activity"]["calls"] == 1  # what was used since it was bought
    delivered = {d["event_id"]: d["state"] for d in bundle["deliveries"]}
    ack_event = next(e["id"] for e in sent if e["type"] == "acknowledgment.sent"
                     and e["data"]["user"] == user)
    assert delivered[ack_event] == "delivered"
    assert delivered[next(e["id"] for e in sent if e["type"] == "cancel.confirmed"
                          and e["data"]["user"] == user)] == "delivered"
    assert bundle["stripe_evidence"]["customer_purchase_ip"] == "203.0.113.9"
    assert "Cancellation received" in bundle["stripe_evidence"]["cancellation_rebuttal"]
    # another app sees none of it
    status, _ = w.call("GET", f"/v1/compliance/evidence?subscription={sub_id}", key=w.other)
    assert status == 404


def test_germanys_button_confirms_receipt_without_revealing_contracts(world: World) -> None:
    w = world
    sub_id, _ = w.subscribe("hans", "pro", "EU-DE", email="hans@example.com")
    client = w.app.test_client()
    # a declaration that matches no contract is received and confirmed; nothing is cancelled
    wrong = client.post("/kuendigen/acme/bestaetigen", data={
        "name": "Hans", "email": "someone@example.com", "contract_ref": sub_id})
    assert wrong.status_code == 200 and "eingegangen" in wrong.text
    assert "Vertragsende: <strong>" not in wrong.text
    assert w.stripe.v1.subscriptions.retrieve(sub_id).cancel_at_period_end is False
    # bad input: the form again, with the reason; an unknown app: 404
    bad = client.post("/kuendigen/acme/bestaetigen", data={
        "name": "Hans", "email": "not-an-address", "contract_ref": sub_id})
    assert bad.status_code == 400 and "gültige E-Mail" in bad.text and 'value="Hans"' in bad.text
    assert client.get("/kuendigen/nobody").status_code == 404
    markup = client.post("/kuendigen/acme/bestaetigen", data={
        "name": "<script>x</script>", "email": "bad", "contract_ref": "r"})
    assert "<script>x" not in markup.text  # what was typed stays text
    # another app's subscription cannot be cancelled through this app's page
    other = client.post("/kuendigen/globex/bestaetigen", data={
        "name": "Hans", "email": "hans@example.com", "contract_ref": sub_id})
    assert other.status_code == 200
    assert w.stripe.v1.subscriptions.retrieve(sub_id).cancel_at_period_end is False
    # past the rate limit of an address, a declaration is still received and recorded, but
    # not matched here: the app handles it (and guessing goes nowhere)
    statuses = [client.post("/kuendigen/acme/bestaetigen", data={
        "name": "Hans", "email": "x@example.com", "contract_ref": "nope"}).status_code
        for _ in range(10)]
    assert set(statuses) == {200}
    late = client.post("/kuendigen/acme/bestaetigen", data={
        "name": "Hans", "email": "hans@example.com", "contract_ref": sub_id})
    assert late.status_code == 200 and "eingegangen" in late.text
    assert w.stripe.v1.subscriptions.retrieve(sub_id).cancel_at_period_end is False
    outcomes = [e["data"]["outcome"] for e in w.sent()
                if e["type"] == "cancel.declaration_received"]
    # every one recorded: the first wrong one, ten more, the one past the limit
    assert len(outcomes) == 12 and outcomes[-1] == "throttled"


def test_minnesota_asks_before_a_save_offer_and_cancel_never_waits_for_it(world: World) -> None:
    w = world
    publish_offer(w.as_call(), "lite")
    sub_id, _ = w.subscribe("minnie", "pro", "US-MN")
    status, first = w.call("GET", f"/v1/subscriptions/{sub_id}/cancel-screen")
    assert status == 200 and first["save_offer"] is None
    assert first["ask_permission"]["question"] and first["save_offer_policy"] == "ask_first"
    status, agreed = w.call("GET", f"/v1/subscriptions/{sub_id}/cancel-screen?offers=yes")
    assert agreed["save_offer"]["plan"]["id"] == "lite"
    # the cancel needs neither step
    status, cancel = w.call("POST", f"/v1/subscriptions/{sub_id}/cancel")
    assert status == 200 and cancel["confirmation"]["steps_count"] == 1
    status, bad = w.call("GET", f"/v1/subscriptions/{sub_id}/cancel-screen?offers=maybe")
    assert status == 422 or status == 400, bad
    status, _ = w.call("GET", f"/v1/subscriptions/{sub_id}/cancel-screen", key=w.other)
    assert status == 404


def test_cxl_06_an_invoice_after_the_cancellation_took_effect_raises_an_alert(
        world: World) -> None:
    w = world
    sub_id, _ = w.subscribe("carl", "pro", "US-CA")
    w.pay(sub_id, 2000)  # the period before the cancel: fine
    status, cancel = w.call("POST", f"/v1/subscriptions/{sub_id}/cancel")
    assert status == 200
    effective = datetime.fromisoformat(cancel["effective_at"])
    w.webhook("customer.subscription.updated",
              w.stripe.v1.subscriptions.retrieve(sub_id).to_dict())
    assert not [e for e in w.sent() if e["type"] == "compliance.alert"]
    # Stripe bills a period after the cancel took effect anyway (a reactivation, a bug)
    later = int(effective.timestamp()) + 60
    w.webhook("invoice.paid", {"id": "in_after_cancel", "object": "invoice",
                               "amount_paid": 2000, "currency": "eur",
                               "customer": str(w.stripe.v1.subscriptions.retrieve(
                                   sub_id).customer),
                               "parent": {"subscription_details": {"subscription": sub_id}},
                               "lines": {"data": [{"period": {"start": later,
                                                              "end": later + 86400 * 30}}]}})
    alerts = [e["data"] for e in w.sent() if e["type"] == "compliance.alert"]
    assert [a["rule_ids"] for a in alerts] == [["CXL-06"]]
    assert alerts[0]["invoice"] == "in_after_cancel"
    status, bundle = w.call("GET", f"/v1/compliance/evidence?subscription={sub_id}")
    assert bundle["charged_after_end"] == ["in_after_cancel"]
    assert "in_after_cancel" in bundle["stripe_evidence"]["cancellation_rebuttal"]
    # undone in Stripe's portal: the cancel no longer stands, and neither does the alert
    w.stripe.v1.subscriptions.update(sub_id, params={"cancel_at_period_end": False})
    w.webhook("customer.subscription.updated",
              w.stripe.v1.subscriptions.retrieve(sub_id).to_dict())
    w.webhook("invoice.paid", {"id": "in_renewed", "object": "invoice", "amount_paid": 2000,
                               "currency": "eur", "parent": {"subscription_details": {
                                   "subscription": sub_id}},
                               "customer": str(w.stripe.v1.subscriptions.retrieve(
                                   sub_id).customer),
                               "lines": {"data": [{"period": {"start": later + 86400 * 30,
                                                              "end": later + 86400 * 60}}]}})
    assert [e for e in w.sent() if e["type"] == "compliance.alert"
            and e["data"]["invoice"] == "in_renewed"] == []


def test_germanys_button_records_the_declaration_even_when_the_cancel_fails(
        world: World) -> None:
    from sqlalchemy import select

    from paywall.models import CancelDeclaration
    from plans.models import Subscription

    w = world
    sub_id, _ = w.subscribe("uwe", "pro", "EU-DE", email="uwe@example.com")
    with w.w.engine.begin() as conn:  # Stripe says it is unpaid: it cannot be changed
        conn.execute(Subscription.__table__.update().where(Subscription.id == sub_id)
                     .values(status="unpaid"))
    done = w.app.test_client().post("/kuendigen/acme/bestaetigen", data={
        "name": "Uwe", "email": "uwe@example.com", "contract_ref": sub_id})
    assert done.status_code == 200 and "eingegangen" in done.text, done.text
    assert "unpaid" not in done.text  # the contract's state is not told to the page
    with w.w.engine.connect() as conn:
        [row] = conn.execute(select(CancelDeclaration.outcome).where(
            CancelDeclaration.contract_ref == sub_id)).all()
    assert row.outcome == "failed"
    [event] = [e["data"] for e in w.sent() if e["type"] == "cancel.declaration_received"]
    assert event["outcome"] == "failed" and event["matched"] is False
    # a control character is refused before anything is tried
    bad = w.app.test_client().post("/kuendigen/acme/bestaetigen", data={
        "name": "Uwe", "email": "uwe@example.com", "contract_ref": sub_id,
        "reason": "a\x00b"})
    assert bad.status_code == 400 and "Steuerzeichen" in bad.text


@pytest.mark.parametrize("lang", ["de", "en", "fr"])
def test_the_cancellation_pages_are_in_the_chosen_language(world: World, lang: str) -> None:
    """Germany's button is German; a visitor may pick English or French. Every word of the
    pages (the typed values aside) is in that language, from templates that escape what was
    typed."""
    import re

    from tests.unit.test_locales import ENGLISH, SAME_WORD

    client = world.app.test_client()
    pages = [client.get(f"/kuendigen/acme?lang={lang}"),
             client.get(f"/kuendigen/acme/bestaetigen?lang={lang}"),
             client.post(f"/kuendigen/acme/bestaetigen?lang={lang}", data={
                 "name": "Zoë", "email": "zoe@example.com", "contract_ref": "sub_nope"})]
    refused = client.post(f"/kuendigen/acme/bestaetigen?lang={lang}", data={
        "name": "Zoë", "email": "not-an-address", "contract_ref": "sub_nope"})
    assert refused.status_code == 400
    pages.append(refused)  # the reason for a refusal is in the page's language too
    assert [p.status_code for p in pages] == [200, 200, 200, 400]
    assert f'<html lang="{lang}">' in pages[0].text
    title = {"de": "Kündigung eingegangen", "en": "Cancellation received",
             "fr": "Résiliation reçue"}[lang]
    assert f"<h1>{title}</h1>" in pages[2].text
    if lang == "en":
        return
    for page in pages:
        body = re.sub(r"<[^>]+>", " ", page.text.split("</nav>")[1])  # the words, no markup
        body = body.replace("zoe@example.com", "").replace("sub_nope", "").replace(
            "not-an-address", "")
        words = {w.lower() for w in re.findall(r"[^\W\d_]{3,}", body)}
        left = words & ENGLISH - SAME_WORD[lang]
        assert not left, (lang, left, body)
