"""Event time and CloudEvents ingestion: a call reported late counts in its own day (finance
reports it there after the next roll-up) and never re-opens a limit window already over;
CloudEvents 1.0, one or a batch, each id and source counted once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from core.config import ConfigError, settings_from
from metering.models import UsageEvent
from tests.conftest import Keys, bearer, config_from_toml, make_keys
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
ONE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


def toml(base_url: str, extra: str = "") -> str:
    return f"""
[[upstreams]]
name = "cloud"
base_url = "{base_url}"

[[models]]
name = "small"
upstream = "cloud"
upstream_model = "gpt-4o-mini"
price = {{ input = "0.15", output = "0.60" }}

[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 1000
{extra}
"""


def _world(url: str, upstream: FakeUpstream, tmp_path: Path, extra: str = "",
           ) -> tuple[Any, Keys]:
    from app import create_app

    app = create_app(config_from_toml(toml(upstream.base_url, extra), tmp_path,
                                      database_url=url))
    app.extensions["wiring"].finance.prices.refresh_seconds = 0
    return app, make_keys(app)


@pytest.fixture()
def world(clean_db: Engine, pg_url: str, upstream: FakeUpstream,
          tmp_path: Path) -> Iterator[tuple[Any, Keys]]:
    app, keys = _world(pg_url, upstream, tmp_path)
    try:
        yield app, keys
    finally:
        app.extensions["wiring"].engine.dispose()


@pytest.fixture()
def sqlite_world(upstream: FakeUpstream, tmp_path: Path) -> Iterator[tuple[Any, Keys]]:
    from core.db import make_engine
    from migrations.schema import upgrade

    url = f"sqlite:///{tmp_path / 'events.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    app, keys = _world(url, upstream, tmp_path)
    try:
        yield app, keys
    finally:
        app.extensions["wiring"].engine.dispose()


def track(client: Any, key: str, *, at: datetime | str | None = None, tokens: int = 100,
          user: str = "ana", idem: str | None = None) -> Any:
    body: dict[str, Any] = {"user": user, "model": "small",
                            "idempotency_key": idem or uuid.uuid4().hex,
                            "usage": {"input_tokens": tokens}}
    if at is not None:
        body["timestamp"] = at if isinstance(at, str) else at.isoformat()
    return client.post("/v1/meter/track", headers=bearer(key), json=body)


def used_today(client: Any, key: str, user: str = "ana") -> int:
    quota = client.get(f"/v1/users/{user}/quota", headers=bearer(key)).get_json()
    return int(quota["limits"][0]["used"])


def rows(app: Any) -> int:
    with app.extensions["wiring"].engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(UsageEvent)).scalar_one())


# -- event time ---------------------------------------------------------------------------------

def test_an_event_time_outside_its_bounds_is_a_422_naming_the_bound(
        world: tuple[Any, Keys]) -> None:
    app, keys = world
    client, now = app.test_client(), datetime.now(UTC)
    old = track(client, keys.app, at=now - timedelta(days=36))
    assert old.status_code == 422 and old.mimetype == "application/problem+json"
    assert "older than [metering] max_event_age (35 days)" in old.get_json()["detail"]
    ahead = track(client, keys.app, at=now + timedelta(minutes=6))
    assert ahead.status_code == 422 and "5 minutes in the future" in ahead.get_json()["detail"]
    naive = track(client, keys.app, at="2026-12-01T10:00:00")
    assert naive.status_code == 422 and "timestamp" in naive.get_json()["errors"]
    batch = client.post("/v1/meter/track/batch", headers=bearer(keys.app), json={"events": [
        {"user": "ana", "model": "small", "idempotency_key": "b1",
         "usage": {"input_tokens": 1}},
        {"user": "ana", "model": "small", "idempotency_key": "b2",
         "usage": {"input_tokens": 1}, "timestamp": (now - timedelta(days=40)).isoformat()}]})
    assert batch.status_code == 422 and "events[1].timestamp is older" in batch.get_json()["detail"]
    assert rows(app) == 0  # nothing recorded of a refused request
    # within the bounds: 34 days ago and 4 minutes ahead (clocks drift) are taken
    assert track(client, keys.app, at=now - timedelta(days=34)).status_code == 201
    assert track(client, keys.app, at=now + timedelta(minutes=4)).status_code == 201
    with app.extensions["wiring"].engine.connect() as conn:
        stamps = sorted(conn.execute(select(UsageEvent.created_at)).scalars())
    assert stamps[0].date() == (now - timedelta(days=34)).date()


def test_max_event_age_is_configured_and_checked() -> None:
    assert settings_from({"metering": {"max_event_age": "2d"}}, "", {})[
        "max_event_age_seconds"] == 2 * 86400
    assert settings_from({"metering": {"max_event_age": 7200}}, "", {})[
        "max_event_age_seconds"] == 7200
    assert settings_from({}, "", {})["max_event_age_seconds"] == 35 * 86400
    for bad in ("35 days", "0d", 10, "500d", True):
        with pytest.raises(ConfigError, match="max_event_age"):
            settings_from({"metering": {"max_event_age": bad}}, "", {})
    with pytest.raises(ConfigError, match="unknown settings"):
        settings_from({"metering": {"max_age": "2d"}}, "", {})


def test_a_shorter_max_event_age_is_the_bound_named(clean_db: Engine, pg_url: str,
                                                    upstream: FakeUpstream,
                                                    tmp_path: Path) -> None:
    app, keys = _world(pg_url, upstream, tmp_path, '[metering]\nmax_event_age = "2d"\n')
    try:
        late = track(app.test_client(), keys.app,
                     at=datetime.now(UTC) - timedelta(days=3))
        assert late.status_code == 422
        assert "max_event_age (2 days)" in late.get_json()["detail"]
    finally:
        app.extensions["wiring"].engine.dispose()


def test_a_late_event_lands_on_its_own_day_in_finance(world: tuple[Any, Keys]) -> None:
    app, keys = world
    client, w = app.test_client(), app.extensions["wiring"]
    now = datetime.now(UTC)
    then = now - timedelta(days=3)
    assert track(client, keys.app, tokens=1000).status_code == 201
    w.finance.refresh()
    period = f"{then:%Y-%m-%d}..{now:%Y-%m-%d}"

    def days() -> dict[str, int]:
        body = client.get(f"/v1/finance/margins?period={period}&group_by=day",
                          headers=bearer(keys.finance))
        assert body.status_code == 200, body.data
        return {r["key"]: r["calls"] for r in body.get_json()["rows"] if r["calls"]}

    assert days() == {f"{now:%Y-%m-%d}": 1}
    late = track(client, keys.app, at=then, tokens=2000)
    assert late.status_code == 201
    assert days() == {f"{now:%Y-%m-%d}": 1}  # the report changes on the next roll-up
    w.finance.refresh()
    assert days() == {f"{then:%Y-%m-%d}": 1, f"{now:%Y-%m-%d}": 1}
    # priced at the price in force then, and on its own day in the usage report too
    usage = client.get(f"/v1/usage?from={then:%Y-%m-%d}&group_by=day",
                       headers=bearer(keys.app)).get_json()
    assert {g["key"]: g["input_tokens"] for g in usage["groups"]} == {
        f"{then:%Y-%m-%d}": 2000, f"{now:%Y-%m-%d}": 1000}


def test_a_late_event_does_not_count_in_a_window_already_over(world: tuple[Any, Keys]) -> None:
    app, keys = world
    client = app.test_client()
    now = datetime.now(UTC)
    # yesterday's window is over: recorded and reported, not counted into today's limit
    assert track(client, keys.app, at=now - timedelta(days=1), tokens=900).status_code == 201
    assert used_today(client, keys.app) == 0
    assert track(client, keys.app, tokens=300).status_code == 201
    assert used_today(client, keys.app) == 300
    # a late event of today's window counts in it (when ten minutes ago is still today)
    earlier = now - timedelta(minutes=10)
    assert track(client, keys.app, at=earlier, tokens=50).status_code == 201
    assert used_today(client, keys.app) == 300 + (50 if earlier.date() == now.date() else 0)
    # the same through a batch
    batch = client.post("/v1/meter/track/batch", headers=bearer(keys.app), json={"events": [
        {"user": "ana", "model": "small", "idempotency_key": f"late-{n}",
         "usage": {"input_tokens": 10}, "timestamp": (now - timedelta(days=n)).isoformat()}
        for n in (0, 2)]})
    assert batch.status_code == 201 and batch.get_json()["tracked"] == 2
    assert used_today(client, keys.app) == 310 + (50 if earlier.date() == now.date() else 0)
    assert rows(app) == 5


# -- CloudEvents --------------------------------------------------------------------------------

def event(ident: str, *, source: str = "/agents/run", user: str = "ana", tokens: int = 100,
          **more: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": ident, "source": source, "type": "meterlane.tokens",
            "subject": user, "data": {"model": "small", "input_tokens": tokens,
                                      "output_tokens": 10}, **more}


def post(client: Any, key: str, body: Any, content_type: str = BATCH,
         query: str = "") -> Any:
    import json

    return client.post(f"/v1/events{query}", headers=bearer(key), data=json.dumps(body),
                       content_type=content_type)


def test_cloudevents_one_and_a_batch_with_duplicates_are_counted_once(
        world: tuple[Any, Keys]) -> None:
    app, keys = world
    client = app.test_client()
    first = post(client, keys.app, event("e1"), ONE)
    assert first.status_code == 201, first.data
    assert first.get_json()["data"][0]["outcome"] == "tracked"
    again = post(client, keys.app, event("e1"), ONE)
    assert again.status_code == 200 and again.get_json()["duplicates"] == 1
    batch = post(client, keys.app, [event("e2"), event("e1"), event("e2"), event("e3"),
                                    event("e1", source="/other")])
    assert batch.status_code == 201, batch.data
    body = batch.get_json()
    assert [d["outcome"] for d in body["data"]] == [
        "tracked", "duplicate", "duplicate", "tracked", "tracked"]
    assert (body["tracked"], body["duplicates"], body["rejected"]) == (3, 2, 0)
    retry = post(client, keys.app, [event("e2"), event("e3")])  # a whole batch sent again
    assert retry.status_code == 200 and retry.get_json()["duplicates"] == 2
    assert rows(app) == 4  # e1, e2, e3 and e1 of another source
    assert used_today(client, keys.app) == 4 * 110  # each counted into the limits once
    with app.extensions["wiring"].engine.connect() as conn:
        endpoints = set(conn.execute(select(UsageEvent.endpoint)).scalars())
    assert endpoints == {"events"}


def test_cloudevents_time_subject_and_per_event_rejections(world: tuple[Any, Keys]) -> None:
    app, keys = world
    client, now = app.test_client(), datetime.now(UTC)
    late = post(client, keys.app, event("t1", time=(now - timedelta(days=2)).isoformat(),
                                        user="bo"), ONE)
    assert late.status_code == 201
    assert used_today(client, keys.app, "bo") == 0  # yesterday's window is over
    too_old = post(client, keys.app, event("t2", time=(now - timedelta(days=60)).isoformat()),
                   ONE)
    assert too_old.status_code == 422 and "max_event_age" in too_old.get_json()["detail"]
    unknown = post(client, keys.app, {**event("t3"), "type": "com.example.clicks"}, ONE)
    assert unknown.status_code == 422
    assert "meterlane.tokens" in str(unknown.get_json()["errors"]["type"])
    no_subject = {k: v for k, v in event("t4").items() if k != "subject"}
    assert post(client, keys.app, no_subject, ONE).status_code == 422
    bad_data = post(client, keys.app, {**event("t5"), "data": {"model": "small"}}, ONE)
    assert bad_data.status_code == 422 and "data" in bad_data.get_json()["errors"]
    assert post(client, keys.app, {**event("t6"), "specversion": "0.3"}, ONE).status_code == 422
    # a batch answers each event on its own
    mixed = post(client, keys.app, [
        event("m1"), {**event("m2"), "type": "clicks"}, "not an event",
        event("m3", time=(now + timedelta(hours=1)).isoformat()),
        {**event("m4"), "traceparent": "00-ab-cd-01"}])  # an extension attribute: read past
    body = mixed.get_json()
    assert mixed.status_code == 201, body
    assert [d["outcome"] for d in body["data"]] == [
        "tracked", "rejected", "rejected", "rejected", "tracked"]
    assert "known types: meterlane.tokens" in body["data"][1]["reason"]
    assert "5 minutes in the future" in body["data"][3]["reason"]
    assert rows(app) == 3


def test_cloudevents_content_type_and_keys(world: tuple[Any, Keys]) -> None:
    app, keys = world
    client = app.test_client()
    wrong = post(client, keys.app, event("k1"), "application/json")
    assert wrong.status_code == 415 and wrong.mimetype == "application/problem+json"
    assert ONE in wrong.get_json()["detail"]
    assert post(client, keys.app, [event("k1")], ONE).status_code == 400  # an array as one
    assert post(client, keys.app, event("k1"), BATCH).status_code == 400
    assert post(client, keys.app, [], BATCH).status_code == 400
    assert post(client, keys.finance, [event("k1")]).status_code == 403
    # an admin key names the app; an app key cannot name another
    assert post(client, keys.admin, [event("k1")]).status_code == 400
    assert post(client, keys.admin, [event("k1")], query="?app=acme").status_code == 201
    assert post(client, keys.other_app, [event("k2")], query="?app=acme").status_code == 403
    user_key = client.post("/v1/users/ana/keys", headers=bearer(keys.app), json={})
    if user_key.status_code == 201:
        assert post(client, user_key.get_json()["key"], [event("k3")]).status_code == 403
    assert rows(app) == 1
    spec = client.get("/openapi.json").get_json()
    assert "/v1/events" in spec["paths"]


def test_the_openapi_document_describes_both_cloudevents_bodies_and_the_answers(
        world: tuple[Any, Keys]) -> None:
    app, keys = world
    client = app.test_client()
    spec = client.get("/openapi.json").get_json()
    op = spec["paths"]["/v1/events"]["post"]
    bodies = op["requestBody"]["content"]
    assert sorted(bodies) == sorted([ONE, BATCH]) and op["requestBody"]["required"] is True
    one = bodies[ONE]["schema"]
    assert one == {"$ref": "#/components/schemas/CloudEvent"}
    assert bodies[BATCH]["schema"]["type"] == "array"
    assert bodies[BATCH]["schema"]["items"] == one
    assert (bodies[BATCH]["schema"]["minItems"], bodies[BATCH]["schema"]["maxItems"]) \
        == (1, 1000)
    event_schema = spec["components"]["schemas"]["CloudEvent"]
    assert {"specversion", "id", "source", "type"} <= set(event_schema["required"])
    assert "data" in event_schema["properties"]  # (a void correction carries none)
    answers = op["responses"]
    for status in ("200", "201"):
        assert answers[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/EventsResult"}
    # each status the route answers with is one the document names, with its media type
    sent = [(event("d1"), ONE), ([event("d2"), event("d2")], BATCH), (event("d1"), ONE),
            ([event("d3")], ONE), ({**event("d4"), "specversion": "0.3"}, ONE),
            (event("d5"), "application/json"), ([], BATCH)]
    seen = set()
    for body, content_type in sent:
        reply = post(client, keys.app, body, content_type)
        described = answers[str(reply.status_code)]["content"]
        assert reply.mimetype in described, (reply.status_code, reply.mimetype)
        seen.add(reply.status_code)
    assert seen == {201, 200, 400, 415, 422}
    assert post(client, keys.finance, [event("d6")]).status_code == 403
    assert "403" in answers


def test_late_events_and_cloudevents_on_sqlite(sqlite_world: tuple[Any, Keys]) -> None:
    app, keys = sqlite_world
    client, now = app.test_client(), datetime.now(UTC)
    assert track(client, keys.app, at=now - timedelta(days=3), tokens=500).status_code == 201
    batch = post(client, keys.app, [event("s1"), event("s1"), event("s2")])
    assert batch.status_code == 201 and batch.get_json()["tracked"] == 2
    assert rows(app) == 3
    assert used_today(client, keys.app) == 2 * 110
    app.extensions["wiring"].finance.refresh()
    body = client.get(f"/v1/finance/margins?period={now - timedelta(days=3):%Y-%m-%d}.."
                      f"{now:%Y-%m-%d}&group_by=day", headers=bearer(keys.finance)).get_json()
    assert {r["key"]: r["calls"] for r in body["rows"] if r["calls"]} == {
        f"{now - timedelta(days=3):%Y-%m-%d}": 1, f"{now:%Y-%m-%d}": 2}


METERED = """
[[plans.limits]]
metric = "meter:audio_seconds"
window = "day"
amount = 100

[[meters]]
id = "audio_seconds"
unit = "seconds"
aggregation = "sum"
field = "seconds"
price = "0.001"
"""


def test_cloudevents_of_a_custom_meter_go_through_its_limits_and_price(
        clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Path) -> None:
    """`type` names a [[meters]] entry: its value read from `data` by the meter's field,
    counted once per id and source, priced, and refused past the plan's limit on it."""
    app, keys = _world(pg_url, upstream, tmp_path, METERED)
    try:
        client = app.test_client()

        def audio(ident: str, seconds: int) -> dict[str, Any]:
            return {"specversion": "1.0", "id": ident, "source": "/calls", "subject": "ana",
                    "type": "audio_seconds", "data": {"seconds": seconds}}

        batch = post(client, keys.app, [audio("a1", 40), audio("a2", 50), audio("a1", 40),
                                        audio("a3", 20), event("t1")])
        assert batch.status_code == 201, batch.data
        body = batch.get_json()
        assert [d["outcome"] for d in body["data"]] == [
            "tracked", "tracked", "duplicate", "rejected", "tracked"], body
        assert "audio_seconds" in body["data"][3]["reason"]  # 90 + 20 passes the 100 a day
        assert body["data"][0]["cost_usd"] == "0.04"
        again = post(client, keys.app, audio("a2", 50), ONE)
        assert again.status_code == 200 and again.get_json()["duplicates"] == 1
        totals = client.get("/v1/users/ana/meters?from=2000-01-01T00:00:00Z",
                            headers=bearer(keys.app)).get_json()
        [found] = [m for m in totals["meters"] if m["meter"] == "audio_seconds"]
        assert (found["value"], found["events"], found["cost_usd"]) == ("90", 2, "0.09")
        assert rows(app) == 1  # the token event; the meter's are its own rows
        unknown = post(client, keys.app, {**audio("a9", 1), "type": "video_seconds"}, ONE)
        assert unknown.status_code == 422 and "audio_seconds" in unknown.text
    finally:
        app.extensions["wiring"].engine.dispose()
