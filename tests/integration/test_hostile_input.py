"""What a client sends is checked once, at the edge: a control character, an integer outside 64
bits, a time outside what the databases and period arithmetic hold, is a 400 in the route's
own envelope (problem+json, or OpenAI's on the gateway), never a 500, and nothing reaches the
ledger. Real Postgres, the app in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from core.config import Config
from tests.conftest import Keys, bearer, config_from_toml, gateway_toml, make_keys
from tests.integration.test_gateway import CHAT, chat, ledger
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
PLANS = """
[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 100000
"""


@pytest.fixture()
def planned(clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Path) -> Any:
    from app import create_app

    config: Config = config_from_toml(gateway_toml(upstream.base_url) + PLANS, tmp_path,
                                      database_url=pg_url)
    app = create_app(config)
    yield app.test_client(), make_keys(app)
    app.extensions["wiring"].engine.dispose()


def track(key: str = "job-1", **extra: Any) -> dict[str, Any]:
    return {"user": "ann", "model": "gpt-4o-mini", "idempotency_key": key,
            "usage": {"input_tokens": 10, "output_tokens": 5}, **extra}


@pytest.mark.parametrize("body", [
    track("k\x00ey"), track("k\x01ey"), track("line\nbreak"), track("tab\tkey"),
    track(model="gpt\x00"), track(user="an\x00n"), track(user="an\nn"),
    track(note=2**70),  # an integer outside 64 bits, anywhere in the body
    track(usage={"input_tokens": 2**64}),
])
def test_text_and_numbers_no_database_takes_are_a_400_and_nothing_is_recorded(
        client: Any, keys: Keys, clean_db: Engine, body: dict[str, Any]) -> None:
    resp = client.post("/v1/meter/track", json=body, headers=bearer(keys.app))
    assert resp.status_code in (400, 422), resp.data  # on main: 201, then a poisoned spool
    assert resp.mimetype == "application/problem+json"
    assert ledger(clean_db) == []


def test_a_batch_with_one_bad_event_records_none_of_them(client: Any, keys: Keys,
                                                         clean_db: Engine) -> None:
    events = [track(f"ok-{i}") for i in range(5)] + [track("bad\x07key")]
    resp = client.post("/v1/meter/track/batch", json={"events": events},
                       headers=bearer(keys.app))
    assert resp.status_code in (400, 422)
    assert ledger(clean_db) == []


def test_a_batch_is_all_or_nothing_and_its_outcomes_are_the_ledgers(
        planned: Any, clean_db: Engine) -> None:
    client, keys = planned
    h = bearer(keys.app)
    assert client.post("/v1/meter/track", json=track("seen"), headers=h).status_code == 201
    resp = client.post("/v1/meter/track/batch", json={"events": [
        track("a"), track("seen"), track("b")]}, headers=h)
    assert resp.status_code == 201
    body = resp.get_json()
    assert [d["outcome"] for d in body["data"]] == ["tracked", "duplicate", "tracked"]
    assert (body["tracked"], body["duplicates"]) == (2, 1)
    assert sorted(r.idempotency_key for r in ledger(clean_db)) == ["a", "b", "seen"]


@pytest.mark.parametrize("query", [
    "from=9999-12-31T23:00:00-05:00", "to=0001-01-01T00:30:00%2B05:00", "from=0001-01-01",
    "from=9999-12-31", "user=%00", "user=a%0Ab", "group_by=model%01",
])
def test_times_and_parameters_out_of_range_are_a_400(client: Any, keys: Keys,
                                                     query: str) -> None:
    for path in ("/v1/usage", "/v1/usage/routing"):
        resp = client.get(f"{path}?{query}", headers=bearer(keys.app))
        assert resp.status_code in (400, 422), (path, query, resp.data)  # on main: some 500s


@pytest.mark.parametrize("when", ["9999-12-31T23:59:00-05:00", "0001-01-01T00:00:00+05:00",
                                  "1969-12-31T23:59:59Z", "9000-01-01T00:00:00Z"])
def test_dates_a_plan_credits_or_prices_carry_stay_in_range(planned: Any, when: str) -> None:
    client, keys = planned
    h = bearer(keys.app)
    for resp in (
            client.put("/v1/users/ann/plan", json={"plan": "free", "anchored_at": when},
                       headers=h),
            client.post("/v1/users/ann/credits/grants", json={
                "amount": 10, "external_id": "g1", "expires_at": when}, headers=h),
            client.post("/v1/prices", json={"model": "gpt-4o-mini", "input": "1",
                                            "output": "1", "effective_from": when},
                        headers=bearer(keys.admin))):
        assert resp.status_code in (400, 422), (when, resp.data)
        assert resp.mimetype == "application/problem+json"


@pytest.mark.parametrize("path", ["/v1/users/a%00b/quota", "/v1/users/a%0Db/credits",
                                  "/v1/users/" + "x" * 3000 + "/quota"])
def test_path_parameters_are_checked_too(planned: Any, path: str) -> None:
    client, keys = planned
    resp = client.get(path, headers=bearer(keys.app))
    assert resp.status_code in (400, 404), resp.data
    assert resp.mimetype == "application/problem+json"


@pytest.mark.parametrize("body", [
    chat(user="ann\x00"), chat(user="ann", max_tokens=2**70), chat(user="ann", n=10**20),
    chat(user="ann", max_tokens=10**10), chat(user="ann", max_completion_tokens=-1),
])
def test_the_gateway_refuses_bad_input_in_openais_envelope(client: Any, keys: Keys,
                                                          clean_db: Engine,
                                                          body: dict[str, Any]) -> None:
    resp = client.post(CHAT, json=body, headers=bearer(keys.app))
    assert resp.status_code == 400, resp.data
    assert resp.get_json()["error"]["type"] == "invalid_request_error"
    assert ledger(clean_db) == []


@pytest.mark.parametrize("body", [
    track("id\u202e\u2066x"), track(model="gpt-4o-mini\u202e\u200b"),  # invisible marks
    track(usage={"input_tokens": 10, "cached_input_tokens": 10**8}),  # parts past the whole
    track(usage={"input_tokens": 10, "cache_write_tokens": 11}),
    track(usage={"input_tokens": 10, "output_tokens": 10, "reasoning_tokens": 10**8}),
])
def test_identifiers_with_invisible_marks_and_contradictory_counts_are_refused(
        planned: Any, clean_db: Engine, body: dict[str, Any]) -> None:
    client, keys = planned
    resp = client.post("/v1/meter/track", json=body, headers=bearer(keys.app))
    assert resp.status_code == 422, resp.data  # on main: stored as they came
    assert ledger(clean_db) == []


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/users/ann/credits/grants", {"amount": 10, "external_id": "g\n1\t"}),
    ("/v1/users/ann/keys", {"name": "k\r\nx"}),
    ("/v1/paywall/offers", {"offer": "promo\n", "plan": "free"}),
    ("/v1/paywall/offers", {"offer": "promo", "plan": "free\u200b"}),
    ("/v1/paywall/consents", {"user": "ann", "type": "tos", "offer": "x", "version": 1,
                              "content_hash": "0" * 64, "disclosure_sha256": "0" * 64,
                              "rendered_price": "1", "ip": "1.2.3.4\n\tevil",
                              "render_manifest": {}}),
])
def test_every_identifier_of_every_request_is_one_printable_line(
        planned: Any, path: str, body: dict[str, Any]) -> None:
    client, keys = planned
    resp = client.post(path, json=body, headers=bearer(keys.app))
    assert resp.status_code == 422, (path, resp.data)
    assert resp.mimetype == "application/problem+json"


@pytest.mark.parametrize("stream", ["true", 1, "yes", {}])
def test_stream_is_true_or_false_or_a_400(client: Any, keys: Keys, clean_db: Engine,
                                          stream: Any) -> None:
    resp = client.post(CHAT, json=chat(user="ann", stream=stream), headers=bearer(keys.app))
    assert resp.status_code == 400  # on main: sent on; an upstream that streamed was unbilled
    assert resp.get_json()["error"]["param"] == "stream"
    assert ledger(clean_db) == []


@pytest.mark.parametrize(("field", "value"), [
    ("name", "Erika\x85Muster"), ("contract_ref", "sub_\x9b1"), ("contract_ref", "sub\n1"),
    ("name", "Eri\u202eka")])
def test_the_public_cancellation_form_refuses_control_characters(
        planned: Any, clean_db: Engine, field: str, value: str) -> None:
    from sqlalchemy import func, select

    from paywall.models import CancelDeclaration

    client, _keys = planned
    form = {"name": "Erika Muster", "email": "erika@example.com", "contract_ref": "sub_1",
            "kind": "ordinary", field: value}
    resp = client.post("/kuendigen/acme/bestaetigen", data=form)
    assert resp.status_code == 400
    with clean_db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(CancelDeclaration)).scalar_one() \
            == 0
