"""Lists page as Stripe's do (`limit`, `starting_after`, `has_more`): every list endpoint of the
OpenAPI document says so, and walking the pages of each kind of list returns every item once,
in order, with another app's ids refused as cursors."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from core.db import utcnow
from core.pagination import page_of, trimmed
from tests.conftest import Keys, bearer

pytestmark = pytest.mark.integration

# Arrays in a GET answer that are not a list to page, and why: each is bounded by something
# other than time (the config, one subscription, one user's live grants) or is a report's
# breakdown. A new list endpoint must page, or be named here with its reason.
NOT_PAGED = {
    "/v1/admin/jobs": "one row per scheduled job",
    "/v1/compliance/evidence": "one subscription's record, a document",
    "/v1/finance/local": "one row per configured GPU upstream",
    "/v1/finance/summary": "revenue per currency",
    "/v1/me/credits": "one user's live grants",
    "/v1/users/{user}/credits": "one user's live grants",
    "/v1/me/quota": "the plan's limits",
    "/v1/users/{user}/quota": "the plan's limits",
    "/v1/paywall/offers": "the published offers of one jurisdiction and platform",
    "/v1/usage": "a report grouped by model or day of a bounded range",
    "/v1/usage/routing": "one row per configured alias",
    "/v1/users/{user}/meters": "one row per configured meter",
}


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_every_list_endpoint_pages_with_a_cursor_and_says_so(client: Any) -> None:
    doc = client.get("/openapi.json").get_json()
    paged, unpaged = [], []
    for path, ops in doc["paths"].items():
        op = ops.get("get")
        content = (op or {}).get("responses", {}).get("200", {}).get("content", {})
        schema = _resolve(doc, content.get("application/json", {}).get("schema", {}))
        props = schema.get("properties", {})
        arrays = {k for k, v in props.items() if _resolve(doc, v).get("type") == "array"}
        if not arrays:
            continue
        if path not in NOT_PAGED:
            params = {p["name"]: p for p in op.get("parameters", [])}
            assert {"limit", "starting_after"} <= set(params), path
            assert "has_more" in props, path
            assert "previous page" in params["starting_after"]["schema"].get(
                "description", params["starting_after"].get("description", "")), path
            paged.append(path)
        else:
            unpaged.append(path)
    assert sorted(unpaged) == sorted(NOT_PAGED), "page it, or say here why it is bounded"
    assert {"/v1/keys", "/v1/audit", "/v1/prices", "/v1/paywall/events",
            "/v1/webhooks/deliveries", "/v1/price-changes",
            "/v1/finance/margins"} <= set(paged)


def walk(client: Any, path: str, key: str, limit: int, id_of: str = "id"
         ) -> list[list[Any]]:
    """Every page of a list, following has_more."""
    pages: list[list[Any]] = []
    after: Any = None
    while True:
        sep = "&" if "?" in path else "?"
        url = f"{path}{sep}limit={limit}" + (f"&starting_after={after}" if after else "")
        resp = client.get(url, headers=bearer(key))
        assert resp.status_code == 200, resp.data
        body = resp.get_json()
        items = body.get("data", body.get("rows"))
        pages.append([item[id_of] for item in items])
        if not body["has_more"]:
            return pages
        assert len(items) == limit
        after = items[-1][id_of]


def test_prices_page_in_catalog_order(client: Any, keys: Keys) -> None:
    start = utcnow().replace(microsecond=0) + timedelta(days=1)
    for n in range(5):
        made = client.post("/v1/prices", headers=bearer(keys.admin), json={
            "model": "gpt-4o-mini", "input": f"0.{n + 1}", "output": "1",
            "effective_from": (start + timedelta(days=n)).isoformat()})
        assert made.status_code == 201, made.data
    whole = client.get("/v1/prices?limit=100", headers=bearer(keys.admin)).get_json()
    assert whole["has_more"] is False
    every = [p["id"] for p in whole["data"]]
    pages = walk(client, "/v1/prices", keys.admin, 2)
    assert [i for page in pages for i in page] == every and len(every) >= 5
    assert all(len(page) == 2 for page in pages[:-1])
    bad = client.get("/v1/prices?starting_after=no-such-model@19700101T000000Z",
                     headers=bearer(keys.admin))
    assert bad.status_code == 400 and bad.get_json()["param"] == "starting_after"


def test_paywall_events_page_newest_first_and_never_by_another_apps_id(
        app: Any, client: Any, keys: Keys, clean_db: Engine) -> None:
    from paywall.models import PaywallEvent

    w = app.extensions["wiring"]
    ids: dict[str, list[str]] = {}
    for name, key in (("acme", keys.app), ("globex", keys.other_app)):
        app_id = w.auth.authenticate(key).app_id
        user = w.tenancy.ensure_end_user(app_id, "eve")
        ids[name] = [f"evt_{name}_{n}" for n in range(7)]
        with clean_db.begin() as conn:
            for n, event_id in enumerate(ids[name]):
                conn.execute(insert(PaywallEvent).values(
                    event_id=event_id, app_id=app_id, end_user_id=user,
                    trigger="threshold_crossed", threshold=50, limit_id="tokens",
                    used=n, amount=100, plan_id="free", plan_version=1,
                    dedupe_key=f"{name}-{n}", created_at=utcnow(),
                    body=orjson.dumps({"user": "eve", "trigger": "threshold_crossed",
                                       "threshold": 50}).decode()))
    pages = walk(client, "/v1/paywall/events", keys.app, 3)
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for page in pages for i in page] == ids["acme"][::-1]  # newest first
    foreign = client.get(f"/v1/paywall/events?starting_after={ids['globex'][3]}",
                         headers=bearer(keys.app))
    assert foreign.status_code == 400


def test_webhook_deliveries_page_and_the_limit_is_kept(app: Any, client: Any,
                                                        keys: Keys) -> None:
    from core.models import WebhookEndpoint

    w = app.extensions["wiring"]
    app_id = w.auth.authenticate(keys.app).app_id
    with w.engine.begin() as conn:  # (a host that does not resolve here: no set_endpoint)
        conn.execute(insert(WebhookEndpoint).values(
            app_id=app_id, url="https://hooks.example/meterlane", secret="whsec_x",
            created_at=utcnow()))
    with w.engine.begin() as conn:
        made = [w.events.publish_in(conn, app_id, "usage.threshold_crossed", {"n": n})
                for n in range(5)]
    pages = walk(client, "/v1/webhooks/deliveries", keys.app, 2)
    assert [len(p) for p in pages] == [2, 2, 1]
    got = [i for page in pages for i in page]
    assert len(set(got)) == 5 and got == sorted(got, reverse=True)
    events = client.get("/v1/webhooks/deliveries?limit=100", headers=bearer(keys.app)
                        ).get_json()["data"]
    assert sorted(e["event_id"] for e in events) == sorted(made)
    too_many = client.get("/v1/webhooks/deliveries?limit=501", headers=bearer(keys.app))
    assert too_many.status_code == 422


def test_a_page_of_a_list_in_memory() -> None:
    items = [f"k{n}" for n in range(5)]
    assert page_of(items, str, None, 2) == (["k0", "k1"], True)
    assert page_of(items, str, "k1", 2) == (["k2", "k3"], True)
    assert page_of(items, str, "k3", 2) == (["k4"], False)
    assert page_of([], str, None, 0) == ([], False)
    assert trimmed([1, 2, 3], 2) == ([1, 2], True)
    with pytest.raises(Exception, match="starting_after"):
        page_of(items, str, "nope", 2)
    assert re.fullmatch(r"k\d", items[0])
