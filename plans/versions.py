"""Published plan versions are immutable: publishing records each version's content hash,
and a config that later changes a published version is refused."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from core.audit import Actor, record
from core.db import utcnow
from plans.catalog import Catalog, Plan
from plans.models import PlanVersion


@dataclass(frozen=True)
class VersionState:
    plan: Plan
    state: str  # unpublished | published | changed
    published_hash: str | None = None


class PlanChangedError(Exception):
    """A published plan version's content differs from what was published."""


def states(engine: Engine, catalog: Catalog) -> list[VersionState]:
    """Each plan version of the catalog against what was published."""
    with engine.connect() as conn:
        rows = {(r.plan_id, r.version): r.content_hash
                for r in conn.execute(select(PlanVersion.plan_id, PlanVersion.version,
                                             PlanVersion.content_hash))}
    out: list[VersionState] = []
    for plan in catalog.plans:
        recorded = rows.get((plan.id, plan.version))
        if recorded is None:
            out.append(VersionState(plan, "unpublished"))
        else:
            state = "published" if recorded == content_hash(plan) else "changed"
            out.append(VersionState(plan, state, recorded))
    return out


def ensure_unchanged(engine: Engine, catalog: Catalog) -> None:
    """Raise PlanChangedError naming every published version whose content was changed."""
    changed = [s.plan.ref for s in states(engine, catalog) if s.state == "changed"]
    if changed:
        raise PlanChangedError(
            f"published plan versions were changed in the config: {', '.join(changed)}. A "
            "published version is what its subscribers bought: put it back as it was and "
            "publish the change as a new version (version = N + 1).")


def publish(engine: Engine, catalog: Catalog, actor: Actor | None = None) -> list[Plan]:
    """Record every unpublished version (idempotent); returns the ones recorded now. Refuses,
    recording nothing, if a published version was changed. Each version recorded is an audit
    row of the actor's (the CLI's)."""
    ensure_unchanged(engine, catalog)
    fresh = [s.plan for s in states(engine, catalog) if s.state == "unpublished"]
    if fresh:
        now = utcnow()
        with engine.begin() as conn:
            conn.execute(insert(PlanVersion), [
                {"plan_id": p.id, "version": p.version, "content_hash": content_hash(p),
                 "content": orjson.dumps(content_of(p)).decode(), "published_at": now}
                for p in fresh])
            for p in fresh:
                record(conn, actor, "plan.publish", target_type="plan_version",
                       target_id=p.ref, app_id=None, after={
                           "price": content_of(p)["price"], "content_hash": content_hash(p)})
    return fresh


def content_of(plan: Plan) -> dict[str, Any]:
    """What a subscriber buys: every term and limit, without what may change on a published
    version (its display name, whether it is the default or retired, operational settings)."""
    t = plan.terms
    return {
        "id": plan.id, "version": t.version, "on_limit": plan.on_limit,
        "price": t.price.__dict__ if t.price else None, "trial_days": t.trial_days,
        "tiers": list(t.tiers) if t.tiers is not None else None, "allowance": t.allowance,
        "overage": t.overage.__dict__ if t.overage else None,
        "credit_multipliers": dict(sorted(t.credit_multipliers.items())),
        "rollover_cap": t.rollover_cap, "upgrade_carries_usage": t.upgrade_carries_usage,
        "limits": [{"id": x.id, "metric": x.metric, "window": x.window.spec,
                    "timezone": x.window.tz, "amount": x.amount, "scope": x.scope,
                    "model": x.model} for x in plan.limits],
        # (only when set: the hashes of versions published before meters stay as they were)
        **({"meters": [{"meter": m.meter, "included": m.included,
                        "overage_price": str(m.overage_price) if m.overage_price else None}
                       for m in t.meters]} if t.meters else {}),
    }


def content_hash(plan: Plan) -> str:
    return hashlib.sha256(orjson.dumps(content_of(plan), option=orjson.OPT_SORT_KEYS)
                          ).hexdigest()
