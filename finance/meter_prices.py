"""Meter prices in the catalog: effective-dated versions of a [[meters]] meter's price per
unit, as finance/prices.py keeps models'. The config's price holds until the first version;
each meter event is priced, when received, at the version in force then."""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from core.audit import Actor, record
from core.db import utcnow
from core.errors import ConflictError, InvalidRequestError, NotFoundError
from core.meters import MeterConfig
from finance.models import MeterPriceVersion
from finance.prices import EPOCH, RETRY_SECONDS

log = logging.getLogger(__name__)
PICO = 10**12


@dataclass(frozen=True)
class MeterPrice:
    meter: str
    effective_from: datetime
    price_usd: Decimal   # per unit
    source: str          # config | api

    @property
    def id(self) -> str:
        return f"{self.meter}@{self.effective_from.astimezone(UTC):%Y%m%dT%H%M%SZ}"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "meter": self.meter, "effective_from": self.effective_from,
                "price": f"{self.price_usd.normalize():f}", "source": self.source}


class MeterPriceBook:
    """Prices in force by meter and time (re-read every `refresh_seconds`, so a price set
    through any worker reaches every worker before it takes effect)."""

    def __init__(self, engine: Engine, meters: tuple[MeterConfig, ...],
                 refresh_seconds: float = 5.0, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.meters = {m.id: m for m in meters}
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._loaded_at = -1e9
        self._versions: dict[str, list[MeterPrice]] = {}

    def _load(self) -> dict[str, list[MeterPrice]]:
        now = time.monotonic()
        with self._lock:
            if now - self._loaded_at < self.refresh_seconds:
                return self._versions
            versions = {m.id: [MeterPrice(m.id, EPOCH, m.price_usd, "config")]
                        for m in self.meters.values() if m.price_usd is not None}
            try:
                with self.engine.connect() as conn:
                    rows = list(conn.execute(select(MeterPriceVersion.__table__)))
            except Exception:  # noqa: BLE001 - the database is down: what was read before
                log.warning("could not read the meter prices; trying again in %d s",
                            RETRY_SECONDS)
                self._loaded_at = now - self.refresh_seconds + RETRY_SECONDS
                return self._versions or versions
            for r in rows:
                versions.setdefault(r.meter_id, []).append(MeterPrice(
                    r.meter_id, r.effective_from, Decimal(r.price_pico_per_unit) / PICO,
                    r.source))
            for items in versions.values():
                items.sort(key=lambda v: v.effective_from)
            self._versions, self._loaded_at = versions, now
            return versions

    def price_at(self, meter: str, at: datetime) -> Decimal | None:
        """USD per unit in force at `at` (None: the meter has no price then)."""
        items = self._load().get(meter) or []
        i = bisect.bisect_right([v.effective_from for v in items], at) - 1
        return items[i].price_usd if i >= 0 else None

    def versions(self, meter: str | None = None) -> list[MeterPrice]:
        found = self._load()
        return [v for name in sorted(found) if meter in (None, name) for v in found[name]]

    def add(self, meter: str, effective_from: datetime | None, price_usd: Decimal,
            actor: Actor | None = None) -> MeterPrice:
        """A new version from `effective_from` (default: as soon as every worker knows it);
        never one in the past: events already priced keep their price."""
        if meter not in self.meters:
            raise NotFoundError(f"No meter {meter!r} in [[meters]].", param="meter")
        now = self.clock()
        soonest = (now + timedelta(seconds=self.refresh_seconds)).replace(microsecond=0) \
            + timedelta(seconds=1)
        when = effective_from or soonest
        if when < soonest:
            raise InvalidRequestError(
                "effective_from is in the past or too soon: events already recorded keep the "
                f"price they were recorded at; give {soonest.isoformat()} or later.",
                param="effective_from")
        version = MeterPrice(meter, when, price_usd, "api")
        try:
            with self.engine.begin() as conn:
                before = self._in_force(conn, meter, when, actor)
                conn.execute(insert(MeterPriceVersion).values(
                    meter_id=meter, effective_from=when, source="api", created_at=now,
                    price_pico_per_unit=int(price_usd * PICO)))
                record(conn, actor, "meter_price.create", target_type="meter_price",
                       target_id=version.id, app_id=None, before=before,
                       after=version.as_dict())
        except IntegrityError as exc:
            raise ConflictError(f"{meter} already has a price from {when.isoformat()}.",
                                code="price_exists") from exc
        with self._lock:
            self._loaded_at = -1e9
        return version

    def _in_force(self, conn: Connection, meter: str, at: datetime,
                  actor: Actor | None) -> dict[str, Any] | None:
        """The version that was to be in force at `at` (an audit row's before), read in the
        change's transaction: the latest version from then or before, else the config's price,
        else None."""
        if actor is None:
            return None  # nothing is recorded
        row = conn.execute(select(MeterPriceVersion.effective_from,
                                  MeterPriceVersion.price_pico_per_unit,
                                  MeterPriceVersion.source)
                           .where(MeterPriceVersion.meter_id == meter,
                                  MeterPriceVersion.effective_from <= at)
                           .order_by(MeterPriceVersion.effective_from.desc()).limit(1)).first()
        if row is not None:
            return MeterPrice(meter, row.effective_from, Decimal(row.price_pico_per_unit) / PICO,
                              row.source).as_dict()
        configured = self.meters[meter].price_usd
        return None if configured is None else MeterPrice(
            meter, EPOCH, configured, "config").as_dict()
