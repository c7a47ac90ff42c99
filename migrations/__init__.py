"""Alembic migrations: env.py and versions/; migrations.schema runs them (`meterlane db upgrade`,
and the start-up check)."""
