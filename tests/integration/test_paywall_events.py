"""Paywall events: thresholds crossed and a quota reached, recorded once per period, carried by
the 402, and sent to the app's endpoint on loopback as signed webhooks, retried with backoff and
logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy.engine import Engine

from core.db import utcnow
from core.events import BACKOFF
from tests.conftest import Keys, bearer, config_from_toml, gateway_toml, make_keys
from tests.support.receiver import Receiver
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
PLANS = """
[[plans]]
id = "starter"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 100

[paywall]
thresholds = [50, 80, 95]        # configurable; the default is 50, 80, 100
"""


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> Any:
        return self.now


@pytest.fixture()
def paywalled(clean_db: Engine, pg_url: str, upstream: FakeUpstream,
              tmp_path: Path) -> Iterator[tuple[Any, Keys, Clock]]:
    from app import create_app

    config = config_from_toml(gateway_toml(upstream.base_url) + PLANS, tmp_path,
                              database_url=pg_url, webhooks_allow_private=True)
    app = create_app(config)
    clock = Clock()
    app.extensions["wiring"].events.clock = clock
    try:
        yield app, make_keys(app), clock
    finally:
        app.extensions["wiring"].engine.dispose()


def call(client: Any, key: str, user: str, words: int) -> Any:
    resp = client.post(CHAT, headers=bearer(key), json={
        "model": "gpt-4o-mini", "user": user, "max_tokens": words,
        "messages": [{"role": "user", "content": "Tell me"}]})  # 5 prompt tokens (fake)
    resp.get_data()
    resp.close()  # a server closes every response: that settles the limits lease
    return resp


def signed_by(secret: str, delivery: Any) -> bool:
    """The receiver's check, written from the documented algorithm (not Meterlane's code)."""
    fields = dict(p.split("=", 1) for p in delivery.headers["meterlane-signature"].split(","))
    mac = hmac.new(secret.encode(), fields["t"].encode() + b"." + delivery.body,
                   hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, fields["v1"])


def test_thresholds_and_the_refusal_become_signed_webhooks_once(
        paywalled: tuple[Any, Keys, Clock]) -> None:
    app, keys, _ = paywalled
    client = app.test_client()
    events = app.extensions["wiring"].events
    with Receiver() as receiver:
        endpoint = client.put("/v1/webhooks", json={"url": receiver.url},
                              headers=bearer(keys.app)).get_json()
        secret = endpoint["secret"]
        assert secret.startswith("whsec_")
        assert client.get("/v1/webhooks", headers=bearer(keys.app)).get_json()["secret"] is None
        same = client.put("/v1/webhooks", json={"url": receiver.url}, headers=bearer(keys.app))
        assert same.get_json()["secret"] is None  # kept: shown only when created or rotated
        call(client, keys.app, "ann", 40)   # 45 of 100: nothing crossed
        call(client, keys.app, "ann", 5)    # 55: 50 % crossed
        call(client, keys.app, "ann", 30)   # 90: 80 % crossed
        clipped = call(client, keys.app, "ann", 20)  # clipped to what is left: 96, 95 % crossed
        assert clipped.status_code == 200
        spent = call(client, keys.app, "ann", 5)
        assert spent.status_code == 402
        paywall = spent.get_json()["error"]["paywall"]
        assert paywall["trigger"] == "limit_reached" and paywall["offers"] == []
        again = call(client, keys.app, "ann", 5).get_json()["error"]["paywall"]
        assert again["event_id"] == paywall["event_id"]  # one event per limit and period
        assert events.deliver_due() == 4
        assert events.deliver_due() == 0  # delivered: never sent twice
    bodies = [orjson.loads(d.body) for d in receiver.deliveries]
    assert [(b["type"], b["data"]["threshold"]) for b in bodies] == [
        ("usage.threshold_crossed", 50), ("usage.threshold_crossed", 80),
        ("usage.threshold_crossed", 95), ("usage.limit_reached", None)]
    assert all(signed_by(secret, d) for d in receiver.deliveries)
    assert not signed_by("whsec_wrong", receiver.deliveries[0])
    assert [d.headers["meterlane-event-id"] for d in receiver.deliveries] == [
        b["id"] for b in bodies]
    reached = bodies[-1]
    assert reached["id"] == paywall["event_id"]
    assert reached["data"]["user"] == "ann" and reached["data"]["plan"]["id"] == "starter"
    assert reached["data"]["limit"]["id"] == "tokens-day"
    assert reached["data"]["limit"]["used"] == 96 and reached["data"]["limit"]["limit"] == 100
    listed = client.get("/v1/paywall/events?user=ann", headers=bearer(keys.app)).get_json()
    assert [e["id"] for e in listed["data"]] == [b["id"] for b in reversed(bodies)]


def test_a_failing_endpoint_is_retried_with_backoff_and_logged(
        paywalled: tuple[Any, Keys, Clock]) -> None:
    app, keys, clock = paywalled
    client = app.test_client()
    events = app.extensions["wiring"].events
    with Receiver() as receiver:
        client.put("/v1/webhooks", json={"url": receiver.url}, headers=bearer(keys.app))
        receiver.statuses.extend([500, 503])
        call(client, keys.app, "bo", 60)  # 65 of 100: 50 % crossed
        assert events.deliver_due() == 1
        assert events.deliver_due() == 0  # not due before its backoff
        clock.now += timedelta(seconds=BACKOFF[0])
        assert events.deliver_due() == 1
        clock.now += timedelta(seconds=BACKOFF[1] - 1)
        assert events.deliver_due() == 0
        clock.now += timedelta(seconds=1)
        assert events.deliver_due() == 1
    assert len(receiver.deliveries) == 3
    assert len({d.headers["meterlane-event-id"] for d in receiver.deliveries}) == 1
    [log] = client.get("/v1/webhooks/deliveries", headers=bearer(keys.app)).get_json()["data"]
    assert log["state"] == "delivered" and log["type"] == "usage.threshold_crossed"
    assert [(a["attempt"], a["status"]) for a in log["attempts"]] == [(1, 500), (2, 503),
                                                                      (3, 200)]
    assert log["attempts"][0]["error"] == "HTTP 500"


def test_an_unreachable_endpoint_gives_up_after_the_last_backoff(
        paywalled: tuple[Any, Keys, Clock]) -> None:
    app, keys, clock = paywalled
    client = app.test_client()
    events = app.extensions["wiring"].events
    client.put("/v1/webhooks", json={"url": "http://127.0.0.1:9/hooks"},
               headers=bearer(keys.app))
    call(client, keys.app, "cy", 60)
    for wait in (0, *BACKOFF):
        clock.now += timedelta(seconds=wait)
        assert events.deliver_due() == 1
    assert events.deliver_due() == 0
    [log] = client.get("/v1/webhooks/deliveries", headers=bearer(keys.app)).get_json()["data"]
    assert log["state"] == "failed" and len(log["attempts"]) == len(BACKOFF) + 1
    assert "NewConnectionError" in log["attempts"][0]["error"]


def test_events_are_the_apps_own_and_bad_input_is_a_clear_error(
        paywalled: tuple[Any, Keys, Clock]) -> None:
    app, keys, _ = paywalled
    client = app.test_client()
    call(client, keys.app, "dee", 60)
    assert len(client.get("/v1/paywall/events", headers=bearer(keys.app)).get_json()["data"]) == 1
    other = client.get("/v1/paywall/events", headers=bearer(keys.other_app)).get_json()
    assert other["data"] == []
    user_key = client.post("/v1/users/dee/keys", json={}, headers=bearer(keys.app)).get_json()
    mine = client.get("/v1/paywall/events", headers=bearer(user_key["key"]))
    assert len(mine.get_json()["data"]) == 1
    assert client.get("/v1/paywall/events?user=ann",
                      headers=bearer(user_key["key"])).status_code == 403
    for resp in (client.get("/v1/paywall/events?trigger=bogus", headers=bearer(keys.app)),
                 client.put("/v1/webhooks", json={"url": "ftp://example.com/hook"},
                            headers=bearer(keys.app)),
                 client.put("/v1/webhooks", json={}, headers=bearer(keys.app))):
        assert resp.status_code in (400, 422)
        assert resp.mimetype == "application/problem+json"
    assert client.get("/v1/paywall/events?user=nobody",
                      headers=bearer(keys.app)).status_code == 404
    assert client.put("/v1/webhooks", json={"url": "https://a.example/h"},
                      headers=bearer(keys.finance)).status_code == 403


def test_usage_the_app_reports_itself_crosses_thresholds_too(
        paywalled: tuple[Any, Keys, Clock]) -> None:
    app, keys, _ = paywalled
    client = app.test_client()
    h = bearer(keys.app)
    track = {"user": "eve", "model": "gpt-4o-mini", "idempotency_key": "job-1",
             "usage": {"input_tokens": 30, "output_tokens": 25}}
    assert client.post("/v1/meter/track", json=track, headers=h).status_code in (200, 201)
    assert client.post("/v1/meter/track", json=track, headers=h).status_code in (200, 201)
    lease = client.post("/v1/meter/reserve", json={
        "user": "eve", "model": "gpt-4o-mini", "input_tokens": 10, "max_output_tokens": 30},
        headers=h).get_json()
    settled = client.post("/v1/meter/settle", json={
        "lease_id": lease["lease_id"], "usage": {"input_tokens": 10, "output_tokens": 20}},
        headers=h)
    assert settled.status_code == 200
    listed = client.get("/v1/paywall/events?user=eve", headers=h).get_json()["data"]
    assert [(e["threshold"], e["limit"]["used"]) for e in listed] == [(80, 85), (50, 55)]


def test_the_sdks_verify_accepts_a_real_delivery_and_refuses_a_forgery(
        paywalled: tuple[Any, Keys, Clock]) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sdk" / "python"))
    from meterlane_sdk import InvalidSignature, verify

    app, keys, _ = paywalled
    client = app.test_client()
    with Receiver() as receiver:
        secret = client.put("/v1/webhooks", json={"url": receiver.url},
                            headers=bearer(keys.app)).get_json()["secret"]
        call(client, keys.app, "fin", 60)
        app.extensions["wiring"].events.deliver_due()
    [delivery] = receiver.deliveries
    header = delivery.headers["meterlane-signature"]
    assert verify(delivery.body, header, secret)["type"] == "usage.threshold_crossed"
    for body, sig, key in ((delivery.body + b" ", header, secret),
                           (delivery.body, header, "whsec_other"),
                           (delivery.body, "t=1,v1=00", secret)):
        with pytest.raises(InvalidSignature):
            verify(body, sig, key)
    t = int(header.split(",")[0][2:])
    with pytest.raises(InvalidSignature, match="tolerance"):
        verify(delivery.body, header, secret, now=t + 301)  # a replay, too late


def test_webhooks_to_private_addresses_are_refused_unless_allowed(
        clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Path) -> None:
    from app import create_app

    app = create_app(config_from_toml(gateway_toml(upstream.base_url) + PLANS, tmp_path,
                                      database_url=pg_url))
    try:
        keys = make_keys(app)
        client = app.test_client()
        for url in ("http://127.0.0.1:8080/h", "http://169.254.169.254/latest",
                    "http://10.1.2.3/h", "http://[::1]/h", "http://localhost/h",
                    "http://100.64.0.7/h", "http://[::ffff:10.0.0.1]/h",
                    "http://[64:ff9b::a9fe:a9fe]/h", "http://[2002:a9fe:a9fe::]/h",
                    "http://[::127.0.0.1]:8080/h", "http://[2001:0:a9fe:a9fe::1]/h",
                    "http://192.0.2.1/h", "http://0.0.0.0/h"):
            resp = client.put("/v1/webhooks", json={"url": url}, headers=bearer(keys.app))
            assert resp.status_code == 400, url
            assert "not public" in resp.get_json()["detail"]
        for url in ("http://example.com:99999/h", "http://example.com:0/h", "http:///h",
                    "http://exa mple.com/h", "http://exa\x00mple.com/h"):
            resp = client.put("/v1/webhooks", json={"url": url}, headers=bearer(keys.app))
            assert resp.status_code == 400, url
    finally:
        app.extensions["wiring"].engine.dispose()


def test_a_delivery_connects_to_the_address_it_checked_not_a_second_lookup(
        clean_db: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name answers a public address when checked and a loopback one a
    moment later. One lookup per delivery, checked and connected to: the loopback receiver
    is never reached (on main, urllib3 looked the name up again and called it)."""
    import socket

    from core.events import EventService
    from core.tenancy import TenancyService

    real = socket.getaddrinfo
    answers: list[str] = []
    fresh = [True]

    def rebinding(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        # a public address for the first lookup of an operation (setting the URL, one
        # delivery), the loopback receiver's for any later one
        if fresh:
            fresh.clear()
            answers.append("2001:4860:4860::8888")
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (answers[-1], port, 0, 0))]
        answers.append("127.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    with Receiver() as receiver:
        port = int(receiver.url.split(":")[2].split("/")[0])
        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        events = EventService(clean_db, timeout_s=2)
        app_id, _ = TenancyService(clean_db).ensure_app("acme")
        events.set_endpoint(app_id, f"http://rebind.test:{port}/hooks/meterlane")
        with clean_db.begin() as conn:
            events.publish_in(conn, app_id, "usage.threshold_crossed", {"n": 1})
        fresh.append(True)
        assert events.deliver_due() == 1
        assert receiver.deliveries == []  # whatever became of the public address's attempt
        assert answers == ["2001:4860:4860::8888"] * 2  # one lookup to set, one to deliver
