"""Running the Alembic migrations: `meterlane db upgrade`, and the check at start-up.

The check reads the head revision from the migration files (their `revision` and
`down_revision` lines) and the database's from its alembic_version table with plain SQL:
alembic itself, with mako, is about 10 MB of every gunicorn worker's memory, imported here
only to migrate (a test checks that both readings agree with alembic's).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

HERE = Path(__file__).parent
VERSION_TABLE = "alembic_version"  # alembic's default; env.py keeps it


class SchemaNotMigratedError(RuntimeError):
    """The database schema is behind the code; the message says what to run."""


def alembic_config(engine: Engine) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    cfg.attributes["engine"] = engine
    return cfg


def _revision_lines(path: Path) -> dict[str, Any]:
    """A migration file's module-level `revision` and `down_revision` (literals)."""
    found: dict[str, Any] = {}
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("revision", "down_revision"):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def head_revision() -> str:
    """The one revision of migrations/versions that no other revises (alembic's head)."""
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in sorted((HERE / "versions").glob("*.py")):
        lines = _revision_lines(path)
        if "revision" not in lines:  # __init__.py
            continue
        revisions.add(lines["revision"])
        down = lines.get("down_revision")
        revised.update((down,) if isinstance(down, str) else down or ())
    heads = sorted(revisions - revised)
    if len(heads) != 1:
        raise RuntimeError(f"the migrations in {HERE / 'versions'} have {len(heads)} heads "
                           f"({', '.join(heads)}); they must have one")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    """The revision alembic_version holds (None: never migrated)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return None
        heads = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(heads) > 1:
        raise RuntimeError(f"Version table '{VERSION_TABLE}' has more than one head present")
    return heads[0] if heads else None


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

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
