"""Consent evidence (CNS-01, CNS-02): a record of exactly what was served and agreed to, checked
against the published offer; forged, replayed or mismatched consents change nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from paywall.models import ConsentRecord
from tests.conftest import Keys, bearer, config_from_toml, gateway_toml, make_keys
from tests.integration.test_paywall_offers import PLANS
from tests.support.consent import MANIFEST, consent_for, flask_call, publish_offer
from tests.support.upstream import FakeUpstream
from tests.unit.paywall.test_offer_rules import GOOD

pytestmark = pytest.mark.integration


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


def shown(client: Any, key: str, user: str, jurisdiction: str = "DE") -> dict[str, Any]:
    data = client.get(f"/v1/paywall/offers?user={user}&jurisdiction={jurisdiction}",
                      headers=bearer(key)).get_json()["data"]
    return dict(data[0])


def body(offer: dict[str, Any], user: str, jurisdiction: str = "DE", **changes: Any) -> dict:
    out = {"user": user, "type": "auto_renewal", "offer": offer["offer"],
           "version": offer["version"], "content_hash": offer["content_hash"],
           "rendered_price": offer["price"], "jurisdiction": jurisdiction,
           "locale": offer["locale"],
           "disclosure_sha256": hashlib.sha256(offer["disclosure"].encode()).hexdigest(),
           "render_manifest": {**MANIFEST, "cta_label": offer["cta_label"]}}
    out.update(changes)
    return out


def test_cns_02_the_record_reconstructs_what_was_shown(served: tuple[Any, Keys]) -> None:
    app, keys = served
    client = app.test_client()
    publish_offer(flask_call(client, keys.app), "pro")
    offer = shown(client, keys.app, "ann")
    made = client.post("/v1/paywall/consents", json=body(offer, "ann", ip="198.51.100.4",
                                                        user_agent="Mozilla/5.0 (X11)"),
                       headers=bearer(keys.app))
    assert made.status_code == 201, made.data
    record = client.get(f"/v1/paywall/consents/{made.get_json()['consent_id']}",
                        headers=bearer(keys.app)).get_json()
    assert record["disclosure_text"] == offer["disclosure"]  # the snapshot, word for word
    assert record["jurisdiction"] == "EU-DE" and record["locale"] == "de"
    assert record["rendered_price"] == "20,00\xa0€" and record["plan_id"] == "pro"  # German
    assert record["render_manifest"]["default_state"] == "unchecked"
    assert (record["ip"], record["user_agent"]) == ("198.51.100.4", "Mozilla/5.0 (X11)")
    retain = record["retain_until"][:4]
    assert int(retain) >= int(record["captured_at"][:4]) + 3  # REC-01
    assert record["checkout_session_id"] is None
    # an end user's own key: the address and browser are what the server saw
    user_key = client.post("/v1/users/bo/keys", json={}, headers=bearer(keys.app)).get_json()
    mine = client.post("/v1/paywall/consents", json=body(offer, "bo", ip="1.2.3.4"),
                       headers=bearer(user_key["key"]),
                       environ_base={"REMOTE_ADDR": "192.0.2.9"})
    assert mine.status_code == 201 and mine.get_json()["ip"] == "192.0.2.9"


def test_forged_replayed_or_mismatched_consent_changes_nothing(
        served: tuple[Any, Keys], clean_db: Engine) -> None:
    app, keys = served
    client = app.test_client()
    call = flask_call(client, keys.app)
    publish_offer(call, "pro")
    offer = shown(client, keys.app, "cy")
    cases = [
        (body(offer, "cy", disclosure_sha256="0" * 64), 409, "CNS-02"),       # forged text
        (body(offer, "cy", content_hash="f" * 64), 409, "CNS-02"),            # another version
        (body(offer, "cy", rendered_price="1.00 EUR"), 409, "CNS-02"),        # another price
        (body(offer, "cy", jurisdiction="US-CA"), 409, "CNS-02"),             # other copy
        (body(offer, "cy", version=99), 409, "DSC-01"),                       # not published
        (body(offer, "cy", render_manifest={**MANIFEST, "cta_label": "Weiter"}), 409,
         "CNS-03"),                                                           # another button
        (body(offer, "cy", render_manifest={**MANIFEST, "default_state": "checked"}), 400,
         "CNS-01"),
        (body(offer, "cy", render_manifest={**MANIFEST, "disclosure_in_viewport": False}), 400,
         "DSC-02"),
    ]
    for payload, status, rule in cases:
        resp = client.post("/v1/paywall/consents", json=payload, headers=bearer(keys.app))
        assert resp.status_code == status, (payload, resp.data)
        assert resp.get_json()["rule"] == rule
    with clean_db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ConsentRecord)).scalar() == 0
    # another user's consent, and a consent of another app, cannot start a checkout
    theirs = consent_for(call, "dee", "pro")
    other = client.post("/v1/checkout/sessions", headers=bearer(keys.app), json={
        "user": "cy", "plan": "pro", "consent_id": theirs,
        "success_url": "https://a.example/ok", "cancel_url": "https://a.example/no"})
    assert other.status_code == 409 and other.get_json()["rule"] == "CNS-01"
    foreign = client.get(f"/v1/paywall/consents/{theirs}", headers=bearer(keys.other_app))
    assert foreign.status_code == 404
    elsewhere = client.post("/v1/checkout/sessions", headers=bearer(keys.other_app), json={
        "user": "dee", "plan": "pro", "consent_id": theirs,
        "success_url": "https://a.example/ok", "cancel_url": "https://a.example/no"})
    assert elsewhere.status_code == 409 and elsewhere.get_json()["rule"] == "CNS-01"


def test_a_consent_to_an_offer_not_served_there_is_refused(served: tuple[Any, Keys]) -> None:
    app, keys = served
    client = app.test_client()
    us_only = {**GOOD, "offer": "pro-us", "plan": "pro", "jurisdictions": ["US-CA"],
               "platforms": ["web"]}
    made = client.post("/v1/paywall/offers", json=us_only, headers=bearer(keys.app)).get_json()
    client.post(f"/v1/paywall/offers/pro-us/versions/{made['version']}/publish",
                headers=bearer(keys.app))
    offer = shown(client, keys.app, "eve", "US-CA")
    assert client.post("/v1/paywall/consents", json=body(offer, "eve", "US-CA"),
                       headers=bearer(keys.app)).status_code == 201
    german = client.post("/v1/paywall/consents", json=body(offer, "eve", "DE"),
                         headers=bearer(keys.app))
    assert german.status_code == 409 and "not what is served to EU-DE" in \
        german.get_json()["detail"]
    ios = client.post("/v1/paywall/consents", json=body(offer, "eve", "US-CA", platform="ios"),
                      headers=bearer(keys.app))
    assert ios.status_code == 409 and "on ios" in ios.get_json()["detail"]
