"""The Python SDK (sdk/python, imported from its own folder) against a real `meterlane serve`:
its three ways of use, typed errors, retries that honour Retry-After, and that it never
imports the server."""

from __future__ import annotations

import ast
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import gateway_toml
from tests.e2e.test_serve import cli, start_server, stop
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream

SDK = Path(__file__).resolve().parents[2] / "sdk" / "python"
sys.path.insert(0, str(SDK))

from meterlane_sdk import (  # noqa: E402
    BadRequest,
    ConnectionFailed,
    Lease,
    Meterlane,
    MeterlaneError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
)

pytestmark = pytest.mark.e2e

PLANS = """
[[plans]]
id = "sdk"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 400
[[plans.limits]]
metric = "requests"
window = "bucket:1/1s"         # one o3-mini call a second: a short Retry-After
amount = 1
model = "o3-mini"
"""


@pytest.fixture(scope="module")
def served(pg_server: str, upstream: FakeUpstream,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("sdk")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
    url = create_database(pg_server, f"mlane_e2e_sdk_{worker}")
    (tmp / "meterlane.toml").write_text(gateway_toml(upstream.base_url) + PLANS)
    env = {**os.environ, "MLANE_DATABASE_URL": url, "MLANE_CONFIG": str(tmp / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp / "var"), "MLANE_KEY_CACHE_SECONDS": "0"}
    assert cli(env, "db", "upgrade").returncode == 0
    created = cli(env, "keys", "create", "--role", "app", "--app", "sdk")
    assert created.returncode == 0, created.stderr
    proc, base = start_server(env, tmp)
    try:
        yield base, created.stdout.strip().splitlines()[-1]
    finally:
        stop(proc)


def test_the_three_ways_and_the_quota(served: tuple[str, str]) -> None:
    base, key = served
    with Meterlane(base, key) as ml:
        # 1. through the gateway with the openai SDK
        reply = ml.openai(user="ann").chat.completions.create(
            model="gpt-4o-mini", max_tokens=20,
            messages=[{"role": "user", "content": "Say hello"}])
        assert reply.usage is not None
        through_gateway = reply.usage.total_tokens
        # 2. reserve, call a model itself, settle
        with ml.metered(user="ann", model="gpt-4o-mini", input_tokens=30,
                        max_output_tokens=50) as call:
            assert call.max_output_tokens == 50
            call.record(input_tokens=28, output_tokens=41)
        # ... and a block that fails releases its reservation
        with pytest.raises(ZeroDivisionError), ml.metered(
                user="ann", model="gpt-4o-mini", input_tokens=10, max_output_tokens=10):
            raise ZeroDivisionError
        # 3. track afterwards, once per idempotency key (a repeat counts nothing)
        ml.track(user="ann", model="gpt-4o-mini", input_tokens=7, output_tokens=3,
                 idempotency_key="job-1")
        ml.track(user="ann", model="gpt-4o-mini", input_tokens=7, output_tokens=3,
                 idempotency_key="job-1")
        limits = {line["id"]: line for line in ml.quota("ann")["limits"]}
        assert limits["tokens-day"]["used"] == through_gateway + 28 + 41 + 10
        assert limits["tokens-day"]["remaining"] == 400 - limits["tokens-day"]["used"]


def test_a_block_without_usage_is_an_error_and_records_nothing(served: tuple[str, str]
                                                                ) -> None:
    base, key = served
    with Meterlane(base, key) as ml:
        with pytest.raises(MeterlaneError, match="without call.record"), \
                ml.metered(user="bo", model="gpt-4o-mini", input_tokens=10,
                           max_output_tokens=10):
            pass
        assert {x["id"]: x for x in ml.quota("bo")["limits"]}["tokens-day"]["used"] == 0


def test_typed_errors(served: tuple[str, str]) -> None:
    base, key = served
    with Meterlane(base, key) as ml:
        ml.track(user="cy", model="gpt-4o-mini", input_tokens=395, output_tokens=0,
                 idempotency_key="big")
        with pytest.raises(QuotaExceeded) as spent:
            ml.reserve(user="cy", model="gpt-4o-mini", input_tokens=20, max_output_tokens=10)
        assert spent.value.status == 402 and spent.value.limit["id"] == "tokens-day"
        assert spent.value.limit["used"] == 395
        assert spent.value.paywall is not None
        assert spent.value.paywall["trigger"] == "limit_reached"
        with pytest.raises(BadRequest):
            ml.reserve(user="cy", model="gpt-4o-mini", input_tokens=-5)
        with pytest.raises(NotFound):
            Lease(ml, {"lease_id": "ls_1_1_nope"}).settle(input_tokens=1, output_tokens=1)
    with Meterlane(base, "mlk_wrong_key") as bad, pytest.raises(PermissionDenied):
        bad.quota("cy")
    with Meterlane("http://127.0.0.1:9", key, max_retries=1, backoff=0.01) as down, \
            pytest.raises(ConnectionFailed):
        down.quota("cy")
    # through the gateway, the openai SDK's own error carries the 402
    with Meterlane(base, key) as ml, pytest.raises(openai.APIStatusError) as gw:
        ml.openai(user="cy").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert gw.value.status_code == 402


def test_rate_limits_are_retried_after_the_servers_wait(served: tuple[str, str]) -> None:
    base, key = served
    with Meterlane(base, key, max_retries=0) as ml:
        ml.track(user="dee", model="o3-mini", input_tokens=1, output_tokens=0,
                 idempotency_key="r0")  # the bucket's one call this second
        with pytest.raises(RateLimited) as limited:
            ml.reserve(user="dee", model="o3-mini", input_tokens=1, max_output_tokens=1)
        assert limited.value.retry_after == 1
    with Meterlane(base, key, max_retries=2) as ml:
        ml.track(user="eve", model="o3-mini", input_tokens=1, output_tokens=0,
                 idempotency_key="e0")
        started = time.monotonic()
        lease = ml.reserve(user="eve", model="o3-mini", input_tokens=1, max_output_tokens=1)
        assert time.monotonic() - started >= 0.9  # it waited what Retry-After said
        lease.release()


def test_the_sdk_never_imports_the_server() -> None:
    for path in (SDK / "meterlane_sdk").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[Any] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] != "meterlane", f"{path.name} imports {name}"
