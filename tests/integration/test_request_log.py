"""Each request's log line (core/observe.py) and its ids, through the app with real Postgres
and the fake upstream: every route gets a line, a model call's line has the call."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from core.logs import FIELDS
from tests.conftest import Keys, bearer

pytestmark = pytest.mark.integration


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [getattr(r, FIELDS) for r in caplog.records if r.name == "meterlane.request"]


def _get(client: Any, path: str, **headers: str) -> Any:
    resp = client.get(path, headers=headers)
    resp.close()  # the line is written when the response is closed
    return resp


def test_every_request_gets_a_line_and_the_same_id_twice(
        client: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="meterlane.request"):
        ok = _get(client, "/healthz", **{"x-request-id": "client-chosen"})
        missing = _get(client, "/no/such/route")
    rid = ok.headers["x-request-id"]
    assert rid == ok.headers["X-Meterlane-Request-Id"] and rid.startswith("req_")
    assert rid != "client-chosen"  # the ledger's id is the gateway's own, never the client's
    first, second = _lines(caplog)
    assert first == {"request_id": rid, "method": "GET", "route": "/healthz", "status": 200,
                     "app": None, "role": None, "duration_ms": first["duration_ms"],
                     "client_request_id": "client-chosen"}  # theirs, on the line beside
    assert isinstance(first["duration_ms"], int)
    assert (second["route"], second["status"]) == (None, 404)  # never the raw path
    assert "client_request_id" not in second
    assert second["request_id"] == missing.headers["x-request-id"]


def test_a_model_call_line_has_the_call_and_a_refusal_line_its_status(
        client: Any, keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": "gpt-4o-mini", "user": "logged", "max_tokens": 4,
            "messages": [{"role": "user", "content": "a secret prompt"}]}
    with caplog.at_level(logging.INFO, logger="meterlane.request"):
        resp = client.post("/v1/chat/completions", json=body, headers=bearer(keys.app))
        resp.close()
        denied = client.post("/v1/chat/completions", json=body,
                             headers=bearer(keys.finance))
        denied.close()
    assert resp.status_code == 200 and denied.status_code == 403
    call, refused = _lines(caplog)
    assert call["request_id"] == resp.headers["x-request-id"]
    assert (call["app"], call["role"], call["outcome"]) == ("acme", "app", "ok")
    assert call["tokens"]["output"] == 4 and call["limit"] == {"outcome": "off"}
    assert call["upstream_request_id"] == resp.headers["x-upstream-request-id"]
    assert (refused["status"], refused["role"]) == (403, "finance")
    assert "outcome" not in refused  # refused before the call began: no call fields
    written = str(_lines(caplog))
    assert "a secret prompt" not in written and keys.app not in written


def test_a_client_id_too_long_or_not_printable_is_left_off(
        client: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="meterlane.request"):
        _get(client, "/healthz", **{"x-request-id": "x" * 129})
        _get(client, "/healthz", **{"x-request-id": "bell\x07"})
        _get(client, "/healthz", **{"x-request-id": "y" * 128})
    long, bell, fits = _lines(caplog)
    assert "client_request_id" not in long and "client_request_id" not in bell
    assert fits["client_request_id"] == "y" * 128


def test_anthropic_answers_carry_the_id_as_request_id_too(client: Any, keys: Keys) -> None:
    body = {"model": "gpt-4o-mini", "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}]}
    headers = {"X-Api-Key": keys.app, "X-Meterlane-User": "anthro"}
    ok = client.post("/v1/messages", json=body, headers=headers)
    bad = client.post("/v1/messages", json={**body, "model": "no-such-model"},
                      headers=headers)
    assert ok.status_code == 200 and bad.status_code == 404
    for resp in (ok, bad):  # Anthropic's SDKs read request-id
        assert resp.headers["request-id"] == resp.headers["x-request-id"]
        assert resp.headers["request-id"].startswith("req_")
    chat = client.post("/v1/chat/completions", json=body, headers=bearer(keys.app))
    assert "request-id" not in chat.headers  # OpenAI's routes: x-request-id alone
