"""AsyncMeterlane (sdk/python) against a real `meterlane serve`, as test_sdk.py runs the sync
client (the same serve, in an app of its own: tests/e2e/conftest.py): the gateway through
openai.AsyncOpenAI, `async with metered()`, typed errors, retries after Retry-After, batches
with event time, an idempotency key across a lost answer, the paywall's offers, consent and
checkout, and calls running side by side on one client."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest

from tests.e2e import test_sdk  # noqa: F401 - it puts sdk/python on sys.path
from tests.e2e.conftest import Served
from tests.support.consent import MANIFEST

from meterlane_sdk import (  # isort: skip - importable once test_sdk put sdk/python on the path
    AsyncMeteredCall,
    AsyncMeterlane,
    BadRequest,
    Conflict,
    ConnectionFailed,
    Lease,
    MeterlaneError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    RateLimited,
)

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


async def day_used(ml: AsyncMeterlane, user: str) -> int:
    return int({x["id"]: x for x in (await ml.quota(user))["limits"]}["tokens-day"]["used"])


async def test_the_three_ways_and_the_quota(sdk_server: Served) -> None:
    async with AsyncMeterlane(sdk_server.base, sdk_server.key) as ml:
        client = ml.openai(user="ann")
        assert isinstance(client, openai.AsyncOpenAI)
        reply = await client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=20,
            messages=[{"role": "user", "content": "Say hello"}])
        await client.close()
        assert reply.usage is not None
        through_gateway = reply.usage.total_tokens
        block = ml.metered(user="ann", model="gpt-4o-mini", input_tokens=30,
                           max_output_tokens=50)
        assert isinstance(block, AsyncMeteredCall)
        async with block as call:
            assert call.max_output_tokens == 50
            assert await day_used(ml, "ann") == through_gateway + 80  # reserved meanwhile
            call.record(input_tokens=28, output_tokens=41)
        with pytest.raises(ZeroDivisionError):  # a block that fails releases its lease
            async with ml.metered(user="ann", model="gpt-4o-mini", input_tokens=10,
                                  max_output_tokens=10):
                raise ZeroDivisionError
        with pytest.raises(MeterlaneError, match="without call.record"):
            async with ml.metered(user="ann", model="gpt-4o-mini", input_tokens=10,
                                  max_output_tokens=10):
                pass
        for _ in range(2):  # once per idempotency key
            await ml.track(user="ann", model="gpt-4o-mini", input_tokens=7, output_tokens=3,
                           idempotency_key="job-1")
        assert await day_used(ml, "ann") == through_gateway + 28 + 41 + 10


async def test_typed_errors(sdk_server: Served) -> None:
    async with AsyncMeterlane(sdk_server.base, sdk_server.key) as ml:
        await ml.track(user="cy", model="gpt-4o-mini", input_tokens=395, output_tokens=0,
                       idempotency_key="big")
        with pytest.raises(QuotaExceeded) as spent:
            await ml.reserve(user="cy", model="gpt-4o-mini", input_tokens=20,
                             max_output_tokens=10)
        assert spent.value.limit["used"] == 395 and spent.value.paywall is not None
        events = (await ml.paywall_events("cy", trigger="limit_reached"))["data"]
        assert [e["id"] for e in events] == [spent.value.paywall["event_id"]]
        with pytest.raises(BadRequest):
            await ml.reserve(user="cy", model="gpt-4o-mini", input_tokens=-5)
        with pytest.raises(NotFound):
            await Lease(ml, {"lease_id": "ls_1_1_nope"}).settle(input_tokens=1, output_tokens=1)
    async with AsyncMeterlane(sdk_server.base, "mlk_wrong_key") as bad:
        with pytest.raises(PermissionDenied):
            await bad.quota("cy")
    async with AsyncMeterlane("http://127.0.0.1:9", sdk_server.key, max_retries=1,
                              backoff=0.01) as down:
        with pytest.raises(ConnectionFailed):
            await down.quota("cy")


async def test_rate_limits_are_retried_after_the_servers_wait(sdk_server: Served) -> None:
    async with AsyncMeterlane(sdk_server.base, sdk_server.key, max_retries=0) as ml:
        await ml.track(user="dee", model="o3-mini", input_tokens=1, output_tokens=0,
                       idempotency_key="r0")  # the bucket's one call this second
        with pytest.raises(RateLimited) as limited:
            await ml.reserve(user="dee", model="o3-mini", input_tokens=1, max_output_tokens=1)
        assert limited.value.retry_after == 1
    async with AsyncMeterlane(sdk_server.base, sdk_server.key, max_retries=2) as ml:
        await ml.track(user="eve", model="o3-mini", input_tokens=1, output_tokens=0,
                       idempotency_key="e0")
        started = time.monotonic()
        lease = await ml.reserve(user="eve", model="o3-mini", input_tokens=1,
                                 max_output_tokens=1)
        assert time.monotonic() - started >= 0.9  # it waited what Retry-After said
        assert (await lease.release())["outcome"] == "released"


async def test_calls_run_side_by_side_on_one_client(sdk_server: Served) -> None:
    async with AsyncMeterlane(sdk_server.base, sdk_server.key) as ml:
        answers = await asyncio.gather(*(
            ml.track(user="ivy", model="gpt-4o-mini", input_tokens=5, output_tokens=1,
                     idempotency_key=f"ivy-{n}") for n in range(12)))
        assert {a["outcome"] for a in answers} == {"tracked"}
        assert await day_used(ml, "ivy") == 12 * 6


class LosesAnAnswer(httpx.AsyncHTTPTransport):
    """The async twin of test_sdk.LosesAnAnswer: the first answer to `path` is lost after
    the server sent it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path, self.sent = path, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        resp = await super().handle_async_request(request)
        if request.url.path == self.path:
            self.sent += 1
            if self.sent == 1:
                await resp.aread()
                await resp.aclose()
                raise httpx.ReadError("connection reset after the answer was sent")
        return resp


