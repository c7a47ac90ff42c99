"""`meterlane ledger`, `limits`, `credits` and `billing`: the ledger and what is counted from it."""

from __future__ import annotations

import click

from core.cli import CommandContext, context


@click.group()
def ledger() -> None:
    """The usage ledger."""


@ledger.command("replay")
def ledger_replay() -> None:
    """Write usage records spooled to disk during a database outage into the ledger."""
    from metering.ledger import LedgerWriter
    from metering.service import MeteringService

    ctx = context()
    written = ctx.part(LedgerWriter).replay()
    click.echo(f"replayed {written} usage records")
    relayed = ctx.part(MeteringService).relayed
    if relayed is not None and relayed.spooled():
        click.echo(f"replayed {relayed.replay()} meter events of relayed calls")
    lost = ctx.part(MeteringService).recover_lost()
    if lost:
        click.echo(f"recorded {lost} calls whose worker died before recording them")


@ledger.group("quarantine")
def quarantine() -> None:
    """Usage records the database refused (or that broke the ledger's rules), kept with the
    reason: never retried on their own."""


@quarantine.command("list")
@click.option("--all", "everything", is_flag=True, help="Include records already resolved.")
def quarantine_list(everything: bool) -> None:
    """One line per record: id, when, where from, request id, reason."""
    from metering.ledger import LedgerWriter

    found = 0
    for entry in context().part(LedgerWriter).quarantine.all_entries(everything):
        found += 1
        state = f"  [{entry.resolution}]" if entry.resolution else ""
        click.echo(f"{entry.id:>8}  {entry.created_at:%Y-%m-%d %H:%M:%S}  {entry.source:<7} "
                   f"{entry.request_id or '-':<40}  {entry.reason}{state}")
    click.echo(f"{found} records in quarantine" if found else "the quarantine is empty",
               err=True)


@quarantine.command("export")
@click.option("--all", "everything", is_flag=True, help="Include records already resolved.")
def quarantine_export(everything: bool) -> None:
    """Every record as a JSON line (id, reason, the record itself) on standard output."""
    import orjson

    from metering.ledger import LedgerWriter

    for entry in context().part(LedgerWriter).quarantine.all_entries(everything):
        click.echo(orjson.dumps(entry.as_dict()).decode())


@quarantine.command("retry")
@click.argument("ids", nargs=-1, type=int)
def quarantine_retry(ids: tuple[int, ...]) -> None:
    """Write the records (all, or those named) into the ledger again, after fixing what
    refused them; a record refused again stays, with the new reason."""
    from core.audit import Actor
    from metering.ledger import LedgerWriter

    writer = context().part(LedgerWriter)
    done = writer.quarantine.retry(writer.write_or_refuse, list(ids) or None, Actor.cli())
    click.echo(f"written {done['written']}, already in the ledger {done['duplicate']}, "
               f"refused again {done['refused']}")
    if done["refused"]:
        raise click.ClickException("some records were refused again: see "
                                   "`meterlane ledger quarantine list`")


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
@click.option("--repair", "repair_period", metavar="YYYY-MM",
              help="First mark again the month's calls that `billing reconcile` found never "
                   "accounted, then account them.")
def credits_accrue(repair_period: str | None) -> None:
    """Account the usage of every end user not yet accounted against allowance, credits and
    overage."""
    from core.db import utcnow
    from core.errors import DomainError
    from metering.accrual import AccrualService
    from metering.reconcile import Reconciliation
    from plans.overage import OverageReporter

    def progress(n: int) -> None:
        if n % 1000 == 0:
            click.echo(f"  {n} end users accounted", err=True)

    ctx = context()
    if repair_period is not None:
        try:
            marked = Reconciliation(ctx.part(AccrualService),
                                    ctx.part(OverageReporter)).repair(repair_period)
        except DomainError as exc:
            raise click.ClickException(exc.detail) from exc
        click.echo(f"{repair_period}: marked {marked} unaccounted usage events again")
    done = ctx.part(AccrualService).accrue_all(utcnow(), progress)
    click.echo(f"accounted {done} usage events")


@click.group()
def billing() -> None:
    """Stripe billing: overage reporting and reconciliation."""


@billing.command("report-overage")
@click.option("--retry-refused", is_flag=True,
              help="Send again the overage Stripe refused before (after fixing the cause).")
