"""Money under concurrency, against a real `meterlane serve` of 2 and of 4 workers, and two
instances of 2 sharing one database and Redis: 300 calls of one end user, 32 at a time
(streamed and not, the upstream answering in 50 to 800 ms, so the workers' ledger writers
commit out of id order) while the app polls their credits, as the quota widget does. Then,
from the raw ledger:

- every call the upstream saw has a row, and the ledger's tokens are those it served;
- no usage is left unaccounted, and what was accounted is the ledger's usage exactly:
  allowance used + credits burned + overage = the ledger's credits;
- credits are conserved: granted = burned + expired + balance;
- the overage run: `billing report-overage` sends it to (a fake) Stripe, whose meter sums
  exactly the ledger's usage past the allowance and the credits, and `billing reconcile`
  agrees call by call.

On main the accounting read `id > cursor`: with the polling, rows committed after a higher
id was accounted were skipped for good (3 of 4 runs of this test lost 54 to 195 tokens).

Stripe's events, each kind delivered 20 times at once over the workers, apply once; two
subscription events of one second end in the state Stripe has."""

from __future__ import annotations

import http.client
import os
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from sqlalchemy import func, select

from core.db import make_engine, utcnow
from metering.models import UsageEvent
from plans.models import CreditBurn, CreditCursor, CreditOverage
from tests.conftest import gateway_toml
from tests.e2e.test_serve import MESSAGES, cli, served_engine, stop
from tests.support.consent import consent_for, http_call
from tests.support.fake_openai import completion_tokens, prompt_tokens
from tests.support.services import create_database
from tests.support.stripesig import stripe_headers
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e
CALLS, PARALLEL, ALLOWANCE, GRANTED = 300, 32, 2000, 3000
SECRET = "whsec_money"


@dataclass
class Served:
    bases: list[str]  # one per instance; every instance shares the database and Redis
    key: str
    env: dict[str, str]
    upstream: FakeUpstream

    def base(self, n: int) -> str:
        return self.bases[n % len(self.bases)]


@pytest.fixture(scope="module", params=[[2], [4], [2, 2]],
                ids=["2-workers", "4-workers", "two-instances-of-2"])
