"""Money under concurrency, against a real `meterlane serve` of 2 and of 4 workers on Postgres
and Redis: 300 calls of one end user, 32 at a time (streamed and not, the upstream answering in 50
to 800 ms, so the workers' ledger writers commit out of id order) while the app polls their
credits, as the quota widget does. Then, from the raw ledger:

- every call the upstream saw has a row, and the ledger's tokens are those it served;
- no usage is left unaccounted, and what was accounted is the ledger's usage exactly:
  allowance used + credits burned + overage = the ledger's credits;
- credits are conserved: granted = burned + expired + balance;
- the overage run: `billing report-overage` sends it to (a fake) Stripe, whose meter sums
  exactly the ledger's usage past the allowance and the credits, and `billing reconcile`
  agrees call by call.

On main the accounting read `id > cursor`: with the polling, rows committed after a higher
id was accounted were skipped for good (3 of 4 runs of this test lost 54 to 195 tokens)."""

from __future__ import annotations

import http.client
import os
import threading
import tomllib
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
from tests.e2e.test_serve import MESSAGES, cli, stop
from tests.support.consent import consent_for, http_call
from tests.support.fake_openai import completion_tokens, prompt_tokens
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e
CALLS, PARALLEL, ALLOWANCE, GRANTED = 300, 32, 2000, 3000


@pytest.fixture(params=[2, 4], ids=["2-workers", "4-workers"])
def served(request: pytest.FixtureRequest, pg_server: str, redis_server: str,
           fake_stripe: str, tmp_path: Path
           ) -> Iterator[tuple[str, str, dict[str, str], FakeUpstream]]:
    workers = request.param
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
               "MLANE_STRIPE_API_KEY": "sk_test_money"}
        assert cli(env, "db", "upgrade").returncode == 0
        assert cli(env, "plans", "sync").returncode == 0
        key = cli(env, "keys", "create", "--role", "app", "--app", "acme").stdout.split()[-1]
        proc, base = _start(env, tmp_path, workers)
        try:
            yield base, key, env, upstream
        finally:
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


def test_credits_and_overage_account_every_call_exactly_under_load(
        served: tuple[str, str, dict[str, str], FakeUpstream]) -> None:
    base, key, env, upstream = served
    url = env["MLANE_DATABASE_URL"]
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

    def poll() -> None:  # the widget: every read accounts what it finds
        while not done.is_set():
            status, _body = _get(base, key, "/v1/users/whale/credits")
            polls.append(status)

    def call(n: int) -> None:
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
        fake = {"delay_ms": 50 + (n * 97) % 750, "words": 10 + n % 30}
        if n % 2:
            for _ in client.chat.completions.create(
                    model="gpt-4o-mini", messages=MESSAGES, user="whale", stream=True,
                    extra_body={"fake": {**fake, "chunk_delay_ms": 5}}):
                pass
        else:
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                           user="whale", extra_body={"fake": fake})

    pollers = [threading.Thread(target=poll) for _ in range(4)]
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
        with engine.connect() as db:
            rows = db.execute(select(UsageEvent.request_id, UsageEvent.input_tokens,
                                     UsageEvent.output_tokens, UsageEvent.status)).all()
            pending = db.execute(select(func.count()).select_from(UsageEvent).where(
                UsageEvent.credits_pending.is_(True))).scalar_one()
            used = db.execute(select(CreditCursor.cycle_used)).scalar_one()
            burned = int(db.execute(select(func.coalesce(func.sum(CreditBurn.amount), 0))
                                    ).scalar_one())
            overage = int(db.execute(select(func.coalesce(
                func.sum(CreditOverage.credits), 0))).scalar_one())
            overage_events = db.execute(select(func.count()).select_from(CreditOverage)
                                        ).scalar_one()
    finally:
        engine.dispose()
    served_calls = upstream.requests
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
    [line] = [ln.split() for ln in rec.stdout.splitlines() if " ok" in ln and "cus_" in ln]
    assert [int(v.replace(",", "")) for v in line[3:7]] == [expected] * 4  # ledger ..stripe
