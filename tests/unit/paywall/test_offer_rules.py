"""One test per compliance rule (COMPLIANCE.md): a compliant offer passes everywhere; each
breach is refused naming its rule id and field. No I/O."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from core.config import ModelConfig
from paywall.offers import STRICTEST, build, check, render, resolve
from plans.catalog import parse_plans

PLANS = parse_plans(({
    "id": "pro", "price": {"amount": 2000, "currency": "eur", "interval": "month"},
    "tiers": ["standard"], "trial_days": 0, "default": True,
    "limits": [{"metric": "tokens", "window": "day", "amount": 200000}]}, {
    "id": "trial", "price": {"amount": 1000, "currency": "usd", "interval": "month"},
    "trial_days": 14}, {
    "id": "annual", "price": {"amount": 9600, "currency": "usd", "interval": "year"}}),
    "", frozenset({"gpt-4o-mini"}), frozenset({"standard"}))
MODELS = (ModelConfig("gpt-4o-mini", "cloud", "gpt-4o-mini"),)
GOOD: dict[str, Any] = {
    "offer": "pro-monthly", "plan": "pro",
    "min_commitment": "none", "cancel_instructions": "Settings > Subscription > Cancel",
    "cancel_deadline": "before the next billing date",
    "headline": {"amount": 2000, "interval": "month"},
    "tax_behavior": "inclusive",
    "policy_refs": {"terms_url": "https://app.example/terms/v3",
                    "privacy_url": "https://app.example/privacy/v2",
                    "cancel_policy_url": "https://app.example/cancel/v1",
                    "refund_policy_url": "https://app.example/refunds/v1"},
    "copy": {"en": {"headline": "Pro", "cta_label": "Subscribe and pay 20.00 EUR per month",
                    "decline_label": "Not now"},
             "de": {"headline": "Pro", "cta_label": "Zahlungspflichtig bestellen",
                    "decline_label": "Nicht jetzt"},
             "fr": {"headline": "Pro", "cta_label": "Commander avec obligation de paiement",
                    "decline_label": "Pas maintenant"}},
    "template": {"disclosure_adjacent_to_cta": True, "dismiss": True,
                 "ios_autorenew_block": True},
    "platforms": ["web", "ios", "android"],
    "jurisdictions": ["US-CA", "EU-DE", "EU-FR", "*"],
}


def offer(**changes: Any) -> dict[str, Any]:
    draft = copy.deepcopy(GOOD)
    for key, value in changes.items():
        if value is None:
            draft.pop(key, None)
        else:
            draft[key] = value
    return build(draft, PLANS, MODELS)


def rules(content: dict[str, Any]) -> set[tuple[str, str]]:
    return {(v.rule, v.field) for v in check(content)}


def test_a_compliant_offer_passes_every_target() -> None:
    content = offer()
    assert check(content) == []
    assert content["entitlements"]["models"] == ["gpt-4o-mini"]
    assert content["billing"] == {"amount": 2000, "currency": "eur", "interval": "month",
                                  "auto_renews": True, "trial_days": 0}


def test_dsc_01_material_terms_are_required() -> None:
    assert ("DSC-01", "cancel_instructions") in rules(offer(cancel_instructions=None))
    assert ("DSC-01", "min_commitment") in rules(offer(min_commitment=" "))
    assert ("DSC-01", "cancel_deadline") in rules(offer(cancel_deadline=None))
    assert ("DSC-01", "plan") in rules(offer(plan="nope"))


def test_dsc_02_disclosure_beside_the_cta() -> None:
    assert rules(offer(template={**GOOD["template"], "disclosure_adjacent_to_cta": False})) == {
        ("DSC-02", "template.disclosure_adjacent_to_cta")}


def test_dsc_03_a_trial_states_the_price_after_it_and_how_to_cancel() -> None:
    base = {"plan": "trial", "headline": {"amount": 1000, "interval": "month"}}
    found = rules(offer(**base))
    assert {("DSC-03", "trial.post_trial_amount"), ("DSC-03", "trial.cancel_before_text"),
            ("DSC-03", "trial.first_charge_date_expr")} <= found
    fixed = offer(**base, trial={"post_trial_amount": 1000,
                                 "first_charge_date_expr": "signup + 14 days",
                                 "cancel_before_text": "Cancel before day 14 to pay nothing."})
    assert not {r for r, _ in rules(fixed)} & {"DSC-03"}
    assert "Free for 14 days, then 10.00 USD every month" in render(fixed, resolve("US-CA"),
                                                                      "en")["disclosure"]


def test_dsc_04_the_headline_is_the_billed_amount() -> None:
    annual = offer(plan="annual", headline={"amount": 800, "interval": "month"})
    assert ("DSC-04", "headline") in rules(annual)
    shown = offer(equivalents=[{"amount": 67, "per": "day"}])
    assert ("DSC-04", "equivalents.0") in rules(shown)
    assert ("DSC-04", "equivalents.0") not in rules(
        offer(equivalents=[{"amount": 67, "per": "day", "subordinate": True}]))


def test_dsc_05_no_unlimited_when_the_plan_has_limits() -> None:
    bad = copy.deepcopy(GOOD["copy"])
    bad["en"]["headline"] = "Pro: unlimited AI"
    assert rules(offer(copy=bad)) == {("DSC-05", "copy.en.headline")}
    assert rules(offer(claims=[{"text": "Unlimited chats"}])) == {("DSC-05", "claims.0")}


def test_dsc_06_cancellation_and_refund_policies() -> None:
    refs = {k: v for k, v in GOOD["policy_refs"].items() if k != "refund_policy_url"}
    assert rules(offer(policy_refs=refs)) == {("DSC-06", "policy_refs.refund_policy_url")}


def test_dsc_07_tax_inclusive_prices_in_the_eu_and_no_extra_fees() -> None:
    exclusive = offer(tax_behavior="exclusive")
    assert ("DSC-07", "tax_behavior") in rules(exclusive)
    us_only = offer(tax_behavior="exclusive", jurisdictions=["US-CA", "US-NY"])
    assert check(us_only) == []  # a US-only offer may show tax on top
    assert ("DSC-07", "fees") in rules(offer(fees=[{"name": "service fee", "amount": 99}]))


def test_dsc_08_terms_privacy_and_the_ios_block() -> None:
    refs = {k: v for k, v in GOOD["policy_refs"].items() if k != "terms_url"}
    assert rules(offer(policy_refs=refs)) == {("DSC-08", "policy_refs.terms_url")}
    no_ios = offer(template={**GOOD["template"], "ios_autorenew_block": False})
    assert rules(no_ios) == {("DSC-08", "template.ios_autorenew_block")}
    assert check(offer(template={**GOOD["template"], "ios_autorenew_block": False},
                       platforms=["web"])) == []


def test_dsc_09_a_clear_decline_no_shaming_no_fake_urgency() -> None:
    assert ("DSC-09", "template.dismiss") in rules(
        offer(template={**GOOD["template"], "dismiss": False}))
    for label in ("No, I don't want to be smarter", "No thanks, I don\u2019t want to grow",
                  "I'd rather pay more later"):
        shaming = copy.deepcopy(GOOD["copy"])
        shaming["en"]["decline_label"] = label
        assert rules(offer(copy=shaming)) == {("DSC-09", "copy.en.decline_label")}, label
    assert ("DSC-09", "copy") in rules(offer(copy=None))
    fake = offer(template={**GOOD["template"], "countdown": {"seconds": 600}})
    assert rules(fake) == {("DSC-09", "template.countdown")}


def test_cns_03_the_eu_order_button_signals_payment() -> None:
    weak = copy.deepcopy(GOOD["copy"])
    weak["de"]["cta_label"] = "Weiter"
    weak["fr"]["cta_label"] = "Continuer"
    found = rules(offer(copy=weak))
    assert found == {("CNS-03", "copy.de.cta_label"), ("CNS-03", "copy.fr.cta_label")}
    dash = copy.deepcopy(GOOD["copy"])
    dash["en"]["cta_label"] = "Subscribe \u2014 pay 20.00 EUR/month"  # COMPLIANCE.md's example
    assert check(offer(copy=dash)) == []
    us = copy.deepcopy(GOOD["copy"])
    us["en"]["cta_label"] = "Get Pro"
    assert check(offer(copy=us, jurisdictions=["US-CA"])) == []  # no such rule in the US


def test_app_03_a_credit_pack_is_never_a_subscription() -> None:
    from plans.catalog import Catalog
    from plans.terms import CreditPack, Price

    catalog = Catalog(PLANS.plans, (CreditPack("100k", "100k", 100_000,
                                               Price(500, "usd", "month")),))
    draft = {**copy.deepcopy(GOOD), "kind": "credits", "pack": "100k",
             "headline": {"amount": 500, "interval": "month"}}
    assert ("APP-03", "kind") in rules(build(draft, catalog, MODELS))
    draft["auto_renews"] = True
    assert ("APP-03", "kind") in rules(build(draft, catalog, MODELS))


def test_gen_03_a_savings_claim_needs_a_real_reference_price() -> None:
    assert rules(offer(claims=[{"text": "Save 50%"}])) == {("GEN-03", "claims.0")}
    headline = copy.deepcopy(GOOD["copy"])
    headline["en"]["headline"] = "Pro, -30% today"
    assert rules(offer(copy=headline)) == {("GEN-03", "copy.en.headline")}
    assert check(offer(claims=[{"text": "Save 50%", "reference_price": 4000}])) == []


def test_gen_01_an_unknown_location_gets_the_strictest_profile() -> None:
    for code in (None, "", "ZZ", "mars"):
        assert resolve(code) is STRICTEST
    assert resolve("DE").id == "EU-DE" and resolve("fr").id == "EU-FR"
    assert resolve("US-CA").id == "US-CA" and resolve("US-TX").id == "US"
    assert resolve("IT").id == "EU"
    shown = render(offer(), resolve(None), None)
    assert shown["cta_label"].startswith("Subscribe and pay")
    assert "Right of withdrawal: 14 days." in shown["disclosure"]
    german = render(offer(), resolve("DE"), "de")
    assert german["cta_label"] == "Zahlungspflichtig bestellen"
    assert "verlängert sich automatisch" in german["disclosure"]
    assert "Right of withdrawal" not in render(offer(), resolve("US-CA"), "en")["disclosure"]


@pytest.mark.parametrize("target", ["US-CA", "EU-DE", "EU-FR", "*"])
def test_the_rendered_disclosure_carries_the_material_terms(target: str) -> None:
    profile = STRICTEST if target == "*" else resolve(target)
    shown = render(offer(), profile, profile.locale)
    price = {"de": "20,00\xa0€", "fr": "20,00\xa0€"}.get(shown["locale"], "20.00 EUR")
    assert shown["price"] == price and price in shown["disclosure"]  # as the language writes it
    assert "Settings > Subscription > Cancel" in shown["disclosure"]
    assert "gpt-4o-mini" in shown["disclosure"]
    # the policies are links with labels in the user's language, beside the disclosure
    links = {link["url"]: link["label"] for link in shown["policy_links"]}
    assert links["https://app.example/refunds/v1"] == {
        "de": "Erstattungsbedingungen", "fr": "Conditions de remboursement"}.get(
        shown["locale"], "Refund policy")


def test_the_savings_rule_reads_a_long_run_of_digits_in_linear_time() -> None:
    """A headline of 200,000 digits: the rule's pattern backtracked quadratically (minutes of
    one worker's CPU per request). The bound is generous: linear takes milliseconds."""
    import time

    from paywall.offers import SAVINGS

    started = time.process_time()
    assert SAVINGS.search("1" * 200_000) is None
    assert SAVINGS.search("1" * 200_000 + " % off") is not None
    assert time.process_time() - started < 2
