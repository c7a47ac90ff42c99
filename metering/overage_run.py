"""One overage run (the `overage` job and `meterlane billing report-overage`): recent usage
accounted, then the overage of tokens and of [[meters]] sent to Stripe, each even when the
other fails."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from core.errors import DomainError
from metering.accrual import AccrualService
from plans.stripe_sync import BillingProviderError

log = logging.getLogger(__name__)


class OverageSender(Protocol):
    def report(self, batch: int = 1000, *, retry_refused: bool = False) -> int: ...


@dataclass(frozen=True)
class OverageSent:
    tokens: int  # overage meter events of tokens sent (or found in Stripe)
    meters: int  # of [[meters]] meters


def report_overage(accrual: AccrualService, tokens: OverageSender, meters: OverageSender, *,
                   now: datetime, retry_refused: bool = False) -> OverageSent:
    """Account usage up to `now`, then send both kinds of overage. A failure of one (Stripe
    away, say) does not hold back the other: both run, then the failure is raised, a
    BillingProviderError naming what failed and what was sent (a failure that is not the
    product's own, e.g. the database's, is raised as it is, after the other ran)."""
    accrual.accrue_all(now)
    sent: dict[str, int] = {}
    failed: list[tuple[str, Exception]] = []
    for kind, reporter in (("token overage", tokens), ("[[meters]] overage", meters)):
        try:
            sent[kind] = reporter.report(retry_refused=retry_refused)
        except Exception as exc:  # noqa: BLE001 - raised below, once the other has run
            log.error("sending %s to Stripe failed: %s", kind, exc)
            sent[kind] = 0
            failed.append((kind, exc))
    if not failed:
        return OverageSent(sent["token overage"], sent["[[meters]] overage"])
    unexpected = [exc for _, exc in failed if not isinstance(exc, DomainError)]
    if unexpected:
        raise unexpected[0]
    detail = "; ".join(f"{kind} not sent: {getattr(exc, 'detail', exc)}"
                       for kind, exc in failed)
    done = ", ".join(f"{count} events of {kind} sent" for kind, count in sent.items()
                     if kind not in {k for k, _ in failed})
    raise BillingProviderError(detail + (f" ({done})" if done else "")) from failed[0][1]