def served(request: pytest.FixtureRequest, pg_server: str, redis_server: str,
           fake_stripe: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The servers of one configuration, shared by its tests (each test reads only its own
    end users' rows: they run in either order)."""
    instances: list[int] = request.param
    tmp_path = tmp_path_factory.mktemp("money")
    with FakeUpstream() as upstream:
        tag = uuid.uuid4().hex[:6]
        worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
        url = create_database(pg_server, f"mlane_money_{worker}")
        (tmp_path / "meterlane.toml").write_text(gateway_toml(upstream.base_url) + f"""
[[plans]]
id = "pro-{tag}"
default = true
price = {{ amount = 2000, currency = "usd", interval = "month" }}
allowance = {ALLOWANCE}
overage = {{ price_per_1m_tokens = 1000, spend_cap = 100000 }}

[stripe]
api_base = "{fake_stripe}"
""")
        env = {**os.environ, "MLANE_DATABASE_URL": url,
               "MLANE_CONFIG": str(tmp_path / "meterlane.toml"),
               "MLANE_DATA_DIR": str(tmp_path / "var"), "MLANE_KEY_CACHE_SECONDS": "0",
               "MLANE_REDIS_URL": redis_server, "MLANE_REDIS_PREFIX": f"mc-{tag}:",
               "MLANE_STRIPE_API_KEY": "sk_test_money",
               "MLANE_STRIPE_WEBHOOK_SECRET": SECRET,
               # serve sizes its pools to own the server's 100 connections; here the other
               # test worker's servers share it. 20 per worker: 20 deliveries of one Stripe
               # event at once on a worker must not wait on its pool (see the note: a handler
               # holding the event's row lock while a pool of 10 was exhausted stalled 60 s)
               "MLANE_DB_POOL_SIZE": "5", "MLANE_DB_MAX_OVERFLOW": "15"}
        assert cli(env, "db", "upgrade").returncode == 0
        assert cli(env, "plans", "sync").returncode == 0
        key = cli(env, "keys", "create", "--role", "app", "--app", "acme").stdout.split()[-1]
        procs, bases = [], []
        try:
            for i, workers in enumerate(instances):  # each its own spool and journals
                own = {**env, "MLANE_DATA_DIR": str(tmp_path / f"var-{i}")}
                proc, base = _start(own, tmp_path, workers)
                procs.append(proc)
                bases.append(base)
            yield Served(bases, key, env, upstream)
        finally:
            for proc in procs:
                stop(proc)


def _start(env: dict[str, str], tmp: Path, workers: int) -> Any:
    import subprocess
    import sys

    from tests.e2e.test_serve import free_port, wait_ready

    port = free_port()
    log = (tmp / f"serve-{port}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port),
                             "--workers", str(workers)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base)
    return proc, base


def _get(base: str, key: str, path: str) -> Any:
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=30)
    conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    return resp.status, orjson.loads(resp.read())


def test_credits_and_overage_account_every_call_exactly_under_load(served: Served) -> None:
    base, key, env, upstream = served.bases[0], served.key, served.env, served.upstream
    url = env["MLANE_DATABASE_URL"]
    before = len(upstream.requests)  # the calls of the configuration's other test
    # whale checks out (a Stripe customer, the overage's destination); stays on the plan
    call = http_call(base, key)
    plan = tomllib.loads(Path(env["MLANE_CONFIG"]).read_text())["plans"][0]["id"]
    status, session = call("POST", "/v1/checkout/sessions", {
        "user": "whale", "plan": plan, "success_url": "https://a.example/ok",
        "cancel_url": "https://a.example/no", "consent_id": consent_for(call, "whale", plan)})
    assert status == 201, session
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=30)
    conn.request("POST", "/v1/users/whale/credits/grants", body=orjson.dumps({
        "amount": GRANTED, "source": "promotion", "external_id": "topup-1"}), headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert conn.getresponse().status == 201
    done = threading.Event()
    polls: list[int] = []

    def poll(n: int) -> None:  # the widget: every read accounts what it finds
        while not done.is_set():
            status, _body = _get(served.base(n), key, "/v1/users/whale/credits")
            polls.append(status)

    def call(n: int) -> None:
        client = openai.OpenAI(base_url=served.base(n) + "/v1", api_key=key, max_retries=0,
                               timeout=60)
        fake = {"delay_ms": 50 + (n * 97) % 750, "words": 10 + n % 30}
        if n % 2:
            for _ in client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, user="whale", stream=True,
                    extra_body={"fake": {**fake, "chunk_delay_ms": 5}}):
                pass
        else:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                           user="whale", extra_body={"fake": fake})

    pollers = [threading.Thread(target=poll, args=(n,)) for n in range(4)]
    for t in pollers:
        t.start()
    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(call, range(CALLS)))
    finally:
        done.set()
        for t in pollers:
            t.join()
    assert polls and all(s == 200 for s in polls)
    status, summary = _get(base, key, "/v1/users/whale/credits")  # accounts the rest
    assert status == 200

    engine = make_engine(url)
    try:
        from core.models import EndUser

        with engine.connect() as db:
            whale = db.execute(select(EndUser.id).where(EndUser.external_id == "whale")
                               ).scalar_one()
            rows = db.execute(select(UsageEvent.request_id, UsageEvent.input_tokens,
                                     UsageEvent.output_tokens, UsageEvent.status).where(
                UsageEvent.end_user_id == whale)).all()
            pending = db.execute(select(func.count()).select_from(UsageEvent).where(
                UsageEvent.end_user_id == whale, UsageEvent.credits_pending.is_(True))
            ).scalar_one()
            used = db.execute(select(CreditCursor.cycle_used).where(
                CreditCursor.end_user_id == whale)).scalar_one()
            burned = int(db.execute(select(func.coalesce(func.sum(CreditBurn.amount), 0))
                                    .where(CreditBurn.end_user_id == whale)).scalar_one())
            overage = int(db.execute(select(func.coalesce(
                func.sum(CreditOverage.credits), 0)).where(
                CreditOverage.end_user_id == whale)).scalar_one())
            overage_events = db.execute(select(func.count()).select_from(CreditOverage)
                                        ).scalar_one()
    finally:
        engine.dispose()
    served_calls = upstream.requests[before:]
    assert len(served_calls) == CALLS == len(rows)
    by_id = {r.request_id: r for r in rows}
    served_tokens = 0
    for req in served_calls:  # what the upstream served, as it reported it
        body = req["body"]
        served_tokens += prompt_tokens(req["path"], body) + completion_tokens(body)
        assert req["headers"]["x-meterlane-request-id"] in by_id
    ledger_tokens = sum(r.input_tokens + r.output_tokens for r in rows)
    assert ledger_tokens == served_tokens
    assert pending == 0
    assert used == ledger_tokens  # every call accounted once, none skipped
    assert burned + overage == max(0, ledger_tokens - ALLOWANCE)
    assert summary["granted"] == GRANTED == summary["burned"] + summary["expired"] \
        + summary["balance"]
    assert summary["burned"] == burned

    # the overage run: sent to Stripe, summed there, and reconciled against the ledger
    expected = max(0, ledger_tokens - ALLOWANCE - GRANTED)
    assert overage == expected > 0
    sent = cli(env, "billing", "report-overage")
    assert sent.returncode == 0 and f"reported {overage_events} overage" in sent.stdout, \
        sent.stdout + sent.stderr
    period = utcnow().strftime("%Y-%m")
    rec = cli(env, "billing", "reconcile", "--period", period)
    assert rec.returncode == 0 and "all reconciled" in rec.stdout, rec.stdout + rec.stderr
    [line] = [ln.split() for ln in rec.stdout.splitlines()
              if ln.split()[:1] == [str(whale)] and ln.endswith(" ok")]
    assert [int(v.replace(",", "")) for v in line[3:7]] == [expected] * 4  # ledger ..stripe


