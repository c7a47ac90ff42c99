"""Corrected usage in the credit accounting: an event voided or amended gives back what its
original was charged (burned credits to their grants, allowance of the cycle still open,
overage cancelled) and is charged its own usage instead; its CreditUse holds the difference,
so that the splits of the original and its correction together add up to what counts now."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from plans.models import CreditBurn, CreditOverage, CreditUse


@dataclass(frozen=True)
class Accounted:
    """How an event was accounted: what a correction of it gives back."""

    credits: int
    allowance: int
    uncharged: int
    at: datetime
    burns: tuple[tuple[int, int, datetime], ...]  # grant, amount, burned_at
    overage: int


def accounted_of(conn: Connection, event_id: int, pending: dict[str, list[dict[str, Any]]]
                 ) -> Accounted | None:
    """The event's accounting, from this run's rows not yet written (`pending`: uses, burns,
    overages) or the database; None when it was never accounted (no plan with an allowance
    counted it, or it was recorded before its accounting began)."""
    use = next((u for u in pending["uses"] if u["usage_event_id"] == event_id), None)
    if use is not None:
        burns = tuple((b["grant_id"], b["amount"], b["burned_at"]) for b in pending["burns"]
                      if b["usage_event_id"] == event_id)
        overage = sum(o["credits"] for o in pending["overages"]
                      if o["usage_event_id"] == event_id)
        return Accounted(use["credits"], use["allowance"], use["uncharged"],
                         use["happened_at"], burns, overage)
    row = conn.execute(select(CreditUse.credits, CreditUse.allowance, CreditUse.uncharged,
                              CreditUse.happened_at).where(
        CreditUse.usage_event_id == event_id)).first()
    if row is None:
        return None
    burns = tuple((int(b[0]), int(b[1]), b[2]) for b in conn.execute(
        select(CreditBurn.grant_id, func.sum(CreditBurn.amount), func.min(CreditBurn.burned_at))
        .where(CreditBurn.usage_event_id == event_id).group_by(CreditBurn.grant_id)))
    overage = conn.execute(select(CreditOverage.credits).where(
        CreditOverage.usage_event_id == event_id)).scalar()
    return Accounted(int(row[0] or 0), int(row[1] or 0), int(row[2] or 0), row[3], burns,
                     int(overage or 0))


def cancel_overage(conn: Connection, event_id: int, pending: dict[str, list[dict[str, Any]]],
                   now: datetime) -> None:
    """The event's overage is no longer billed: not sent if it was not; cancelled with Stripe
    (plans.overage) if it was, or may have been."""
    for o in pending["overages"]:
        if o["usage_event_id"] == event_id:
            o["cancelled_at"] = now
    conn.execute(update(CreditOverage).where(
        CreditOverage.usage_event_id == event_id, CreditOverage.cancelled_at.is_(None))
        .values(cancelled_at=now))


def net_burns(event_id: int, end_user_id: int, charged: list[dict[str, Any]],
              back: tuple[tuple[int, int, datetime], ...]) -> list[dict[str, Any]]:
    """One burn row per grant for a correction: what it burned less what it gave back (a
    negative row returns credits to the grant), dated as the original's burns when it gives
    back more than it takes (they then count in the original's cycle)."""
    net: dict[int, list[Any]] = {}
    for b in charged:
        net[b["grant_id"]] = [b["amount"], b["burned_at"]]
    for grant_id, amount, burned_at in back:
        entry = net.setdefault(grant_id, [0, burned_at])
        entry[0] -= amount
        if entry[0] < 0:
            entry[1] = burned_at
    return [{"grant_id": g, "end_user_id": end_user_id, "usage_event_id": event_id,
             "amount": amount, "burned_at": at}
            for g, (amount, at) in net.items() if amount != 0]


def difference(use: dict[str, Any], old: Accounted, supersedes: int) -> dict[str, Any]:
    """A correction's CreditUse: its own figures less the original's."""
    return {**use, "credits": use["credits"] - old.credits,
            "allowance": use["allowance"] - old.allowance,
            "uncharged": use["uncharged"] - old.uncharged, "supersedes_id": supersedes}
