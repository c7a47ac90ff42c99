"""API keys and roles: keys are shown once, stored as a SHA-256 of their secret, cached briefly."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from core.background import background_runner
from core.cache import ReadCache
from core.db import utcnow
from core.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError
from core.models import ApiKey, App, EndUser

KEY_PREFIX = "mlk"
_KEY_RE = re.compile(r"^mlk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
MAX_USER_ID_LEN = 256
# A key's last use is written at most this often per key and worker (never once per call)
LAST_USED_EVERY_SECONDS = 60.0
log = logging.getLogger(__name__)


class Role(StrEnum):
    ADMIN = "admin"
    APP = "app"
    USER = "user"
    FINANCE = "finance"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's role, its app (None for operator-wide keys), its end user."""

    key_pk: int
    role: Role
    app_id: int | None
    app_name: str | None
    end_user_id: int | None = None
    end_user: str | None = None
    expires_at: datetime | None = None
    key_id: str = ""  # the public hex id (mlk_<key_id>_...), never the secret


@dataclass(frozen=True)
class IssuedKey:
    key: str
    key_pk: int
    role: Role
    app_name: str | None
    end_user: str | None
    expires_at: datetime | None


def hash_secret(secret: str) -> str:
    # Keys carry 256 random bits, so a fast hash is safe; a slow KDF would tax every call.
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key_material() -> tuple[str, str, str]:
    """(full key, key id, secret) for a new key."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}_{key_id}_{secret}", key_id, secret


def validate_user_id(user: object, where: str = "user") -> str:
    """The app's own end-user id: a non-empty printable string of at most 256 characters."""
    if not isinstance(user, str) or not user.strip():
        raise InvalidRequestError(f"{where} must be a non-empty string naming the end user",
                                  param=where)
    if len(user) > MAX_USER_ID_LEN or not user.isprintable():
        raise InvalidRequestError(
            f"{where} must be at most {MAX_USER_ID_LEN} printable characters", param=where)
    return user