def _deliver(base: str, payload: bytes) -> tuple[int, str]:
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=60)
    conn.request("POST", "/v1/stripe/webhook", body=payload,
                 headers={**stripe_headers(payload, SECRET), "Content-Type": "application/json"})
    resp = conn.getresponse()
    body = orjson.loads(resp.read() or b"{}")
    return resp.status, str(body.get("outcome", body))


def _event(kind: str, obj: dict[str, Any], created: int) -> bytes:
    return orjson.dumps({"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": kind,
                         "created": created, "data": {"object": obj}}, default=str)


def _at_once(served: Served, payloads: list[bytes]) -> list[tuple[int, str]]:
    """Each payload delivered at the same moment, spread over the instances' workers. A
    delivery answered 503 (the database had no connection to spare: this suite's other
    servers share it) is delivered again, as Stripe does, until it is answered."""
    start = threading.Barrier(len(payloads))

    def one(n: int) -> tuple[int, str]:
        start.wait()
        answer = _deliver(served.base(n), payloads[n])
        for retry in range(12):
            if answer[0] != 503:
                break
            time.sleep(min(2.0, 0.05 * 2 ** retry))  # Stripe waits before it retries
            answer = _deliver(served.base(n + 1), payloads[n])
        return answer

    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(one, range(len(payloads))))


