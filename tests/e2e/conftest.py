"""The Python SDK's serve (tests/e2e/test_sdk.py and test_sdk_async.py): one `meterlane serve`
per xdist worker, shared by both modules, each module in an app of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import fake_stripe_server, gateway_toml
from tests.e2e.test_serve import cli, start_server, stop
from tests.support.consent import http_call, publish_offer
from tests.support.services import create_database
from tests.support.upstream import FakeUpstream

SDK_PLANS = """
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

[[plans]]
id = "pro"
name = "Pro"
price = { amount = 2000, currency = "usd", interval = "month" }
"""


@dataclass(frozen=True)
class SdkServe:
    base: str
    admin_key: str  # an operator-wide admin key: it makes each module's app key


@dataclass(frozen=True)
class Served:
    base: str
    key: str
    offer: str  # the id of a published offer of "pro"


@pytest.fixture(scope="session")
def sdk_serve(pg_server: str, upstream: FakeUpstream,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[SdkServe]:
    """A serve with the plans above, its Stripe the fake one. Starting one takes about 15 s;
    the two SDK modules share it, each in its own app (sdk_server below), so that no end user,
    idempotency key, offer or consent of one is seen by the other."""
    tmp = tmp_path_factory.mktemp("sdk")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "m")
    url = create_database(pg_server, f"mlane_sdk_{worker}")
    with fake_stripe_server() as stripe_url:
        (tmp / "meterlane.toml").write_text(
            gateway_toml(upstream.base_url) + SDK_PLANS
            + f'\n[stripe]\napi_base = "{stripe_url}"\ncollect_terms_consent = false\n')
        env = {**os.environ, "MLANE_DATABASE_URL": url,
               "MLANE_CONFIG": str(tmp / "meterlane.toml"), "MLANE_DATA_DIR": str(tmp / "var"),
               "MLANE_KEY_CACHE_SECONDS": "0", "MLANE_STRIPE_API_KEY": "sk_test_sdk",
               # it lives until the session ends, idle once the SDK's tests are done: few
               # connections kept open, so that the suite's later servers find Postgres's
               # 100 as they did when this one stopped with its module
               "MLANE_DB_POOL_SIZE": "2", "MLANE_DB_MAX_OVERFLOW": "20"}
        assert cli(env, "db", "upgrade").returncode == 0
        created = cli(env, "keys", "create", "--role", "admin")
        assert created.returncode == 0, created.stderr
        synced = cli(env, "plans", "sync")
        assert synced.returncode == 0, synced.stderr
        proc, base = start_server(env, tmp)
        try:
            yield SdkServe(base, created.stdout.strip().splitlines()[-1])
        finally:
            stop(proc)


@pytest.fixture(scope="module")
def sdk_server(request: pytest.FixtureRequest, sdk_serve: SdkServe) -> Served:
    """The shared serve as this module's app (named after the module) sees it: an app key and
    a published offer of the plan "pro"."""
    app = request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")
    status, issued = http_call(sdk_serve.base, sdk_serve.admin_key)(
        "POST", "/v1/keys", {"role": "app", "app": app})
    assert status == 201, issued
    key = str(issued["key"])
    return Served(sdk_serve.base, key, publish_offer(http_call(sdk_serve.base, key), "pro"))
