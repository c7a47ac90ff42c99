"""Tests of the fake OpenAI-compatible upstream over real HTTP (urllib3 and the openai SDK)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import urllib3
from openai.types.chat import ChatCompletionMessageParam

from tests.support.upstream import FakeUpstream, completion_text, prompt_tokens

REPO_ROOT = Path(__file__).resolve().parents[2]
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there friend"},
]
CHAT: dict[str, Any] = {"model": "gpt-test", "messages": MESSAGES}
CHAT_PROMPT_TOKENS = (2 + 3) + (3 + 3)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture()
def http() -> Iterator[urllib3.PoolManager]:
    with urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=10)) as pool:
        yield pool


@pytest.fixture()
def client(upstream: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=upstream.base_url, api_key="sk-upstream", max_retries=0)


def post(
    http: urllib3.PoolManager, up: FakeUpstream, path: str, body: dict[str, Any], **kw: Any
) -> urllib3.BaseHTTPResponse:
    return http.request(
        "POST",
        up.base_url + path,
        body=orjson.dumps(body),
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-upstream"},
        **kw,
    )


def sse_events(raw: bytes) -> list[Any]:
    assert raw.endswith(b"data: [DONE]\n\n")
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    return [orjson.loads(e[6:]) for e in events[:-1]]


def test_chat_non_stream(upstream: FakeUpstream, http: urllib3.PoolManager) -> None:
    upstream.clear()
    r = post(http, upstream, "/chat/completions", {**CHAT, "max_tokens": 5})
    assert r.status == 200 and r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "gpt-test"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": completion_text(5),
        "refusal": None,
    }
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    assert body["usage"] == {
        "prompt_tokens": CHAT_PROMPT_TOKENS,
        "completion_tokens": 5,
        "total_tokens": CHAT_PROMPT_TOKENS + 5,
    }
    rec = upstream.wait_for_requests(1)[-1]
    assert rec["path"] == "/v1/chat/completions" and rec["method"] == "POST"
    assert rec["authorization"] == "Bearer sk-upstream" and rec["body"]["max_tokens"] == 5
    assert prompt_tokens("/v1/chat/completions", rec["body"]) == CHAT_PROMPT_TOKENS


def test_chat_defaults_and_controls(upstream: FakeUpstream, http: urllib3.PoolManager) -> None:
    assert r_usage(http, upstream, {})["completion_tokens"] == 16
    assert r_usage(http, upstream, {"max_completion_tokens": 9999})["completion_tokens"] == 4096
    usage = r_usage(
        http, upstream, {"max_tokens": 4, "fake": {"cached_tokens": 2, "reasoning_tokens": 7}}
    )
    assert usage["completion_tokens"] == 11 and usage["total_tokens"] == CHAT_PROMPT_TOKENS + 11
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 7}
    r = post(http, upstream, "/chat/completions", {**CHAT, "fake": {"usage": False, "words": 2}})
    assert "usage" not in r.json() and r.json()["choices"][0]["message"]["content"] == " the quick"


def r_usage(http: urllib3.PoolManager, up: FakeUpstream, extra: dict[str, Any]) -> Any:
    r = post(http, up, "/chat/completions", {**CHAT, **extra})
    assert r.status == 200
    return r.json()["usage"]


def test_chat_stream_with_usage(upstream: FakeUpstream, http: urllib3.PoolManager) -> None:
    body = {**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    r = post(http, upstream, "/chat/completions", body, preload_content=False)
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["Transfer-Encoding"] == "chunked"
    raw_chunks = list(r.read_chunked())
    assert len(raw_chunks) == 7  # role + 3 words + finish + usage + [DONE]
    events = sse_events(b"".join(raw_chunks))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"].get("content") for e in events[1:4]] == [
        " the",
        " quick",
        " brown",
    ]
    assert events[4]["choices"][0]["finish_reason"] == "stop"
    assert all(e["object"] == "chat.completion.chunk" and e["usage"] is None for e in events[:5])
    assert events[5]["choices"] == []
    assert events[5]["usage"] == {
        "prompt_tokens": CHAT_PROMPT_TOKENS,
        "completion_tokens": 3,
        "total_tokens": CHAT_PROMPT_TOKENS + 3,
    }


def test_chat_stream_without_usage(upstream: FakeUpstream, http: urllib3.PoolManager) -> None:
    r = post(http, upstream, "/chat/completions", {**CHAT, "max_tokens": 2, "stream": True})
    events = sse_events(r.data)
    assert len(events) == 4 and all("usage" not in e for e in events)
    body = {
        **CHAT,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "fake": {"usage": False},
    }
    events = sse_events(post(http, upstream, "/chat/completions", body).data)
    assert len(events) == 4 and all("usage" not in e for e in events)


def test_stream_fail_after_chunks(upstream: FakeUpstream, http: urllib3.PoolManager) -> None:
    body = {**CHAT, "stream": True, "fake": {"fail_after_chunks": 2}}
    r = post(http, upstream, "/chat/completions", body, preload_content=False)
    assert r.status == 200
    got: list[bytes] = []
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for chunk in r.read_chunked():
            got.append(chunk)
    assert len(got) == 3 and b"[DONE]" not in b"".join(got)  # role + 2 content chunks


def test_error_status(upstream: FakeUpstream, http: urllib3.PoolManager) -> None:
    r = post(http, upstream, "/chat/completions", {**CHAT, "fake": {"status": 503}})
    assert r.status == 503
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["type"] == "server_error"
    r = post(
        http,
        upstream,
        "/chat/completions",
        {**CHAT, "fake": {"status": 429, "message": "slow down"}},
    )
    assert r.status == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["message"] == "slow down"
    r = http.request("GET", upstream.base_url + "/nope")
    assert r.status == 404 and r.json()["error"]["code"] == "not_found"


def test_delay_and_hang(upstream: FakeUpstream, http: urllib3.PoolManager) -> None:
    start = time.monotonic()
    r = post(http, upstream, "/chat/completions", {**CHAT, "fake": {"delay_ms": 150}})
    assert r.status == 200 and time.monotonic() - start >= 0.14
    start = time.monotonic()
    slow = {**CHAT, "stream": True, "fake": {"words": 2, "chunk_delay_ms": 25}}
    events = sse_events(post(http, upstream, "/chat/completions", slow).data)
    assert len(events) == 4 and time.monotonic() - start >= 0.1  # 5 gaps between 6 HTTP chunks
    assert post(http, upstream, "/chat/completions", CHAT).status == 200  # keep-alive still OK
    upstream.clear()
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        post(
            http,
            upstream,
            "/chat/completions",
            {**CHAT, "fake": {"hang": True}},
            timeout=urllib3.Timeout(connect=5, read=0.2),
        )
    assert upstream.wait_for_requests(1)[0]["body"]["fake"] == {"hang": True}
    assert post(http, upstream, "/chat/completions", CHAT).status == 200


def test_completions_embeddings_models(upstream: FakeUpstream, http: urllib3.PoolManager) -> None:
    r = post(
        http, upstream, "/completions", {"model": "m", "prompt": "one two three", "max_tokens": 2}
    )
    assert r.json()["choices"][0]["text"] == " the quick"
    assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    events = sse_events(
        post(
            http,
            upstream,
            "/completions",
            {
                "model": "m",
                "prompt": "a b",
                "max_tokens": 2,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ).data
    )
    assert [e["object"] for e in events] == ["text_completion"] * 4
    assert [e["choices"][0]["text"] for e in events[:2]] == [" the", " quick"]
    assert events[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    r = post(http, upstream, "/embeddings", {"model": "e", "input": [[1, 2, 3], [4, 5]]})
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1] and all(len(d["embedding"]) == 8 for d in data)
    assert r.json()["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    r = http.request("GET", upstream.base_url + "/models")
    assert r.json()["object"] == "list" and r.json()["data"]


def test_openai_sdk(upstream: FakeUpstream, client: openai.OpenAI) -> None:
    upstream.clear()
    resp = client.chat.completions.create(model="gpt-test", messages=MESSAGES, max_tokens=4)
    assert resp.choices[0].message.content == completion_text(4) and resp.model == "gpt-test"
    assert resp.usage is not None and resp.usage.completion_tokens == 4
    assert resp.usage.prompt_tokens == CHAT_PROMPT_TOKENS
    assert upstream.requests[-1]["authorization"] == "Bearer sk-upstream"

    stream = client.chat.completions.create(
        model="gpt-test",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"fake": {"words": 3, "cached_tokens": 1, "reasoning_tokens": 2}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion_text(3)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 5
    assert (
        usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 1
    )
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 2

    comp = client.completions.create(model="m", prompt="a b c", max_tokens=2)
    assert comp.choices[0].text == " the quick" and comp.usage is not None
    emb = client.embeddings.create(model="e", input=["a b", "c"])  # SDK asks for base64
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
    assert emb.usage.prompt_tokens == 3
    assert [m.id for m in client.models.list()]
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="m", messages=MESSAGES, extra_body={"fake": {"status": 503}}
        )
    assert info.value.status_code == 503


def test_cli_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.upstream", "--port", "0"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:") and line.endswith("/v1")
        base_url = line.removeprefix("listening on ")
        with urllib3.PoolManager(retries=False) as pool:
            r = pool.request("POST", base_url + "/chat/completions", json=CHAT)
        assert r.status == 200 and r.json()["usage"]["completion_tokens"] == 16
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
