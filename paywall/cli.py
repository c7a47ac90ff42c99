"""`meterlane notices`: reminders to subscribers."""

from __future__ import annotations

import click

from core.cli import context


@click.group()
def notices() -> None:
    """Reminders to subscribers: trial ending, renewal, yearly, price change (NTC-01..04)."""


@notices.command("run")
@click.option("--deliver/--no-deliver", default=True, show_default=True,
              help="Also send the webhooks now (else the serve workers send them).")
def notices_run(deliver: bool) -> None:
    """Send every notice that is due and not sent yet (idempotent: run it from cron)."""
    from core.events import EventService
    from paywall.notices import NoticeService

    ctx = context()
    sent = ctx.part(NoticeService).run()
    for notice in sent:
        late = "" if notice["on_time"] else "  (late: outside its window)"
        click.echo(f"{notice['notice_type']:<17} {notice['subscription']:<32} "
                   f"{notice['event_at'][:10]}  {notice['jurisdiction']:<9} "
                   f"{notice['window']}{late}")
    if deliver and sent:
        ctx.part(EventService).deliver_due()
    click.echo(f"sent {len(sent)} notices")
