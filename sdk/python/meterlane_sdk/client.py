"""The Meterlane client: an OpenAI client that goes through the gateway, the quota, and
reserve -> settle around calls the app makes itself."""

from __future__ import annotations

import random
import time
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from meterlane_sdk.errors import (
    ConnectionFailed,
    MeterlaneError,
    RateLimited,
    ServiceUnavailable,
    error_for,
)

DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
MAX_RETRY_WAIT = 30.0  # a Retry-After longer than this is not waited out: the error is raised


class Meterlane:
    """`Meterlane(base_url, api_key)`: an app key acts for any end user of its app (name them
    with `user=`); an end-user key acts only for its own user."""

    def __init__(self, base_url: str, api_key: str, *, timeout: Any = DEFAULT_TIMEOUT,
                 max_retries: int = 2, backoff: float = 0.5,
                 http_client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        headers = {"Authorization": f"Bearer {api_key}",
                   "User-Agent": "meterlane-sdk-python/0.1"}
        if http_client is None:
            http_client = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        else:  # the caller's client (proxies, transports): pointed at this server, with the key
            http_client.base_url = httpx.URL(self.base_url)
            http_client.headers.update(headers)
        self._http = http_client

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Meterlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- 1. calls through the gateway ---------------------------------------------------------

    def openai(self, user: str | None = None, **kwargs: Any) -> Any:
        """An `openai.OpenAI` client whose calls go through Meterlane, metered for `user`."""
        import openai

        return openai.OpenAI(**self._openai_args(user, kwargs))

    def async_openai(self, user: str | None = None, **kwargs: Any) -> Any:
        """The same as an `openai.AsyncOpenAI`."""
        import openai

        return openai.AsyncOpenAI(**self._openai_args(user, kwargs))

    def _openai_args(self, user: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        headers = dict(kwargs.pop("default_headers", None) or {})
        if user is not None:
            headers["X-Meterlane-User"] = user
        return {"base_url": f"{self.base_url}/v1", "api_key": self.api_key,
                "default_headers": headers, "timeout": kwargs.pop("timeout", 600.0),
                "max_retries": kwargs.pop("max_retries", self.max_retries), **kwargs}

    # -- 2. what an end user has left -----------------------------------------------------------

    def quota(self, user: str | None = None) -> dict[str, Any]:
        """Every limit of the user's plan: used, remaining, limit, resets_at (user keys: their
        own, with `user` left out)."""
        path = "/v1/me/quota" if user is None else f"/v1/users/{quote(user, safe='')}/quota"
        return dict(self._request("GET", path, retry=True))

    def credits(self, user: str | None = None) -> dict[str, Any]:
        path = "/v1/me/credits" if user is None else f"/v1/users/{quote(user, safe='')}/credits"
        return dict(self._request("GET", path, retry=True))

    # -- 3. calls the app makes itself ------------------------------------------------------

    def reserve(self, *, model: str, user: str | None = None,
                input_tokens: int | None = None, messages: list[Any] | None = None,
                max_output_tokens: int | None = None) -> Lease:
        """Reserve a call's tokens against the user's limits; raises QuotaExceeded or
        RateLimited when they would be overspent. Retried only on a 429 or 503 (the server
        did nothing), not on a lost answer: such a lease expires by itself on the server."""
        body: dict[str, Any] = {"model": model}
        for key, value in (("user", user), ("input_tokens", input_tokens),
                           ("messages", messages), ("max_output_tokens", max_output_tokens)):
            if value is not None:
                body[key] = value
        return Lease(self, self._request("POST", "/v1/meter/reserve", json=body))

    def metered(self, *, model: str, user: str | None = None,
                input_tokens: int | None = None, messages: list[Any] | None = None,
                max_output_tokens: int | None = None) -> MeteredCall:
        """`with ml.metered(...) as call:` reserves, lets the app call any model, and settles
        with `call.record(...)`'s usage on the way out, or releases if the block raised."""
        return MeteredCall(self, dict(model=model, user=user, input_tokens=input_tokens,
                                      messages=messages, max_output_tokens=max_output_tokens))

    def track(self, *, model: str, input_tokens: int, output_tokens: int,
              idempotency_key: str, user: str | None = None,
              cached_input_tokens: int = 0, reasoning_tokens: int = 0) -> dict[str, Any]:
        """Record a call's usage without a lease (once per idempotency key; retried safely)."""
        usage = {"input_tokens": input_tokens, "output_tokens": output_tokens}
        if cached_input_tokens:
            usage["cached_input_tokens"] = cached_input_tokens
        if reasoning_tokens:
            usage["reasoning_tokens"] = reasoning_tokens
        body: dict[str, Any] = {"model": model, "usage": usage,
                                "idempotency_key": idempotency_key}
        if user is not None:
            body["user"] = user
        return dict(self._request("POST", "/v1/meter/track", json=body, retry=True))

    # -- HTTP -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, json: Any = None,
                 retry: bool = False) -> Any:
        """One call; with `retry`, a 429 or 503 (after its Retry-After) and a connection
        failure are tried again, with backoff, up to max_retries times. A 429 or 503 means
        the server did nothing, so even non-idempotent calls retry those."""
        attempt = 0
        while True:
            try:
                resp = self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                if not retry or attempt >= self.max_retries:
                    raise ConnectionFailed(0, f"{method} {path}: {exc!r}") from exc
                self._sleep(attempt, None)
                attempt += 1
                continue
            if resp.status_code < 300:
                try:
                    return resp.json() if resp.content else {}
                except ValueError as exc:  # not Meterlane answering (a proxy's page?)
                    raise MeterlaneError(resp.status_code, f"{method} {path}: the answer is "
                                         "not JSON") from exc
            try:
                body = resp.json()
            except ValueError:
                body = {"detail": resp.text}
            err = error_for(resp.status_code, body, {k.lower(): v for k, v in
                                                     resp.headers.items()})
            if isinstance(err, (RateLimited, ServiceUnavailable)) and attempt < self.max_retries:
                wait = err.retry_after
                if wait is None or wait <= MAX_RETRY_WAIT:
                    self._sleep(attempt, wait)
                    attempt += 1
                    continue
            raise err

    def _sleep(self, attempt: int, retry_after: float | None) -> None:
        if retry_after is not None:
            time.sleep(retry_after)
            return
        time.sleep(min(MAX_RETRY_WAIT,
                       self.backoff * (2 ** attempt) * (0.5 + random.random() / 2)))


class Lease:
    """A reservation: settle it with the call's usage, or release it if the call failed."""

    def __init__(self, client: Meterlane, doc: dict[str, Any]) -> None:
        self._client = client
        self.doc = doc
        self.id: str = doc["lease_id"]
        self.granted_output_tokens: int | None = doc.get("granted_output_tokens")
        self.limits: list[dict[str, Any]] = list(doc.get("limits") or [])
        self.done = False

    def settle(self, *, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0,
               reasoning_tokens: int = 0) -> dict[str, Any]:
        usage = {"input_tokens": input_tokens, "output_tokens": output_tokens}
        if cached_input_tokens:
            usage["cached_input_tokens"] = cached_input_tokens
        if reasoning_tokens:
            usage["reasoning_tokens"] = reasoning_tokens
        out = self._client._request("POST", "/v1/meter/settle", retry=True,
                                    json={"lease_id": self.id, "usage": usage})
        self.done = True
        return dict(out)

    def release(self) -> dict[str, Any]:
        out = self._client._request("POST", "/v1/meter/release", retry=True,
                                    json={"lease_id": self.id})
        self.done = True
        return dict(out)


class MeteredCall:
    """The context manager of `Meterlane.metered`."""

    def __init__(self, client: Meterlane, args: dict[str, Any]) -> None:
        self._client = client
        self._args = args
        self.lease: Lease | None = None
        self._usage: dict[str, int] | None = None

    @property
    def max_output_tokens(self) -> int | None:
        """The output the call may generate: cap the model call at this."""
        return self.lease.granted_output_tokens if self.lease else None

    def record(self, *, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0,
               reasoning_tokens: int = 0) -> None:
        self._usage = {"input_tokens": input_tokens, "output_tokens": output_tokens,
                       "cached_input_tokens": cached_input_tokens,
                       "reasoning_tokens": reasoning_tokens}

    def __enter__(self) -> MeteredCall:
        self.lease = self._client.reserve(**self._args)
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.lease is not None
        if exc_type is not None or self._usage is None:
            try:
                self.lease.release()
            except Exception:  # noqa: BLE001, S110 - the lease expires by itself; the
                pass           # block's own error is the one to see
            if exc_type is None:
                raise MeterlaneError(0, "the metered block ended without call.record(...): "
                                     "its lease was released and nothing was recorded")
            return
        self.lease.settle(**self._usage)
