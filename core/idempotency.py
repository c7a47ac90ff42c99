"""Idempotent retries (the `Idempotency-Key` header): the first request with a key holds it
while it runs, and its answer is kept for a day; a retry with the same key and the same request
gets that answer again instead of running twice. core/web.py applies it to every write.

Per caller (their app, role and end user: never across tenants), a key is in one of these
states, and a request that carries it is answered accordingly:
- unknown, or expired: the request runs and holds the key (the claim is one INSERT: the unique
  (scope, key) decides who runs when two arrive at once);
- held by a request still running: 409 with Retry-After, nothing run;
- held for another request (another method, path, query, body or end user): 422;
- done, answer kept: the kept status, headers and body, marked `Idempotent-Replayed: true`;
- done, answer not kept (a stream, a secret shown once, a body over MAX_KEPT_BYTES): 409.

Only successes (2xx) are kept: after an error the key is let go, so a retry runs again (after
Retry-After, a top-up, a fix), as it must after a 429 or a failed upstream. A request whose
process died holding a key (kill -9) lets it go after `lapse` (longer than any request runs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import orjson
from sqlalchemy import ColumnElement, Table, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine, Row

from core.auth import Principal, Role
from core.config import Config
from core.db import utcnow
from core.errors import ConflictError, DomainError, InvalidRequestError
from core.models import IdempotencyRecord

KEEP = timedelta(hours=24)  # how long an answer is replayed (Stripe's, the IETF draft's)
MAX_KEPT_BYTES = 1 << 20  # a larger answer is not kept: a retry gets a 409
MAX_KEY = 255
MIN_LAPSE = timedelta(minutes=15)
# the headers a replay repeats; the rest (request id, quota left now) are the replay's own
KEPT_HEADERS = ("Content-Type", "Content-Disposition", "Location", "Cache-Control")
IN_PROGRESS, DONE = "in_progress", "done"
_TABLE = cast(Table, IdempotencyRecord.__table__)


class IdempotencyKeyInUseError(ConflictError):
    slug, title = "idempotency-key-in-use", "Idempotency-Key in use"
    openai_code = "idempotency_key_in_use"


class IdempotencyKeyReusedError(DomainError):
    status, slug, title = 422, "idempotency-key-reused", "Idempotency-Key reused"
    openai_code = "idempotency_key_reused"


class AnswerNotKeptError(ConflictError):
    slug, title = "idempotency-answer-not-kept", "Answer not kept"
    openai_code = "idempotency_answer_not_kept"


@dataclass(frozen=True)
class Claim:
    """This request holds the key: its answer is kept (finish) or the key let go (release)."""

    scope: str
    key: str
    request_id: str


@dataclass(frozen=True)
class Kept:
    """The answer of the request that held the key (request_id), to send again."""

    status: int
    headers: dict[str, str]
    body: bytes
    request_id: str


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY or not key.isprintable():
        raise InvalidRequestError(
            f"Idempotency-Key must be 1 to {MAX_KEY} printable characters.",
            param="Idempotency-Key")
    return key


def scope_of(principal: Principal) -> str:
    """Whose keys these are: an app's keys never meet another app's (nor an end user's their
    app's); operator-wide keys share the operator's."""
    app = "*" if principal.app_id is None else str(principal.app_id)
    scope = f"{principal.role.value}:{app}"
    if principal.role == Role.USER:
        scope += f":{principal.end_user_id}"
    return scope


def fingerprint(parts: Iterable[bytes]) -> str:
    """sha256 of the request's parts (method, path, query, body, ...), each length-prefixed so
    that no two different requests share one."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def lapse_for(config: Config) -> timedelta:
    """How long a key is held for a request that never finished: past the longest any request
    may wait for its upstream (connect and read), never under MIN_LAPSE."""
    longest = max((u.connect_timeout_s + u.read_timeout_s for u in config.upstreams),
                  default=0.0)
    return max(MIN_LAPSE, timedelta(seconds=longest + 60))


class IdempotencyService:
    """Claims keys, keeps answers, replays them; `purge` deletes the expired (a job)."""

    def __init__(self, engine: Engine, *, lapse: timedelta = MIN_LAPSE,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.lapse = lapse
        self.clock = clock
        self._insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert

    def begin(self, scope: str, key: str, fingerprint: str, request_id: str) -> Claim | Kept:
        """Hold the key for this request (Claim), or the kept answer to replay (Kept); raises
        when the key is held, used for another request, or its answer was not kept."""
        for _attempt in range(3):
            now = self.clock()
            if self._claim(scope, key, fingerprint, request_id, now):
                return Claim(scope, key, request_id)
            found = self._find(scope, key)
            if found is None:
                continue  # expired and purged just now: claim it again
            if found.expires_at <= now:
                if self._take_over(found, fingerprint, request_id, now):
                    return Claim(scope, key, request_id)
                continue
            if found.fingerprint != fingerprint:
                raise IdempotencyKeyReusedError(
                    f"Idempotency-Key {key!r} was used for another request (another method, "
                    "path, query or body) in the last 24 hours; send a new key.")
            if found.state == IN_PROGRESS:
                if found.lapses_at <= now and self._take_over(found, fingerprint, request_id,
                                                              now):
                    return Claim(scope, key, request_id)  # its request died: this one runs
                raise self._in_use(key)
            if found.body is None:
                raise AnswerNotKeptError(
                    f"The request with Idempotency-Key {key!r} was answered with status "
                    f"{found.status}, and that answer (a stream, a secret shown once, or a "
                    f"body over {MAX_KEPT_BYTES} bytes) is not kept to be sent again; send a "
                    "new key to make another request.")
            headers: dict[str, str] = orjson.loads(found.headers or "{}")
            return Kept(status=found.status or 200, headers=headers, body=bytes(found.body),
                        request_id=found.request_id)
        raise self._in_use(key)

    def finish(self, claim: Claim, *, status: int, headers: dict[str, str],
               body: bytes | None) -> None:
        """The request ended with a success: its answer is kept (body None: not kept, a retry
        is told so)."""
        if body is not None and len(body) > MAX_KEPT_BYTES:
            body = None
        kept = {k: v for k, v in headers.items() if k in KEPT_HEADERS}
        with self.engine.begin() as conn:
            conn.execute(update(_TABLE).where(*self._held_by(claim)).values(
                state=DONE, status=status, headers=orjson.dumps(kept).decode(), body=body))

    def release(self, claim: Claim) -> None:
        """The request failed: let the key go, so that a retry runs again."""
        with self.engine.begin() as conn:
            conn.execute(delete(_TABLE).where(*self._held_by(claim)))

    def purge(self, *, batch: int = 5000) -> int:
        """Delete the expired records (the `idempotency` job); returns how many."""
        total = 0
        while True:
            now = self.clock()
            with self.engine.begin() as conn:
                ids = select(_TABLE.c.id).where(
                    _TABLE.c.expires_at <= now).limit(batch).scalar_subquery()
                # expired still when deleted: a record a retry has just taken over is kept
                gone = conn.execute(delete(_TABLE).where(
                    _TABLE.c.id.in_(ids), _TABLE.c.expires_at <= now)).rowcount
            total += gone
            if gone < batch:
                return total

    # -- the store --------------------------------------------------------------------------

    def _claim(self, scope: str, key: str, fingerprint: str, request_id: str,
               now: datetime) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(self._insert(_TABLE).values(
                scope=scope, key=key, fingerprint=fingerprint, request_id=request_id,
                state=IN_PROGRESS, created_at=now, lapses_at=now + self.lapse,
                expires_at=now + KEEP).on_conflict_do_nothing(
                index_elements=["scope", "key"]).returning(_TABLE.c.id)).first() is not None

    def _find(self, scope: str, key: str) -> Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(select(_TABLE).where(_TABLE.c.scope == scope,
                                                     _TABLE.c.key == key)).first()

    def _take_over(self, found: Row[Any], fingerprint: str, request_id: str,
                   now: datetime) -> bool:
        """Hold a key whose record expired (or whose request died), unless another request
        took it over first (the record is matched on the request that held it)."""
        with self.engine.begin() as conn:
            return conn.execute(update(_TABLE).where(
                _TABLE.c.id == found.id, _TABLE.c.request_id == found.request_id,
                _TABLE.c.state == found.state).values(
                fingerprint=fingerprint, request_id=request_id, state=IN_PROGRESS,
                status=None, headers=None, body=None, created_at=now,
                lapses_at=now + self.lapse, expires_at=now + KEEP)).rowcount == 1

    @staticmethod
    def _held_by(claim: Claim) -> tuple[ColumnElement[bool], ...]:
        return (_TABLE.c.scope == claim.scope, _TABLE.c.key == claim.key,
                _TABLE.c.request_id == claim.request_id, _TABLE.c.state == IN_PROGRESS)

    @staticmethod
    def _in_use(key: str) -> IdempotencyKeyInUseError:
        return IdempotencyKeyInUseError(
            f"A request with Idempotency-Key {key!r} is still running; retry after it ends.",
            headers={"Retry-After": "1"})
