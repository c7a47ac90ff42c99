"""Keys across users and apps, bad input of every kind: clear errors, nothing half-written."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from core.auth import Role
from metering.models import UsageEvent
from tests.conftest import Keys, bearer

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(UsageEvent)).scalar_one())


def user_key(client: Any, app_key: str, user: str, **body: Any) -> Any:
    return client.post(f"/v1/users/{user}/keys", json=body, headers=bearer(app_key))


@pytest.mark.parametrize(("headers", "data", "status", "code"), [
    ({}, b"{}", 401, "invalid_api_key"),
    ({"Authorization": "Bearer nope"}, b"{}", 401, "invalid_api_key"),
    ({"Authorization": "Bearer mlk_0123456789abcdef_" + "x" * 43}, b"{}", 401,
     "invalid_api_key"),
])
def test_missing_or_invalid_key_is_401(client: Any, clean_db: Engine, headers: dict[str, str],
                                       data: bytes, status: int, code: str) -> None:
    resp = client.post(CHAT, data=data, headers=headers)
    assert resp.status_code == status
    assert resp.get_json()["error"]["code"] == code
    assert resp.headers["X-Meterlane-Request-Id"].startswith("req_")


@pytest.mark.parametrize(("data", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"messages": []}', 400, "model"),
    (b'{"model": "no-such-model", "messages": [], "user": "u"}', 404, "model"),
    (b'{"model": "gpt-4o-mini", "messages": []}', 400, "user"),
    (b'{"model": "gpt-4o-mini", "messages": [], "user": ""}', 400, "user"),
])
def test_bad_bodies_get_openai_errors_and_write_nothing(
        client: Any, keys: Keys, clean_db: Engine, data: bytes, status: int,
        param: str | None) -> None:
    resp = client.post(CHAT, data=data, headers=bearer(keys.app),
                       content_type="application/json")
    assert resp.status_code == status, resp.data
    err = resp.get_json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    assert rows(clean_db) == 0


def test_oversized_body_is_413(app: Any, client: Any, keys: Keys, clean_db: Engine) -> None:
    big = b'{"model": "gpt-4o-mini", "user": "u", "x": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    resp = client.post(CHAT, data=big, headers=bearer(keys.app), content_type="application/json")
    assert resp.status_code == 413
    assert resp.get_json()["error"]["code"] == "request_too_large"
    assert rows(clean_db) == 0


def test_user_key_acts_only_as_its_user(client: Any, keys: Keys, clean_db: Engine) -> None:
    minted = user_key(client, keys.app, "alice", ttl_seconds=600)
    assert minted.status_code == 201, minted.data
    alice = minted.get_json()["key"]
    assert client.post(CHAT, json=BODY, headers=bearer(alice)).status_code == 200
    assert client.post(CHAT, json={**BODY, "user": "alice"},
                       headers=bearer(alice)).status_code == 200
    other = client.post(CHAT, json={**BODY, "user": "bob"}, headers=bearer(alice))
    assert other.status_code == 403
    assert other.get_json()["error"]["type"] == "permission_error"
    own = client.get("/v1/usage", headers=bearer(alice)).get_json()
    assert own["user"] == "alice" and own["totals"]["requests"] == 2
    assert client.get("/v1/usage?user=bob", headers=bearer(alice)).status_code == 403


def test_user_key_cannot_mint_keys_and_expired_key_is_refused(
        app: Any, client: Any, keys: Keys, clean_db: Engine) -> None:
    alice = user_key(client, keys.app, "alice").get_json()["key"]
    assert user_key(client, alice, "alice").status_code == 403
    from datetime import timedelta

    expired = app.extensions["wiring"].keys.create_key(
        Role.USER, "acme", user="alice", ttl=timedelta(seconds=-1))
    resp = client.post(CHAT, json=BODY, headers=bearer(expired.key))
    assert resp.status_code == 401 and "expired" in resp.get_json()["error"]["message"]


def test_revoked_key_is_refused(app: Any, client: Any, keys: Keys, clean_db: Engine) -> None:
    from core.audit import Actor

    revoked = app.extensions["wiring"].keys.revoke(Actor.cli(), keys.app)
    assert revoked["state"] == "revoked"
    resp = client.post(CHAT, json={**BODY, "user": "u"}, headers=bearer(keys.app))
    assert resp.status_code == 401 and "revoked" in resp.get_json()["error"]["message"]


def test_apps_do_not_see_each_others_usage(client: Any, keys: Keys, clean_db: Engine) -> None:
    assert client.post(CHAT, json={**BODY, "user": "shared-name"},
                       headers=bearer(keys.app)).status_code == 200
    mine = client.get("/v1/usage", headers=bearer(keys.app)).get_json()
    theirs = client.get("/v1/usage", headers=bearer(keys.other_app)).get_json()
    assert mine["totals"]["requests"] == 1 and theirs["totals"]["requests"] == 0
    assert client.get("/v1/usage?user=shared-name",
                      headers=bearer(keys.other_app)).status_code == 404
    assert client.get("/v1/usage?app=acme", headers=bearer(keys.other_app)).status_code == 403
    assert client.get("/v1/usage?app=acme", headers=bearer(keys.admin)).get_json()[
        "totals"]["requests"] == 1


def test_finance_and_admin_keys_cannot_make_calls(client: Any, keys: Keys,
                                                  clean_db: Engine) -> None:
    for key in (keys.finance, keys.admin):
        resp = client.post(CHAT, json={**BODY, "user": "u"}, headers=bearer(key))
        assert resp.status_code == 403


def test_usage_groups_by_model_and_day(client: Any, keys: Keys, clean_db: Engine) -> None:
    for model in ("gpt-4o-mini", "gpt-4o-mini", "llama-local"):
        assert client.post(CHAT, json={**BODY, "model": model, "user": "u"},
                           headers=bearer(keys.app)).status_code == 200
    by_model = client.get("/v1/usage?group_by=model", headers=bearer(keys.finance)).get_json()
    groups = {g["key"]: g for g in by_model["groups"]}
    assert groups["gpt-4o-mini"]["requests"] == 2 and groups["llama-local"]["requests"] == 1
    assert groups["llama-local"]["unpriced_requests"] == 1
    assert by_model["totals"]["total_tokens"] == sum(g["total_tokens"] for g in groups.values())
    by_day = client.get("/v1/usage?group_by=day", headers=bearer(keys.app)).get_json()
    assert len(by_day["groups"]) == 1 and by_day["groups"][0]["requests"] == 3


@pytest.mark.parametrize("query", ["group_by=week", "from=yesterday", "bogus=1",
                                   "from=2026-11-10&to=2026-11-01"])
def test_bad_usage_queries_are_problem_json(client: Any, keys: Keys, clean_db: Engine,
                                            query: str) -> None:
    resp = client.get(f"/v1/usage?{query}", headers=bearer(keys.app))
    assert resp.status_code in (400, 422)
    assert resp.mimetype == "application/problem+json"
    assert resp.get_json()["status"] == resp.status_code


def test_openapi_documents_every_non_gateway_route(app: Any, client: Any) -> None:
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith(("gateway.", "anthropic.", "static")):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        assert path in doc["paths"], f"{rule.rule} is not in the OpenAPI document"
    usage = doc["paths"]["/v1/usage"]["get"]
    assert any(p["name"] == "group_by" for p in usage["parameters"])


def test_health_ready_and_metrics(client: Any, keys: Keys, clean_db: Engine) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json()["checks"]["database"] == "ok"
    client.post(CHAT, json={**BODY, "user": "u"}, headers=bearer(keys.app))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'meterlane_calls_total{endpoint="chat.completions",model="gpt-4o-mini",status="ok"}' \
        in text
    assert "meterlane_tokens_total" in text
