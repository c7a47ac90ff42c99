"""Key use cases: create, list, revoke and rotate keys (the CLI and /v1/keys), and the
short-lived end-user keys an app mints. Every change is audited in its own transaction.

Who may manage keys: an operator-wide admin key (and the CLI), any key of any app; an admin
key bound to an app, only its app's keys, and never a key bound to no app. App keys cannot
manage keys (they mint end-user keys only): a leaked app key must not be able to mint itself
a successor that outlives its revocation. So no key ever makes a key with more power than its
own.

A key rotates once: its successor is a key of its own (revoking the old key leaves it alone),
and a second rotation is refused, so a retried rotation never leaves two live successors.
Rotate and revoke lock the key's row, so a revocation and a rotation at the same moment
never give a revoked key a successor made after its revocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import aliased

from core.audit import CLI_ROLE, Actor, record
from core.auth import KEY_PREFIX, AuthService, IssuedKey, Role, issue_in, validate_user_id
from core.db import utcnow, write_transaction
from core.errors import ConflictError, InvalidRequestError, NotFoundError, PermissionDeniedError
from core.models import ApiKey, App, EndUser
from core.tenancy import TenancyService

MAX_OVERLAP_SECONDS = 7 * 24 * 3600
USER_KEY_TTL_SECONDS = 3600          # an end-user key's lifetime when none is asked
USER_KEY_MAX_TTL_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class KeyFilter:
    app: str | None = None
    role: Role | None = None
    include_revoked: bool = False
    limit: int = 20
    starting_after: str | None = None


def key_id_of(key_or_id: str) -> str:
    """The public hex id of a key given whole (mlk_<id>_<secret>), as its prefix, or bare."""
    if key_or_id.startswith(f"{KEY_PREFIX}_"):
        return key_or_id.split("_")[1]
    return key_or_id


class KeyService:
    def __init__(self, auth: AuthService, tenancy: TenancyService, *,
                 user_key_ttl_seconds: int = USER_KEY_TTL_SECONDS,
                 user_key_max_ttl_seconds: int = USER_KEY_MAX_TTL_SECONDS) -> None:
        self.auth = auth
        self.tenancy = tenancy
        self.engine = auth.engine
        self.user_key_ttl = timedelta(seconds=user_key_ttl_seconds)
        self.user_key_max_ttl = timedelta(seconds=user_key_max_ttl_seconds)

    def user_ttl(self, ttl: timedelta | None) -> timedelta:
        """An end-user key's lifetime, however it is made (minted by an app, created by an
        admin or the CLI, rotated): the default when none is asked; past the cap, refused."""
        if ttl is None:
            return self.user_key_ttl
        if ttl > self.user_key_max_ttl:
            raise InvalidRequestError(
                "ttl_seconds may be at most "
                f"{int(self.user_key_max_ttl.total_seconds())} for an end-user key.",
                param="ttl_seconds")
        return ttl

    # -- create ----------------------------------------------------------------------------

    def create_key(self, role: Role, app: str | None, *, user: str | None = None,
                   name: str | None = None, ttl: timedelta | None = None,
                   description: str | None = None, actor: Actor | None = None) -> IssuedKey:
        """A new key. app keys need an app (created if new); user keys need an app and user;
        admin and finance keys without an app are operator-wide. A key bound to an app
        creates keys of its own app only (no app named: its own)."""
        if actor is not None:
            _require_manager(actor)
            if not actor.is_operator:
                if app is not None and app != actor.app_name:
                    raise PermissionDeniedError(
                        f"This key acts only in app {actor.app_name!r}; it cannot make keys "
                        "for another app.", param="app")
                app = actor.app_name
        if role in (Role.APP, Role.USER) and not app:
            raise InvalidRequestError(f"a {role.value} key needs an app (--app NAME)",
                                      param="app")
        if role == Role.USER and not user:
            raise InvalidRequestError("a user key needs an end user (--user ID)", param="user")
        if role != Role.USER and user:
            raise InvalidRequestError("only user keys name an end user", param="user")
        if role == Role.USER:
            ttl = self.user_ttl(ttl)
        app_id = self.tenancy.ensure_app(app)[0] if app else None
        end_user_id = None
        if user is not None and app_id is not None:
            end_user_id = self.tenancy.ensure_end_user(app_id, validate_user_id(user))
        expires_at = utcnow() + ttl if ttl is not None else None
        with self.engine.begin() as conn:
            key, pk = issue_in(conn, role=role, app_id=app_id, end_user_id=end_user_id,
                               name=name, description=description, expires_at=expires_at)
            record(conn, actor, "key.create", target_type="key", target_id=key_id_of(key),
                   app_id=app_id, after={"role": role.value, "app": app, "user": user,
                                         "name": name, "description": description,
                                         "expires_at": expires_at})
        return IssuedKey(key=key, key_pk=pk, role=role, app_name=app, end_user=user,
                         expires_at=expires_at)

    def issue_user_key(self, app_id: int, user: str, ttl: timedelta | None,
                       name: str | None = None, actor: Actor | None = None) -> IssuedKey:
        expires_at = utcnow() + self.user_ttl(ttl)
        end_user_id = self.tenancy.ensure_end_user(app_id, validate_user_id(user))
        with self.engine.begin() as conn:
            key, pk = issue_in(conn, role=Role.USER, app_id=app_id, end_user_id=end_user_id,
                               name=name, expires_at=expires_at)
            record(conn, actor, "key.create", target_type="key", target_id=key_id_of(key),
                   app_id=app_id, after={"role": Role.USER.value, "user": user, "name": name,
                                         "expires_at": expires_at})
        return IssuedKey(key=key, key_pk=pk, role=Role.USER, app_name=None, end_user=user,
                         expires_at=expires_at)

    # -- read ------------------------------------------------------------------------------

    def list_keys(self, actor: Actor, wanted: KeyFilter) -> tuple[list[dict[str, Any]], bool]:
        """The keys the actor may see, newest first: (a page, has_more). Never a secret."""
        _require_manager(actor)
        stmt = _key_rows().order_by(ApiKey.id.desc()).limit(wanted.limit + 1)
        if not actor.is_operator:
            if wanted.app is not None and wanted.app != actor.app_name:
                raise PermissionDeniedError(
                    f"This key acts only in app {actor.app_name!r}; it cannot name another.",
                    param="app")
            stmt = stmt.where(ApiKey.app_id == actor.app_id)
        elif wanted.app is not None:
            stmt = stmt.where(ApiKey.app_id == self.tenancy.get_app(wanted.app))
        if wanted.role is not None:
            stmt = stmt.where(ApiKey.role == wanted.role.value)
        if not wanted.include_revoked:
            stmt = stmt.where(ApiKey.revoked_at.is_(None))
        with self.engine.connect() as conn:
            if wanted.starting_after is not None:
                after = self._row(conn, actor, key_id_of(wanted.starting_after),
                                  param="starting_after")
                stmt = stmt.where(ApiKey.id < after["pk"])
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        return [_view(r) for r in rows[:wanted.limit]], len(rows) > wanted.limit

    def get_key(self, actor: Actor, key_id: str) -> dict[str, Any]:
        _require_manager(actor)
        with self.engine.connect() as conn:
            return _view(self._row(conn, actor, key_id_of(key_id)))

    def _row(self, conn: Connection, actor: Actor, key_id: str, *,
             param: str = "key_id", lock: bool = False) -> dict[str, Any]:
        """The key in the actor's scope; a key of another app is as unknown as a missing one
        (404: never reveal that another tenant's key exists). lock: its row is held until
        the transaction ends (FOR UPDATE on Postgres; on SQLite, `write_transaction` holds
        the whole database)."""
        stmt = _key_rows().where(ApiKey.key_id == key_id)
        if not actor.is_operator:
            stmt = stmt.where(ApiKey.app_id == actor.app_id)
        if lock:
            stmt = stmt.with_for_update(of=ApiKey)
        row = conn.execute(stmt).one_or_none()
        if row is None:
            raise NotFoundError(f"No key {KEY_PREFIX}_{key_id[:32]} here.", param=param)
        return dict(row._mapping)

    # -- change ----------------------------------------------------------------------------

    def revoke(self, actor: Actor, key_id: str) -> dict[str, Any]:
        """Revoke a key at once (idempotent: a revoked key is returned as it is). This worker
        refuses it from now on, the others within key_cache_seconds."""
        _require_manager(actor)
        with write_transaction(self.engine) as conn:
            row = self._row(conn, actor, key_id_of(key_id), lock=True)
            if row["revoked_at"] is None:
                row["revoked_at"] = now = utcnow()
                conn.execute(update(ApiKey).where(ApiKey.id == row["pk"])
                             .values(revoked_at=now))
                record(conn, actor, "key.revoke", target_type="key", target_id=row["key_id"],
                       app_id=row["app_id"], before={"revoked_at": None},
                       after={"revoked_at": now})
        self.auth.forget_cached()
        return _view(row)

    def rotate(self, actor: Actor, key_id: str, *, overlap_seconds: int,
               ttl: timedelta | None = None) -> tuple[IssuedKey, dict[str, Any]]:
        """A successor of the key (same role, app, end user, name and description; its own
        lifetime `ttl`, else the old key's; an end-user key's within the end-user cap), shown
        once; the old key keeps working for `overlap_seconds` more (at most 7 days), then is
        refused. A key rotates once: a key that has a successor is refused (409). (the new
        key, the old key's view)"""
        _require_manager(actor)
        if not 0 <= overlap_seconds <= MAX_OVERLAP_SECONDS:
            raise InvalidRequestError(f"overlap_seconds must be 0..{MAX_OVERLAP_SECONDS}.",
                                      param="overlap_seconds")
        given = ttl is not None
        with write_transaction(self.engine) as conn:
            old = self._row(conn, actor, key_id_of(key_id), lock=True)
            now = utcnow()  # (held: after a revocation that came first, never before it)
            _check_rotatable(old, now)
            _check_no_successor(conn, old)
            # never rotated before (checked above, the right to write held): its expiry is
            # still its own, not an overlap's end, so its lifetime is what it was made with
            if ttl is None and old["expires_at"] is not None:
                ttl = old["expires_at"] - old["created_at"]
            if old["role"] == Role.USER.value:  # asked: refused past the cap; inherited:
                # cut to it (a key made before the cap held), none: the default
                ttl = self.user_ttl(ttl) if given or ttl is None else \
                    min(ttl, self.user_key_max_ttl)
            ends = now + timedelta(seconds=overlap_seconds)
            if old["expires_at"] is not None:
                ends = min(ends, old["expires_at"])
            new_expiry = now + ttl if ttl is not None else None
            key, pk = issue_in(conn, role=Role(old["role"]), app_id=old["app_id"],
                               end_user_id=old["end_user_id"], name=old["name"],
                               description=old["description"], expires_at=new_expiry,
                               rotated_from=old["pk"])
            conn.execute(update(ApiKey).where(ApiKey.id == old["pk"]).values(expires_at=ends))
            new_id = key_id_of(key)
            record(conn, actor, "key.rotate", target_type="key", target_id=old["key_id"],
                   app_id=old["app_id"], before={"expires_at": old["expires_at"]},
                   after={"expires_at": ends, "successor": f"{KEY_PREFIX}_{new_id}"})
            record(conn, actor, "key.create", target_type="key", target_id=new_id,
                   app_id=old["app_id"], after={
                       "role": old["role"], "app": old["app"], "user": old["user"],
                       "name": old["name"], "description": old["description"],
                       "expires_at": new_expiry,
                       "rotated_from": f"{KEY_PREFIX}_{old['key_id']}"})
        self.auth.forget_cached()
        old["expires_at"] = ends
        issued = IssuedKey(key=key, key_pk=pk, role=Role(old["role"]), app_name=old["app"],
                           end_user=old["user"], expires_at=new_expiry)
        return issued, _view(old)


def _require_manager(actor: Actor) -> None:
    if actor.role not in (Role.ADMIN.value, CLI_ROLE):
        raise PermissionDeniedError(
            f"A {actor.role} key cannot manage keys; it needs an admin key.")


def _check_rotatable(row: dict[str, Any], now: datetime) -> None:
    prefix = f"{KEY_PREFIX}_{row['key_id']}"
    if row["revoked_at"] is not None:
        raise ConflictError(f"Key {prefix} is revoked; create a new key instead.")
    if row["expires_at"] is not None and row["expires_at"] <= now:
        raise ConflictError(f"Key {prefix} has expired; create a new key instead.")


def _check_no_successor(conn: Connection, row: dict[str, Any]) -> None:
    """A key rotates once: a second rotation (a retry after a lost answer, say) would make a
    second live successor, its lifetime cut to the first one's overlap."""
    successor = conn.execute(select(ApiKey.key_id).where(ApiKey.rotated_from == row["pk"])
                             .order_by(ApiKey.id).limit(1)).scalar()
    if successor is not None:
        raise ConflictError(
            f"Key {KEY_PREFIX}_{row['key_id']} was rotated already: its successor is "
            f"{KEY_PREFIX}_{successor}. A key rotates once; rotate the successor, or revoke "
            "it and create a new key.", code="already_rotated",
            successor=f"{KEY_PREFIX}_{successor}")


def _key_rows() -> Any:
    parent = aliased(ApiKey)
    return (select(ApiKey.id.label("pk"), ApiKey.key_id, ApiKey.role, ApiKey.app_id,
                   App.name.label("app"), ApiKey.end_user_id, EndUser.external_id.label("user"),
                   ApiKey.name, ApiKey.description, ApiKey.created_at, ApiKey.last_used_at,
                   ApiKey.expires_at, ApiKey.revoked_at, parent.key_id.label("parent"))
            .select_from(ApiKey)
            .outerjoin(App, App.id == ApiKey.app_id)
            .outerjoin(EndUser, EndUser.id == ApiKey.end_user_id)
            .outerjoin(parent, parent.id == ApiKey.rotated_from))


def _view(row: dict[str, Any]) -> dict[str, Any]:
    """A key as the API and the CLI show it: its prefix, never its secret or hash."""
    now = utcnow()
    if row["revoked_at"] is not None:
        state = "revoked"
    elif row["expires_at"] is not None and row["expires_at"] <= now:
        state = "expired"
    else:
        state = "active"
    parent = row.get("parent")
    return {
        "id": row["key_id"], "prefix": f"{KEY_PREFIX}_{row['key_id']}", "role": row["role"],
        "app": row["app"], "user": row["user"], "name": row["name"],
        "description": row["description"], "created_at": row["created_at"],
        "last_used_at": row["last_used_at"], "expires_at": row["expires_at"],
        "revoked_at": row["revoked_at"], "state": state,
        "rotated_from": f"{KEY_PREFIX}_{parent}" if parent else None,
    }
