"""AsyncMeterlane (httpx's async client): the same methods as Meterlane, awaited; `metered()`
is an async context manager and `.openai()` an `openai.AsyncOpenAI`. Its methods are
meterlane_sdk._api's; this module is its transport."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import TracebackType
from typing import Any

import httpx

from meterlane_sdk._api import Api, Lease, MeteredBlock
from meterlane_sdk._core import Call
from meterlane_sdk.errors import MeterlaneError

Doc = Coroutine[Any, Any, dict[str, Any]]


class AsyncMeterlane(Api[Doc, Coroutine[Any, Any, Lease[Doc]], "AsyncMeteredCall",
                         httpx.AsyncClient]):
    """`AsyncMeterlane(base_url, api_key)`: as Meterlane, each call awaited
    (`async with AsyncMeterlane(...) as ml:` closes it); `http_client=` an httpx.AsyncClient."""

    _openai_class = "AsyncOpenAI"
    _http_class = httpx.AsyncClient

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMeterlane:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, call: Call) -> dict[str, Any]:
        """As Meterlane's: the waits between attempts are asyncio sleeps."""
        attempt = 0
        while True:
            try:
                got: httpx.Response | httpx.TransportError = await self._http.request(
                    **call.request())
            except httpx.TransportError as exc:
                got = exc
            outcome = self._policy.judge(call, got, attempt)
            if isinstance(outcome, dict):
                return outcome
            await asyncio.sleep(outcome)
            attempt += 1

    async def _send_reserve(self, call: Call) -> Lease[Doc]:
        return Lease(self, await self._send(call))

    def _block(self, args: dict[str, Any]) -> AsyncMeteredCall:
        return AsyncMeteredCall(self, args)


class AsyncMeteredCall(MeteredBlock[Doc]):
    """The async context manager of `AsyncMeterlane.metered`."""

    def __init__(self, client: AsyncMeterlane, args: dict[str, Any]) -> None:
        super().__init__(args)
        self._client = client

    async def __aenter__(self) -> AsyncMeteredCall:
        self.lease = await self._client.reserve(**self._args)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.lease is not None
        raised = exc_type is not None
        usage = self._to_settle(raised)
        if usage is not None:
            await self.lease.settle(**usage)
            return
        try:
            await self.lease.release()
        except MeterlaneError:  # the lease expires by itself on the server, and the
            pass                # block's own error is the one to see
        self._released(raised)
