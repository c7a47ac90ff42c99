"""Offers through the API: drafts built from the plan catalog, publishing refused with the rule
ids it breaks, versions immutable, served per jurisdiction / platform / locale, and carried by
the 402 of a user who ran out."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.models import OutboxEvent
from tests.conftest import Keys, bearer, config_from_toml, gateway_toml, make_keys
from tests.support.upstream import FakeUpstream
from tests.unit.paywall.test_offer_rules import GOOD

pytestmark = pytest.mark.integration
PLANS = """
[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 60

[[plans]]
id = "pro"
price = { amount = 2000, currency = "eur", interval = "month" }
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 200000
"""


@pytest.fixture()
def served(clean_db: Engine, pg_url: str, upstream: FakeUpstream,
           tmp_path: Path) -> Iterator[tuple[Any, Keys]]:
    from app import create_app

    app = create_app(config_from_toml(gateway_toml(upstream.base_url) + PLANS, tmp_path,
                                      database_url=pg_url))
    try:
        yield app, make_keys(app)
    finally:
        app.extensions["wiring"].engine.dispose()


def publish(client: Any, key: str, draft: dict[str, Any]) -> Any:
    created = client.post("/v1/paywall/offers", json=draft, headers=bearer(key))
    assert created.status_code == 201, created.data
    v = created.get_json()["version"]
    return client.post(f"/v1/paywall/offers/{draft['offer']}/versions/{v}/publish",
                       headers=bearer(key))


def test_a_breaking_offer_is_refused_with_its_rule_ids_and_never_served(
        served: tuple[Any, Keys], clean_db: Engine) -> None:
    app, keys = served
    client = app.test_client()
    bad = copy.deepcopy(GOOD)
    bad["offer"] = "pro-bad"
    bad["copy"]["de"]["cta_label"] = "Weiter"
    bad["copy"]["en"]["headline"] = "Unlimited AI"
    resp = publish(client, keys.app, bad)
    assert resp.status_code == 422 and resp.mimetype == "application/problem+json"
    problem = resp.get_json()
    assert problem["rules"] == ["CNS-03", "DSC-05"]
    assert {(v["rule"], v["field"]) for v in problem["violations"]} == {
        ("CNS-03", "copy.de.cta_label"), ("DSC-05", "copy.en.headline")}
    with clean_db.connect() as conn:
        types = conn.execute(select(OutboxEvent.type)).scalars().all()
    assert types == ["compliance.offer_publish_rejected"]
    listed = client.get("/v1/paywall/offers?jurisdiction=DE", headers=bearer(keys.app))
    assert listed.get_json()["data"] == []


def test_published_offers_are_served_per_jurisdiction_and_versions_never_change(
        served: tuple[Any, Keys]) -> None:
    app, keys = served
    client = app.test_client()
    assert publish(client, keys.app, GOOD).get_json()["status"] == "published"
    again = client.post("/v1/paywall/offers/pro-monthly/versions/1/publish",
                        headers=bearer(keys.app))
    assert again.status_code == 200  # idempotent

    def offers(query: str) -> dict[str, Any]:
        resp = client.get(f"/v1/paywall/offers?{query}", headers=bearer(keys.app))
        assert resp.status_code == 200, resp.data
        return dict(resp.get_json())

    ca = offers("jurisdiction=US-CA&locale=en")
    [pro] = ca["data"]
    assert ca["jurisdiction"] == "US-CA" and pro["price"] == "20.00 EUR"
    assert pro["cta_label"] == GOOD["copy"]["en"]["cta_label"]
    assert "renews automatically until you cancel" in pro["disclosure"]
    de = offers("jurisdiction=DE")["data"][0]
    assert de["cta_label"] == "Zahlungspflichtig bestellen" and de["locale"] == "de"
    assert "Widerrufsrecht: 14 Tage." in de["disclosure"] and de["price"] == "20,00\xa0€"
    fr = offers("jurisdiction=FR&locale=fr-FR")["data"][0]
    assert fr["cta_label"].startswith("Commander") and fr["jurisdiction"] == "EU-FR"
    nowhere = offers("")
    assert nowhere["jurisdiction"] == "STRICTEST"
    assert nowhere["data"][0]["cta_label"].startswith("Subscribe and pay")
    assert offers("jurisdiction=US-CA&platform=ios")["data"]
    # a target named by its country code is served to that country
    de_only = {**GOOD, "offer": "pro-de", "jurisdictions": ["de"]}
    assert publish(client, keys.app, de_only).status_code == 200
    assert {o["offer"] for o in offers("jurisdiction=DE")["data"]} == {"pro-monthly", "pro-de"}
    assert {o["offer"] for o in offers("jurisdiction=FR")["data"]} == {"pro-monthly"}
    # a new version is a draft: v1 is served until v2 is published
    changed = {**GOOD, "cancel_instructions": "Account > Billing > Cancel"}
    v2 = client.post("/v1/paywall/offers", json=changed, headers=bearer(keys.app)).get_json()
    assert v2["version"] == 2 and v2["content_hash"] != pro["content_hash"]
    assert offers("jurisdiction=US-CA")["data"][0]["version"] == 1
    client.post("/v1/paywall/offers/pro-monthly/versions/2/publish", headers=bearer(keys.app))
    assert offers("jurisdiction=US-CA")["data"][0]["version"] == 2
    # a user already on pro is offered nothing
    client.put("/v1/users/paid/plan", json={"plan": "pro"}, headers=bearer(keys.app))
    assert offers("jurisdiction=US-CA&user=paid")["data"] == []


def test_the_402_of_a_user_who_ran_out_carries_the_offers(served: tuple[Any, Keys]) -> None:
    app, keys = served
    client = app.test_client()
    publish(client, keys.app, GOOD)
    body = {"model": "gpt-4o-mini", "user": "ann", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hello"}]}
    first = client.post("/v1/chat/completions", json=body, headers=bearer(keys.app))
    first.get_data()
    first.close()
    spent = client.post("/v1/chat/completions", json=body, headers=bearer(keys.app))
    assert spent.status_code == 402
    paywall = spent.get_json()["error"]["paywall"]
    [offer] = paywall["offers"]
    assert offer["offer"] == "pro-monthly" and offer["price"] == "20.00 EUR"
    assert "Right of withdrawal" in offer["disclosure"]  # unknown location: the strictest
    event = client.get("/v1/paywall/events?user=ann&trigger=limit_reached",
                       headers=bearer(keys.app)).get_json()["data"][0]
    assert event["id"] == paywall["event_id"] and event["offers"][0]["offer"] == "pro-monthly"


def test_bad_offer_input_is_a_clear_error(served: tuple[Any, Keys]) -> None:
    app, keys = served
    client = app.test_client()
    cases = [({**GOOD, "offer": "Bad Id!"}, 422), ({**GOOD, "plan": "gold"}, 400),
             ({**GOOD, "jurisdictions": ["Atlantis"]}, 400),
             ({**GOOD, "platforms": ["fax"]}, 422), ({**GOOD, "extra": 1}, 422)]
    for draft, status in cases:
        resp = client.post("/v1/paywall/offers", json=draft, headers=bearer(keys.app))
        assert resp.status_code == status, (draft, resp.data)
        assert resp.mimetype == "application/problem+json"
    assert client.post("/v1/paywall/offers/nope/versions/1/publish",
                       headers=bearer(keys.app)).status_code == 404
    user_key = client.post("/v1/users/ann/keys", json={}, headers=bearer(keys.app)).get_json()
    assert client.post("/v1/paywall/offers", json=GOOD,
                       headers=bearer(user_key["key"])).status_code == 403
    assert client.get("/v1/paywall/offers?platform=fax",
                      headers=bearer(keys.app)).status_code == 422
    publish(client, keys.app, GOOD)
    other = client.get("/v1/paywall/offers", headers=bearer(keys.other_app)).get_json()
    assert other["data"] == []  # one tenant never sees another's offers
