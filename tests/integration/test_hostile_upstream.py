"""An upstream that lies or fails: its usage is checked before it is trusted (else counted,
with the reason on the ledger row), a 2xx that is not an answer is a 502, and what it says in
an error reaches neither the tenant nor the ledger. Real Postgres, a real HTTP upstream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from core.config import Config
from tests.conftest import Keys, bearer, config_from_toml, gateway_toml, make_keys
from tests.integration.test_gateway import CHAT, chat, ledger, sse_events
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
SECRET = "sk-proj-Zz9Yy8Xx7Ww6Vv5Uu4"
DAILY = """
[[plans]]
id = "free"
default = true
default_max_output_tokens = 50
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 5000
scope = "app"
"""


@pytest.fixture()
def limited(clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Path) -> Any:
    """An app whose plan limits the whole app to 5,000 tokens a day."""
    from app import create_app

    config: Config = config_from_toml(gateway_toml(upstream.base_url) + DAILY, tmp_path,
                                      database_url=pg_url)
    app = create_app(config)
    yield app.test_client(), make_keys(app)
    app.extensions["wiring"].engine.dispose()


def test_absurd_usage_is_counted_instead_and_the_app_is_not_refused_for_the_day(
        limited: Any, clean_db: Engine) -> None:
    client, keys = limited
    absurd = {"prompt_tokens": 10**17, "completion_tokens": 5, "total_tokens": 10**17 + 5}
    resp = client.post(CHAT, json=chat(user="ann", fake={"usage_override": absurd}),
                       headers=bearer(keys.app))
    assert resp.status_code == 200
    again = client.post(CHAT, json=chat(user="bob"), headers=bearer(keys.app))
    assert again.status_code == 200, again.get_json()  # on main: the app was out for the day
    first, second = ledger(clean_db)
    assert first.usage_source == "counted" and "prompt_tokens" in first.usage_note
    assert 0 < first.input_tokens < 50 and first.output_tokens < 100
    assert second.usage_source == "reported" and second.usage_note is None


@pytest.mark.parametrize(("usage", "source", "tokens"), [
    ({"prompt_tokens": 12.0, "completion_tokens": 4.0, "total_tokens": 16.0}, "reported",
     (12, 4)),
    ({"prompt_tokens": "12", "completion_tokens": 4}, "counted", None),
    ({"prompt_tokens": 12.5, "completion_tokens": 4}, "counted", None),
    ({"prompt_tokens": -3, "completion_tokens": 4}, "counted", None),
    ({"prompt_tokens": 12, "completion_tokens": 4,
      "prompt_tokens_details": {"cached_tokens": 10**12}}, "counted", None),
])
def test_usage_numbers_are_taken_only_when_they_are_whole_counts(
        client: Any, keys: Keys, clean_db: Engine, usage: dict[str, Any], source: str,
        tokens: tuple[int, int] | None) -> None:
    resp = client.post(CHAT, json=chat(user="cat", fake={"usage_override": usage, "words": 6}),
                       headers=bearer(keys.app))
    assert resp.status_code == 200
    [row] = ledger(clean_db)
    assert row.usage_source == source
    if tokens is not None:
        assert (row.input_tokens, row.output_tokens) == tokens
    else:  # never 0 "reported": the prompt and the 6 words generated, counted
        assert row.input_tokens > 0 and row.output_tokens == 6 and row.usage_note


def test_a_total_alone_is_split_by_counting(client: Any, keys: Keys, clean_db: Engine) -> None:
    resp = client.post(CHAT, json=chat(user="dan", fake={"usage_override": {"total_tokens": 40}}),
                       headers=bearer(keys.app))
    assert resp.status_code == 200
    [row] = ledger(clean_db)
    assert row.usage_source == "counted" and "total_tokens" in row.usage_note
    assert row.input_tokens + row.output_tokens == 40 and row.input_tokens > 0  # on main: 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_2xx_that_is_not_an_answer_is_a_502_recorded_as_an_upstream_error(
        client: Any, keys: Keys, clean_db: Engine, stream: bool) -> None:
    fake = {"body_text": "<html><body>Gateway login: http://10.1.2.3/admin</body></html>"}
    resp = client.post(CHAT, json=chat(user="eve", stream=stream, fake=fake),
                       headers=bearer(keys.app))
    assert resp.status_code == 502  # on main: 200, recorded "ok"
    err = resp.get_json()["error"]
    assert err["code"] == "upstream_error" and "10.1.2.3" not in err["message"]
    assert resp.headers["X-Meterlane-Request-Id"] in err["message"]
    [row] = ledger(clean_db)
    assert (row.status, row.http_status) == ("upstream_error", 502)
    assert row.usage_source == "counted" and row.input_tokens > 0  # what was sent was paid for
    assert "10.1.2.3" not in (row.error or "")


def test_an_upstreams_error_words_reach_neither_the_tenant_nor_the_ledger(
        client: Any, keys: Keys, clean_db: Engine) -> None:
    fake = {"status": 401, "message": f"Incorrect API key provided: {SECRET}. See "
                                      "https://internal.example:8443/keys"}
    resp = client.post(CHAT, json=chat(user="fay", fake=fake), headers=bearer(keys.app))
    assert resp.status_code == 502
    message = resp.get_json()["error"]["message"]
    assert SECRET not in message and "internal.example" not in message
    assert "401" in message and resp.headers["X-Meterlane-Request-Id"] in message
    [row] = ledger(clean_db)
    assert SECRET not in row.error and "internal.example" not in row.error


def test_an_error_event_mid_stream_is_replaced_by_the_gateways_own(
        client: Any, keys: Keys, clean_db: Engine) -> None:
    fake = {"fail_after_chunks": 3, "error_event": f"backend key {SECRET} was revoked"}
    resp = client.post(CHAT, json=chat(user="gus", stream=True, fake=fake),
                       headers=bearer(keys.app))
    assert resp.status_code == 200
    body = resp.get_data()
    assert SECRET.encode() not in body
    events = sse_events(body)
    assert events[-1]["error"]["code"] == "upstream_stream_error"
    [row] = ledger(clean_db)
    assert row.status == "stream_error" and row.output_tokens == 3  # the words that passed
    assert SECRET not in row.error


def test_a_refused_connection_names_the_upstream_not_its_address(
        client: Any, keys: Keys, clean_db: Engine) -> None:
    resp = client.post(CHAT, json=chat("ghost", user="hal"), headers=bearer(keys.app))
    message = resp.get_json()["error"]["message"]
    assert resp.status_code == 502 and "'down'" in message and "127.0.0.1:9" not in message
    [row] = ledger(clean_db)
    assert "127.0.0.1" not in row.error


def test_an_upstream_that_ignores_stream_true_is_a_502_billed_by_its_usage(
        client: Any, keys: Keys, clean_db: Engine) -> None:
    import orjson

    answer = {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi " * 400}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 400, "total_tokens": 412}}
    fake = {"body_text": orjson.dumps(answer).decode(), "content_type": "application/json"}
    resp = client.post(CHAT, json=chat(user="ian", stream=True, fake=fake),
                       headers=bearer(keys.app))
    assert resp.status_code == 502
    [row] = ledger(clean_db)
    assert (row.input_tokens, row.output_tokens, row.usage_source) == (12, 400, "reported")


def test_events_labelled_text_plain_are_still_a_stream(client: Any, keys: Keys,
                                                        clean_db: Engine) -> None:
    body = ('data: {"choices": [{"index": 0, "delta": {"content": " hello"}}]}\n\n'
            "data: [DONE]\n\n")
    fake = {"body_text": body, "content_type": "text/plain"}
    resp = client.post(CHAT, json=chat(user="joy", stream=True, fake=fake),
                       headers=bearer(keys.app))
    assert resp.status_code == 200 and b"hello" in resp.get_data()
    [row] = ledger(clean_db)
    assert row.status == "ok" and row.output_tokens == 1


def test_a_prompt_only_usage_has_its_output_counted(client: Any, keys: Keys,
                                                    clean_db: Engine) -> None:
    fake = {"usage_override": {"prompt_tokens": 9}, "words": 5}
    resp = client.post(CHAT, json=chat(user="kay", fake=fake), headers=bearer(keys.app))
    assert resp.status_code == 200
    [row] = ledger(clean_db)
    assert (row.input_tokens, row.output_tokens, row.usage_source) == (9, 5, "counted")
    assert "no output" in row.usage_note


@pytest.mark.parametrize("stream", [False, True])
def test_zero_output_reported_for_a_call_that_generated_text_is_counted(
        client: Any, keys: Keys, clean_db: Engine, stream: bool) -> None:
    fake = {"usage_override": {"prompt_tokens": 5, "completion_tokens": 0}, "words": 40}
    body = chat(user="lea", fake=fake, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    resp = client.post(CHAT, json=body, headers=bearer(keys.app))
    assert resp.status_code == 200 and resp.get_data()  # (a stream settles once read)
    [row] = ledger(clean_db)
    assert (row.input_tokens, row.output_tokens) == (5, 40)  # on main: (5, 0) "reported"
    assert row.usage_source == "counted" and "no output" in row.usage_note


def test_an_answer_with_a_lone_surrogate_escape_is_still_an_answer(
        client: Any, keys: Keys, clean_db: Engine) -> None:
    body = ('{"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": '
            '{"role": "assistant", "content": "half \\ud83d emoji"}}], "usage": '
            '{"prompt_tokens": 8, "completion_tokens": 501, "total_tokens": 509}}')
    fake = {"body_text": body, "content_type": "application/json"}
    resp = client.post(CHAT, json=chat(user="max", fake=fake), headers=bearer(keys.app))
    assert resp.status_code == 200  # on main: a 502 that recorded (8, 0)
    [row] = ledger(clean_db)
    assert (row.input_tokens, row.output_tokens, row.usage_source) == (8, 501, "reported")
