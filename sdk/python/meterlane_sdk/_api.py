"""Every method of the API, written once for both clients. A method builds its request
(meterlane_sdk._core) and hands it to the client's transport, `_send`: the sync client's answers
the document, the async client's a coroutine of it. The type parameters say which, so
`Meterlane.quota()` is typed `dict` and `AsyncMeterlane.quota()` a coroutine of one."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from meterlane_sdk._core import (
    DEFAULT_TIMEOUT,
    Call,
    Policy,
    auth_headers,
    given,
    track_body,
    usage,
    user_path,
    write,
)
from meterlane_sdk.errors import MeterlaneError

Doc = TypeVar("Doc")        # what a call answers: dict[str, Any], or a coroutine of one
Reserved = TypeVar("Reserved")  # what reserve() answers: a Lease, or a coroutine of one
Block = TypeVar("Block")    # what metered() answers: a context manager, sync or async
Http = TypeVar("Http", httpx.Client, httpx.AsyncClient)  # the transport's httpx client


class Api(Generic[Doc, Reserved, Block, Http]):
    """`base_url` and `api_key`: an app key acts for any end user of its app (name them with
    `user=`); an end-user key acts only for its own user (leave `user` out). `http_client`:
    your own httpx client (proxies, transports), pointed at this server with this key."""

    _openai_class = "OpenAI"  # the openai SDK's client that .openai() returns
    _http_class: type[Http]

    def __init__(self, base_url: str, api_key: str, *, timeout: Any = DEFAULT_TIMEOUT,
                 max_retries: int = 2, backoff: float = 0.5,
                 http_client: Http | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._policy = Policy(max_retries, backoff)
        if http_client is None:
            http_client = self._http_class(base_url=self.base_url, timeout=timeout,
                                           headers=auth_headers(api_key))
        else:
            http_client.base_url = httpx.URL(self.base_url)
            http_client.headers.update(auth_headers(api_key))
        self._http: Http = http_client

    # the transport: each client's own (sync or async)
    def _send(self, call: Call) -> Doc:
        raise NotImplementedError

    def _send_reserve(self, call: Call) -> Reserved:
        raise NotImplementedError

    def _block(self, args: dict[str, Any]) -> Block:
        raise NotImplementedError

    # -- 1. calls through the gateway ---------------------------------------------------------

    def openai(self, user: str | None = None, **kwargs: Any) -> Any:
        """An openai SDK client (`openai.OpenAI`; `openai.AsyncOpenAI` from AsyncMeterlane)
        whose calls go through Meterlane, metered for `user`."""
        import openai

        return getattr(openai, self._openai_class)(**self._openai_args(user, kwargs))

    def async_openai(self, user: str | None = None, **kwargs: Any) -> Any:
        """An `openai.AsyncOpenAI`, from either client."""
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

    def quota(self, user: str | None = None) -> Doc:
        """Every limit of the user's plan: used, remaining, limit, resets_at (user keys: their
        own, with `user` left out)."""
        return self._send(Call("GET", user_path(user, "quota")))

    def credits(self, user: str | None = None) -> Doc:
        """The user's credit balance and grants (granted, burned, expired)."""
        return self._send(Call("GET", user_path(user, "credits")))

    # -- 3. calls the app makes itself ------------------------------------------------------

    def reserve(self, *, model: str, user: str | None = None,
                input_tokens: int | None = None, messages: list[Any] | None = None,
                max_output_tokens: int | None = None,
                idempotency_key: str | None = None) -> Reserved:
        """Reserve a call's tokens against the user's limits; raises QuotaExceeded or
        RateLimited when they would be overspent. Retried on a 429 or 503 (the server did
        nothing); after a lost answer only with an `idempotency_key` (the retry gets the same
        lease); without one such a lease expires by itself on the server."""
        body = {"model": model, **given(user=user, input_tokens=input_tokens, messages=messages,
                                        max_output_tokens=max_output_tokens)}
        return self._send_reserve(write("POST", "/v1/meter/reserve", body, idempotency_key))

    def metered(self, *, model: str, user: str | None = None,
                input_tokens: int | None = None, messages: list[Any] | None = None,
                max_output_tokens: int | None = None,
                idempotency_key: str | None = None) -> Block:
        """`with ml.metered(...) as call:` (`async with` on AsyncMeterlane) reserves, lets the
        app call any model, and settles with `call.record(...)`'s usage on the way out, or
        releases if the block raised."""
        return self._block(dict(model=model, user=user, input_tokens=input_tokens,
                                messages=messages, max_output_tokens=max_output_tokens,
                                idempotency_key=idempotency_key))

    def track(self, *, model: str, input_tokens: int, output_tokens: int,
              idempotency_key: str, user: str | None = None,
              cached_input_tokens: int = 0, reasoning_tokens: int = 0,
              cache_write_tokens: int = 0, timestamp: datetime | str | None = None) -> Doc:
        """Record a call's usage without a lease, once per idempotency key (so it is retried
        safely). `timestamp`: when it happened (an aware datetime or RFC 3339; default now),
        at most the server's `[metering] max_event_age` (35 days) ago."""
        return self._send(Call("POST", "/v1/meter/track", json=track_body(
            model=model, input_tokens=input_tokens, output_tokens=output_tokens,
            idempotency_key=idempotency_key, user=user, cached_input_tokens=cached_input_tokens,
            reasoning_tokens=reasoning_tokens, cache_write_tokens=cache_write_tokens,
            timestamp=timestamp)))

    def track_batch(self, events: Iterable[Mapping[str, Any]]) -> Doc:
        """Record up to 1,000 calls in one request, all or none: each event takes track()'s
        keyword arguments (each its own idempotency_key). The answer counts them (`tracked`,
        `duplicates`) and gives each one's outcome in order (`data`). App keys only."""
        return self._send(Call("POST", "/v1/meter/track/batch",
                               json={"events": [track_body(**e) for e in events]}))

    # -- 4. the paywall: offers, consents, checkout ---------------------------------------------

    def paywall_events(self, user: str | None = None, *, trigger: str | None = None,
                       limit: int | None = None, starting_after: str | None = None) -> Doc:
        """Paywall events (a threshold crossed, a limit reached), newest first, a page at a
        time (`has_more`; pass the last id as `starting_after`)."""
        return self._send(Call("GET", "/v1/paywall/events", params=given(
            user=user, trigger=trigger, limit=limit, starting_after=starting_after)))

    def offers(self, user: str | None = None, *, jurisdiction: str | None = None,
               platform: str = "web", locale: str | None = None) -> Doc:
        """The published offers the user may take where they are (`data`), each with the
        disclosure and call to action that jurisdiction requires, in the user's language.
        An unknown or missing jurisdiction gets the strictest profile."""
        return self._send(Call("GET", "/v1/paywall/offers", params=given(
            user=user, jurisdiction=jurisdiction, platform=platform, locale=locale)))

    def record_consent(self, *, offer: Mapping[str, Any], render_manifest: Mapping[str, Any],
                       user: str | None = None, consent_type: str = "auto_renewal",
                       platform: str = "web", ip: str | None = None,
                       user_agent: str | None = None,
                       idempotency_key: str | None = None) -> Doc:
        """Record that the user agreed to `offer`, one of offers()'s `data` as it was shown:
        its version, content hash, price and disclosure (its SHA-256), jurisdiction and
        locale are taken from it. `render_manifest` says how it was shown
        (`disclosure_in_viewport`, `default_state` "unchecked", `cta_label`). The answer's
        `consent_id` starts one checkout. Raises Conflict (409, `.rule`) when it is not what
        Meterlane served."""
        body = {"type": consent_type, "offer": offer["offer"], "version": offer["version"],
                "content_hash": offer["content_hash"], "rendered_price": offer["price"],
                "disclosure_sha256": hashlib.sha256(offer["disclosure"].encode()).hexdigest(),
                "render_manifest": dict(render_manifest), "platform": platform,
                **given(user=user, jurisdiction=offer.get("jurisdiction"),
                        locale=offer.get("locale"), ip=ip, user_agent=user_agent)}
        return self._send(write("POST", "/v1/paywall/consents", body, idempotency_key))

    def get_consent(self, consent_id: str) -> Doc:
        """A consent record, read back as evidence (with the checkout it started)."""
        return self._send(Call("GET", f"/v1/paywall/consents/{quote(consent_id, safe='')}"))

    def checkout(self, *, user: str, success_url: str, cancel_url: str,
                 plan: str | None = None, credit_pack: str | None = None,
                 consent_id: str | None = None, idempotency_key: str | None = None) -> Doc:
        """A Stripe Checkout for the user: a plan (a subscription: needs the user's
        `consent_id`, else Conflict naming CNS-01) or a credit pack. Send the user to the
        answer's `url`."""
        body = {"user": user, "success_url": success_url, "cancel_url": cancel_url,
                **given(plan=plan, credit_pack=credit_pack, consent_id=consent_id)}
        return self._send(write("POST", "/v1/checkout/sessions", body, idempotency_key))


