"""The Meterlane client (httpx's sync client): an OpenAI client that goes through the gateway,
the quota, reserve -> settle around calls the app makes itself, tracking, and the paywall. Its
methods are meterlane_sdk._api's; this module is its transport."""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import httpx

from meterlane_sdk._api import Api, Lease, MeteredBlock
from meterlane_sdk._core import Call
from meterlane_sdk.errors import MeterlaneError

Doc = dict[str, Any]


class Meterlane(Api[Doc, Lease[Doc], "MeteredCall", httpx.Client]):
    """`Meterlane(base_url, api_key)`: an app key acts for any end user of its app (name them
    with `user=`); an end-user key acts only for its own user. Also `timeout=`,
    `max_retries=`, `backoff=` (seconds) and `http_client=` (an httpx.Client)."""

    _http_class = httpx.Client

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Meterlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, call: Call) -> Doc:
        """One call; a 429 or 503 (after its Retry-After), and a connection failure when the
        call is safe to repeat, are tried again with backoff, up to max_retries times."""
        attempt = 0
        while True:
            try:
                got: httpx.Response | httpx.TransportError = self._http.request(**call.request())
            except httpx.TransportError as exc:
                got = exc
            outcome = self._policy.judge(call, got, attempt)
            if isinstance(outcome, dict):
                return outcome
            time.sleep(outcome)
            attempt += 1

    def _send_reserve(self, call: Call) -> Lease[Doc]:
        return Lease(self, self._send(call))

    def _block(self, args: dict[str, Any]) -> MeteredCall:
        return MeteredCall(self, args)


class MeteredCall(MeteredBlock[Doc]):
    """The context manager of `Meterlane.metered`."""

    def __init__(self, client: Meterlane, args: dict[str, Any]) -> None:
        super().__init__(args)
        self._client = client

    def __enter__(self) -> MeteredCall:
        self.lease = self._client.reserve(**self._args)
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.lease is not None
        raised = exc_type is not None
        usage = self._to_settle(raised)
        if usage is not None:
            self.lease.settle(**usage)
            return
        try:
            self.lease.release()
        except MeterlaneError:  # the lease expires by itself on the server, and the
            pass                # block's own error is the one to see
        self._released(raised)
