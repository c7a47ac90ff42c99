"""The transactional outbox and signed webhooks to the app.

An event is written in the same transaction as the change it reports (`publish_in`), with one
delivery row per webhook endpoint of its app. A dispatcher (in every `meterlane serve` worker,
or `meterlane webhooks deliver`) claims due deliveries, POSTs them signed, and retries with
backoff; every attempt is logged. A delivery is claimed for a while before it is sent, so two
dispatchers never send it at once; a receiver still de-duplicates by the event id (a crash
between sending and recording can repeat a delivery).

Signature (documented for receivers): header `Meterlane-Signature: t=<unix seconds>,v1=<hex>`
where hex = HMAC-SHA256(endpoint secret, f"{t}.{raw body}"). Reject a timestamp more than five
minutes old, compare in constant time, de-duplicate by the signed body's "id" (the
`Meterlane-Event-Id` header repeats it, unsigned).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import urllib3
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from core.audit import Actor, record
from core.cutoff import Cutoff, CutoffHTTPConnection, CutoffHTTPSConnection, DeadlineError
from core.db import utcnow
from core.errors import ConflictError, InvalidRequestError
from core.models import OutboxEvent, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from core.pagination import trimmed
from core.text import control_free

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "Meterlane-Signature"
EVENT_ID_HEADER = "Meterlane-Event-Id"
TOLERANCE_SECONDS = 300
# Seconds to wait after each failed attempt; then the delivery is given up ("failed").
BACKOFF = (10, 30, 120, 600, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600)
# A delivery's time, connect to answer (5 s to connect, 10 s per read within it): a receiver
# trickling its answer must not hold the webhooks job (and the jobs after it) for minutes.
DELIVERY_SECONDS = 15.0
CLAIM_SECONDS = 120  # well over a delivery's deadline
RUN_SECONDS = 30.0  # a webhooks run picks no new delivery after this; the rest go next run


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, body: bytes, header: str, *, now: float | None = None,
           tolerance: int = TOLERANCE_SECONDS) -> bool:
    """Check a Meterlane-Signature header, as a receiver does."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected.encode(), parts.get("v1", "").encode())


@dataclass(frozen=True)
class Endpoint:
    url: str
    secret: str | None  # shown once, when created or rotated
    created_at: datetime


class _RefusedError(Exception):
    """A webhook URL that must not be called (it points inside the operator's network)."""


# IPv6 prefixes that carry an IPv4 address a gateway may reach for us: NAT64 (well-known
# and local-use), 6to4, Teredo, and the old IPv4-compatible ::/96. A webhook never needs
# them, and the IPv4 inside could be any internal address.
_TRANSITION = [ipaddress.ip_network(n) for n in (
    "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32", "::/96")]