class Lease(Generic[Doc]):
    """A reservation: settle it with the call's usage, or release it if the call failed
    (awaited on AsyncMeterlane)."""

    def __init__(self, client: Api[Doc, Any, Any, Any], doc: dict[str, Any]) -> None:
        self._client = client
        self.doc = doc
        self.id: str = doc["lease_id"]
        self.granted_output_tokens: int | None = doc.get("granted_output_tokens")
        self.limits: list[dict[str, Any]] = list(doc.get("limits") or [])

    def settle(self, *, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0,
               reasoning_tokens: int = 0, cache_write_tokens: int = 0) -> Doc:
        """Record the call's usage (idempotent per lease: retried safely)."""
        return self._client._send(Call("POST", "/v1/meter/settle", json={
            "lease_id": self.id, "usage": usage(
                input_tokens=input_tokens, output_tokens=output_tokens,
                cached_input_tokens=cached_input_tokens, reasoning_tokens=reasoning_tokens,
                cache_write_tokens=cache_write_tokens)}))

    def release(self) -> Doc:
        """The call did not happen: give the reservation back."""
        return self._client._send(Call("POST", "/v1/meter/release",
                                       json={"lease_id": self.id}))


class MeteredBlock(Generic[Doc]):
    """What `metered()`'s context managers share: the lease, and the usage to settle it with."""

    def __init__(self, args: dict[str, Any]) -> None:
        self._args = args
        self._usage: dict[str, int] | None = None
        self.lease: Lease[Doc] | None = None

    @property
    def max_output_tokens(self) -> int | None:
        """The output the call may generate: cap the model call at this."""
        return self.lease.granted_output_tokens if self.lease is not None else None

    def record(self, *, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0,
               reasoning_tokens: int = 0, cache_write_tokens: int = 0) -> None:
        """The call's usage, settled when the block ends."""
        self._usage = {"input_tokens": input_tokens, "output_tokens": output_tokens,
                       "cached_input_tokens": cached_input_tokens,
                       "reasoning_tokens": reasoning_tokens,
                       "cache_write_tokens": cache_write_tokens}

    def _to_settle(self, raised: bool) -> dict[str, int] | None:
        """The usage to settle with; None: release (the block raised or recorded nothing)."""
        return None if raised else self._usage

    @staticmethod
    def _released(raised: bool) -> None:
        """After a release: a block that ended without record() is an error of its own."""
        if not raised:
            raise MeterlaneError(0, "the metered block ended without call.record(...): its "
                                 "lease was released and nothing was recorded")
