"""`meterlane ledger`, `limits`, `credits` and `billing`: the ledger and what is counted from it."""

from __future__ import annotations

import click

from core.cli import context


@click.group()
def ledger() -> None:
    """The usage ledger."""


@ledger.command("replay")
def ledger_replay() -> None:
    """Write usage records spooled to disk during a database outage into the ledger."""
    from metering.ledger import LedgerWriter

    written = context().part(LedgerWriter).replay()
    click.echo(f"replayed {written} usage records")


@click.group()
def limits() -> None:
    """Limit counters (the ledger is the truth; counters can be rebuilt from it)."""


@limits.command("rebuild")
def limits_rebuild() -> None:
    """Set the current periods' counters from the ledger, e.g. after losing Redis."""
    from metering.limits import LimitsService

    service = context().part(LimitsService)
    if not service.enabled:
        raise click.ClickException("no plan has limits: nothing to rebuild")

    def progress(n: int) -> None:
        if n % 1000 == 0:
            click.echo(f"  {n} end users rebuilt", err=True)

    done = service.rebuild(progress=progress)
    click.echo(f"rebuilt the counters of {done} end users and apps from the ledger")


@click.group()
def credits() -> None:
    """Credits: usage past plan allowances, burned from grants or billed as overage."""


@credits.command("accrue")
def credits_accrue() -> None:
    """Account recent usage of every end user against allowance, credits and overage."""
    from core.db import utcnow
    from metering.accrual import AccrualService

    def progress(n: int) -> None:
        if n % 1000 == 0:
            click.echo(f"  {n} end users accounted", err=True)

    done = context().part(AccrualService).accrue_all(utcnow(), progress)
    click.echo(f"accounted {done} usage events")


@click.group()
def billing() -> None:
    """Stripe billing: overage reporting and reconciliation."""


@billing.command("report-overage")
@click.option("--retry-refused", is_flag=True,
              help="Send again the overage Stripe refused before (after fixing the cause).")
def billing_report_overage(retry_refused: bool) -> None:
    """Account recent usage, then send overage not yet reported to Stripe (meter events)."""
    from core.db import utcnow
    from core.errors import DomainError
    from metering.accrual import AccrualService
    from plans.overage import OverageReporter

    ctx = context()
    ctx.part(AccrualService).accrue_all(utcnow())
    try:
        sent = ctx.part(OverageReporter).report(retry_refused=retry_refused)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    click.echo(f"reported {sent} overage meter events to Stripe")


@billing.command("reconcile")
@click.option("--period", required=True, help="The month, e.g. 2026-11.")
def billing_reconcile(period: str) -> None:
    """Compare, per end user, overage in the ledger, reported, and summed by Stripe."""
    from core.db import utcnow
    from core.errors import DomainError
    from metering.accrual import AccrualService
    from plans.overage import OverageReporter

    ctx = context()
    ctx.part(AccrualService).accrue_all(utcnow())
    try:
        lines = ctx.part(OverageReporter).reconcile(period)
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
