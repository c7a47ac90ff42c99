"""The compliant paywall as a new user tries it: a real `meterlane serve` (its workers send the
webhooks), the fake Stripe on loopback, the app's endpoint on loopback. A user in Germany runs
out of quota (the openai SDK gets the 402 with the paywall), agrees to the offer served there,
checks out, gets the acknowledgment, and cancels with Germany's button, not logged in, over
plain HTTP; the evidence bundle is read back and every webhook's signature checked with the
documented algorithm."""

from __future__ import annotations

import http.client
import os
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import gateway_toml
from tests.e2e.test_serve import cli, start_server, stop
from tests.support.consent import publish_offer
from tests.support.lifecycle import PLANS, SECRET, World, signed_by
from tests.support.receiver import Receiver
from tests.support.services import create_database
from tests.support.stripesig import stripe_headers
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e


@dataclass
class Served(World):
    """The lifecycle world, over HTTP to `meterlane serve`."""

    base: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def http(self, method: str, path: str, body: bytes | None,
             headers: dict[str, str]) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.base.split("//")[1], timeout=30)
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()

    def call(self, method: str, path: str, body: Any = None, key: str | None = None
             ) -> tuple[int, Any]:
        status, raw = self.http(method, path, orjson.dumps(body) if body is not None else None,
                                {"Authorization": f"Bearer {key or self.key}",
                                 "Content-Type": "application/json"})
        return status, orjson.loads(raw) if raw else None

    def webhook(self, kind: str, obj: dict[str, Any]) -> None:
        self._created = max(self._created, int(time.time()))
        payload = orjson.dumps({"id": f"evt_{uuid.uuid4().hex}", "object": "event",
                                "type": kind, "created": self._created,
                                "data": {"object": obj}}, default=str)
        status, raw = self.http("POST", "/v1/stripe/webhook", payload,
                                stripe_headers(payload, SECRET))
        assert status == 200, raw

    def typed(self, kind: str) -> list[dict[str, Any]]:
        return [b for b in (orjson.loads(d.body) for d in self.receiver.deliveries)
                if b["type"] == kind]


@pytest.fixture(scope="module")
def served(pg_server: str, upstream: FakeUpstream, fake_stripe: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("paywall")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
    url = create_database(pg_server, f"mlane_e2e_paywall_{worker}")
    (tmp / "meterlane.toml").write_text(gateway_toml(upstream.base_url) + PLANS
                                        + f'\n[stripe]\napi_base = "{fake_stripe}"\n'
                                        + "collect_terms_consent = false\n")
    env = {**os.environ, "MLANE_DATABASE_URL": url, "MLANE_CONFIG": str(tmp / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp / "var"), "MLANE_KEY_CACHE_SECONDS": "0",
           "MLANE_STRIPE_API_KEY": "sk_test_lifecycle", "MLANE_STRIPE_WEBHOOK_SECRET": SECRET,
           "MLANE_WEBHOOKS_ALLOW_PRIVATE": "1"}
    assert cli(env, "db", "upgrade").returncode == 0
    created = cli(env, "keys", "create", "--role", "app", "--app", "shop")
    assert created.returncode == 0, created.stderr
    synced = cli(env, "plans", "sync")
    assert synced.returncode == 0, synced.stderr
    proc, base = start_server(env, tmp)
    try:
        with Receiver() as receiver:
            world = Served(None, created.stdout.strip().splitlines()[-1], "", "", fake_stripe,
                           receiver, "", base=base, env=env)
            status, endpoint = world.call("PUT", "/v1/webhooks", {"url": receiver.url})
            assert status in (200, 201), endpoint
            world.secret = endpoint["secret"]
            yield world
    finally:
        stop(proc)


def test_a_german_user_from_an_empty_quota_to_a_cancellation_without_login(
        served: Served) -> None:
    w, user = served, "anna"
    offer = publish_offer(w.as_call(), "pro")
    client = openai.OpenAI(base_url=w.base + "/v1", api_key=w.key, max_retries=0)
    refused = None
    for _ in range(20):
        try:
            client.chat.completions.create(model="gpt-4o-mini", user=user, max_tokens=25,
                                           messages=[{"role": "user", "content": "Hi"}])
        except openai.APIStatusError as exc:
            refused = exc
            break
    assert refused is not None and refused.status_code == 402
    paywall = refused.response.json()["error"]["paywall"]
    assert offer in {o["offer"] for o in paywall["offers"]}

    sub_id, _ = w.subscribe(user, "pro", "DE", email="anna@example.de", offer_id=offer)
    w.receiver.wait_for(lambda _: bool(w.typed("acknowledgment.sent")))
    [ack] = [e["data"] for e in w.typed("acknowledgment.sent")]
    assert ack["jurisdiction"] == "EU-DE" and ack["tokens"]["missing"] == []
    assert ack["contract_ref"] == sub_id and ack["withdrawal_deadline"]

    # Germany's button: two pages, no key, a form post
    status, first = w.http("GET", "/kuendigen/shop", None, {})
    assert status == 200 and "Verträge hier kündigen".encode() in first
    status, form = w.http("GET", "/kuendigen/shop/bestaetigen", None, {})
    assert status == 200 and "jetzt kündigen".encode() in form
    status, done = w.http("POST", "/kuendigen/shop/bestaetigen", urllib.parse.urlencode({
        "name": "Anna Schmidt", "email": "anna@example.de", "contract_ref": sub_id,
        "kind": "ordinary"}).encode(), {"Content-Type": "application/x-www-form-urlencoded"})
    page = done.decode()
    assert status == 200 and "Kündigung eingegangen" in page and "Vertragsende" in page
    assert w.stripe.v1.subscriptions.retrieve(sub_id).cancel_at_period_end is True

    w.receiver.wait_for(lambda _: bool(w.typed("cancel.confirmed"))
                        and bool(w.typed("cancel.declaration_received")))
    [confirmed] = [e["data"] for e in w.typed("cancel.confirmed")]
    assert confirmed["channel"] == "de_button" and confirmed["steps_count"] == 2
    # Webhooks promise no order of delivery (workers deliver side by side, as Stripe's do):
    # the events' own times tell the story's order.
    events = sorted((orjson.loads(d.body) for d in w.receiver.deliveries),
                    key=lambda e: e["created"])
    types = [e["type"] for e in events]
    chain = ["usage.limit_reached", "consent.captured", "acknowledgment.sent",
             "cancel.confirmed"]
    assert [t for t in types if t in chain] == chain
    assert all(signed_by(w.secret, d.headers, d.body) for d in w.receiver.deliveries)

    status, bundle = w.call("GET", f"/v1/compliance/evidence?subscription={sub_id}")
    assert status == 200, bundle
    assert bundle["consent"]["jurisdiction"] == "EU-DE"
    assert bundle["acknowledgment"]["ack_id"] == ack["ack_id"]
    assert bundle["cancellations"][0]["channel"] == "de_button"
    assert bundle["cancel_declarations"][0]["cancellation_id"] == \
        confirmed["cancellation_id"]
    # the scheduler from a shell: nothing due for a cancelled subscription, and again nothing
    ran = cli(w.env, "notices", "run")
    assert ran.returncode == 0 and "sent 0 notices" in ran.stdout, ran.stderr

