"""Corrections: an event voided or amended by a new event naming it (append-only: the ledger
keeps both), through POST /v1/meter/corrections and CloudEvents; what every reader of usage
counts after it (usage, quota on both limit stores, finance roll-ups, credits); refusals
(unknown, another app's, corrected twice) and replays."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from metering.models import UsageEvent
from tests.conftest import Keys, bearer, config_from_toml, make_keys
from tests.integration.test_event_time import ONE, sqlite_world, track, used_today
from tests.integration.test_event_time import toml as limits_toml
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
__all__ = ["sqlite_world"]  # the embedded default's fixture (test_event_time)
BATCH = "application/cloudevents-batch+json"


@pytest.fixture(params=["sql", "redis"])
def world(request: pytest.FixtureRequest, clean_db: Engine, pg_url: str,
          upstream: FakeUpstream, tmp_path: Path) -> Iterator[tuple[Any, Keys]]:
    from app import create_app

    config = config_from_toml(limits_toml(upstream.base_url), tmp_path, database_url=pg_url)
    if request.param == "redis":
        config = replace(config, redis_url=request.getfixturevalue("redis_server"),
                         redis_prefix=f"mlc-{uuid.uuid4().hex[:8]}:")
    app = create_app(config)
    app.extensions["wiring"].finance.prices.refresh_seconds = 0
    try:
        yield app, make_keys(app)
    finally:
        app.extensions["wiring"].engine.dispose()


def correct(client: Any, key: str, corrects: str, action: str, idem: str,
            **more: Any) -> Any:
    return client.post("/v1/meter/corrections", headers=bearer(key), json={
        "idempotency_key": idem, "corrects": corrects, "action": action, **more})


def usage(client: Any, key: str) -> dict[str, Any]:
    body = client.get("/v1/usage?user=ana", headers=bearer(key))
    assert body.status_code == 200, body.data
    totals: dict[str, Any] = body.get_json()["totals"]
    return totals


def ledger(app: Any) -> list[tuple[Any, ...]]:
    with app.extensions["wiring"].engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(UsageEvent.__table__)
                                               .order_by(UsageEvent.id))]


def test_void_and_amend_change_usage_and_quota_and_keep_the_ledger_append_only(
        world: tuple[Any, Keys]) -> None:
    app, keys = world
    client = app.test_client()
    assert track(client, keys.app, tokens=300, idem="e1").status_code == 201
    assert track(client, keys.app, tokens=200, idem="e2").status_code == 201
    assert used_today(client, keys.app) == 500
    before = ledger(app)

    void = correct(client, keys.app, "e1", "void", "fix-1")
    assert void.status_code == 201, void.data
    assert void.get_json().items() >= {"outcome": "corrected", "action": "void", "user": "ana",
                                       "cost_usd": "0", "corrects": "e1"}.items()
    assert used_today(client, keys.app) == 200  # given back in the open window
    assert usage(client, keys.app)["input_tokens"] == 200
    assert usage(client, keys.app)["requests"] == 1

    # the same correction again: replayed, nothing given back twice
    again = correct(client, keys.app, "e1", "void", "fix-1")
    assert again.status_code == 200 and again.get_json()["outcome"] == "duplicate"
    assert used_today(client, keys.app) == 200

    amend = correct(client, keys.app, "e2", "amend", "fix-2", usage={"input_tokens": 50})
    assert amend.status_code == 201, amend.data
    assert used_today(client, keys.app) == 50
    totals = usage(client, keys.app)
    assert (totals["input_tokens"], totals["requests"]) == (50, 1)
    # cost of the amendment at the model's price: 50 x 0.15 USD / 1M
    assert totals["cost_usd"] == amend.get_json()["cost_usd"] == "0.0000075"

    # the originals are untouched; each correction is a row of its own naming its original
    after = ledger(app)
    assert after[:2] == before
    rows = {r.idempotency_key: r for r in _rows(app)}
    assert (rows["fix-1"].supersedes_id, rows["fix-1"].correction) == (rows["e1"].id, "void")
    assert (rows["fix-2"].supersedes_id, rows["fix-2"].correction) == (rows["e2"].id, "amend")
    assert rows["fix-2"].created_at == rows["e2"].created_at  # the original's time


def test_a_correction_is_audited_as_the_key_that_made_it(world: tuple[Any, Keys]) -> None:
    """A correction changes billed usage: one audit row in its transaction, whichever route
    it came by (the corrections endpoint, or a CloudEvent naming the event); before, the
    corrected event's figures; after, the correction's. A replay or a refusal: no row."""
    app, keys = world
    client = app.test_client()
    tracked = track(client, keys.app, tokens=300, idem="e1")
    assert tracked.status_code == 201
    assert track(client, keys.app, tokens=200, idem="e2").status_code == 201
    assert post(client, keys.app, cloud("c1", 400)).status_code == 201
    assert correct(client, keys.app, "e1", "void", "fix-1").status_code == 201
    assert correct(client, keys.app, "e1", "void", "fix-1").status_code == 200  # a replay
    assert correct(client, keys.app, "e1", "void", "fix-x").status_code == 409  # refused
    amend = correct(client, keys.app, "e2", "amend", "fix-2", usage={"input_tokens": 50})
    assert amend.status_code == 201
    assert post(client, keys.app, cloud("c2", corrects="c1", correction="void")
                ).status_code == 201
    trail = client.get("/v1/audit?action=correction", headers=bearer(keys.admin)).get_json()
    rows = trail["data"][::-1]
    assert [(r["action"], r["target"]["type"], r["target"]["id"], r["actor"]["key_id"],
             r["actor"]["role"], r["app"]) for r in rows] == [
        ("correction.void", "usage_event", "e1", keys.app.split("_")[1], "app", "acme"),
        ("correction.amend", "usage_event", "e2", keys.app.split("_")[1], "app", "acme"),
        ("correction.void", "usage_event", "ce:app/backend:c1", keys.app.split("_")[1],
         "app", "acme")]
    void, amended, cloud_void = rows
    assert void["before"].items() >= {
        "user": "ana", "model": "small", "input_tokens": 300,
        "cost_usd": tracked.get_json()["cost_usd"]}.items()
    assert void["after"].items() >= {"idempotency_key": "fix-1", "input_tokens": 0,
                                     "cost_usd": "0"}.items()
    assert (amended["before"]["input_tokens"], amended["after"]["input_tokens"]) == (200, 50)
    assert amended["after"]["cost_usd"] == amend.get_json()["cost_usd"] == "0.0000075"
    assert cloud_void["before"]["input_tokens"] == 400
    assert cloud_void["after"]["idempotency_key"] == "ce:app/backend:c2"
    assert all(r["request_id"] for r in rows)


def _rows(app: Any) -> list[Any]:
    with app.extensions["wiring"].engine.connect() as conn:
        return list(conn.execute(select(UsageEvent.__table__)))


def test_refusals_are_problem_documents(world: tuple[Any, Keys]) -> None:
    app, keys = world
    client = app.test_client()
    assert track(client, keys.app, tokens=10, idem="e1").status_code == 201
    assert correct(client, keys.app, "e1", "void", "fix-1").status_code == 201

    twice = correct(client, keys.app, "e1", "amend", "fix-9", usage={"input_tokens": 5})
    assert twice.status_code == 409 and twice.mimetype == "application/problem+json"
    assert twice.get_json()["code"] == "already_corrected"
    assert twice.get_json()["corrected_by"] == "fix-1"
    of_a_correction = correct(client, keys.app, "fix-1", "void", "fix-10")
    assert of_a_correction.status_code == 409
    assert of_a_correction.get_json()["code"] == "correction_not_correctable"
    unknown = correct(client, keys.app, "nope", "void", "fix-11")
    assert unknown.status_code == 404 and unknown.mimetype == "application/problem+json"
    reused = correct(client, keys.app, "e1", "amend", "e1", usage={"input_tokens": 1})
    assert reused.status_code == 400
    assert track(client, keys.app, tokens=10, idem="e2").status_code == 201
    key_taken = correct(client, keys.app, "e2", "void", "fix-1")  # fix-1 corrected e1
    assert key_taken.status_code == 409 and key_taken.get_json()["code"] == "key_reused"
    no_usage = correct(client, keys.app, "e2", "amend", "fix-12")
    assert no_usage.status_code == 422 and "usage" in no_usage.get_json()["errors"]
    other_user = correct(client, keys.app, "e2", "void", "fix-13", user="bo")
    assert other_user.status_code == 400 and other_user.get_json()["param"] == "user"
    moved = correct(client, keys.app, "e2", "amend", "fix-14", user="bo",
                    usage={"input_tokens": 1})
    assert moved.status_code == 400 and moved.get_json()["param"] == "user"
    old = (datetime.now(UTC) - timedelta(days=36)).isoformat()
    too_old = correct(client, keys.app, "e2", "amend", "fix-15", usage={"input_tokens": 1},
                      timestamp=old)
    assert too_old.status_code == 422 and "max_event_age" in too_old.get_json()["detail"]
    assert len(_rows(app)) == 3  # e1, fix-1, e2: nothing recorded of a refusal


def test_another_apps_event_reads_as_unknown_and_end_user_keys_are_refused(
        world: tuple[Any, Keys]) -> None:
    app, keys = world
    client = app.test_client()
    assert track(client, keys.app, tokens=300, idem="e1").status_code == 201
    theirs = correct(client, keys.other_app, "e1", "void", "fix-1")
    assert theirs.status_code == 404 and theirs.mimetype == "application/problem+json"
    assert "e1" in theirs.get_json()["detail"]
    # the other app's own event under the same key is its own to correct
    assert track(client, keys.other_app, tokens=70, idem="e1").status_code == 201
    assert correct(client, keys.other_app, "e1", "void", "fix-1").status_code == 201
    assert used_today(client, keys.app) == 300  # the first app's event still counts
    assert usage(client, keys.app)["input_tokens"] == 300
    user_key = app.extensions["wiring"].keys.create_key(
        _user_role(), "acme", user="ana").key
    refused = correct(client, user_key, "e1", "void", "fix-2")
    assert refused.status_code == 403


def _user_role() -> Any:
    from core.auth import Role

    return Role.USER


def test_a_closed_window_is_not_reopened(world: tuple[Any, Keys]) -> None:
    app, keys = world
    client = app.test_client()
    yesterday = datetime.now(UTC) - timedelta(days=1)
    assert track(client, keys.app, at=yesterday, tokens=900, idem="old").status_code == 201
    assert track(client, keys.app, tokens=100, idem="new").status_code == 201
    assert used_today(client, keys.app) == 100
    assert correct(client, keys.app, "old", "void", "fix-old").status_code == 201
    assert used_today(client, keys.app) == 100  # yesterday's usage never counted today
    assert usage(client, keys.app)["input_tokens"] == 100
    # an amendment moved into today counts today, and leaves yesterday
    assert track(client, keys.app, at=yesterday, tokens=400, idem="old2").status_code == 201
    moved = correct(client, keys.app, "old2", "amend", "fix-old2", usage={"input_tokens": 40},
                    timestamp=datetime.now(UTC).isoformat())
    assert moved.status_code == 201
    assert used_today(client, keys.app) == 140


def test_finance_figures_change_on_the_next_rollup(world: tuple[Any, Keys]) -> None:
    app, keys = world
    client, w = app.test_client(), app.extensions["wiring"]
    now = datetime.now(UTC)
    then = now - timedelta(days=2)
    assert track(client, keys.app, tokens=1000, idem="today").status_code == 201
    assert track(client, keys.app, tokens=2000, at=then, idem="then").status_code == 201
    w.finance.refresh()
    period = f"{then:%Y-%m-%d}..{now:%Y-%m-%d}"

    def days() -> dict[str, tuple[int, str]]:
        body = client.get(f"/v1/finance/margins?period={period}&group_by=day",
                          headers=bearer(keys.finance))
        assert body.status_code == 200, body.data
        return {r["key"]: (r["calls"], r["cost_usd"]) for r in body.get_json()["rows"]
                if r["calls"]}

    first = days()
    assert set(first) == {f"{then:%Y-%m-%d}", f"{now:%Y-%m-%d}"}
    assert correct(client, keys.app, "today", "void", "fix-today").status_code == 201
    # the amendment moves the call from two days ago to today: both days change
    assert correct(client, keys.app, "then", "amend", "fix-then", usage={"input_tokens": 10},
                   timestamp=now.isoformat()).status_code == 201
    assert days() == first  # reports read roll-ups: unchanged until the next one
    w.finance.refresh()
    assert days() == {f"{now:%Y-%m-%d}": (1, "0.0000015")}  # 10 x 0.15 USD / 1M


# -- CloudEvents -------------------------------------------------------------------------------

def cloud(event_id: str, tokens: int | None = None, **more: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"specversion": "1.0", "id": event_id, "source": "app/backend",
                             "type": "meterlane.tokens", "subject": "ana", **more}
    if tokens is not None:
        event["data"] = {"model": "small", "input_tokens": tokens}
    return event


def post(client: Any, key: str, body: Any, mimetype: str = ONE) -> Any:
    return client.post("/v1/events", headers=bearer(key, **{"Content-Type": mimetype}),
                       json=body)


def test_cloudevents_void_and_amend_name_the_event_by_id_and_source(
        world: tuple[Any, Keys]) -> None:
    app, keys = world
    client = app.test_client()
    assert post(client, keys.app, cloud("c1", 300)).status_code == 201
    assert post(client, keys.app, cloud("c2", 200)).status_code == 201
    assert used_today(client, keys.app) == 500
    void = post(client, keys.app, cloud("c3", corrects="c1", correction="void"))
    assert void.status_code == 201, void.data
    assert void.get_json()["corrected"] == 1 and void.get_json()["data"][0]["outcome"] == \
        "corrected"
    assert used_today(client, keys.app) == 200
    again = post(client, keys.app, cloud("c3", corrects="c1", correction="void"))
    assert again.status_code == 200 and again.get_json()["duplicates"] == 1
    assert used_today(client, keys.app) == 200

    # a batch: an event and its amendment together, an unknown one rejected on its own
    batch = post(client, keys.app, [
        cloud("c4", 1000), cloud("c5", 40, corrects="c4", correction="amend"),
        cloud("c6", corrects="ghost", correction="void")], BATCH)
    assert batch.status_code == 201, batch.data
    outcomes = [r["outcome"] for r in batch.get_json()["data"]]
    assert outcomes == ["tracked", "corrected", "rejected"]
    assert "ghost" in batch.get_json()["data"][2]["reason"]
    assert used_today(client, keys.app) == 240
    assert usage(client, keys.app)["input_tokens"] == 240

    unknown = post(client, keys.app, cloud("c7", corrects="ghost", correction="void"))
    assert unknown.status_code == 404 and unknown.mimetype == "application/problem+json"
    twice = post(client, keys.app, cloud("c8", corrects="c4", correction="void"))
    assert twice.status_code == 409 and twice.get_json()["code"] == "already_corrected"
    other_source = post(client, keys.app, {**cloud("c9", corrects="c2", correction="void"),
                                           "source": "elsewhere"})
    assert other_source.status_code == 404  # id and source name the event together
    bad = post(client, keys.app, cloud("c10", 5, corrects="c2", correction="void"))
    assert bad.status_code == 422 and "data" in bad.get_json()["errors"]
    theirs = post(client, keys.other_app, cloud("c11", corrects="c2", correction="void"))
    assert theirs.status_code == 404
    assert used_today(client, keys.app) == 240


def test_a_call_the_gateway_measured_is_not_corrected(world: tuple[Any, Keys]) -> None:
    app, keys = world
    client = app.test_client()
    resp = client.post("/v1/chat/completions", headers=bearer(keys.app, **{
        "X-Meterlane-User": "ana", "Idempotency-Key": "chat-1"}), json={
        "model": "small", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.data
    with app.extensions["wiring"].engine.connect() as conn:
        key = conn.execute(select(UsageEvent.idempotency_key)).scalar_one()
    refused = correct(client, keys.app, key, "void", "fix-chat")
    assert refused.status_code == 409 and refused.get_json()["code"] == "not_correctable"
    assert usage(client, keys.app)["requests"] == 1


def test_corrections_work_on_the_embedded_sqlite_default(
        sqlite_world: tuple[Any, Keys]) -> None:
    app, keys = sqlite_world
    client, w = app.test_client(), app.extensions["wiring"]
    assert track(client, keys.app, tokens=300, idem="e1").status_code == 201
    assert track(client, keys.app, tokens=200, idem="e2").status_code == 201
    assert correct(client, keys.app, "e1", "void", "fix-1").status_code == 201
    assert correct(client, keys.app, "e2", "amend", "fix-2",
                   usage={"input_tokens": 20}).status_code == 201
    assert correct(client, keys.app, "e2", "void", "fix-3").status_code == 409
    assert correct(client, keys.app, "e1", "void", "fix-1").status_code == 200
    assert used_today(client, keys.app) == 20
    assert usage(client, keys.app)["input_tokens"] == 20
    w.finance.refresh()
    day = f"{datetime.now(UTC):%Y-%m-%d}"
    body = client.get(f"/v1/finance/margins?period={day}&group_by=day",
                      headers=bearer(keys.finance)).get_json()
    assert [r["calls"] for r in body["rows"] if r["calls"]] == [1]


ROLLING = """
[[plans.limits]]
metric = "tokens"
window = "rolling:1h"
amount = 5000
"""


@pytest.mark.parametrize("store", ["sql", "redis"])
def test_a_rolling_window_gives_back_from_the_slot_that_counted_the_event(
        store: str, request: pytest.FixtureRequest, clean_db: Engine, pg_url: str,
        upstream: FakeUpstream, tmp_path: Path) -> None:
    from app import create_app
    from tests.integration.test_limits_gateway import Clock

    config = config_from_toml(limits_toml(upstream.base_url, ROLLING), tmp_path,
                              database_url=pg_url)
    if store == "redis":
        config = replace(config, redis_url=request.getfixturevalue("redis_server"),
                         redis_prefix=f"mlr-{uuid.uuid4().hex[:8]}:")
    app = create_app(config)
    w = app.extensions["wiring"]
    clock = Clock()
    w.limits.clock = w.metering.clock = clock
    try:
        keys, client = make_keys(app), app.test_client()

        def rolling() -> int:
            quota = client.get("/v1/users/ana/quota", headers=bearer(keys.app)).get_json()
            [line] = [x for x in quota["limits"] if x["window"] == "rolling:1h"]
            return int(line["used"])

        assert track(client, keys.app, tokens=300, idem="e1").status_code == 201
        assert track(client, keys.app, tokens=100, idem="e2").status_code == 201
        assert rolling() == 400
        clock.now += timedelta(minutes=20)  # later slots of the hour: none holds usage
        assert correct(client, keys.app, "e1", "void", "fix-1").status_code == 201
        assert rolling() == 100
    finally:
        w.engine.dispose()
