"""The audit trail: one append-only row per change made with an admin or app key (or the CLI).

A service that changes something an operator or an app answers for (a price, a plan
assignment, a credit grant, a key, a webhook, an offer, a subscription, a quarantined record)
takes an `Actor` from its edge and calls `record(conn, actor, ...)` inside the transaction of
the change, so a change never lands without its row. An actor of None is the system acting on
its own (a Stripe event, a scheduled job): no row. The database refuses UPDATE and DELETE of
audit rows (triggers, migration 0021).
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine

from core.auth import KEY_PREFIX, Principal
from core.db import utcnow
from core.errors import InvalidRequestError
from core.models import AuditEvent, EndUser

CLI_ROLE = "cli"
MAX_JSON = 16_384  # characters of a before/after document; past it, the row says it was cut


@dataclass(frozen=True)
class Actor:
    """Who makes a change: a key (its public id, role and app; never its secret), or the
    `meterlane` CLI run by an OS user (operator power: it has the database)."""

    role: str
    key_id: str | None = None
    key_pk: int | None = None
    app_id: int | None = None
    app_name: str | None = None
    name: str | None = None
    request_id: str | None = None

    @classmethod
    def of_key(cls, principal: Principal, request_id: str | None = None) -> Actor:
        return cls(role=principal.role.value, key_id=principal.key_id or None,
                   key_pk=principal.key_pk, app_id=principal.app_id,
                   app_name=principal.app_name, request_id=request_id)

    @classmethod
    def cli(cls) -> Actor:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (a container)
            user = "unknown"
        return cls(role=CLI_ROLE, name=user[:100])

    @property
    def is_operator(self) -> bool:
        """Bound to no app: an operator-wide key, or the CLI."""
        return self.app_id is None


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return sorted(value, key=str)
    raise TypeError(f"not JSON: {type(value).__name__}")


def to_json(doc: dict[str, Any] | None) -> str | None:
    if doc is None:
        return None
    text = orjson.dumps(doc, default=_default,
                        option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()
    if len(text) > MAX_JSON:
        return orjson.dumps({"truncated": True, "fields": sorted(map(str, doc))}).decode()
    return text


def record(conn: Connection, actor: Actor | None, action: str, *, target_type: str,
           target_id: str | int, app_id: int | None, before: dict[str, Any] | None = None,
           after: dict[str, Any] | None = None) -> None:
    """Append one audit row in the caller's transaction (nothing when actor is None: the
    system acting on its own). before/after hold the changed fields, never a secret."""
    if actor is None:
        return
    conn.execute(insert(AuditEvent).values(
        at=utcnow(), actor_key_id=actor.key_id, actor_role=actor.role,
        actor_name=actor.name, app_id=app_id, action=action, target_type=target_type,
        target_id=str(target_id)[:300], before=to_json(before), after=to_json(after),
        request_id=actor.request_id))


def user_ref(conn: Connection, actor: Actor | None, end_user_id: int) -> str:
    """The app's own id of an end user, as an audit row names them (no read without an
    actor: nothing will be recorded)."""
    if actor is None:
        return ""
    found = conn.execute(select(EndUser.external_id).where(EndUser.id == end_user_id)
                         ).scalar_one_or_none()
    return found if found is not None else str(end_user_id)


@dataclass(frozen=True)
class AuditQuery:
    app_id: int | None = None  # None: every app and the operator's own changes
    action: str | None = None  # exact, or a family without a dot ("price": price.*)
    actor_key: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 20
    starting_after: int | None = None


class AuditService:
    """Reads the trail, newest first, a page at a time (Stripe's cursor: starting_after)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def events(self, query: AuditQuery) -> tuple[list[dict[str, Any]], bool]:
        """(rows, has_more)."""
        from core.models import App

        stmt = (select(*AuditEvent.__table__.c, App.name.label("app_name"))
                .outerjoin(App, App.id == AuditEvent.app_id)
                .where(*self._filters(query))
                .order_by(AuditEvent.id.desc()).limit(query.limit + 1))
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return [_view(r) for r in rows[:query.limit]], len(rows) > query.limit

    @staticmethod
    def _filters(query: AuditQuery) -> list[Any]:
        where: list[Any] = []
        if query.app_id is not None:
            where.append(AuditEvent.app_id == query.app_id)
        if query.action:
            where.append(AuditEvent.action == query.action if "." in query.action
                         else AuditEvent.action.startswith(f"{query.action}.",
                                                            autoescape=True))
        if query.actor_key:
            key_id = query.actor_key.removeprefix(f"{KEY_PREFIX}_").split("_")[0]
            where.append(AuditEvent.actor_key_id == key_id)
        if query.target_type:
            where.append(AuditEvent.target_type == query.target_type)
        if query.target_id:
            where.append(AuditEvent.target_id == query.target_id)
        if query.since is not None:
            where.append(AuditEvent.at >= query.since)
        if query.until is not None:
            where.append(AuditEvent.at < query.until)
        if query.since is not None and query.until is not None and query.until <= query.since:
            raise InvalidRequestError("until must be after since.", param="until")
        if query.starting_after is not None:
            where.append(AuditEvent.id < query.starting_after)
        return where


def _view(event: Any) -> dict[str, Any]:
    return {
        "id": event.id, "at": event.at, "action": event.action, "app": event.app_name,
        "actor": {"role": event.actor_role, "key_id": event.actor_key_id,
                  "key": f"{KEY_PREFIX}_{event.actor_key_id}" if event.actor_key_id else None,
                  "name": event.actor_name},
        "target": {"type": event.target_type, "id": event.target_id},
        "before": orjson.loads(event.before) if event.before else None,
        "after": orjson.loads(event.after) if event.after else None,
        "request_id": event.request_id,
    }
