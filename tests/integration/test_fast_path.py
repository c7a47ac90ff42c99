"""The gateway's fast path (gateway/fastpath.py) against Flask's: every request is sent twice,
once each way, and the two answers must agree (status, headers, body, the request's log line,
the ledger's row). A hook of the Flask app tells which way a request went: the fast path runs
none of Flask's hooks."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from core.logs import FIELDS
from gateway.fastpath import install, unmirrored_hooks
from metering.models import UsageEvent
from tests.conftest import Keys, bearer, config_from_toml, gateway_toml, make_keys
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.integration
CHAT = "/v1/chat/completions"
PLANS = """
[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 100000
[[plans.limits]]
metric = "requests"
window = "minute"
amount = 2
"""
# What differs between two answers to the same request by design (ids, clocks): compared by
# name only.
VARYING_HEADERS = {"x-request-id", "x-meterlane-request-id", "x-upstream-request-id",
                   "x-meterlane-quota-reset", "x-ratelimit-reset-requests",
                   "x-ratelimit-reset-tokens", "retry-after", "date",
                   "content-length"}  # the body names the end user (checked apart)
VARYING_FIELDS = {"request_id", "duration_ms", "upstream_request_id", "ttft_ms",
                  "upstream_ms", "latency_ms", "id", "created", "created_at", "user",
                  "end_user_id"}


@pytest.fixture()
def app(clean_db: Engine, pg_url: str, upstream: FakeUpstream, tmp_path: Path) -> Iterator[Any]:
    from app import create_app

    config = config_from_toml(gateway_toml(upstream.base_url) + PLANS, tmp_path,
                              database_url=pg_url)
    flask_app = create_app(config)
    # The plan allows 2 requests a minute, and a request is compared with its twin sent the
    # other way: the limits' clock stays in one minute for the whole test, so that a minute
    # turning over between the two (CI saw it) never tells them apart.
    limits = flask_app.extensions["wiring"].limits
    pinned = limits.clock()
    limits.clock = lambda: pinned

    @flask_app.before_request
    def seen_by_flask() -> None:
        g.seen_by_flask = True
        flask_app.extensions["flask_served"].append(flask_app.extensions["now_sending"])

    flask_app.extensions["flask_served"] = []
    flask_app.extensions["fast_path_on_at_start"] = flask_app.extensions[
        "gateway_fast_path"].enabled
    yield flask_app
    flask_app.extensions["wiring"].engine.dispose()


@pytest.fixture()
def keys(app: Any) -> Keys:
    return make_keys(app)


def _send(app: Flask, fast: bool, path: str, user: str, **kw: Any) -> tuple[Any, bytes]:
    """One request one way; the answer read to its end and closed (the log line, the settle)."""
    app.extensions["gateway_fast_path"].enabled = fast
    app.extensions["now_sending"] = (fast, path, user)
    headers = dict(kw.pop("headers", {}))
    if user:
        headers["X-Meterlane-User"] = user
    resp = app.test_client().post(path, headers=headers, **kw)
    body = resp.get_data()
    resp.close()
    went_flask = (fast, path, user) in app.extensions["flask_served"]
    assert went_flask is not fast, \
        f"the request went through {'Flask' if went_flask else 'the fast path'}"
    return resp, body


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items() if k not in VARYING_FIELDS}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _doc(body: bytes, content_type: str) -> Any:
    if content_type.startswith("text/event-stream"):
        events = [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]
        return [_scrub(json.loads(e)) if e != "[DONE]" else e for e in events]
    return _scrub(json.loads(body))


def _same(app: Flask, path: str, caplog: pytest.LogCaptureFixture, **kw: Any) -> Any:
    """The request both ways (each as its own end user: limits count per user); the answers
    must agree. Returns the fast path's."""
    answers = []
    user = kw.pop("user", "u")
    for fast in (True, False):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="meterlane.request"):
            resp, body = _send(app, fast, path, f"{user}-{fast}", **dict(kw))
        lines = [getattr(r, FIELDS) for r in caplog.records if r.name == "meterlane.request"]
        assert len(lines) == 1
        assert lines[0]["request_id"] == resp.headers["x-request-id"]
        assert resp.headers["x-request-id"] == resp.headers["X-Meterlane-Request-Id"]
        assert resp.headers["x-request-id"].startswith("req_")
        if "Content-Length" in resp.headers:
            assert int(resp.headers["Content-Length"]) == len(body)
        headers = {k.lower(): "(varies)" if k.lower() in VARYING_HEADERS else v
                   for k, v in resp.headers.items()}
        answers.append((resp.status_code, headers, _doc(body, resp.headers["Content-Type"]),
                        _scrub(lines[0]), resp.status))
    assert answers[0] == answers[1]
    return answers[0]


