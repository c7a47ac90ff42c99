"""Running the Alembic migrations: `meterlane db upgrade`, and the check at start-up."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

HERE = Path(__file__).parent


class SchemaNotMigratedError(RuntimeError):
    """The database schema is behind the code; the message says what to run."""


def alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    script = ScriptDirectory(str(HERE))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def ensure_schema_current(engine: Engine, *, auto_migrate: bool = False) -> None:
    """Refuse to run on a schema that is not at head (or migrate it, on the embedded default)."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if auto_migrate:
        upgrade(engine)
        return
    where = engine.url.render_as_string(hide_password=True)
    state = "empty (never migrated)" if current is None else f"at revision {current}"
    raise SchemaNotMigratedError(
        f"The database {where} is {state}; this version of Meterlane needs revision {head}. "
        "Run `meterlane db upgrade` (with the same MLANE_DATABASE_URL), then start again.")