def test_stripe_events_delivered_twenty_at_once_apply_once_and_ties_follow_stripe(
        served: Served, fake_stripe: str) -> None:
    """Every kind of Stripe event the service applies, delivered 20 times at once over the
    workers (and instances): one delivery applies it, the others answer `duplicate`, and the
    money it carries lands once. Then two events of one subscription stamped in the same
    second, delivered at once, newer state and older: the subscription ends as Stripe has it."""
    import urllib.request

    import stripe

    from plans.models import CreditGrant, RevenueEvent, Subscription

    env = served.env
    plan = tomllib.loads(Path(env["MLANE_CONFIG"]).read_text())["plans"][0]["id"]
    client = openai.OpenAI(base_url=served.bases[0] + "/v1", api_key=served.key, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user="payer")
    engine = served_engine(env)
    try:
        from core.models import EndUser

        with engine.connect() as db:
            app_id, user_id = db.execute(select(EndUser.app_id, EndUser.id).where(
                EndUser.external_id == "payer")).one()
        owner = {"mlane_app_id": str(app_id), "mlane_end_user_id": str(user_id)}
        fake = stripe.StripeClient("sk_test_money", base_addresses={"api": fake_stripe})
        customer = fake.v1.customers.create(params={"email": "payer@example.com"})
        [price] = fake.v1.prices.list(params={"lookup_keys": [f"{plan}@1"]}).data
        sub = fake.v1.subscriptions.create(params={
            "customer": customer.id, "items": [{"price": price.id, "quantity": 1}],
            "metadata": owner})
        now = int(utcnow().timestamp()) - 600
        current = fake.v1.subscriptions.retrieve(sub.id).to_dict()
        kinds: list[tuple[str, dict[str, Any]]] = [
            ("checkout.session.completed", {
                "id": "cs_money", "object": "checkout.session", "mode": "payment",
                "payment_status": "paid", "amount_total": 1000, "currency": "usd",
                "customer": customer.id, "metadata": {**owner, "mlane_credits": "5000"}}),
            ("invoice.paid", {"id": "in_money", "object": "invoice", "amount_paid": 2000,
                              "currency": "usd", "customer": customer.id, "metadata": owner}),
            ("charge.refunded", {"id": "ch_money", "object": "charge", "amount_refunded": 500,
                                 "currency": "usd", "customer": customer.id,
                                 "metadata": owner}),
            ("customer.subscription.created", current),
            ("customer.subscription.updated", {**current, "cancel_at_period_end": True}),
        ]
        for i, (kind, obj) in enumerate(kinds):
            answers = _at_once(served, [_event(kind, obj, now + i)] * 20)
            assert all(status == 200 for status, _ in answers), (kind, answers)
            outcomes = sorted(o for _, o in answers)
            assert outcomes == ["duplicate"] * 19 + ["handled"], (kind, outcomes)

        # Tie: Stripe now says past_due; its past_due event and a stale `active` one carry
        # the same second and arrive together, on different workers.
        req = urllib.request.Request(f"{fake_stripe}/_config/subscriptions/{sub.id}",
                                     data=orjson.dumps({"status": "past_due"}), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()  # noqa: S310 - the fake on loopback
        past_due = fake.v1.subscriptions.retrieve(sub.id).to_dict()
        tie = now + len(kinds)
        answers = _at_once(served, [
            _event("customer.subscription.updated", obj, tie) for obj in (past_due, current)])
        assert [s for s, _ in answers] == [200, 200], answers
        with engine.connect() as db:
            status = db.execute(select(Subscription.status).where(
                Subscription.id == sub.id)).scalar_one()
        assert status == "past_due"

        deleted = {**past_due, "status": "canceled"}
        answers = _at_once(served, [_event("customer.subscription.deleted", deleted,
                                           tie + 1)] * 20)
        assert sorted(o for _, o in answers) == ["duplicate"] * 19 + ["handled"], answers
        with engine.connect() as db:
            status = db.execute(select(Subscription.status).where(
                Subscription.id == sub.id)).scalar_one()
            grants = db.execute(select(func.sum(CreditGrant.amount)).where(
                CreditGrant.end_user_id == user_id)).scalar_one()
            facts = sorted(db.execute(select(RevenueEvent.kind, RevenueEvent.amount)).all())
        assert status == "canceled"
        assert grants == 5000  # the credit pack, once
        assert [tuple(f) for f in facts] == [  # each payment and the refund, once
            ("credit_purchase", 1000), ("invoice_paid", 2000), ("refund", -500)]
    finally:
        engine.dispose()