async def test_batches_event_time_and_a_lost_answer(sdk_server: Served) -> None:
    yesterday = datetime.now(UTC) - timedelta(days=1)
    events = [{"user": "fay", "model": "gpt-4o-mini", "input_tokens": 20, "output_tokens": 5,
               "idempotency_key": "b-1"},
              {"user": "fay", "model": "gpt-4o-mini", "input_tokens": 30, "output_tokens": 7,
               "idempotency_key": "b-2", "timestamp": yesterday}]
    lossy = LosesAnAnswer("/v1/meter/reserve")
    async with AsyncMeterlane(sdk_server.base, sdk_server.key, backoff=0.01,
                              http_client=httpx.AsyncClient(transport=lossy)) as ml:
        assert (await ml.track_batch(events))["tracked"] == 2
        assert (await ml.track_batch(events))["duplicates"] == 2
        assert await day_used(ml, "fay") == 25  # yesterday's call is in yesterday
        with pytest.raises(BadRequest, match="timestamp"):
            await ml.track(user="fay", model="gpt-4o-mini", input_tokens=1, output_tokens=0,
                           idempotency_key="old", timestamp=yesterday - timedelta(days=60))
        lease = await ml.reserve(user="fay", model="gpt-4o-mini", input_tokens=30,
                                 max_output_tokens=50, idempotency_key="reserve-fay-1")
        assert lossy.sent == 2 and await day_used(ml, "fay") == 25 + 80  # one lease
        await lease.settle(input_tokens=30, output_tokens=10)
        assert await day_used(ml, "fay") == 25 + 40


async def test_offers_consent_and_checkout(sdk_server: Served) -> None:
    async with AsyncMeterlane(sdk_server.base, sdk_server.key) as ml:
        served = await ml.offers("jo", jurisdiction="EU-DE", locale="de")
        [offer] = [o for o in served["data"] if o["offer"] == sdk_server.offer]
        consent = await ml.record_consent(
            user="jo", offer=offer, ip="203.0.113.9", user_agent="Mozilla/5.0 (test)",
            render_manifest={**MANIFEST, "cta_label": offer["cta_label"]})
        record = await ml.get_consent(consent["consent_id"])
        assert (record["jurisdiction"], record["locale"]) == ("EU-DE", "de")
        session = await ml.checkout(user="jo", plan="pro", consent_id=consent["consent_id"],
                                    success_url="https://app.example/ok",
                                    cancel_url="https://app.example/back")
        assert session["mode"] == "subscription" and session["url"]
        with pytest.raises(Conflict) as again:
            await ml.checkout(user="jo", plan="pro", consent_id=consent["consent_id"],
                              success_url="https://app.example/ok",
                              cancel_url="https://app.example/back")
        assert again.value.rule == "CNS-01"


class Counts(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.tries = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.tries += 1
        return await super().handle_async_request(request)


async def test_a_connection_failure_is_tried_again_only_when_safe() -> None:
    """The policy is the sync client's (test_sdk.py tries each kind of call); here, that the
    async transport follows it."""
    for safe, tries in ((True, 3), (False, 1)):
        counted = Counts()
        async with AsyncMeterlane("http://127.0.0.1:9", "mlk_x", max_retries=2, backoff=0.001,
                                  http_client=httpx.AsyncClient(transport=counted)) as ml:
            with pytest.raises(ConnectionFailed):
                await (ml.quota("kim") if safe else ml.reserve(user="kim", model="m"))
        assert counted.tries == tries
