"""Idempotency-Key on a real `meterlane serve` (two gevent workers, Postgres): a client that
retries after a timeout gets its first answer, whichever worker takes the retry, and the
upstream is called once; a retry while the first is still running is a 409 with Retry-After."""

from __future__ import annotations

import http.client
import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from metering.models import UsageEvent
from tests.conftest import gateway_toml
from tests.e2e.test_serve import cli, served_engine, start_server, stop
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e


@dataclass
class Served:
    base: str
    key: str
    engine: Engine

    def post(self, path: str, body: dict[str, Any], idem: str,
             timeout: float = 30) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(self.base.split("//")[1], timeout=timeout)
        conn.request("POST", path, body=orjson.dumps(body), headers={
            "Authorization": f"Bearer {self.key}", "Content-Type": "application/json",
            "Idempotency-Key": idem})
        return conn.getresponse()


@pytest.fixture(scope="module")
def served(pg_server: str, upstream: FakeUpstream,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("idem")
    url = create_database(pg_server,
                          f"mlane_idem_{os.environ.get('PYTEST_XDIST_WORKER', 'm')}")
    (tmp / "meterlane.toml").write_text(gateway_toml(upstream.base_url))
    env = {**os.environ, "MLANE_DATABASE_URL": url, "MLANE_CONFIG": str(tmp / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp / "var"), "MLANE_KEY_CACHE_SECONDS": "0"}
    assert cli(env, "db", "upgrade").returncode == 0
    created = cli(env, "keys", "create", "--role", "app", "--app", "idem")
    assert created.returncode == 0, created.stderr
    proc, base = start_server(env, Path(tmp))
    engine = served_engine(env)
    try:
        yield Served(base=base, key=created.stdout.strip().splitlines()[-1], engine=engine)
    finally:
        stop(proc)
        engine.dispose()


def chat(user: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "user": user,
            "messages": [{"role": "user", "content": "Tell me about the quick brown fox"}],
            **extra}


def sent_for(upstream: FakeUpstream, user: str) -> int:
    return sum(1 for r in upstream.requests
               if isinstance(r["body"], dict) and r["body"].get("user") == user)


def ledger_for(engine: Engine, user_marker: str) -> list[Any]:
    with engine.connect() as conn:
        return [r for r in conn.execute(select(UsageEvent.__table__).order_by(UsageEvent.id))
                if r.idempotency_key.startswith(user_marker)]


def test_a_retried_call_is_replayed_without_a_second_upstream_call(
        served: Served, upstream: FakeUpstream) -> None:
    user = f"sdk-{uuid.uuid4().hex[:8]}"
    key = f"{user}-call"
    client = openai.OpenAI(base_url=served.base + "/v1", api_key=served.key, max_retries=0)
    headers = {"Idempotency-Key": key}
    first = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", user=user, extra_headers=headers,
        messages=[{"role": "user", "content": "Tell me about the quick brown fox"}])
    answers = [first]
    for _ in range(4):  # whichever of the two workers takes it
        answers.append(client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", user=user, extra_headers=headers,
            messages=[{"role": "user", "content": "Tell me about the quick brown fox"}]))
    assert first.headers.get("Idempotent-Replayed") is None
    for again in answers[1:]:
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.http_response.content == first.http_response.content
        assert again.parse().id == first.parse().id
    assert sent_for(upstream, user) == 1
    [row] = ledger_for(served.engine, key)
    assert row.status == "ok"


def test_a_retry_while_the_first_runs_is_409_and_then_gets_the_answer(
        served: Served, upstream: FakeUpstream) -> None:
    user = f"slow-{uuid.uuid4().hex[:8]}"
    key = f"{user}-call"
    body = chat(user, fake={"delay_ms": 2000})  # the upstream holds the first (timeout: 3 s)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(lambda: served.post("/v1/chat/completions", body, key))
        deadline = time.monotonic() + 20
        while not sent_for(upstream, user):  # the first call reached the upstream: it holds
            assert time.monotonic() < deadline, "the first call never reached the upstream"
            time.sleep(0.02)  # polling, with a deadline
        running = served.post("/v1/chat/completions", body, key)
        running_body = orjson.loads(running.read())
        assert running.status == 409, running_body
        assert running.getheader("Retry-After") is not None
        assert running_body["error"]["code"] == "idempotency_key_in_use"
        answer = first.result(timeout=30)
        answer_body = answer.read()
        assert answer.status == 200, answer_body
    replay = served.post("/v1/chat/completions", body, key)
    assert replay.status == 200 and replay.getheader("Idempotent-Replayed") == "true"
    assert replay.read() == answer_body
    assert sent_for(upstream, user) == 1
    assert len(ledger_for(served.engine, key)) == 1
