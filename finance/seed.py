"""`meterlane demo seed`: a database filled with realistic usage, so that a new user sees real
reports within a minute: end users on several plans (most free, some paying), a few heavy
users and many light ones, calls to the configured cloud models and to a local GPU upstream,
each priced as the gateway prices it, and the invoices of the paying users."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine

from core.config import Config, ModelConfig
from core.errors import ConflictError, InvalidRequestError
from core.tenancy import TenancyService
from finance.prices import PriceBook
from metering import reads as ledger
from metering.pricing import TokenUsage, cost_or_none
from plans import revenue
from plans.catalog import Catalog
from plans.service import insert_assignments

CHUNK = 5000


@dataclass(frozen=True)
class SeedResult:
    app: str
    users: int
    events: int
    invoices: int
    first_day: datetime
    models: tuple[str, ...]
    local_models: tuple[str, ...]


def seed(engine: Engine, config: Config, catalog: Catalog, tenancy: TenancyService,
         prices: PriceBook, *, users: int, days: int, app: str = "demo", rng_seed: int = 7,
         now: datetime | None = None,
         progress: Callable[[int], None] | None = None) -> SeedResult:
    if not 1 <= users <= 1_000_000 or not 1 <= days <= 3660:
        raise InvalidRequestError("users must be 1 to 1,000,000 and days 1 to 3660")
    local_upstreams = {u.name for u in config.upstreams if u.cost is not None}
    models = [m for m in config.models if m.price is not None or m.upstream in local_upstreams]
    if not models:
        raise InvalidRequestError(
            "The config has no priced model and no local upstream with a cost: the demo "
            "needs models to bill (see the README's finance demo config).")
    local = [m for m in models if m.upstream in local_upstreams]
    cloud = [m for m in models if m.upstream not in local_upstreams]
    app_id, _ = tenancy.ensure_app(app)
    with engine.connect() as conn:
        if ledger.has_events(conn, app_id):
            raise ConflictError(f"App {app!r} already has usage: seed another (--app).",
                                code="app_has_usage")
    rnd = random.Random(rng_seed)  # noqa: S311 - demo data, reproducible by its seed
    end = (now or datetime.now(UTC)).replace(minute=0, second=0, microsecond=0)
    start = (end - timedelta(days=days)).replace(hour=0)
    default = catalog.default
    paid = sorted((p for p in catalog.current if p.terms.price is not None
                   and not p.terms.retired), key=lambda p: p.terms.price.amount
                  if p.terms.price else 0)
    people: list[tuple[int, str, bool]] = []  # end user id, plan id, heavy
    plan_rows, revenue_rows = [], []
    for n in range(users):
        external = f"demo-user-{n:05d}"
        end_user_id = tenancy.ensure_end_user(app_id, external)
        heavy = rnd.random() < 0.15
        roll = rnd.random()
        plan = (paid[-1] if paid and roll < (0.35 if heavy else 0.05) else
                paid[0] if paid and roll < (0.7 if heavy else 0.25) else default)
        people.append((end_user_id, plan.id if plan is not None else "default", heavy))
        if plan is not None and plan is not default:
            plan_rows.append({"end_user_id": end_user_id, "app_id": app_id,
                              "plan_id": plan.id, "plan_version": plan.version,
                              "anchored_at": start, "updated_at": start})
            price = plan.terms.price
            assert price is not None
            step = timedelta(days=365 if price.interval == "year" else 30)
            at, k = start, 0
            while at < end:
                revenue_rows.append({
                    "source_id": f"demo_in_{app_id}_{end_user_id}_{k}", "kind": "invoice_paid",
                    "app_id": app_id, "end_user_id": end_user_id, "amount": price.amount,
                    "currency": price.currency, "period_start": at, "period_end": at + step,
                    "occurred_at": at, "plan_id": plan.id})
                at, k = at + step, k + 1
    events = 0
    batch: list[dict[str, Any]] = []
    with engine.begin() as conn:
        insert_assignments(conn, plan_rows)
        revenue.insert_events(conn, revenue_rows)
    for d in range(days):
        day = start + timedelta(days=d)
        for end_user_id, plan_id, heavy in people:
            if rnd.random() > (0.85 if heavy else 0.3):
                continue
            calls = max(1, int(rnd.lognormvariate(math.log(40 if heavy else 3), 0.6)))
            for c in range(calls):
                at = day + timedelta(seconds=rnd.randrange(86400))
                if at >= end:
                    continue
                use_local = bool(local) and rnd.random() < 0.5
                model = rnd.choice(local if use_local or not cloud else cloud)
                batch.append(_event(rnd, app_id, end_user_id, plan_id, model, at, prices,
                                    f"demo-{end_user_id}-{d}-{c}"))
                if len(batch) >= CHUNK:
                    events += _flush(engine, batch)
                    if progress is not None:
                        progress(events)
    events += _flush(engine, batch)
    if progress is not None:
        progress(events)
    return SeedResult(app, users, events, len(revenue_rows), start,
                      tuple(m.name for m in models), tuple(m.name for m in local))


def _event(rnd: random.Random, app_id: int, end_user_id: int, plan_id: str,
           model: ModelConfig, at: datetime, prices: PriceBook, key: str) -> dict[str, Any]:
    prompt = int(rnd.lognormvariate(math.log(900), 0.9)) + 20
    cached = int(prompt * rnd.choice((0, 0, 0.5, 0.8)))
    output = int(rnd.lognormvariate(math.log(300), 0.8)) + 5
    reasoning = int(output * 0.6) if rnd.random() < 0.1 else 0
    usage = TokenUsage(input_tokens=prompt, cached_input_tokens=cached, output_tokens=output,
                       reasoning_tokens=reasoning)
    price = prices.price_at(model.name, at)
    return {"app_id": app_id, "end_user_id": end_user_id, "request_id": f"req_{key}",
            "idempotency_key": key, "endpoint": "chat", "requested_model": model.name,
            "upstream": model.upstream, "upstream_model": model.upstream_model,
            "stream": rnd.random() < 0.5, "input_tokens": prompt, "cached_input_tokens": cached,
            "output_tokens": output, "reasoning_tokens": reasoning, "cache_write_tokens": 0,
            "usage_source": "reported", "cost_pico_usd": cost_or_none(usage, price),
            "priced": price is not None, "status": "ok", "http_status": 200, "error": None,
            "latency_ms": rnd.randrange(200, 4000), "ttft_ms": rnd.randrange(80, 900),
            "created_at": at, "limits_pending": False, "plan_id": plan_id}


def _flush(engine: Engine, batch: list[dict[str, Any]]) -> int:
    if not batch:
        return 0
    with engine.begin() as conn:
        ledger.insert_events(conn, batch)
    n = len(batch)
    batch.clear()
    return n
