"""The web searches a native Responses upstream runs are metered by the gateway itself: each
web_search_call item of the answer is one event of the `web_search_calls` meter (priced, once
per item), for plain and streamed calls, through a real `meterlane serve` and the official
`openai` package; with no such meter the call goes through and nothing is recorded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from metering.models import MeterEvent
from tests.conftest import gateway_toml
from tests.e2e.test_serve import serving
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e

NATIVE = """
[[upstreams]]
name = "native"
base_url = "{base}"
api = "responses"

[[models]]
name = "gpt-native"
upstream = "native"
upstream_model = "gpt-5-mini"
price = {{ input = "0.25", output = "2.00" }}
"""
METER = """
[[meters]]
id = "web_search_calls"
unit = "searches"
aggregation = "count"
price = "0.01"
"""
SEARCH = [{"type": "web_search"}]


@dataclass
class Served:
    base: str
    key: str
    engine: Engine
    upstream: FakeUpstream

    def client(self, user: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.key, max_retries=0,
                             default_headers={"X-Meterlane-User": user})

    def events(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(MeterEvent.__table__).order_by(MeterEvent.id)))

    def meters(self, user: str) -> dict[str, Any]:
        reply = httpx.get(f"{self.base}/v1/users/{user}/meters",
                          params={"from": "2000-01-01T00:00:00Z"},
                          headers={"Authorization": f"Bearer {self.key}"})
        assert reply.status_code == 200, reply.text
        return {m["meter"]: m for m in reply.json()["meters"]}


def _serve(name: str, toml: str, pg_server: str, tmp: Path,
           upstream: FakeUpstream) -> Iterator[Served]:
    with serving(pg_server, name, tmp, gateway_toml(upstream.base_url) + toml,
                 "searching-app") as (base, key, engine):
        yield Served(base, key, engine, upstream)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def behaviour(fake: FakeUpstream) -> Iterator[dict[str, Any]]:
    fake.behaviour = {}
    try:
        yield fake.behaviour
    finally:
        fake.behaviour = {}


@pytest.fixture(scope="module")
def metered(pg_server: str, tmp_path_factory: pytest.TempPathFactory,
            fake: FakeUpstream) -> Iterator[Served]:
    yield from _serve("searches", NATIVE.format(base=fake.base_url) + METER, pg_server,
                      tmp_path_factory.mktemp("searches"), fake)


@pytest.fixture(scope="module")
def unmetered(pg_server: str, tmp_path_factory: pytest.TempPathFactory,
              fake: FakeUpstream) -> Iterator[Served]:
    yield from _serve("nosearchmeter", NATIVE.format(base=fake.base_url), pg_server,
                      tmp_path_factory.mktemp("nosearchmeter"), fake)


def test_two_searches_in_one_call_are_two_priced_events(metered: Served,
                                                        behaviour: dict[str, Any]) -> None:
    behaviour["web_searches"] = 2
    raw = metered.client("sam").responses.with_raw_response.create(
        model="gpt-native", input="What happened today?", tools=SEARCH)
    reply = raw.parse()
    request_id = raw.headers["X-Meterlane-Request-Id"]
    searches = [item for item in reply.output if item.type == "web_search_call"]
    assert len(searches) == 2 and reply.output_text  # relayed as the upstream sent them
    found = metered.meters("sam")["web_search_calls"]
    assert (found["value"], found["events"], found["cost_usd"]) == ("2", 2, "0.02")
    keys = [e.idempotency_key for e in metered.events()
            if e.idempotency_key.startswith(request_id)]
    assert sorted(keys) == sorted(f"{request_id}:{item.id}" for item in searches)


def test_a_streamed_call_counts_each_search_once(metered: Served,
                                                 behaviour: dict[str, Any]) -> None:
    behaviour["web_searches"] = 3
    with metered.client("sue").responses.stream(
            model="gpt-native", input="Find three things", tools=SEARCH
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds.count("response.web_search_call.completed") == 3
    assert kinds[-1] == "response.completed"
    # seen done in the stream and again in response.completed: counted once each
    assert [i.type for i in final.output].count("web_search_call") == 3
    found = metered.meters("sue")["web_search_calls"]
    assert (found["value"], found["cost_usd"]) == ("3", "0.03")


def test_a_stream_cut_short_still_counts_the_searches_that_ran(
        metered: Served, behaviour: dict[str, Any]) -> None:
    behaviour.update(web_searches=2, fail_after_chunks=1)
    resp = httpx.post(metered.base + "/v1/responses", timeout=30, headers={
        "Authorization": f"Bearer {metered.key}", "X-Meterlane-User": "cyd"},
        json={"model": "gpt-native", "input": "Search then fail", "stream": True,
              "tools": SEARCH})
    kinds = [json.loads(line[5:])["type"] for line in resp.text.splitlines()
             if line.startswith("data:")]
    assert kinds.count("response.web_search_call.completed") == 2
    assert kinds[-1] == "error" and "response.completed" not in kinds  # no final output
    assert metered.meters("cyd")["web_search_calls"]["value"] == "2"


def test_a_replayed_idempotent_call_does_not_count_again(metered: Served,
                                                         behaviour: dict[str, Any]) -> None:
    behaviour["web_searches"] = 2
    client = metered.client("ida")
    sent = len(metered.upstream.requests)
    first = client.responses.create(model="gpt-native", input="Once", tools=SEARCH,
                                    extra_headers={"Idempotency-Key": "search-once"})
    again = client.responses.create(model="gpt-native", input="Once", tools=SEARCH,
                                    extra_headers={"Idempotency-Key": "search-once"})
    assert again.id == first.id  # the kept answer, replayed
    assert len(metered.upstream.requests) == sent + 1
    found = metered.meters("ida")["web_search_calls"]
    assert (found["value"], found["events"]) == ("2", 2)


def test_without_a_meter_the_call_works_and_nothing_is_recorded(
        unmetered: Served, behaviour: dict[str, Any]) -> None:
    behaviour["web_searches"] = 2
    reply = unmetered.client("nia").responses.create(
        model="gpt-native", input="Search away", tools=SEARCH)
    assert [i.type for i in reply.output].count("web_search_call") == 2
    with unmetered.client("nia").responses.stream(
            model="gpt-native", input="Search away", tools=SEARCH
    ) as stream:
        assert stream.get_final_response().status == "completed"
    assert unmetered.events() == []
    assert "web_search_calls" not in unmetered.meters("nia")
