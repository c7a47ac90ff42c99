"""Roles as narrow as their names, route by route: every route of the OpenAPI document and of
the gateway, called with every kind of key, in its own app and naming another.

- "operator": an admin key bound to no app (changes what every app shares: prices);
- "admin": an admin key bound to one app; "app": the app's server key; "finance": reports;
- "user": an end user's key (a browser holds it: it reads its own quota and calls models).

A role the table allows must get past authorization (any answer but 401 and 403); any other
role gets 403. A key bound to one app naming another (?app=) gets 403 on every route. A route
missing from the table fails the test: a new route must say who may call it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from core.auth import Role
from core.config import Config
from tests.conftest import bearer, config_from_toml, gateway_toml
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration

ALL = frozenset({"operator", "admin", "app", "finance", "user"})
ADMINS = frozenset({"operator", "admin"})
PUBLIC = None  # no key needed (health, the widget's script, Germany's cancel pages, Stripe)

POLICY: dict[tuple[str, str], frozenset[str] | None] = {
    ("GET", "/"): PUBLIC,
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/widget.js"): PUBLIC,
    ("GET", "/widget/texts"): PUBLIC,
    ("GET", "/finance"): PUBLIC,  # the page; its data needs a finance key
    ("GET", "/kuendigen/{app}"): PUBLIC,
    ("GET", "/kuendigen/{app}/bestaetigen"): PUBLIC,
    ("POST", "/kuendigen/{app}/bestaetigen"): PUBLIC,
    ("POST", "/v1/stripe/webhook"): PUBLIC,  # Stripe's signature, not a key
    # the gateway: app keys for any of their users, user keys for themselves
    ("POST", "/v1/chat/completions"): frozenset({"app", "user"}),
    ("POST", "/v1/completions"): frozenset({"app", "user"}),
    ("POST", "/v1/embeddings"): frozenset({"app", "user"}),
    ("POST", "/v1/messages"): frozenset({"app", "user"}),
    ("POST", "/v1/responses"): frozenset({"app", "user"}),
    ("GET", "/v1/models"): ALL,
    # keys
    ("POST", "/v1/users/{user}/keys"): frozenset({"app"}),
    ("POST", "/v1/keys"): ADMINS,  # an app-bound admin: its own app's keys only
    ("GET", "/v1/keys"): ADMINS,
    ("GET", "/v1/keys/{key_id}"): ADMINS,
    ("DELETE", "/v1/keys/{key_id}"): ADMINS,
    ("POST", "/v1/keys/{key_id}/rotate"): ADMINS,
    ("GET", "/v1/audit"): ADMINS,  # an app-bound admin: its own app's rows only
    # usage, quota, credits
    ("GET", "/v1/usage"): ALL,  # a user key: its own usage only
    ("GET", "/v1/usage/routing"): ALL,
    ("GET", "/v1/users/{user}/quota"): ADMINS | {"app"},
    ("GET", "/v1/me/quota"): frozenset({"user"}),
    ("GET", "/v1/users/{user}/credits"): ADMINS | {"app"},
    ("GET", "/v1/me/credits"): frozenset({"user"}),
    ("POST", "/v1/users/{user}/credits/grants"): ADMINS | {"app"},
    # reporting usage: the app's backend only
    ("POST", "/v1/meter/reserve"): frozenset({"app"}),
    ("POST", "/v1/meter/settle"): frozenset({"app"}),
    ("POST", "/v1/meter/release"): frozenset({"app"}),
    ("POST", "/v1/meter/track"): frozenset({"app"}),
    ("POST", "/v1/meter/track/batch"): frozenset({"app"}),
    ("POST", "/v1/meter/corrections"): frozenset({"app"}),
    ("POST", "/v1/events"): ADMINS | {"app"},  # CloudEvents; an operator names the app
    ("POST", "/v1/meter/events"): frozenset({"app"}),
    ("POST", "/v1/meter/events/batch"): frozenset({"app"}),
    ("GET", "/v1/users/{user}/meters"): ADMINS | {"app"},
    # plans and subscriptions
    ("PUT", "/v1/users/{user}/plan"): ADMINS | {"app"},
    ("POST", "/v1/subscriptions/{sub_id}/change"): frozenset({"app"}),
    ("POST", "/v1/subscriptions/{sub_id}/cancel"): frozenset({"app"}),
    ("GET", "/v1/subscriptions/{sub_id}/cancel-screen"): ADMINS | {"app"},
    ("POST", "/v1/checkout/sessions"): frozenset({"app"}),
    ("POST", "/v1/withdrawals"): frozenset({"app"}),
    ("GET", "/v1/compliance/evidence"): ADMINS | {"app"},
    # the paywall
    ("GET", "/v1/paywall/events"): ADMINS | {"app", "user"},
    ("POST", "/v1/paywall/offers"): ADMINS | {"app"},
    ("GET", "/v1/paywall/offers"): ADMINS | {"app", "user"},
    ("POST", "/v1/paywall/offers/{offer}/versions/{version}/publish"): ADMINS | {"app"},
    ("POST", "/v1/paywall/consents"): frozenset({"app", "user"}),
    ("GET", "/v1/paywall/consents/{consent_id}"): ADMINS | {"app"},
    ("PUT", "/v1/webhooks"): ADMINS | {"app"},
    ("GET", "/v1/webhooks"): ADMINS | {"app"},
    ("GET", "/v1/webhooks/deliveries"): ADMINS | {"app"},
    # what every app shares: operator-wide admin keys change it
    ("POST", "/v1/prices"): frozenset({"operator"}),
    ("POST", "/v1/prices/import"): frozenset({"operator"}),
    ("GET", "/v1/prices"): ADMINS | {"app", "finance"},
    ("POST", "/v1/prices/meters"): frozenset({"operator"}),
    ("GET", "/v1/prices/meters"): ADMINS | {"app", "finance"},
    ("POST", "/v1/price-changes"): frozenset({"operator"}),
    ("GET", "/v1/price-changes"): ADMINS,
    # finance
    ("GET", "/v1/finance/summary"): ADMINS | {"finance"},
    ("GET", "/v1/finance/margins"): ADMINS | {"finance"},
    ("GET", "/v1/finance/users/least-profitable"): ADMINS | {"finance"},
    ("GET", "/v1/finance/local"): frozenset({"operator"}),  # every app's GPU upstreams
    ("GET", "/v1/admin/jobs"): frozenset({"operator"}),  # the scheduled jobs of every app
}
GATEWAY = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
           ("POST", "/v1/embeddings"), ("POST", "/v1/messages"), ("POST", "/v1/responses"),
           ("GET", "/v1/models")]
VALUES = {"user": "alice", "sub_id": "sub_none", "offer": "pro-monthly", "version": "1",
          "consent_id": "cns_none", "app": "acme", "key_id": "0123456789abcdef"}
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
def world(clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Path) -> Any:
    from app import create_app

    config: Config = config_from_toml(gateway_toml(upstream.base_url) + PLANS, tmp_path,
                                      database_url=pg_url)
    app = create_app(config)
    service = app.extensions["wiring"].keys
    keys = {
        "operator": service.create_key(Role.ADMIN, None).key,
        "admin": service.create_key(Role.ADMIN, "acme").key,
        "app": service.create_key(Role.APP, "acme").key,
        "finance": service.create_key(Role.FINANCE, "acme").key,
        "user": service.create_key(Role.USER, "acme", user="alice").key,
    }
    service.create_key(Role.APP, "globex")  # the other app exists
    yield app, keys
    app.extensions["wiring"].engine.dispose()


def _routes(app: Any) -> list[tuple[str, str]]:
    doc = app.test_client().get("/openapi.json").get_json()
    found = [(method.upper(), path) for path, ops in doc["paths"].items() for method in ops]
    return sorted(set(found) | set(GATEWAY))


def _url(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: VALUES[m[1]], path)


def _call(client: Any, method: str, path: str, key: str | None, query: str = "") -> Any:
    headers = {"Content-Type": "application/json", **(bearer(key) if key else {})}
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], ' \
           b'"input": "hi", "user": "alice", "max_tokens": 1}' \
        if path in [p for _m, p in GATEWAY] else b"{}"
    return client.open(_url(path) + query, method=method, headers=headers,
                       data=None if method == "GET" else body)


def test_every_route_is_in_the_role_table(world: Any) -> None:
    app, _keys = world
    missing = [r for r in _routes(app) if r not in POLICY]
    assert missing == [], "classify these routes in POLICY"
    stale = [r for r in POLICY if r not in _routes(app)]
    assert stale == []


def test_each_role_is_let_through_or_refused_as_the_table_says(world: Any) -> None:
    app, keys = world
    client = app.test_client()
    wrong = []
    checked = 0
    for method, path in _routes(app):
        allowed = POLICY[(method, path)]
        if allowed is PUBLIC:
            continue
        for role, key in keys.items():
            status = _call(client, method, path, key).status_code
            checked += 1
            if role in allowed and status in (401, 403):
                wrong.append(f"{role} refused ({status}) on {method} {path}")
            elif role not in allowed and status != 403:
                wrong.append(f"{role} let through ({status}) on {method} {path}")
        if _call(client, method, path, None).status_code != 401:
            wrong.append(f"no key let through on {method} {path}")
    assert checked > 200
    assert not wrong, "\n".join(wrong)


def test_a_key_bound_to_one_app_naming_another_is_refused_everywhere(world: Any) -> None:
    app, keys = world
    client = app.test_client()
    wrong = []
    for method, path in _routes(app):
        if POLICY[(method, path)] is PUBLIC:
            continue
        for role in ("admin", "app", "finance", "user"):
            status = _call(client, method, path, keys[role], "?app=globex").status_code
            if status != 403:
                wrong.append(f"{role} naming globex got {status} on {method} {path}")
            own = _call(client, method, path, keys[role], "?app=acme").status_code
            if own == 403 and role in (POLICY[(method, path)] or ()):
                wrong.append(f"{role} naming its own app refused on {method} {path}")
    assert not wrong, "\n".join(wrong)


def test_reads_never_create_end_users(world: Any, clean_db: Engine) -> None:
    from sqlalchemy import func, select

    from core.models import EndUser

    app, keys = world
    client = app.test_client()

    def users() -> int:
        with clean_db.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(EndUser)).scalar_one())

    before = users()
    for path in ("/v1/users/nobody-1/quota", "/v1/users/nobody-2/credits",
                 "/v1/paywall/offers?user=nobody-3", "/v1/usage?user=nobody-4",
                 "/v1/paywall/events?user=nobody-5"):
        resp = client.get(path, headers=bearer(keys["app"]))
        assert resp.status_code in (200, 404), (path, resp.data)
    assert users() == before  # on main: every name read became an end user
    quota = client.get("/v1/users/nobody-1/quota", headers=bearer(keys["app"])).get_json()
    assert quota["plan"]["id"] == "free" and quota["limits"][0]["used"] == 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                  "/v1/messages", "/v1/responses"])
def test_a_key_that_cannot_call_models_is_refused_before_its_body_is_read(
        world: Any, path: str) -> None:
    """On main a finance or admin key's malformed body was a 400: the body was read first."""
    app, keys = world
    client = app.test_client()
    for role in ("admin", "finance"):
        resp = client.post(path, data=b"{not json", headers={
            "Authorization": f"Bearer {keys[role]}", "Content-Type": "application/json"})
        assert resp.status_code == 403, (role, path, resp.data)
    resp = client.post(path, data=b"{not json", headers={
        "Authorization": f"Bearer {keys['app']}", "Content-Type": "application/json"})
    assert resp.status_code == 400, resp.data
