"""`meterlane plans`: the plan catalog, its published versions and Stripe's copy of it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from core.cli import context

if TYPE_CHECKING:
    from plans.catalog import Plan


@click.group()
def plans() -> None:
    """The plan catalog ([[plans]] in the config)."""


@plans.command("check")
def plans_check() -> None:
    """Validate the catalog and compare it with the published plan versions."""
    from plans.catalog import Catalog
    from plans.versions import states

    ctx = context()
    catalog = Catalog.from_config(ctx.config())
    if not catalog.plans:
        click.echo("no [[plans]] in the config: every call is metered, none is limited")
        return
    try:
        ctx.ensure_embedded_schema()
        found = states(ctx.engine(), catalog)
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
    from core.audit import Actor
    from plans.catalog import Catalog
    from plans.versions import PlanChangedError, publish

    ctx = context()
    ctx.ensure_embedded_schema()
    try:
        fresh = publish(ctx.engine(), Catalog.from_config(ctx.config()), Actor.cli())
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
    from core.audit import Actor
    from core.errors import DomainError
    from plans.catalog import Catalog
    from plans.stripe_sync import stripe_client, sync
    from plans.versions import PlanChangedError, publish

    ctx = context()
    catalog = Catalog.from_config(ctx.config())
    ctx.ensure_embedded_schema()
    try:
        publish(ctx.engine(), catalog, Actor.cli())
        changes = sync(stripe_client(ctx.config()), catalog)
    except (PlanChangedError, DomainError) as exc:
        raise click.ClickException(str(getattr(exc, "detail", exc))) from exc
    for change in changes:
        click.echo(str(change))
    conflicts = [c for c in changes if c.action == "conflict"]
    if conflicts:
        raise click.ClickException(f"{len(conflicts)} prices in Stripe differ from the catalog")
    made = sum(1 for c in changes if c.action != "unchanged")
    click.echo(f"{made} changes in Stripe" if made else "Stripe is in sync: nothing changed")


def _plan_summary(plan: Plan) -> str:
    from plans.terms import format_minor

    t = plan.terms
    parts = [plan.name]
    parts.append(f"{format_minor(t.price.amount, t.price.currency)}/{t.price.interval}"
                 if t.price else "no price")
    if t.trial_days:
        parts.append(f"trial {t.trial_days} d")
    if t.allowance is not None:
        parts.append(f"allowance {t.allowance:,} credits/cycle")
    if t.overage is not None:
        currency = t.price.currency if t.price else "usd"
        parts.append(f"overage {format_minor(t.overage.price_per_1m, currency)}/1M "
                     f"up to {format_minor(t.overage.spend_cap, currency)}")
    elif t.allowance is not None:
        parts.append("hard stop")
    if t.tiers is not None:
        parts.append(f"tiers {','.join(t.tiers)}")
    parts.append(f"{len(plan.limits)} limits")
    if t.retired:
        parts.append("retired")
    return "; ".join(parts)
