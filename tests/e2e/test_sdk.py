"""The Python SDK (sdk/python, imported from its own folder) against a real `meterlane serve`:
its three ways of use, typed errors, retries that honour Retry-After, reported calls in
batches and with their own time, idempotency keys, the paywall's offers, consents and
checkout (the fake Stripe on loopback), and that it never imports the server. The async client
(test_sdk_async.py) runs against the same serve, in an app of its own (tests/e2e/conftest.py)."""

from __future__ import annotations

import ast
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Served
from tests.support.consent import MANIFEST

SDK = Path(__file__).resolve().parents[2] / "sdk" / "python"
sys.path.insert(0, str(SDK))

from meterlane_sdk import (  # noqa: E402
    BadRequest,
    Conflict,
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

@pytest.fixture(scope="module")
def served(sdk_server: Served) -> tuple[str, str]:
    return sdk_server.base, sdk_server.key


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
        events = ml.paywall_events("cy", trigger="limit_reached")["data"]
        assert [e["id"] for e in events] == [spent.value.paywall["event_id"]]
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


def day_used(ml: Meterlane, user: str) -> int:
    return int({x["id"]: x for x in ml.quota(user)["limits"]}["tokens-day"]["used"])


def test_a_batch_is_recorded_once_each_call_in_its_own_time(served: tuple[str, str]) -> None:
    base, key = served
    yesterday = datetime.now(UTC) - timedelta(days=1)
    events = [
        {"user": "fay", "model": "gpt-4o-mini", "input_tokens": 20, "output_tokens": 5,
         "idempotency_key": "b-1"},
        {"user": "fay", "model": "gpt-4o-mini", "input_tokens": 30, "output_tokens": 7,
         "idempotency_key": "b-2", "timestamp": yesterday},               # another day
        {"user": "fay", "model": "gpt-4o-mini", "input_tokens": 40, "output_tokens": 9,
         "idempotency_key": "b-3", "cached_input_tokens": 10,
         "timestamp": datetime.now(UTC).isoformat()},            # RFC 3339 text
    ]
    with Meterlane(base, key) as ml:
        first = ml.track_batch(events)
        assert (first["tracked"], first["duplicates"]) == (3, 0)
        assert [d["idempotency_key"] for d in first["data"]] == ["b-1", "b-2", "b-3"]
        again = ml.track_batch(events)
        assert (again["tracked"], again["duplicates"]) == (0, 3)
        assert day_used(ml, "fay") == 25 + 49  # yesterday's call is not in today's window
        # a single call keeps its time too, within the server's max_event_age
        ml.track(user="fay", model="gpt-4o-mini", input_tokens=100, output_tokens=0,
                 idempotency_key="t-1", timestamp=yesterday)
        assert day_used(ml, "fay") == 25 + 49
        with pytest.raises(BadRequest, match="timestamp"):
            ml.track(user="fay", model="gpt-4o-mini", input_tokens=1, output_tokens=0,
                     idempotency_key="t-2", timestamp=yesterday - timedelta(days=60))
        with pytest.raises(ValueError, match="time zone"):  # refused before it is sent
            ml.track(user="fay", model="gpt-4o-mini", input_tokens=1, output_tokens=0,
                     idempotency_key="t-3", timestamp=datetime(2026, 12, 1, 9, 30))
        assert ml.credits("fay")["balance"] == 0
    # an end user's own key reads its own quota; it reports one call at a time, not batches
    with Meterlane(base, user_key(base, key, "fay")) as own:
        assert {x["id"]: x for x in own.quota()["limits"]}["tokens-day"]["used"] == 74
        with pytest.raises(PermissionDenied):
            own.track_batch([{**events[0], "user": None, "idempotency_key": "b-9"}])


class LosesAnAnswer(httpx.HTTPTransport):
    """A connection that breaks after the server answered the first call to `path` (the
    server did the work; the client never hears of it)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path, self.sent = path, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle_request(request)
        if request.url.path == self.path:
            self.sent += 1
            if self.sent == 1:
                resp.read()
                resp.close()
                raise httpx.ReadError("connection reset after the answer was sent")
        return resp


def test_a_reserve_with_an_idempotency_key_survives_a_lost_answer(
        served: tuple[str, str]) -> None:
    base, key = served
    lossy = LosesAnAnswer("/v1/meter/reserve")
    with Meterlane(base, key, backoff=0.01, http_client=httpx.Client(transport=lossy)) as ml:
        lease = ml.reserve(user="gus", model="gpt-4o-mini", input_tokens=30,
                           max_output_tokens=50, idempotency_key="reserve-gus-1")
        assert lossy.sent == 2  # tried again after the lost answer
        # the retry got the first lease back: one reservation, not two
        assert day_used(ml, "gus") == 80
        lease.settle(input_tokens=30, output_tokens=20)
        assert day_used(ml, "gus") == 50
        # without a key a lost answer is not tried again: the call may have happened
        lossy.sent = 0
        with pytest.raises(ConnectionFailed):
            ml.reserve(user="gus", model="gpt-4o-mini", input_tokens=1, max_output_tokens=1)
        assert lossy.sent == 1


def user_key(base: str, key: str, user: str) -> str:
    made = httpx.post(f"{base}/v1/users/{user}/keys", headers={"Authorization": f"Bearer {key}"})
    assert made.status_code == 201, made.text
    return str(made.json()["key"])


def test_offers_consent_and_checkout(sdk_server: Served) -> None:
    with Meterlane(sdk_server.base, sdk_server.key) as ml:
        served = ml.offers("hal", jurisdiction="US-CA", locale="en")
        [offer] = [o for o in served["data"] if o["offer"] == sdk_server.offer]
        assert offer["disclosure"] and offer["price"]
        with pytest.raises(Conflict) as no_consent:
            ml.checkout(user="hal", plan="pro", success_url="https://app.example/ok",
                        cancel_url="https://app.example/back")
        assert no_consent.value.rule == "CNS-01"
        consent = ml.record_consent(
            user="hal", offer=offer, ip="203.0.113.7", user_agent="Mozilla/5.0 (test)",
            render_manifest={**MANIFEST, "cta_label": offer["cta_label"]})
        # what Meterlane served is what the consent records
        record = ml.get_consent(consent["consent_id"])
        assert record["disclosure_text"] == offer["disclosure"]
        assert record["rendered_price"] == offer["price"]
        session = ml.checkout(user="hal", plan="pro", consent_id=consent["consent_id"],
                              success_url="https://app.example/ok",
                              cancel_url="https://app.example/back",
                              idempotency_key="checkout-hal-1")
        assert session["url"] and session["mode"] == "subscription"
        assert ml.get_consent(consent["consent_id"])["checkout_session_id"] == session["id"]
        # the same key: the same session, not a second checkout
        assert ml.checkout(user="hal", plan="pro", consent_id=consent["consent_id"],
                           success_url="https://app.example/ok",
                           cancel_url="https://app.example/back",
                           idempotency_key="checkout-hal-1")["id"] == session["id"]
        with pytest.raises(Conflict) as replayed:  # a consent starts one checkout
            ml.checkout(user="hal", plan="pro", consent_id=consent["consent_id"],
                        success_url="https://app.example/ok",
                        cancel_url="https://app.example/back")
        assert replayed.value.rule == "CNS-01"
        # a disclosure other than the one served is refused
        with pytest.raises(Conflict):
            ml.record_consent(user="hal", offer={**offer, "disclosure": "Pay later."},
                              render_manifest={**MANIFEST, "cta_label": offer["cta_label"]})


class Counts(httpx.HTTPTransport):
    """A real transport that counts the requests it tries."""

    def __init__(self) -> None:
        super().__init__()
        self.tries = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.tries += 1
        return super().handle_request(request)


@pytest.mark.parametrize(("call", "tries"), [
    (lambda ml: ml.quota("kim"), 3),                                  # a read
    (lambda ml: ml.track(user="kim", model="m", input_tokens=1, output_tokens=0,
                         idempotency_key="k"), 3),                    # idempotent by its key
    (lambda ml: ml.track_batch([]), 3),
    (lambda ml: ml.reserve(user="kim", model="m", input_tokens=1), 1),  # may have happened
    (lambda ml: ml.reserve(user="kim", model="m", input_tokens=1, idempotency_key="r"), 3),
    (lambda ml: ml.checkout(user="kim", plan="pro", success_url="https://a.example/",
                            cancel_url="https://a.example/"), 1),
    (lambda ml: ml.checkout(user="kim", plan="pro", success_url="https://a.example/",
                            cancel_url="https://a.example/", idempotency_key="c"), 3),
])
def test_only_calls_safe_to_repeat_are_tried_again_after_a_connection_failure(
        call: Any, tries: int) -> None:
    counted = Counts()
    with Meterlane("http://127.0.0.1:9", "mlk_x", max_retries=2, backoff=0.001,
                   http_client=httpx.Client(transport=counted)) as ml, \
            pytest.raises(ConnectionFailed):
        call(ml)
    assert counted.tries == tries