@pytest.mark.parametrize(("path", "body"), [
    (CHAT, {"model": "gpt-4o-mini", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hello there"}]}),
    (CHAT, {"model": "gpt-4o-mini", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hello there"}]}),
    ("/v1/completions", {"model": "gpt-4o-mini", "prompt": "say it", "max_tokens": 3}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["one", "two"]}),
    ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 4}),
], ids=["chat", "chat-stream", "completions", "embeddings", "responses"])
def test_a_call_is_answered_and_metered_alike(app: Any, keys: Keys, path: str, body: Any,
                                              caplog: pytest.LogCaptureFixture,
                                              clean_db: Engine) -> None:
    status, headers, doc, line, _ = _same(app, path, caplog, json=body, headers=bearer(keys.app))
    assert status == 200 and line["outcome"] == "ok" and line["limit"]["outcome"] == "allowed"
    assert "x-meterlane-quota-limit" in headers  # the plan's headers, both ways
    with clean_db.connect() as conn:
        rows = conn.execute(select(UsageEvent.end_user_id, func.count())
                            .group_by(UsageEvent.end_user_id)).all()
    assert sorted(n for _, n in rows) == [1, 1]  # one row each way, each its own end user


@pytest.mark.parametrize(("case", "kw", "status"), [
    ("no key", {"json": {"model": "gpt-4o-mini"}}, 401),
    ("a wrong scheme", {"json": {}, "headers": {"Authorization": "Basic abc"}}, 401),
    ("an unknown key", {"json": {}, "headers": bearer("mlk_0000_nope")}, 401),
    ("not JSON", {"data": b"{nope", "content_type": "application/json"}, 400),
    ("an unknown model", {"json": {"model": "nope", "messages": []}}, 404),
    ("not an object", {"json": [1, 2]}, 400),
    ("too large", {"data": b"x" * 2048, "content_type": "application/json"}, 413),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_refused_request_is_answered_alike(app: Any, keys: Keys, case: str, kw: Any,
                                             status: int,
                                             caplog: pytest.LogCaptureFixture) -> None:
    app.config["MAX_CONTENT_LENGTH"] = 1024
    if "headers" not in kw and case != "no key":
        kw = {**kw, "headers": bearer(keys.app)}
    got, _, doc, line, _ = _same(app, CHAT, caplog, **kw)
    assert got == status == line["status"]
    assert set(doc["error"]) >= {"message", "type", "code"}  # OpenAI's envelope


def test_the_key_may_come_as_x_api_key(app: Any, keys: Keys,
                                       caplog: pytest.LogCaptureFixture) -> None:
    status, _, _, line, _ = _same(app, CHAT, caplog, headers={"X-Api-Key": keys.app}, json={
        "model": "gpt-4o-mini", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
    assert (status, line["app"], line["role"]) == (200, "acme", "app")


def test_a_rate_limit_refusal_is_answered_alike(app: Any, keys: Keys,
                                                caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": "gpt-4o-mini", "max_tokens": 2, "messages": [{"role": "user",
                                                                   "content": "x"}]}
    for _ in range(2):
        assert _same(app, CHAT, caplog, json=body, headers=bearer(keys.app),
                     user="busy")[0] == 200
    status, headers, doc, line, _ = _same(app, CHAT, caplog, json=body,
                                          headers=bearer(keys.app), user="busy")
    assert status == 429 and doc["error"]["code"] == "rate_limited"
    assert line["limit"]["outcome"] == "refused"
    assert headers["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.parametrize("kw", [
    {"query_string": {"app": "acme"}},
    {"headers": {"Idempotency-Key": "fast-path-1"}},
], ids=["a query", "an idempotency key"])
def test_what_the_fast_path_leaves_to_flask_goes_there(app: Any, keys: Keys,
                                                       kw: Any) -> None:
    body = {"model": "gpt-4o-mini", "max_tokens": 2, "messages": [{"role": "user",
                                                                   "content": "x"}]}
    headers = {**bearer(keys.app), "X-Meterlane-User": "u", **kw.pop("headers", {})}
    app.extensions["now_sending"] = "fallback"
    resp = app.test_client().post(CHAT, json=body, headers=headers, **kw)
    resp.close()
    assert resp.status_code == 200 and app.extensions["flask_served"] == ["fallback"]


class _ResetInput(io.BytesIO):
    def read(self, *_args: Any) -> bytes:
        raise ConnectionResetError("reset by peer")

    readinto = read  # type: ignore[assignment]


@pytest.mark.parametrize(("case", "environ", "status"), [
    # gunicorn ends the body itself (wsgi.input_terminated): a short one is read as it is
    ("short, the server ending it", {"wsgi.input_terminated": True, "CONTENT_LENGTH": "500"},
     200),
    ("short", {"CONTENT_LENGTH": "500"}, 400),  # the client left: werkzeug's 400
    ("reset", {"wsgi.input": _ResetInput()}, 400),
    ("reset, the server ending it", {"wsgi.input": _ResetInput(), "wsgi.input_terminated": True},
     400),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_body_cut_short_is_read_alike(app: Any, keys: Keys, case: str, environ: Any,
                                        status: int,
                                        caplog: pytest.LogCaptureFixture) -> None:
    body = b'{"model": "gpt-4o-mini", "max_tokens": 2, "messages": []}'
    got, _, doc, line, _ = _same(app, CHAT, caplog, data=body, headers=bearer(keys.app),
                                 content_type="application/json", environ_overrides=environ)
    assert got == status == line["status"], doc


def test_every_flask_hook_of_a_gateway_call_is_mirrored(app: Any) -> None:
    # the app as create_app makes it: the fast path on (no hook it does not know)
    assert app.extensions["fast_path_on_at_start"] is True
    # the fixture's own hook, added since, is one it does not know
    assert unmirrored_hooks(app) == ["tests.integration.test_fast_path.seen_by_flask"]
    plain = Flask("plain")

    @plain.after_request
    def stamp(response: Any) -> Any:
        return response

    install(plain)
    assert plain.extensions["gateway_fast_path"].enabled is False  # calls go through Flask
