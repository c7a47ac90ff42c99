"""Apps (tenants) and their end users; an end user is created the first time it is named."""

from __future__ import annotations

import math

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from core.cache import ReadCache
from core.db import utcnow
from core.errors import NotFoundError
from core.models import App, EndUser

UNSEEN = 0  # no end user row has this id: reads for a user the app has not named yet


class TenancyService:
    """Finds or creates apps and end users; end-user ids are cached (they never change), and
    a user's first calls arriving together look them up once (ReadCache), not once each."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._users: ReadCache[tuple[int, str], int] = ReadCache("end users", math.inf)

    def get_app(self, name: str) -> int:
        with self.engine.connect() as conn:
            app_id = conn.execute(select(App.id).where(App.name == name)).scalar_one_or_none()
        if app_id is None:
            raise NotFoundError(f"No app named {name!r}.")
        return app_id

    def app_names(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(App.name).order_by(App.name)).scalars())

    def ensure_app(self, name: str) -> tuple[int, bool]:
        """(app id, created?)"""
        with self.engine.begin() as conn:
            created = _insert_ignore(conn, App, {"name": name, "created_at": utcnow()},
                                     ["name"])
            app_id = conn.execute(select(App.id).where(App.name == name)).scalar_one()
        return app_id, created

    def ensure_end_user(self, app_id: int, external_id: str) -> int:
        return self._users.get((app_id, external_id),
                               lambda: self._ensure_end_user(app_id, external_id))

    def _ensure_end_user(self, app_id: int, external_id: str) -> int:
        stmt = select(EndUser.id).where(EndUser.app_id == app_id,
                                        EndUser.external_id == external_id)
        with self.engine.begin() as conn:
            user_id = conn.execute(stmt).scalar_one_or_none()
            if user_id is None:
                _insert_ignore(conn, EndUser, {"app_id": app_id, "external_id": external_id,
                                               "created_at": utcnow()},
                               ["app_id", "external_id"])
                user_id = conn.execute(stmt).scalar_one()
        return int(user_id)

    def known_end_user(self, app_id: int, external_id: str) -> int | None:
        """The end user's id if this process has seen them (no database read)."""
        return self._users.peek((app_id, external_id))

    def ensure_end_users(self, app_id: int, external_ids: list[str]) -> dict[str, int]:
        """Many end users at once (a batch of reported usage): one read, one insert of the
        new ones, one read of those."""
        out = {e: u for e in external_ids if (u := self._users.peek((app_id, e))) is not None}
        wanted = [e for e in dict.fromkeys(external_ids) if e not in out]
        if wanted:
            def read(conn: Connection, names: list[str]) -> dict[str, int]:
                return {r[0]: r[1] for r in conn.execute(select(
                    EndUser.external_id, EndUser.id).where(EndUser.app_id == app_id,
                                                           EndUser.external_id.in_(names)))}
            with self.engine.begin() as conn:
                found = read(conn, wanted)
                new = [e for e in wanted if e not in found]
                if new:
                    _insert_ignore(conn, EndUser, [{"app_id": app_id, "external_id": e,
                                                    "created_at": utcnow()} for e in new],
                                   ["app_id", "external_id"])
                if new:
                    found.update(read(conn, new))
            for e, u in found.items():
                self._users.put((app_id, e), u, self._users.clock())
            out.update(found)
        return out

    def seen_end_user(self, app_id: int, external_id: str) -> int:
        """The end user's id, or UNSEEN for one the app has never named: reads never create
        users (a GET that did would let anyone fill the table). What is read for UNSEEN is
        what a new user starts with."""
        found = self.find_end_user(app_id, external_id)
        return UNSEEN if found is None else found

    def find_end_user(self, app_id: int, external_id: str) -> int | None:
        cached = self._users.peek((app_id, external_id))
        if cached is not None:
            return cached
        with self.engine.connect() as conn:
            return conn.execute(select(EndUser.id).where(
                EndUser.app_id == app_id, EndUser.external_id == external_id)
            ).scalar_one_or_none()


def _insert_ignore(conn: Connection, model: type[App] | type[EndUser],
                   values: dict[str, object] | list[dict[str, object]],
                   conflict: list[str]) -> bool:
    """INSERT .. ON CONFLICT DO NOTHING (one row, or many in one statement) on either
    backend; True when a row was inserted."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        pg = postgresql.insert(model).values(values).on_conflict_do_nothing(
            index_elements=conflict)
        return bool(conn.execute(pg).rowcount)
    if dialect == "sqlite":
        lite = sqlite.insert(model).values(values).on_conflict_do_nothing(
            index_elements=conflict)
        return bool(conn.execute(lite).rowcount)
    raise RuntimeError(f"unsupported database {dialect}")