def _routable(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        if mapped is not None:
            return mapped.is_global and not mapped.is_multicast
        if any(addr in net for net in _TRANSITION):
            return False
    return addr.is_global and not addr.is_multicast


def resolve_webhook_host(url: str, *, allow_private: bool) -> tuple[str, int, str]:
    """(host, port, address) of a webhook URL: the address it is called at, resolved once
    and, unless `allow_private`, globally routable (Python's is_global: no private, loopback,
    link-local, shared 100.64/10, reserved or documentation address). Raises ValueError
    saying what is wrong."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an http(s) URL with a host")
    try:
        port = parts.port
        if port is None:
            port = 443 if parts.scheme == "https" else 80
    except ValueError:
        raise ValueError("url has a port that is not a number from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise ValueError("url has a port that is not a number from 1 to 65535")
    host = parts.hostname
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"the webhook host {host!r} does not resolve") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not allow_private:
        for addr in addresses:
            if not _routable(addr):
                raise ValueError(
                    f"the webhook host {host!r} resolves to an address that is not public "
                    f"({addr}); set MLANE_WEBHOOKS_ALLOW_PRIVATE=1 to allow it")
    return host, port, str(addresses[0])


class EventService:
    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow,
                 timeout_s: float = 10.0, deadline_s: float = DELIVERY_SECONDS,
                 allow_private: bool = False) -> None:
        self.engine = engine
        self.clock = clock
        # Webhooks to private addresses (loopback, 10/8, 169.254/16, ...) are refused unless
        # the operator allows them (MLANE_WEBHOOKS_ALLOW_PRIVATE=1: development, tests).
        self.allow_private = allow_private
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- endpoints --------------------------------------------------------------------------

    def set_endpoint(self, app_id: int, url: str, *, rotate: bool = False,
                     actor: Actor | None = None) -> Endpoint:
        """The app's webhook URL; a new or rotated endpoint gets a new secret (shown once).
        The audit row says the secret changed, never what it is."""
        if not url.startswith(("https://", "http://")) or len(url) > 2000 \
                or not control_free(url, multiline=False):
            raise InvalidRequestError("url must be an http(s) URL of at most 2000 characters.",
                                      param="url")
        blocked = self._blocked(url)
        if blocked is not None:
            raise InvalidRequestError(blocked, param="url")
        now = self.clock()
        with self.engine.begin() as conn:
            row = conn.execute(select(WebhookEndpoint.created_at, WebhookEndpoint.url).where(
                WebhookEndpoint.app_id == app_id).with_for_update()).first()
            secret = None
            if row is None or rotate:
                secret = "whsec_" + secrets.token_urlsafe(32)
            record(conn, actor, "webhook.set", target_type="webhook_endpoint",
                   target_id=app_id, app_id=app_id,
                   before=None if row is None else {"url": row.url},
                   after={"url": url, "secret_changed": secret is not None})
            if row is None:
                try:
                    conn.execute(insert(WebhookEndpoint).values(
                        app_id=app_id, url=url, secret=secret, created_at=now))
                except IntegrityError as exc:
                    raise ConflictError("Another request set this app's webhook at the same "
                                        "time; read it with GET /v1/webhooks.") from exc
                return Endpoint(url, secret, now)
            values: dict[str, Any] = {"url": url}
            if secret is not None:
                values["secret"] = secret
            conn.execute(update(WebhookEndpoint).where(WebhookEndpoint.app_id == app_id)
                         .values(**values))
            return Endpoint(url, secret, row.created_at)

    def _blocked(self, url: str) -> str | None:
        try:
            resolve_webhook_host(url, allow_private=self.allow_private)
        except ValueError as exc:
            return str(exc)
        return None

    def _post(self, url: str, payload: bytes, headers: dict[str, str]) -> int:
        """POST to the address the URL's host resolved to when it was checked (never a second
        lookup that DNS could answer otherwise); TLS still checks the host's certificate.
        The whole exchange has `deadline_s` (core.cutoff): DeadlineError past it."""
        try:
            host, port, address = resolve_webhook_host(url, allow_private=self.allow_private)
        except ValueError as exc:
            raise _RefusedError(str(exc)) from exc
        parts = urllib.parse.urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        timeout = urllib3.Timeout(connect=5, read=self.timeout_s)
        with Cutoff(self.deadline_s) as cutoff:
            pool: urllib3.HTTPConnectionPool
            if parts.scheme == "https":
                pool = urllib3.HTTPSConnectionPool(
                    address, port, server_hostname=host, assert_hostname=host,
                    cert_reqs="CERT_REQUIRED", timeout=timeout, retries=False, maxsize=1,
                    cutoff=cutoff)
                pool.ConnectionCls = CutoffHTTPSConnection
            else:
                pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout,
                                                  retries=False, maxsize=1, cutoff=cutoff)
                pool.ConnectionCls = CutoffHTTPConnection
            default = 443 if parts.scheme == "https" else 80
            shown = f"[{host}]" if ":" in host else host
            try:
                resp = pool.urlopen("POST", path, body=payload, redirect=False, retries=False,
                                    preload_content=False, headers={
                                        **headers, "Host": shown if port == default
                                        else f"{shown}:{port}"})
                try:
                    resp.read(4096)  # the answer's body does not matter: never read it all
                    return int(resp.status)
                finally:
                    resp.close()
            except Exception as exc:
                if cutoff.expired:  # whatever the cut connection raised
                    raise DeadlineError(f"no complete answer within {self.deadline_s:g} s: "
                                        "cut off") from exc
                raise
            finally:
                pool.close()

    def endpoint(self, app_id: int) -> Endpoint | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(WebhookEndpoint.url, WebhookEndpoint.created_at).where(
                WebhookEndpoint.app_id == app_id)).first()
        return Endpoint(row[0], None, row[1]) if row else None

    # -- the outbox -------------------------------------------------------------------------

    def publish_in(self, conn: Connection, app_id: int, type_: str, data: dict[str, Any],
                   *, event_id: str | None = None) -> str:
        """Write an event (and its deliveries) inside the caller's transaction."""
        event_id = event_id or new_event_id()
        now = self.clock()
        body = {"id": event_id, "type": type_, "created": _iso(now), "data": data}
        conn.execute(insert(OutboxEvent).values(
            event_id=event_id, app_id=app_id, type=type_, body=orjson.dumps(body).decode(),
            created_at=now))
        endpoints = conn.execute(select(WebhookEndpoint.id).where(
            WebhookEndpoint.app_id == app_id)).scalars().all()
        for endpoint_id in endpoints:
            conn.execute(insert(WebhookDelivery).values(
                event_id=event_id, endpoint_id=endpoint_id, app_id=app_id, state="pending",
                attempts=0, next_attempt_at=now, created_at=now))
        return event_id

    # -- delivering -------------------------------------------------------------------------

    def deliver_for(self, budget_s: float = RUN_SECONDS, *, rounds: int = 50) -> int:
        """The webhooks job's run: deliveries due, 100 a round, until none is due or
        `budget_s` has passed (no new delivery is picked after it; the rest are due at the
        next run); returns how many were attempted."""
        until = time.monotonic() + budget_s
        total = 0
        for _round in range(rounds):
            sent = self.deliver_due(until=until)
            total += sent
            if not sent or time.monotonic() >= until:
                break
        return total

    def deliver_due(self, limit: int = 100, *, until: float | None = None) -> int:
        """Send the deliveries that are due (none picked once time.monotonic() reaches
        `until`); returns how many were attempted."""
        now = self.clock()
        with self.engine.connect() as conn:
            due = conn.execute(select(WebhookDelivery.id).where(
                WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now,
            ).order_by(WebhookDelivery.next_attempt_at).limit(limit)).scalars().all()
        sent = 0
        for delivery_id in due:
            if until is not None and time.monotonic() >= until:
                break
            claimed = self._claim(delivery_id)
            if claimed is not None:
                self._attempt(delivery_id, claimed)
                sent += 1
        return sent

    def _claim(self, delivery_id: int) -> datetime | None:
        """Take a delivery for a while (compare-and-set: works on SQLite and Postgres); the
        claim's expiry is its token, so only the claimant records the attempt."""
        now = self.clock()  # now, not when the batch was read: an attempt takes time
        until = now + timedelta(seconds=CLAIM_SECONDS)
        with self.engine.begin() as conn:
            result = conn.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.state == "pending",
                WebhookDelivery.next_attempt_at <= now,
            ).values(next_attempt_at=until))
            return until if result.rowcount == 1 else None

    def _attempt(self, delivery_id: int, claimed_until: datetime) -> None:
        with self.engine.connect() as conn:
            row = conn.execute(select(
                WebhookDelivery.attempts, WebhookEndpoint.url, WebhookEndpoint.secret,
                OutboxEvent.body, OutboxEvent.event_id,
            ).join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id).join(
                OutboxEvent, OutboxEvent.event_id == WebhookDelivery.event_id).where(
                WebhookDelivery.id == delivery_id)).one()
        attempts, url, secret, body, event_id = row
        payload = body.encode()
        started = time.perf_counter()
        status: int | None = None
        error: str | None = None
        try:
            status = self._post(url, payload, {
                "Content-Type": "application/json", EVENT_ID_HEADER: event_id,
                SIGNATURE_HEADER: sign(secret, payload, int(time.time())),
                "User-Agent": "Meterlane-Webhooks/1"})
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except _RefusedError as exc:
            error = str(exc)
        except urllib3.exceptions.HTTPError as exc:
            error = f"{exc.__class__.__name__}: {exc}"[:500]
        elapsed = int((time.perf_counter() - started) * 1000)
        now = self.clock()
        attempts += 1
        values: dict[str, Any] = {"attempts": attempts, "last_status": status,
                                  "last_error": error}
        if error is None:
            values.update(state="delivered", delivered_at=now)
        elif attempts > len(BACKOFF):
            values.update(state="failed")
        else:
            values["next_attempt_at"] = now + timedelta(seconds=BACKOFF[attempts - 1])
        with self.engine.begin() as conn:
            mine = conn.execute(update(WebhookDelivery).where(
                WebhookDelivery.id == delivery_id, WebhookDelivery.state == "pending",
                WebhookDelivery.next_attempt_at == claimed_until).values(**values))
            if mine.rowcount != 1:  # the claim ran out and another dispatcher took it
                log.warning("webhook delivery %s: claim lost, attempt not recorded", delivery_id)
                return
            conn.execute(insert(WebhookAttempt).values(
                delivery_id=delivery_id, attempt=attempts, at=now, status=status,
                error=error, duration_ms=elapsed))

    def deliveries(self, app_id: int, event_id: str | None = None, limit: int = 100,
                   starting_after: int | None = None) -> tuple[list[dict[str, Any]], bool]:
        """The delivery log: each delivery with its attempts, newest first, a page at a time:
        (the page, whether more follow)."""
        where = [WebhookDelivery.app_id == app_id]
        if event_id is not None:
            where.append(WebhookDelivery.event_id == event_id)
        if starting_after is not None:
            where.append(WebhookDelivery.id < starting_after)
        with self.engine.connect() as conn:
            rows = conn.execute(select(
                WebhookDelivery.id, WebhookDelivery.event_id, OutboxEvent.type,
                WebhookEndpoint.url, WebhookDelivery.state, WebhookDelivery.attempts,
                WebhookDelivery.next_attempt_at, WebhookDelivery.delivered_at,
                WebhookDelivery.created_at,
            ).join(OutboxEvent, OutboxEvent.event_id == WebhookDelivery.event_id).join(
                WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id,
            ).where(*where).order_by(WebhookDelivery.id.desc()).limit(limit + 1)).all()
            rows, more = trimmed(rows, limit)
            ids = [r.id for r in rows]
            attempts: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
            if ids:
                for a in conn.execute(select(
                        WebhookAttempt.delivery_id, WebhookAttempt.attempt, WebhookAttempt.at,
                        WebhookAttempt.status, WebhookAttempt.error, WebhookAttempt.duration_ms,
                ).where(WebhookAttempt.delivery_id.in_(ids)).order_by(WebhookAttempt.id)):
                    attempts[a.delivery_id].append({
                        "attempt": a.attempt, "at": a.at, "status": a.status,
                        "error": a.error, "duration_ms": a.duration_ms})
        return [{"id": r.id, "event_id": r.event_id, "type": r.type, "url": r.url,
                 "state": r.state, "attempts": attempts[r.id],
                 "next_attempt_at": r.next_attempt_at if r.state == "pending" else None,
                 "delivered_at": r.delivered_at, "created_at": r.created_at} for r in rows], more

    # -- the dispatcher thread of a serving worker --------------------------------------------

    def start(self, interval_s: float = 1.0) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    while self.deliver_due() > 0:
                        pass
                except Exception:  # noqa: BLE001 - the next round tries again
                    log.exception("webhook delivery round failed")

        self._thread = threading.Thread(target=loop, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
