"""The migrations build exactly the schema the models describe (alembic's autogenerate
comparison finds nothing to add, drop or alter) on Postgres and on SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Engine

from meterlane.core.db import Base, make_engine

pytestmark = pytest.mark.integration


def differences(engine: Engine) -> list[object]:
    import meterlane.app  # noqa: F401 - every model registered on Base.metadata

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return [d for d in compare_metadata(context, Base.metadata)
                if not (isinstance(d, tuple) and d[0] == "remove_table"
                        and d[1].name == "alembic_version")]


def test_postgres_schema_matches_the_models(clean_db: Engine) -> None:
    assert differences(clean_db) == []


def test_sqlite_schema_matches_the_models(tmp_path: Path) -> None:
    from meterlane.migrations import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade(engine)
    try:
        assert differences(engine) == []
    finally:
        engine.dispose()
