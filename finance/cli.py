"""Finance commands: `meterlane report summary|margins|local`, `meterlane finance rollup`,
`meterlane prices list|import`, `meterlane demo seed`."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from core.cli import context
from core.errors import DomainError

if TYPE_CHECKING:
    from finance.service import FinanceService


def _finance() -> FinanceService:
    """The finance service; on the embedded SQLite default, its schema made current first
    (as `meterlane serve` does), so that a new user can seed and report at once."""
    from finance.service import FinanceService

    ctx = context()
    if ctx.config().embedded:
        ctx.ensure_embedded_schema()
    return ctx.part(FinanceService)


def _app_id(app: str | None) -> int:
    from core.tenancy import TenancyService

    tenancy = context().part(TenancyService)
    if app:
        return int(tenancy.get_app(app))
    names = tenancy.app_names()
    if len(names) != 1:
        raise click.ClickException(f"Name the app (--app); there are {len(names)}: "
                                   f"{', '.join(sorted(names)[:10])}")
    return int(tenancy.get_app(names[0]))


def _refresh(svc: FinanceService) -> None:
    """Bring the roll-ups up to date, with a progress bar over the days to recompute."""
    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label="rolling up days", file=sys.stderr)
            bar.__enter__()
        bar.update(1)

    started = time.monotonic()
    run = svc.refresh(progress)
    if bar is not None:
        bar.__exit__(None, None, None)
    if run is None:
        click.echo("another process is rolling up now: the reports show the roll-ups as they "
                   "were", err=True)
    if run is not None and run.days:
        click.echo(f"rolled up {len(run.days)} days in {time.monotonic() - started:.1f} s",
                   err=True)


@click.group()
def report() -> None:
    """Finance reports from the roll-ups (brought up to date first)."""


@report.command("summary")
@click.option("--period", required=True, help="2026-11, 2026-11-03 or 2026-11-03..2026-11-09")
@click.option("--app", help="The app (needed when there are several).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv"]), default="text")
def report_summary(period: str, app: str | None, fmt: str) -> None:
    """Revenue, inference cost, gross margin and active users of a period."""
    svc = _finance()
    try:
        app_id = _app_id(app)
        _refresh(svc)
        body = svc.reports.summary(app_id, period)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    if fmt == "json":
        import orjson

        click.echo(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
        return
    from finance.reports import cents

    rows = [(k, "" if v is None else cents(v) if k.endswith("_usd") else v)
            for k, v in body.items() if not isinstance(v, list)]
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([("field", "value"), *rows])
        click.echo(out.getvalue(), nl=False)
        return
    for key, value in body.items():  # money to the cent, right-aligned
        if isinstance(value, list):
            continue
        shown = cents(value, grouped=True) if key.endswith("_usd") else (
            "-" if value is None else str(value))
        click.echo(f"{key:<36} {shown:>20}")
    for item in body["revenue_unconverted"]:
        click.echo(f"revenue not converted (no [finance] usd_per rate): {item['amount_minor']} "
                   f"minor units of {item['currency'].upper()}")


@report.command("margins")
@click.option("--period", required=True)
@click.option("--group-by", "group_by", required=True,
              type=click.Choice(["plan", "model", "user", "day"]))
@click.option("--app")
@click.option("--format", "fmt", type=click.Choice(["text", "csv"]), default="text")
@click.option("--least-profitable", "limit", type=int,
              help="Only the N least profitable rows.")
def report_margins(period: str, group_by: str, app: str | None, fmt: str,
                   limit: int | None) -> None:
    """Revenue, cost and margin per plan, model, user or day."""
    from finance.api import margins_csv

    svc = _finance()
    try:
        app_id = _app_id(app)
        _refresh(svc)
        body = svc.reports.margins(app_id, period, group_by,
                                         order="margin" if limit else "key", limit=limit)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    if fmt == "csv":
        click.echo(margins_csv(body), nl=False)
        return
    from finance.reports import cents

    click.echo(f"{group_by:<28} {'revenue USD':>14} {'cost USD':>14} {'margin USD':>14} "
               f"{'margin %':>9} {'users':>6} {'calls':>9}")
    for row in [*body["rows"], {"key": "TOTAL", **body["totals"], "margin_percent": None,
                                "active_users": None}]:
        click.echo(f"{str(row['key'])[:28]:<28} {cents(row['revenue_usd'], grouped=True):>14} "
                   f"{cents(row['cost_usd'], grouped=True):>14} "
                   f"{cents(row['margin_usd'], grouped=True):>14} "
                   f"{row.get('margin_percent') or '-':>9} "
                   f"{'' if row.get('active_users') is None else row['active_users']:>6} "
                   f"{row['calls']:>9}")
    if body.get("note"):
        click.echo(f"note: {body['note']}")


@report.command("local")
@click.option("--period", required=True)
def report_local(period: str) -> None:
    """Local GPU upstreams: full cost, allocated, idle, and the same tokens at cloud prices."""
    svc = _finance()
    try:
        _refresh(svc)
        body = svc.reports.local_vs_cloud(period)
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    from finance.reports import cents

    for up in body["upstreams"]:
        click.echo(f"{up['upstream']}: {up['hours']} h at {cents(up['hourly_cost_usd'])} USD/h"
                   f" = {cents(up['cost_usd'], grouped=True)} USD; allocated "
                   f"{cents(up['allocated_usd'], grouped=True)}, idle "
                   f"{cents(up['idle_unallocated_usd'], grouped=True)}; {up['calls']:,} calls, "
                   f"{up['tokens']:,} tokens")
    click.echo(f"same tokens at cloud prices: {cents(body['shadow_cost_usd'], grouped=True)} "
               f"USD; savings {cents(body['savings_usd'], grouped=True)} USD")


@click.group()
def finance() -> None:
    """Finance roll-ups."""


@finance.command("rollup")
def finance_rollup() -> None:
    """Bring the roll-ups up to date (idempotent: a re-run changes nothing)."""
    svc = _finance()
    _refresh(svc)
    click.echo(f"roll-ups up to date ({svc.rolled_up_at()})")


@click.group()
def prices() -> None:
    """The price catalog: effective-dated model prices."""


@prices.command("list")
@click.option("--model")
def prices_list(model: str | None) -> None:
    svc = _finance()
    for v in svc.prices.versions(model):
        d = v.as_dict()
        click.echo(f"{d['model']:<28} from {d['effective_from'].isoformat():<26} in {d['input']}"
                   f" out {d['output']} cached {d['cached_input'] or '-'} write "
                   f"{d['cache_write'] or '-'} reasoning {d['reasoning'] or '-'} fee "
                   f"{d['request_fee'] or '-'} ({d['source']})")


@prices.command("import")
@click.argument("sheet", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def prices_import(sheet: Path) -> None:
    """Import a price sheet (.json or .csv): all its rows or none."""
    from core.audit import Actor

    svc = _finance()
    fmt = "csv" if sheet.suffix.lower() == ".csv" else "json"
    try:
        done = svc.prices.import_sheet(sheet.read_text(encoding="utf-8"), fmt,
                                       f"import:{sheet.name}", Actor.cli())
    except DomainError as exc:
        raise click.ClickException(exc.detail) from exc
    click.echo(f"imported {len(done)} prices from {sheet}")


@click.command("seed")
@click.option("--users", default=200, show_default=True, type=int)
@click.option("--days", default=30, show_default=True, type=int)
@click.option("--app", default="demo", show_default=True)
@click.option("--seed", "rng_seed", default=7, show_default=True, type=int)
def demo_seed(users: int, days: int, app: str, rng_seed: int) -> None:
    """Fill the database with realistic usage, plans and invoices, then roll it up."""
    from sqlalchemy.engine import Engine

    from core.tenancy import TenancyService
    from finance.seed import seed
    from plans.service import PlanService

    ctx = context()

    svc = _finance()
    started = time.monotonic()
    with click.progressbar(length=users * days, label="seeding usage", file=sys.stderr,
                           show_pos=True) as bar:
        last = [0]

        def progress(events: int) -> None:
            bar.label = f"seeding usage ({events:,} calls)"
            bar.update(0)
            last[0] = events

        try:
            result = seed(ctx.part(Engine), ctx.config(), ctx.part(PlanService).catalog,
                          ctx.part(TenancyService), svc.prices,
                          users=users, days=days, app=app, rng_seed=rng_seed,
                          progress=progress)
        except DomainError as exc:
            raise click.ClickException(exc.detail) from exc
        bar.update(users * days)
    _refresh(svc)
    click.echo(f"seeded app {result.app!r}: {result.users} users, {result.events:,} calls "
               f"over {days} days from {result.first_day:%Y-%m-%d} (models "
               f"{', '.join(result.models)}; local {', '.join(result.local_models) or '-'}), "
               f"{result.invoices} invoices, in {time.monotonic() - started:.1f} s")
    from datetime import UTC, datetime

    click.echo(f"try: meterlane report summary --app {result.app} --period "
               f"{datetime.now(UTC):%Y-%m}  (or --period {result.first_day:%Y-%m-%d}.."
               f"{datetime.now(UTC):%Y-%m-%d} for all of it)")
