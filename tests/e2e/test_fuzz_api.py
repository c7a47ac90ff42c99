"""Schemathesis against a real `meterlane serve` on Postgres and Redis: every operation of
its OpenAPI document, with cases generated from the document (bounded: a fixed seed and a
fixed number of examples per operation), sent with an operator admin, an app, a finance and an
end-user key. No answer may be a 5xx, and no answer may break the schema the document gives
for it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.conftest import gateway_toml
from tests.e2e.test_serve import cli, start_server, stop
from tests.support.consent import http_call
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream

pytestmark = pytest.mark.e2e
EXAMPLES = int(os.environ.get("MLANE_FUZZ_EXAMPLES", "12"))  # per operation and key
PLANS = """
[[plans]]
id = "free"
default = true
[[plans.limits]]
metric = "tokens"
window = "day"
amount = 1000000
[[plans.limits]]
metric = "requests"
window = "minute"
amount = 100000
"""


@pytest.fixture(scope="module")
def served(pg_server: str, redis_server: str, upstream: FakeUpstream,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    url = create_database(pg_server, f"mlane_fuzz_{os.environ.get('PYTEST_XDIST_WORKER', 'm')}")
    (tmp / "meterlane.toml").write_text(gateway_toml(upstream.base_url) + PLANS)
    env = {**os.environ, "MLANE_DATABASE_URL": url, "MLANE_CONFIG": str(tmp / "meterlane.toml"),
           "MLANE_DATA_DIR": str(tmp / "var"), "MLANE_KEY_CACHE_SECONDS": "0",
           "MLANE_REDIS_URL": redis_server, "MLANE_REDIS_PREFIX": f"fz-{uuid.uuid4().hex[:6]}:",
           "MLANE_STRIPE_WEBHOOK_SECRET": "whsec_fuzz"}
    assert cli(env, "db", "upgrade").returncode == 0
    made = cli(env, "keys", "create", "--role", "admin")
    assert made.returncode == 0, made.stderr
    keys = {"admin": made.stdout.strip().splitlines()[-1]}
    proc, base = start_server(env, tmp)
    try:
        # the other keys from the admin's, over HTTP: a `meterlane keys create` each took
        # about 2.5 s (a Python start and the app's build) of the module's set-up
        for role, extra in (("app", {}), ("finance", {}), ("user", {"user": "alice"})):
            status, issued = http_call(base, keys["admin"])(
                "POST", "/v1/keys", {"role": role, "app": "acme", **extra})
            assert status == 201, issued
            keys[role] = str(issued["key"])
        yield base, keys
    finally:
        stop(proc)


def _fuzz(base: str, key: str, failures: list[str]) -> int:
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    headers = {"Authorization": f"Bearer {key}"}
    sent = 0
    for result in schema.get_all_operations():
        _fuzz_operation(base, headers, result.ok(), failures, counter := [0])
        sent += counter[0]
    return sent


def _fuzz_operation(base: str, headers: dict[str, str], operation: Any, failures: list[str],
                    counter: list[int]) -> None:
    @seed(20261204)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        counter[0] += 1
        response = case.call(base_url=base, headers=headers, timeout=30)
        try:
            case.validate_response(response, checks=[not_a_server_error,
                                                      response_schema_conformance])
        except Exception as exc:  # noqa: BLE001 - gathered, reported together
            failures.append(f"{operation.label}: {str(exc)[:400]}")

    run()


@pytest.mark.parametrize("role", ["admin", "app", "finance", "user"])
def test_no_generated_request_is_a_server_error_or_breaks_its_schema(
        served: tuple[str, dict[str, str]], role: str) -> None:
    base, keys = served
    failures: list[str] = []
    sent = _fuzz(base, keys[role], failures)
    print(f"schemathesis as {role}: {sent} cases, {len(failures)} failures")  # noqa: T201
    assert sent >= 40 * min(EXAMPLES, 5)
    assert not failures, "\n".join(failures[:30])


def test_the_gateway_takes_hostile_bodies_without_a_server_error(
        served: tuple[str, dict[str, str]]) -> None:
    """The gateway is not in the document: its bodies are fuzzed here (JSON of any shape in
    OpenAI's fields), as app and user keys."""
    import httpx
    from hypothesis import strategies as st

    base, keys = served
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                       st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
    value = st.recursive(scalar, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
        max_leaves=8)
    fields = st.fixed_dictionaries({}, optional={
        "model": st.one_of(st.sampled_from(["gpt-4o-mini", "llama-local", "nope"]), value),
        "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), value),
        "max_tokens": value, "max_completion_tokens": value, "n": value, "best_of": value,
        "stream": st.one_of(st.booleans(), value), "user": st.one_of(st.just("alice"), value),
        "input": value, "prompt": value, "stream_options": value, "tools": value})
    seen: list[int] = []
    with httpx.Client(base_url=base, timeout=30) as client:
        @seed(20261204)
        @settings(max_examples=EXAMPLES * 12, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @example(body={"model": "gpt-4o-mini", "user": "alice",
                       "messages": [{"role": "user", "content": "hi"}]},
                 path="/v1/chat/completions", role="app")
        @given(body=fields, path=st.sampled_from(["/v1/chat/completions", "/v1/completions",
                                                  "/v1/embeddings", "/v1/messages"]),
               role=st.sampled_from(["app", "user"]))
        def run(body: dict[str, Any], path: str, role: str) -> None:
            resp = client.post(path, json=body, headers={"Authorization": f"Bearer {keys[role]}"})
            seen.append(resp.status_code)
            assert resp.status_code < 500 or resp.status_code in (502, 503, 504), (
                path, body, resp.status_code, resp.text[:300])

        run()
    assert len(seen) >= 50 and 200 in seen and 400 in seen
