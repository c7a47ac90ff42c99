"""The log line and metrics of the metering routes (metering/telemetry.py), through the app
with real Postgres: each route's JSON line has its end user, model, tokens by kind, cost and
limit outcome (a batch: counts and sums, bounded); the tokens it recorded and the limits'
refusals reach /metrics, a reported model's label bounded to the operator's models."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from core.logs import JsonFormatter
from tests.conftest import bearer, config_from_toml, gateway_toml
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration

LIMITS = """
[[meters]]
id = "searches"
unit = "searches"
aggregation = "count"
price = "0.01"

[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 1000
[[plans.limits]]
metric = "meter:searches"
window = "day"
amount = 2
"""


class _Closing(FlaskClient):
    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)  # read whole and closed: the line is written
        return super().open(*args, **kwargs)


@pytest.fixture()
def metered(clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Path) -> Any:
    from app import create_app
    from core.auth import Role

    app = create_app(config_from_toml(gateway_toml(upstream.base_url) + LIMITS, tmp_path,
                                      database_url=pg_url))
    app.test_client_class = _Closing
    app.key = app.extensions["wiring"].keys.create_key(Role.APP, "acme").key
    yield app
    app.extensions["wiring"].engine.dispose()


def _line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """The last request line, as the JSON formatter writes it."""
    records = [r for r in caplog.records if r.name == "meterlane.request"]
    doc: dict[str, Any] = orjson.loads(JsonFormatter().format(records[-1]))
    return doc


def _post(client: Any, key: str, path: str, body: Any, caplog: pytest.LogCaptureFixture,
          **headers: str) -> tuple[Any, dict[str, Any]]:
    with caplog.at_level(logging.INFO, logger="meterlane.request"):
        resp = client.post(path, json=body, headers=bearer(key, **headers))
    return resp, _line(caplog)


def _samples(client: Any) -> dict[str, float]:
    text = client.get("/metrics").get_data(as_text=True)
    return {s.name + str(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _usage(inp: int, out: int, cached: int = 0) -> dict[str, int]:
    return {"input_tokens": inp, "output_tokens": out, "cached_input_tokens": cached}


def _tokens(inp: int, cached: int, out: int) -> dict[str, int]:
    return {"input": inp, "cached_input": cached, "output": out, "reasoning": 0}


def test_track_and_its_batch_say_who_what_and_how_much(
        metered: Any, caplog: pytest.LogCaptureFixture) -> None:
    client, key = metered.test_client(), metered.key
    resp, line = _post(client, key, "/v1/meter/track", {
        "user": "ann", "model": "gpt-4o-mini", "idempotency_key": "t1",
        "usage": _usage(1000, 200, 100)}, caplog)
    assert resp.status_code == 201, resp.data
    assert line["route"] == "/v1/meter/track" and line["request_id"] == \
        resp.headers["x-request-id"]
    assert isinstance(line["end_user_id"], int) and line["model"] == "gpt-4o-mini"
    assert line["tokens"] == _tokens(1000, 100, 200)
    # 900 x 0.15 + 100 x 0.075 + 200 x 0.60 per 1M tokens, in pico-USD
    assert line["cost_pico_usd"] == 262_500_000
    assert (line["events"], line["outcomes"]) == (1, {"tracked": 1})
    ann = line["end_user_id"]

    _resp, again = _post(client, key, "/v1/meter/track", {
        "user": "ann", "model": "gpt-4o-mini", "idempotency_key": "t1",
        "usage": _usage(1000, 200, 100)}, caplog)
    assert again["outcomes"] == {"duplicate": 1}

    events = [{"user": user, "model": model, "idempotency_key": f"b{n}",
               "usage": _usage(10, 5)}
              for n, (user, model) in enumerate([("ann", "gpt-4o-mini"), ("bob", "my-own"),
                                                 ("bob", "my-own")])]
    resp, batch = _post(client, key, "/v1/meter/track/batch", {"events": events}, caplog)
    assert resp.status_code == 201, resp.data
    assert (batch["events"], batch["outcomes"]) == (3, {"tracked": 3})
    assert batch["tokens"] == _tokens(30, 0, 15)
    assert batch["cost_pico_usd"] == 10 * 150_000 + 5 * 600_000  # my-own is not priced
    assert "end_user_id" not in batch and "model" not in batch  # two of each: neither
    assert len(orjson.dumps(batch)) < 1000  # counts and sums, no list per event

    _resp, one = _post(client, key, "/v1/meter/track/batch", {"events": [
        {"user": "ann", "model": "gpt-4o-mini", "idempotency_key": "c1",
         "usage": _usage(1, 1)}]}, caplog)
    assert one["end_user_id"] == ann and one["model"] == "gpt-4o-mini"

    resp, void = _post(client, key, "/v1/meter/corrections", {
        "idempotency_key": "v1", "corrects": "t1", "action": "void"}, caplog)
    assert resp.status_code == 201, resp.data
    assert (void["outcomes"], void["end_user_id"]) == ({"corrected": 1}, ann)

    found = _samples(client)  # what was recorded, once; a model of the app's own: "other"
    assert found["meterlane_tokens_total[('kind', 'input'), ('model', 'gpt-4o-mini')]"] \
        == 1000 + 10 + 1
    assert found["meterlane_tokens_total[('kind', 'output'), ('model', 'other')]"] == 10
    assert not any("my-own" in name for name in found)


def test_reserve_settle_and_a_refusal_are_on_the_line_and_counted(
        metered: Any, caplog: pytest.LogCaptureFixture) -> None:
    client, key = metered.test_client(), metered.key
    resp, line = _post(client, key, "/v1/meter/reserve", {
        "user": "cy", "model": "gpt-4o-mini", "input_tokens": 100,
        "max_output_tokens": 100}, caplog)
    assert resp.status_code == 201, resp.data
    assert line["limit"] == {"outcome": "allowed"} and line["model"] == "gpt-4o-mini"
    assert isinstance(line["end_user_id"], int)
    resp, settled = _post(client, key, "/v1/meter/settle", {
        "lease_id": resp.get_json()["lease_id"], "usage": _usage(100, 50)}, caplog)
    assert resp.status_code == 200, resp.data
    assert settled["tokens"] == _tokens(100, 0, 50) and settled["cost_pico_usd"] == 45_000_000
    assert settled["end_user_id"] == line["end_user_id"]

    resp, refused = _post(client, key, "/v1/meter/reserve", {
        "user": "cy", "model": "gpt-4o-mini", "input_tokens": 5000}, caplog)
    assert resp.status_code == 402
    assert refused["limit"]["outcome"] == "refused"
    assert (refused["limit"]["kind"], refused["limit"]["metric"]) == ("quota_exceeded",
                                                                      "tokens")
    found = _samples(client)
    assert found["meterlane_limit_refusals_total[('kind', 'quota_exceeded'), "
                 "('metric', 'tokens')]"] == 1


def test_meter_events_and_cloudevents_have_their_lines(
        metered: Any, caplog: pytest.LogCaptureFixture) -> None:
    client, key = metered.test_client(), metered.key
    event = {"user": "dee", "meter": "searches", "idempotency_key": "s1"}
    resp, line = _post(client, key, "/v1/meter/events", event, caplog)
    assert resp.status_code == 201, resp.data
    assert line["limit"] == {"outcome": "allowed"} and line["cost_pico_usd"] == 10**10
    assert isinstance(line["end_user_id"], int) and line["outcomes"] == {"recorded": 1}

    batch = [{**event, "idempotency_key": f"s{n}"} for n in (2, 3, 4)]
    resp, many = _post(client, key, "/v1/meter/events/batch", {"events": batch}, caplog)
    assert resp.status_code == 200, resp.data
    assert many["outcomes"] == {"recorded": 1, "refused": 2}  # two a day
    assert many["limit"]["outcome"] == "refused" and many["limit"]["refused"] == 2
    resp, alone = _post(client, key, "/v1/meter/events", {**event, "idempotency_key": "s5"},
                        caplog)
    assert resp.status_code == 402 and alone["limit"]["kind"] == "quota_exceeded"
    found = _samples(client)
    assert found["meterlane_limit_refusals_total[('kind', 'quota_exceeded'), "
                 "('metric', 'meter:searches')]"] == 3

    cloud = [{"specversion": "1.0", "id": f"e{n}", "source": "app", "subject": "eve",
              "type": "meterlane.tokens",
              "data": {"model": "gpt-4o-mini", "input_tokens": 7, "output_tokens": 3}}
             for n in range(2)]
    with caplog.at_level(logging.INFO, logger="meterlane.request"):
        resp = client.post("/v1/events", data=orjson.dumps(cloud),
                           headers=bearer(key, **{
                               "Content-Type": "application/cloudevents-batch+json"}))
    assert resp.status_code == 201, resp.data
    ce = _line(caplog)
    assert (ce["route"], ce["events"], ce["outcomes"]) == ("/v1/events", 2, {"tracked": 2})
    assert ce["tokens"] == _tokens(14, 0, 6) and ce["model"] == "gpt-4o-mini"
    assert isinstance(ce["end_user_id"], int)