def billing_report_overage(retry_refused: bool) -> None:
    """Account recent usage, then send overage not yet reported to Stripe (meter events):
    of tokens, and of [[meters]] meters past the plans' allowances. Takes the `overage`
    job's lock: while a worker (or another of these) runs that job, says so and exits with
    status 1, sending nothing."""
    from core.db import utcnow
    from core.errors import DomainError
    from core.jobs import JobBoard
    from core.worker import lock_factory
    from metering.accrual import AccrualService
    from metering.overage_run import report_overage
    from plans.meter_stripe import MeterOverageReporter
    from plans.overage import OverageReporter

    ctx = context()
    # the `overage` job's lock: never alongside a worker's run (or another of these)
    lock = lock_factory(ctx.part(JobBoard).engine, ctx.config().data_dir)("overage")
    if not lock.acquire():
        raise click.ClickException(
            "the overage job is running (on a `meterlane worker`, or another "
            "`billing report-overage`): it sends the same overage; nothing was sent by "
            "this one. Try again once it ends (`GET /v1/admin/jobs` shows it).")
    try:
        sent = report_overage(ctx.part(AccrualService), ctx.part(OverageReporter),
                              ctx.part(MeterOverageReporter), now=utcnow(),
                              retry_refused=retry_refused)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    finally:
        lock.release()
    click.echo(f"reported {sent.tokens} overage meter events to Stripe")
    click.echo(f"reported {sent.meters} overage events of [[meters]] to Stripe")


@billing.command("reconcile")
@click.option("--period", required=True, help="The month, e.g. 2026-11.")
def billing_reconcile(period: str) -> None:
    """Check the month's overage billing against the raw ledger, per end user: every call
    accounted, each split adding up, and the overage it leaves equal to what was accounted,
    reported, and summed by Stripe. Lists the end users with overage or a fault."""
    from core.db import utcnow
    from core.errors import DomainError
    from metering.accrual import AccrualService
    from metering.reconcile import Reconciliation
    from plans.overage import OverageReporter

    ctx = context()
    ctx.part(AccrualService).accrue_all(utcnow())
    try:
        lines = Reconciliation(ctx.part(AccrualService),
                               ctx.part(OverageReporter)).reconcile(period)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    shown = [ln for ln in lines if not ln.ok or ln.ledger or ln.accounted]
    click.echo(f"{'end user':>9}  {'customer':<24} {'calls':>8} {'ledger':>10} "
               f"{'accounted':>10} {'reported':>10} {'stripe':>10}  state")
    for line in shown:
        stripe_sum = "-" if line.stripe is None else f"{line.stripe:,}"
        click.echo(f"{line.end_user_id:>9}  {line.customer or '-':<24} {line.events:>8,} "
                   f"{line.ledger:>10,} {line.accounted:>10,} {line.reported:>10,} "
                   f"{stripe_sum:>10}  {line.state}")
        if line.unaccounted_count:
            click.echo(f"{'':>11}{line.unaccounted_count} calls never accounted, e.g. usage "
                       f"events {', '.join(map(str, line.unaccounted))}")
        if line.mismatched_count:
            click.echo(f"{'':>11}{line.mismatched_count} calls accounted with other tokens "
                       f"or a split that does not add up, e.g. usage events "
                       f"{', '.join(map(str, line.mismatched))}")
    bad_meters = _reconcile_meters(ctx, period)
    calls = sum(ln.events for ln in lines)
    bad = [ln for ln in lines if not ln.ok]
    if any(ln.unaccounted_count for ln in bad):
        click.echo(f"run `meterlane credits accrue --repair {period}` to account the calls "
                   "never accounted", err=True)
    if bad:
        raise click.ClickException(f"{len(bad)} of {len(lines)} end users differ for {period}")
    if bad_meters:
        raise click.ClickException(f"the overage of {bad_meters} meters of end users differs "
                                   f"for {period}")
    click.echo(f"{period}: {calls:,} calls of {len(lines)} end users checked against the "
               f"ledger, {len(shown)} with overage, all reconciled")


def _reconcile_meters(ctx: CommandContext, period: str) -> int:
    """The month's overage of [[meters]] meters per end user: accounted, reported, summed by
    Stripe; returns how many differ."""
    from core.errors import DomainError
    from core.meters import format_units
    from plans.meter_stripe import MeterOverageReporter

    try:
        lines = ctx.part(MeterOverageReporter).by_user(period)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    if lines:
        click.echo(f"{'end user':>9}  {'customer':<24} {'meter':<20} {'accounted':>10} "
                   f"{'reported':>10} {'stripe':>10}  state")
    for ln in lines:
        stripe_sum = "-" if ln.stripe is None else format_units(ln.stripe)
        click.echo(f"{ln.end_user_id:>9}  {ln.customer or '-':<24} {ln.meter[:20]:<20} "
                   f"{format_units(ln.accounted):>10} {format_units(ln.reported):>10} "
                   f"{stripe_sum:>10}  {'ok' if ln.ok else 'DIFFERENCE'}")
    return sum(1 for ln in lines if not ln.ok)