class KeyStore:
    """Key rows; reads and writes through the engine (short transactions, no ORM identity map)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def find_active(self, key_id: str) -> tuple[str, Principal] | None:
        stmt = (
            select(ApiKey.id, ApiKey.key_id, ApiKey.secret_sha256, ApiKey.role,
                   ApiKey.app_id, App.name, ApiKey.end_user_id, EndUser.external_id,
                   ApiKey.expires_at, ApiKey.revoked_at)
            .select_from(ApiKey)
            .outerjoin(App, App.id == ApiKey.app_id)
            .outerjoin(EndUser, EndUser.id == ApiKey.end_user_id)
            .where(ApiKey.key_id == key_id)
        )
        with self.engine.connect() as conn:
            row = conn.execute(stmt).one_or_none()
        if row is None or row.revoked_at is not None:
            return None
        return row.secret_sha256, Principal(
            key_pk=row.id, role=Role(row.role), app_id=row.app_id, app_name=row.name,
            end_user_id=row.end_user_id, end_user=row.external_id,
            expires_at=row.expires_at, key_id=row.key_id,
        )


class AuthService:
    """Turns a bearer key into a Principal; a verified key is cached for a few seconds.

    A revoked or rotated key is refused at once by the worker that changed it (its cache is
    cleared) and by every other worker at most `cache_seconds` later (README's promise for
    MLANE_KEY_CACHE_SECONDS: a cached key is never used longer than that after its read
    began; an expiry already known is checked on every call, cached or not). A key is
    read by one call at a time per worker (ReadCache): a burst of calls on a key whose
    entry lapsed waits for that one read instead of each taking a pooled connection, and
    under steady use the entry is re-read beside the calls before it lapses."""

    def __init__(self, engine: Engine, *, cache_seconds: float = 2.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = KeyStore(engine)
        self.engine = engine
        self.cache_seconds = cache_seconds
        self.monotonic = monotonic
        self._cache: ReadCache[str, Principal | None] = ReadCache(
            "keys", cache_seconds, max_entries=10_000, clock=monotonic)
        self._lock = threading.Lock()
        self._used: dict[int, float] = {}  # key pk -> when this worker last noted its use
        self._pending: dict[int, datetime] = {}  # uses noted, not written yet
        self._flushing = False
        self._run = background_runner()

    def authenticate(self, raw_key: str | None) -> Principal:
        if not raw_key:
            raise AuthenticationError(
                "Missing API key: send it as 'Authorization: Bearer <key>'.")
        now = self.monotonic()
        match = _KEY_RE.match(raw_key)
        if match is None:
            raise AuthenticationError("Invalid API key.")
        principal = self._cache.get(raw_key, lambda: self._verify(match))
        if principal is None:
            raise AuthenticationError("Invalid or revoked API key.")
        return self._note_use(self._check_expiry(principal), now)

    def _verify(self, match: re.Match[str]) -> Principal | None:
        """The key's principal if it exists, is not revoked and its secret matches (its
        expiry is checked on each use: an expired key stays cached, refused)."""
        found = self.store.find_active(match.group(1))
        if found is None or not hmac.compare_digest(found[0], hash_secret(match.group(2))):
            return None
        return found[1]

    def _note_use(self, principal: Principal, now: float) -> Principal:
        """Record the key's last use: at most once a LAST_USED_EVERY_SECONDS per key in this
        worker, written beside the request (a greenlet under gunicorn), never in its way; the
        keys due meanwhile are written together. The column is therefore exact to about a
        minute."""
        last = self._used.get(principal.key_pk)
        if last is not None and now - last < LAST_USED_EVERY_SECONDS:
            return principal
        with self._lock:
            if len(self._used) > 100_000:
                self._used.clear()
            self._used[principal.key_pk] = now
            self._pending[principal.key_pk] = utcnow()
            if self._flushing:
                return principal
            self._flushing = True
        self._run(self._write_uses)
        return principal

    def _write_uses(self) -> None:
        with self._lock:
            due, self._pending, self._flushing = self._pending, {}, False
        if not due:
            return
        try:
            with self.engine.begin() as conn:
                for key_pk, at in sorted(due.items()):  # one order: no deadlock between workers
                    conn.execute(update(ApiKey).where(
                        ApiKey.id == key_pk,
                        or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < at),
                    ).values(last_used_at=at))
        except SQLAlchemyError as exc:  # a key's last use is a hint: never fail a call for it
            log.warning("could not record the last use of %d keys: %s", len(due), exc)
            with self._lock:
                for key_pk in due:
                    self._used.pop(key_pk, None)

    def forget_cached(self) -> None:
        """Drop this worker's verified keys (after a revocation or rotation)."""
        self._cache.forget()

    @staticmethod
    def _check_expiry(principal: Principal) -> Principal:
        if principal.expires_at is not None and principal.expires_at <= utcnow():
            raise AuthenticationError("This API key has expired.")
        return principal


def issue_in(conn: Connection, *, role: Role, app_id: int | None, end_user_id: int | None,
             name: str | None = None, description: str | None = None,
             expires_at: datetime | None = None, rotated_from: int | None = None
             ) -> tuple[str, int]:
    """Store a new key (only its hash) in the caller's transaction: (the key, its row id)."""
    key, key_id, secret = new_key_material()
    pk = conn.execute(
        insert(ApiKey).values(
            key_id=key_id, secret_sha256=hash_secret(secret), role=role.value,
            app_id=app_id, end_user_id=end_user_id, name=name, description=description,
            created_at=utcnow(), expires_at=expires_at, rotated_from=rotated_from,
        ).returning(ApiKey.id)
    ).scalar_one()
    return key, int(pk)


def require_role(principal: Principal, *roles: Role) -> None:
    if principal.role not in roles:
        allowed = ", ".join(r.value for r in roles)
        raise PermissionDeniedError(
            f"A {principal.role.value} key cannot do this; it needs a key with role: {allowed}.")


def require_operator(principal: Principal) -> None:
    """Global settings (the price catalog, price changes) apply to every tenant: only an
    operator-wide admin key (bound to no app) may change them."""
    require_role(principal, Role.ADMIN)
    if principal.app_id is not None:
        raise PermissionDeniedError(
            f"This admin key is bound to app {principal.app_name!r}; only an operator-wide "
            "admin key (no app) changes what every app shares.")
