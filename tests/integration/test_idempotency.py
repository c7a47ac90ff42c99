"""Idempotency-Key on every write: a retry with the same key and body gets the first answer
again (never a second upstream call or ledger row); another body is a 422; keys are per app."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from metering.models import UsageEvent
from tests.conftest import Keys, bearer
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"


def chat(user: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "user": user,
            "messages": [{"role": "user", "content": "Say hello to the world"}], **extra}


def keyed(key: str, idem: str, **headers: str) -> dict[str, str]:
    return bearer(key, **{"Idempotency-Key": idem}, **headers)


def ledger(engine: Engine, user: str | None = None) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(UsageEvent.__table__).order_by(UsageEvent.id)))


def sent_for(upstream: FakeUpstream, user: str) -> list[dict[str, Any]]:
    """What the upstream received for this end user (the fake is shared by the session)."""
    return [r for r in upstream.requests
            if isinstance(r["body"], dict) and r["body"].get("user") == user]


def test_a_retried_call_is_replayed_without_a_second_upstream_call(
        client: Any, keys: Keys, upstream: FakeUpstream, clean_db: Engine) -> None:
    user = f"kim-{uuid.uuid4().hex[:8]}"
    first = client.post(CHAT, json=chat(user), headers=keyed(keys.app, "call-1"))
    assert first.status_code == 200, first.data
    assert "Idempotent-Replayed" not in first.headers
    again = client.post(CHAT, json=chat(user), headers=keyed(keys.app, "call-1"))
    assert again.status_code == 200, again.data
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Content-Type"] == first.headers["Content-Type"]
    assert again.data == first.data
    # the replay is a request of its own; it names the one it replays
    assert again.headers["X-Meterlane-Request-Id"] != first.headers["X-Meterlane-Request-Id"]
    assert again.headers["Original-Request"] == first.headers["X-Meterlane-Request-Id"]
    assert len(sent_for(upstream, user)) == 1
    [row] = ledger(clean_db)
    assert row.idempotency_key == "call-1"


def test_the_same_key_with_another_body_is_422_in_the_route_envelope(
        client: Any, keys: Keys, upstream: FakeUpstream, clean_db: Engine) -> None:
    user = f"lea-{uuid.uuid4().hex[:8]}"
    assert client.post(CHAT, json=chat(user), headers=keyed(keys.app, "k")).status_code == 200
    other = client.post(CHAT, json=chat(user, temperature=0.5), headers=keyed(keys.app, "k"))
    assert other.status_code == 422, other.data
    error = other.get_json()["error"]  # OpenAI's envelope on a gateway route
    assert error["code"] == "idempotency_key_reused" and "Idempotency-Key" in error["message"]
    # another route with the same key is another request too
    emb = client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": "x",
                                              "user": user}, headers=keyed(keys.app, "k"))
    assert emb.status_code == 422
    assert len(sent_for(upstream, user)) == 1
    assert len(ledger(clean_db)) == 1


def test_two_apps_using_one_key_never_see_each_others_answers(
        client: Any, keys: Keys, upstream: FakeUpstream, clean_db: Engine) -> None:
    user = f"max-{uuid.uuid4().hex[:8]}"
    acme = client.post(CHAT, json=chat(user), headers=keyed(keys.app, "shared"))
    globex = client.post(CHAT, json=chat(user), headers=keyed(keys.other_app, "shared"))
    assert acme.status_code == globex.status_code == 200
    assert "Idempotent-Replayed" not in globex.headers
    assert acme.get_json()["id"] != globex.get_json()["id"]
    assert len(sent_for(upstream, user)) == 2
    # each app's retry gets its own answer back
    again = client.post(CHAT, json=chat(user), headers=keyed(keys.other_app, "shared"))
    assert again.headers["Idempotent-Replayed"] == "true" and again.data == globex.data
    assert len(ledger(clean_db)) == 2


def test_a_management_post_is_replayed_not_done_twice(client: Any, keys: Keys,
                                                      clean_db: Engine) -> None:
    body = {"model": "gpt-4o-mini", "input": "0.20", "output": "0.80"}
    first = client.post("/v1/prices", json=body, headers=keyed(keys.admin, "price-1"))
    assert first.status_code == 201, first.data
    again = client.post("/v1/prices", json=body, headers=keyed(keys.admin, "price-1"))
    assert again.status_code == 201, again.data
    assert again.headers["Idempotent-Replayed"] == "true" and again.data == first.data
    listed = client.get("/v1/prices?model=gpt-4o-mini", headers=bearer(keys.admin)).get_json()
    assert [p["input"] for p in listed["data"] if p["source"] == "api"] == ["0.2"]
    changed = client.post("/v1/prices", json={**body, "input": "0.30"},
                          headers=keyed(keys.admin, "price-1"))
    assert changed.status_code == 422
    assert changed.mimetype == "application/problem+json"
    assert changed.get_json()["type"].endswith("/idempotency-key-reused")


def test_an_error_is_not_kept_and_a_retry_runs_again(
        client: Any, keys: Keys, upstream: FakeUpstream, clean_db: Engine) -> None:
    user = f"ned-{uuid.uuid4().hex[:8]}"
    upstream.behaviour = {"status": 500}
    try:
        failed = client.post(CHAT, json=chat(user), headers=keyed(keys.app, "flaky"))
    finally:
        upstream.behaviour = {}
    assert failed.status_code >= 500, failed.data
    ok = client.post(CHAT, json=chat(user), headers=keyed(keys.app, "flaky"))
    assert ok.status_code == 200, ok.data
    assert "Idempotent-Replayed" not in ok.headers
    again = client.post(CHAT, json=chat(user), headers=keyed(keys.app, "flaky"))
    assert again.headers["Idempotent-Replayed"] == "true" and again.data == ok.data
    assert len(sent_for(upstream, user)) == 2  # the failed attempt and the one that answered
    rows = ledger(clean_db)
    assert [r.status for r in rows] == ["upstream_error", "ok"]  # each attempt once
    assert [r.idempotency_key for r in rows] == [f"flaky#{rows[0].request_id}", "flaky"]


def test_a_stream_that_failed_or_was_refused_lets_its_key_go(
        client: Any, keys: Keys, upstream: FakeUpstream, clean_db: Engine) -> None:
    user = f"quy-{uuid.uuid4().hex[:8]}"
    body = chat(user, stream=True)
    upstream.behaviour = {"status": 500}
    try:
        failed = client.post(CHAT, json=body, headers=keyed(keys.app, "s-2"))
    finally:
        upstream.behaviour = {}
    assert failed.status_code >= 500, failed.data
    ok = client.post(CHAT, json=body, headers=keyed(keys.app, "s-2"))
    assert ok.status_code == 200 and b"[DONE]" in ok.get_data()
    again = client.post(CHAT, json=body, headers=keyed(keys.app, "s-2"))
    assert again.status_code == 409, again.data  # answered once: never forwarded again
    assert len(sent_for(upstream, user)) == 2
    rows = ledger(clean_db)
    assert [(r.status, r.idempotency_key) for r in rows] == [
        ("upstream_error", f"s-2#{rows[0].request_id}"), ("ok", "s-2")]


def test_an_expired_answer_is_not_replayed(client: Any, keys: Keys, upstream: FakeUpstream,
                                           clean_db: Engine) -> None:
    user = f"ola-{uuid.uuid4().hex[:8]}"
    first = client.post(CHAT, json=chat(user), headers=keyed(keys.app, "old"))
    assert first.status_code == 200
    with clean_db.begin() as conn:
        conn.execute(text("UPDATE idempotency_records SET expires_at = expires_at - "
                          "interval '25 hours'"))
    later = client.post(CHAT, json=chat(user), headers=keyed(keys.app, "old"))
    assert later.status_code == 200 and "Idempotent-Replayed" not in later.headers
    assert later.get_json()["id"] != first.get_json()["id"]
    assert len(sent_for(upstream, user)) == 2


def test_a_streamed_calls_key_still_deduplicates_its_ledger_row(
        client: Any, keys: Keys, upstream: FakeUpstream, clean_db: Engine) -> None:
    user = f"pia-{uuid.uuid4().hex[:8]}"
    body = chat(user, stream=True)
    first = client.post(CHAT, json=body, headers=keyed(keys.app, "s-1"))
    assert first.status_code == 200 and first.mimetype == "text/event-stream"
    first.get_data()
    again = client.post(CHAT, json=body, headers=keyed(keys.app, "s-1"))
    assert again.status_code == 409, again.data  # a stream is not kept: no replay
    assert "Idempotent-Replayed" not in again.headers
    with clean_db.begin() as conn:  # the kept record gone, the ledger still knows the key
        conn.execute(text("DELETE FROM idempotency_records"))
    late = client.post(CHAT, json=body, headers=keyed(keys.app, "s-1"))
    assert late.status_code == 409 and late.get_json()["error"]["code"] == "conflict"
    assert len(sent_for(upstream, user)) == 1
    [row] = ledger(clean_db)
    assert row.idempotency_key == "s-1" and row.stream


def test_a_new_keys_secret_is_never_kept_for_a_replay(client: Any, keys: Keys,
                                                     clean_db: Engine) -> None:
    body = {"role": "app", "app": "acme"}
    made = client.post("/v1/keys", json=body, headers=keyed(keys.admin, "mint-1"))
    assert made.status_code == 201, made.data
    secret = made.get_json()["key"]
    again = client.post("/v1/keys", json=body, headers=keyed(keys.admin, "mint-1"))
    assert again.status_code == 409, again.data  # not minted twice, not shown twice
    assert secret.encode() not in again.data
    with clean_db.connect() as conn:
        bodies = [r.body for r in conn.execute(text("SELECT body FROM idempotency_records"))]
    assert all(b is None or secret.encode() not in bytes(b) for b in bodies)


def test_a_malformed_key_is_a_400(client: Any, keys: Keys, clean_db: Engine) -> None:
    resp = client.post(CHAT, json=chat("quinn"), headers=keyed(keys.app, "x" * 300))
    assert resp.status_code == 400
    assert "Idempotency-Key" in orjson.loads(resp.data)["error"]["message"]


def test_anthropic_messages_are_replayed_and_refused_in_anthropics_envelope(
        client: Any, keys: Keys, upstream: FakeUpstream, clean_db: Engine) -> None:
    user = f"ray-{uuid.uuid4().hex[:8]}"
    headers = {"X-Api-Key": keys.app, "X-Meterlane-User": user, "Idempotency-Key": "m-1"}
    body = {"model": "gpt-4o-mini", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]}
    first = client.post("/v1/messages", json=body, headers=headers)
    assert first.status_code == 200, first.data
    again = client.post("/v1/messages", json=body, headers=headers)
    assert again.headers["Idempotent-Replayed"] == "true" and again.data == first.data
    other_user = client.post("/v1/messages", json=body,
                             headers={**headers, "X-Meterlane-User": user + "-b"})
    assert other_user.status_code == 422  # the end user named is part of the request
    assert other_user.get_json()["type"] == "error"  # Anthropic's envelope
    assert len(ledger(clean_db)) == 1


def test_a_key_held_by_a_request_that_died_lapses(clean_db: Engine) -> None:
    from datetime import timedelta

    from core.db import utcnow
    from core.idempotency import (
        Claim,
        IdempotencyKeyInUseError,
        IdempotencyService,
        Kept,
    )

    now = utcnow()
    service = IdempotencyService(clean_db, lapse=timedelta(minutes=15), clock=lambda: now)
    assert service.begin("app:1", "k", "f", "req_dead") == Claim("app:1", "k", "req_dead")
    now += timedelta(minutes=14)
    with pytest.raises(IdempotencyKeyInUseError) as held:
        service.begin("app:1", "k", "f", "req_retry")
    assert held.value.headers["Retry-After"] == "1"
    now += timedelta(minutes=2)  # its request never finished: the retry runs
    retry = service.begin("app:1", "k", "f", "req_retry")
    assert retry == Claim("app:1", "k", "req_retry")
    # the first request, had it lived on, can neither keep its answer nor let go the key now
    service.finish(Claim("app:1", "k", "req_dead"), status=200, headers={}, body=b"old")
    service.release(Claim("app:1", "k", "req_dead"))
    service.finish(retry, status=201, headers={"Content-Type": "application/json",
                                               "X-Other": "x"}, body=b"{}")
    assert service.begin("app:1", "k", "f", "req_3") == Kept(
        status=201, headers={"Content-Type": "application/json"}, body=b"{}",
        request_id="req_retry")


def test_of_many_requests_racing_on_one_key_exactly_one_runs(clean_db: Engine) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from core.idempotency import Claim, IdempotencyKeyInUseError, IdempotencyService

    service = IdempotencyService(clean_db)

    def attempt(i: int) -> str:
        try:
            found = service.begin("app:1", "race", "f", f"req_{i}")
        except IdempotencyKeyInUseError:
            return "in use"
        return "claimed" if isinstance(found, Claim) else "replayed"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, range(16)))
    assert outcomes.count("claimed") == 1 and outcomes.count("in use") == 15


def test_the_idempotency_job_deletes_expired_records(app: Any, client: Any, keys: Keys,
                                                     clean_db: Engine) -> None:
    from core.worker import Worker, lock_factory

    for key in ("a", "b"):
        resp = client.post("/v1/prices", json={"model": "o3-mini", "input": "1", "output": "2",
                                              "effective_from": f"2030-01-0{1 + (key == 'b')}"
                                              "T00:00:00Z"}, headers=keyed(keys.admin, key))
        assert resp.status_code == 201, resp.data
    with clean_db.begin() as conn:
        conn.execute(text("UPDATE idempotency_records SET expires_at = now() - interval '1 "
                          "second' WHERE key = 'a'"))
    board = app.extensions["wiring"].jobs
    worker = Worker(board, lock_factory(board.engine, app.extensions["wiring"].config.data_dir),
                    name="test:1", only=["idempotency"])
    [run] = worker.tick()
    assert run.ok
    with clean_db.connect() as conn:
        assert [r.key for r in conn.execute(text("SELECT key FROM idempotency_records"))] == ["b"]


def test_write_routes_document_the_idempotency_key(client: Any) -> None:
    resp = client.get("/openapi.json")
    doc = resp.get_json()
    assert resp.status_code == 200, doc
    ref = {"$ref": "#/components/parameters/IdempotencyKey"}
    assert ref in doc["paths"]["/v1/prices"]["post"]["parameters"]
    assert ref not in doc["paths"]["/v1/prices"]["get"]["parameters"]
    assert doc["components"]["parameters"]["IdempotencyKey"]["in"] == "header"


def test_replays_work_on_the_embedded_sqlite_default(upstream: FakeUpstream,
                                                     tmp_path: Any) -> None:
    from app import create_app
    from tests.conftest import config_from_toml, gateway_toml, make_keys

    config = config_from_toml(gateway_toml(upstream.base_url), tmp_path,
                              database_url=f"sqlite:///{tmp_path / 'embedded.db'}")
    app = create_app(config)
    try:
        keys, client = make_keys(app), app.test_client()
        user = f"sue-{uuid.uuid4().hex[:8]}"
        first = client.post(CHAT, json=chat(user), headers=keyed(keys.app, "lite"))
        assert first.status_code == 200, first.data
        again = client.post(CHAT, json=chat(user), headers=keyed(keys.app, "lite"))
        assert again.headers["Idempotent-Replayed"] == "true" and again.data == first.data
        other = client.post(CHAT, json=chat(user, n=2), headers=keyed(keys.app, "lite"))
        assert other.status_code == 422
        assert len(sent_for(upstream, user)) == 1
        ledger_rows = ledger(app.extensions["wiring"].engine)
        assert [r.idempotency_key for r in ledger_rows] == ["lite"]
    finally:
        app.extensions["wiring"].engine.dispose()


PLAN = """
[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 100000
"""


def test_the_metering_api_replays_and_keeps_its_own_key(
        clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Any) -> None:
    from app import create_app
    from tests.conftest import config_from_toml, gateway_toml, make_keys

    app = create_app(config_from_toml(gateway_toml(upstream.base_url) + PLAN, tmp_path,
                                      database_url=pg_url))
    try:
        _metering_api_replays(app.test_client(), make_keys(app), clean_db)
    finally:
        app.extensions["wiring"].engine.dispose()


def _metering_api_replays(client: Any, keys: Keys, clean_db: Engine) -> None:
    track = {"user": "tia", "model": "gpt-4o-mini", "idempotency_key": "job-1",
             "usage": {"input_tokens": 10, "output_tokens": 5}}
    first = client.post("/v1/meter/track", json=track, headers=keyed(keys.app, "h-1"))
    assert first.status_code == 201, first.data
    again = client.post("/v1/meter/track", json=track, headers=keyed(keys.app, "h-1"))
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.data == first.data
    # the body's own key still counts the event once, whatever the header says
    other = client.post("/v1/meter/track", json=track, headers=keyed(keys.app, "h-2"))
    assert other.status_code == 200 and other.get_json()["outcome"] == "duplicate"
    assert len(ledger(clean_db)) == 1


ONE_A_MINUTE = """
[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "requests"
window = "minute"
amount = 1
"""


def test_a_call_refused_by_a_limit_is_not_kept_and_its_retry_is_judged_again(
        clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Any) -> None:
    from app import create_app
    from tests.conftest import config_from_toml, gateway_toml, make_keys

    app = create_app(config_from_toml(gateway_toml(upstream.base_url) + ONE_A_MINUTE,
                                      tmp_path, database_url=pg_url))
    limits = app.extensions["wiring"].limits
    pinned = limits.clock()
    limits.clock = lambda: pinned  # one minute throughout: the refusals must not depend on when
    try:
        client, keys = app.test_client(), make_keys(app)
        user = f"uma-{uuid.uuid4().hex[:8]}"
        assert client.post(CHAT, json=chat(user), headers=keyed(keys.app, "a")).status_code \
            == 200
        refused = client.post(CHAT, json=chat(user, n=1), headers=keyed(keys.app, "b"))
        assert refused.status_code == 429 and "Retry-After" in refused.headers
        # the retry is the limit's to judge again (once the minute is over it runs), never a
        # replay of the 429 nor a 409 for a key "already used" by the refusal's ledger row
        retry = client.post(CHAT, json=chat(user, n=1), headers=keyed(keys.app, "b"))
        assert retry.status_code == 429, retry.data
        assert "Idempotent-Replayed" not in retry.headers
        assert len(sent_for(upstream, user)) == 1
    finally:
        app.extensions["wiring"].engine.dispose()
