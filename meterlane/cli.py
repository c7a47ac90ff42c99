"""The `meterlane` command: serve, db, keys, ledger."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from meterlane.core.config import Config, ConfigError


def _config() -> Config:
    from meterlane.plans.catalog import Catalog

    try:
        config = Config.from_env()
        Catalog.from_config(config)  # a malformed plan stops every command, naming its line
        return config
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from exc


def _engine(config: Config) -> Any:
    from meterlane.core.db import make_engine

    if config.embedded:
        Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    return make_engine(config.database_url)


@click.group()
def main() -> None:
    """Meterlane: token metering, limits and billing in front of every model call."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int)
@click.option("--timeout", default=900, show_default=True, type=int,
              help="Seconds a worker may go silent before it is restarted.")
def serve(host: str, port: int, workers: int, timeout: int) -> None:
    """Run the service under gunicorn (gevent workers: many streams open at once)."""
    config = _config()
    # Check (or, on SQLite, apply) migrations in a child process: the gunicorn master must not
    # import the database driver, or psycopg picks its blocking wait before gevent patches.
    check = subprocess.run([sys.executable, "-m", "meterlane.cli", "db", "ensure"],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise click.ClickException(check.stderr.strip().removeprefix("Error: "))
    # Each worker writes its metrics here; /metrics merges them. Must be set before any
    # worker imports prometheus_client.
    metrics_dir = tempfile.mkdtemp(prefix="meterlane-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from meterlane.server import run

    where = "embedded SQLite " + config.database_url[10:] if config.embedded else "database"
    click.echo(f"meterlane: serving http://{host}:{port} with {workers} workers on {where}",
               err=True)
    run(host=host, port=port, workers=workers, timeout=timeout)


@main.group()
def db() -> None:
    """Database schema migrations."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Migrate the database to the latest schema."""
    from meterlane.migrations import current_revision, upgrade

    engine = _engine(_config())
    before = current_revision(engine)
    upgrade(engine, revision)
    after = current_revision(engine)
    click.echo(f"database at revision {after}" + ("" if before == after else
                                                   f" (was {before or 'empty'})"))


@db.command("ensure", hidden=True)
def db_ensure() -> None:
    """Fail unless the schema is current (migrating it first where auto-migrate is on)."""
    from meterlane.migrations import SchemaNotMigratedError, ensure_schema_current
    from meterlane.plans.catalog import Catalog
    from meterlane.plans.versions import PlanChangedError, ensure_unchanged

    config = _config()
    try:
        engine = _engine(config)
        ensure_schema_current(engine, auto_migrate=config.should_auto_migrate)
        # serve runs this first: a changed published plan stops it before any worker starts
        ensure_unchanged(engine, Catalog.from_config(config))
    except (SchemaNotMigratedError, PlanChangedError) as exc:
        raise click.ClickException(str(exc)) from exc


@db.command("current")
def db_current() -> None:
    """Print the schema revision of the database and the one this code needs."""
    from meterlane.migrations import current_revision, head_revision

    engine = _engine(_config())
    click.echo(f"database: {current_revision(engine) or 'empty'}; code: {head_revision()}")


def _wiring() -> Any:
    from meterlane.app import build_wiring
    from meterlane.migrations import SchemaNotMigratedError

    try:
        return build_wiring(_config())
    except SchemaNotMigratedError as exc:
        raise click.ClickException(str(exc)) from exc


@main.group()
def keys() -> None:
    """API keys (shown once, stored hashed)."""


@keys.command("create")
@click.option("--role", required=True, type=click.Choice(["admin", "app", "user", "finance"]))
@click.option("--app", "app_name", help="The app (tenant); created if new.")
@click.option("--user", help="The end user (user keys only).")
@click.option("--name", help="A label for the key.")
@click.option("--ttl-seconds", type=int, help="Expire the key after this many seconds.")
def keys_create(role: str, app_name: str | None, user: str | None, name: str | None,
                ttl_seconds: int | None) -> None:
    """Create a key and print it as the last line (it is not shown again)."""
    from datetime import timedelta

    from meterlane.core.auth import Role
    from meterlane.core.errors import DomainError

    config = _config()
    if config.embedded:
        _ensure_embedded_schema(config)
    wiring = _wiring()
    try:
        issued = wiring.keys.create_key(
            Role(role), app_name, user=user, name=name,
            ttl=timedelta(seconds=ttl_seconds) if ttl_seconds else None)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    scope = f"app {issued.app_name}" if issued.app_name else "every app"
    click.echo(f"created {role} key for {scope}" + (f", user {user}" if user else "")
               + " (store it now: it is shown only once)", err=True)
    click.echo(issued.key)


@keys.command("revoke")
@click.argument("key")
def keys_revoke(key: str) -> None:
    """Revoke a key (the full key, or its id: the hex part after 'mlk_')."""
    key_id = key.split("_")[1] if key.startswith("mlk_") else key
    if not _wiring().auth.revoke(key_id):
        raise click.ClickException("no active key with that id")
    click.echo(f"revoked {key_id}")


@main.group()
def ledger() -> None:
    """The usage ledger."""


@ledger.command("replay")
def ledger_replay() -> None:
    """Write usage records spooled to disk during a database outage into the ledger."""
    written = _wiring().ledger.replay()
    click.echo(f"replayed {written} usage records")


@main.group()
def limits() -> None:
    """Limit counters (the ledger is the truth; counters can be rebuilt from it)."""


@limits.command("rebuild")
def limits_rebuild() -> None:
    """Set the current periods' counters from the ledger, e.g. after losing Redis."""
    wiring = _wiring()
    if not wiring.limits.enabled:
        raise click.ClickException("no plan has limits: nothing to rebuild")
    def progress(n: int) -> None:
        if n % 1000 == 0:
            click.echo(f"  {n} end users rebuilt", err=True)

    done = wiring.limits.rebuild(progress=progress)
    click.echo(f"rebuilt the counters of {done} end users and apps from the ledger")


@main.group()
def plans() -> None:
    """The plan catalog ([[plans]] in the config)."""


@plans.command("check")
def plans_check() -> None:
    """Validate the catalog and compare it with the published plan versions."""
    from meterlane.plans.catalog import Catalog
    from meterlane.plans.versions import states

    config = _config()
    catalog = Catalog.from_config(config)
    if not catalog.plans:
        click.echo("no [[plans]] in the config: every call is metered, none is limited")
        return
    try:
        _ensure_embedded_schema(config)
        found = states(_engine(config), catalog)
    except Exception as exc:  # noqa: BLE001 - the config check stands on its own
        click.echo(f"(published versions not compared: {exc})", err=True)
        found = None
    by_ref = {s.plan.ref: s.state for s in found} if found is not None else {}
    for plan in sorted(catalog.plans, key=lambda p: (p.id, p.version)):
        click.echo(f"{plan.ref:<20} {_plan_summary(plan)}  "
                   f"[{by_ref.get(plan.ref, 'not compared')}]")
    changed = [ref for ref, state in by_ref.items() if state == "changed"]
    if changed:
        raise click.ClickException(
            f"published versions changed: {', '.join(changed)}; restore them and publish the "
            "change as a new version")
    unpublished = sum(1 for state in by_ref.values() if state == "unpublished")
    ids = len({p.id for p in catalog.plans})
    click.echo(f"catalog OK: {ids} plans, {len(catalog.plans)} versions"
               + (f"; {unpublished} not yet published (meterlane plans publish)"
                  if unpublished else ""))


@plans.command("publish")
def plans_publish() -> None:
    """Record the catalog's new plan versions as published (from then on immutable)."""
    from meterlane.plans.catalog import Catalog
    from meterlane.plans.versions import PlanChangedError, publish

    config = _config()
    _ensure_embedded_schema(config)
    try:
        fresh = publish(_engine(config), Catalog.from_config(config))
    except PlanChangedError as exc:
        raise click.ClickException(str(exc)) from exc
    for plan in fresh:
        click.echo(f"published {plan.ref}")
    click.echo(f"{len(fresh)} plan versions published" if fresh else
               "nothing to publish: every plan version is published as it is")


@plans.command("sync")
def plans_sync() -> None:
    """Create or update the Stripe products and prices of the catalog (idempotent: lookup
    keys), publishing its plan versions; says what it changed."""
    from meterlane.core.errors import DomainError
    from meterlane.plans.catalog import Catalog
    from meterlane.plans.stripe_sync import stripe_client, sync
    from meterlane.plans.versions import PlanChangedError, publish

    config = _config()
    catalog = Catalog.from_config(config)
    _ensure_embedded_schema(config)
    try:
        publish(_engine(config), catalog)
        changes = sync(stripe_client(config), catalog)
    except (PlanChangedError, DomainError) as exc:
        raise click.ClickException(str(getattr(exc, "detail", exc))) from exc
    for change in changes:
        click.echo(str(change))
    conflicts = [c for c in changes if c.action == "conflict"]
    if conflicts:
        raise click.ClickException(f"{len(conflicts)} prices in Stripe differ from the catalog")
    made = sum(1 for c in changes if c.action != "unchanged")
    click.echo(f"{made} changes in Stripe" if made else "Stripe is in sync: nothing changed")


@main.group()
def billing() -> None:
    """Stripe billing: overage reporting and reconciliation."""


@billing.command("report-overage")
@click.option("--retry-refused", is_flag=True,
              help="Send again the overage Stripe refused before (after fixing the cause).")
def billing_report_overage(retry_refused: bool) -> None:
    """Account recent usage, then send overage not yet reported to Stripe (meter events)."""
    from meterlane.core.db import utcnow
    from meterlane.core.errors import DomainError

    wiring = _wiring()
    wiring.accrual.accrue_all(utcnow())
    try:
        sent = wiring.overage.report(retry_refused=retry_refused)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    click.echo(f"reported {sent} overage meter events to Stripe")


@main.group()
def webhooks() -> None:
    """Signed webhooks to the app (each serve worker sends them too)."""


@webhooks.command("deliver")
@click.option("--loop", "forever", is_flag=True, help="Keep sending, once a second.")
def webhooks_deliver(forever: bool) -> None:
    """Send the webhook deliveries that are due (retries included)."""
    import time

    wiring = _wiring()
    total = 0
    while True:
        sent = wiring.events.deliver_due()
        total += sent
        if not sent and not forever:
            break
        if not sent:
            time.sleep(1)
    click.echo(f"attempted {total} webhook deliveries")


@main.group()
def notices() -> None:
    """Reminders to subscribers: trial ending, renewal, yearly, price change (NTC-01..04)."""


@notices.command("run")
@click.option("--deliver/--no-deliver", default=True, show_default=True,
              help="Also send the webhooks now (else the serve workers send them).")
def notices_run(deliver: bool) -> None:
    """Send every notice that is due and not sent yet (idempotent: run it from cron)."""
    wiring = _wiring()
    sent = wiring.notices.run()
    for notice in sent:
        late = "" if notice["on_time"] else "  (late: outside its window)"
        click.echo(f"{notice['notice_type']:<17} {notice['subscription']:<32} "
                   f"{notice['event_at'][:10]}  {notice['jurisdiction']:<9} "
                   f"{notice['window']}{late}")
    if deliver and sent:
        wiring.events.deliver_due()
    click.echo(f"sent {len(sent)} notices")


@billing.command("reconcile")
@click.option("--period", required=True, help="The month, e.g. 2026-11.")
def billing_reconcile(period: str) -> None:
    """Compare, per end user, overage in the ledger, reported, and summed by Stripe."""
    from meterlane.core.db import utcnow
    from meterlane.core.errors import DomainError

    wiring = _wiring()
    wiring.accrual.accrue_all(utcnow())
    try:
        lines = wiring.overage.reconcile(period)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    click.echo(f"{'end user':>9}  {'customer':<30} {'ledger':>12} {'reported':>12} "
               f"{'stripe':>12}  state")
    for line in lines:
        state = "ok" if line.ok else ("no Stripe customer" if line.customer is None
                                      else "DIFFERENCE")
        stripe_sum = "-" if line.stripe is None else f"{line.stripe:,}"
        click.echo(f"{line.end_user_id:>9}  {line.customer or '-':<30} {line.ledger:>12,} "
                   f"{line.reported:>12,} {stripe_sum:>12}  {state}")
    bad = [line for line in lines if not line.ok]
    if bad:
        raise click.ClickException(f"{len(bad)} of {len(lines)} end users differ for {period}")
    click.echo(f"{period}: {len(lines)} end users with overage, all reconciled")


@main.group()
def credits() -> None:
    """Credits: usage past plan allowances, burned from grants or billed as overage."""


@credits.command("accrue")
def credits_accrue() -> None:
    """Account recent usage of every end user against allowance, credits and overage."""
    from meterlane.core.db import utcnow

    wiring = _wiring()

    def progress(n: int) -> None:
        if n % 1000 == 0:
            click.echo(f"  {n} end users accounted", err=True)

    done = wiring.accrual.accrue_all(utcnow(), progress)
    click.echo(f"accounted {done} usage events")


def _plan_summary(plan: Any) -> str:
    from meterlane.plans.terms import format_minor

    t = plan.terms
    parts = [plan.name]
    parts.append(f"{format_minor(t.price.amount, t.price.currency)}/{t.price.interval}"
                 if t.price else "no price")
    if t.trial_days:
        parts.append(f"trial {t.trial_days} d")
    if t.allowance is not None:
        parts.append(f"allowance {t.allowance:,} credits/cycle")
    if t.overage is not None:
        parts.append(f"overage {format_minor(t.overage.price_per_1m, t.price.currency)}/1M "
                     f"up to {format_minor(t.overage.spend_cap, t.price.currency)}")
    elif t.allowance is not None:
        parts.append("hard stop")
    if t.tiers is not None:
        parts.append(f"tiers {','.join(t.tiers)}")
    parts.append(f"{len(plan.limits)} limits")
    if t.retired:
        parts.append("retired")
    return "; ".join(parts)


def _ensure_embedded_schema(config: Config) -> None:
    from meterlane.migrations import ensure_schema_current

    ensure_schema_current(_engine(config), auto_migrate=config.should_auto_migrate)


def _finance_commands() -> None:
    from meterlane.finance import cli as finance_cli

    for group in (finance_cli.report, finance_cli.finance, finance_cli.prices, finance_cli.demo):
        main.add_command(group)


_finance_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
