"""Alembic environment: target metadata is every Meterlane model; one transaction per migration."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from core import models as _core_models  # noqa: F401 - register tables
from core.db import Base
from finance import models as _finance_models  # noqa: F401
from metering import models as _metering_models  # noqa: F401
from paywall import models as _paywall_models  # noqa: F401
from plans import models as _plans_models  # noqa: F401

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        from core.db import make_engine

        engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as connection:
        is_pg = connection.dialect.name == "postgresql"
        if is_pg:
            connection.execute(text("SET lock_timeout = '10s'"))
            # One migrator at a time when several instances start together.
            connection.execute(text("SELECT pg_advisory_lock(727274)"))
        context.configure(connection=connection, target_metadata=target_metadata,
                          compare_type=True, compare_server_default=True,
                          transaction_per_migration=True, render_as_batch=not is_pg)
        with context.begin_transaction():
            context.run_migrations()
        if is_pg:
            connection.execute(text("SELECT pg_advisory_unlock(727274)"))
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `meterlane db upgrade`")
run_migrations_online()
