"""`meterlane db`: the schema's migrations."""

from __future__ import annotations

import click

from core.cli import context


@click.group()
def db() -> None:
    """Database schema migrations."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Migrate the database to the latest schema."""
    from migrations.schema import current_revision, upgrade

    engine = context().engine()
    before = current_revision(engine)
    upgrade(engine, revision)
    after = current_revision(engine)
    click.echo(f"database at revision {after}" + ("" if before == after else
                                                   f" (was {before or 'empty'})"))


@db.command("ensure", hidden=True)
def db_ensure() -> None:
    """Fail unless the schema is current (migrating it first where auto-migrate is on)."""
    from migrations.schema import SchemaNotMigratedError, ensure_schema_current
    from plans.catalog import Catalog
    from plans.versions import PlanChangedError, ensure_unchanged

    ctx = context()
    config = ctx.config()
    try:
        engine = ctx.engine()
        ensure_schema_current(engine, auto_migrate=config.should_auto_migrate)
        # serve runs this first: a changed published plan stops it before any worker starts
        ensure_unchanged(engine, Catalog.from_config(config))
    except (SchemaNotMigratedError, PlanChangedError) as exc:
        raise click.ClickException(str(exc)) from exc


@db.command("current")
def db_current() -> None:
    """Print the schema revision of the database and the one this code needs."""
    from migrations.schema import current_revision, head_revision

    engine = context().engine()
    click.echo(f"database: {current_revision(engine) or 'empty'}; code: {head_revision()}")
