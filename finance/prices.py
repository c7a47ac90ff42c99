"""The price catalog: versioned, effective-dated model prices. A model's config price is its
first version (in force from the beginning); later versions come from the admin API or an
imported price sheet (JSON or CSV). Each call is priced, when it is metered, at the version
in force at that moment: a new price leaves the calls before it as they were."""

from __future__ import annotations

import bisect
import csv
import io
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
from marshmallow import ValidationError
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from core.audit import Actor, record
from core.config import MAX_PRICE_USD, ModelConfig, ModelPrice
from core.db import utcnow
from core.errors import ConflictError, InvalidRequestError, NotFoundError
from core.schemas import bounded_time
from finance.models import ModelPriceVersion

log = logging.getLogger(__name__)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
RATES = ("input", "cached_input", "cache_write", "output", "reasoning")
FIELDS = (*RATES, "request_fee")
_PER_TOKEN = Decimal(10**6)   # USD per 1M tokens -> pico-USD per token
_PER_CALL = Decimal(10**12)   # USD -> pico-USD
# per 1M tokens or per call: a call's cost (at most 10^8 tokens in and out each) stays
# inside 64 bits of pico-USD
MAX_PRICE = MAX_PRICE_USD  # the config's own bound
RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class PriceVersion:
    model: str
    effective_from: datetime
    price: ModelPrice
    source: str

    @property
    def id(self) -> str:
        """The version's id: its model and the second it takes effect."""
        return f"{self.model}@{self.effective_from.astimezone(UTC):%Y%m%dT%H%M%SZ}"

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "effective_from": self.effective_from,
                "source": self.source, **{f: None if getattr(self.price, f) is None
                                           else str(getattr(self.price, f)) for f in FIELDS}}


def _decimal(value: Any, field: str, places: int) -> Decimal | None:
    if value is None or value == "":
        return None
    if isinstance(value, (bool, float)):
        raise InvalidRequestError(f"{field} must be a decimal string such as \"2.50\" (a float "
                                  "is not exact)", param=field)
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise InvalidRequestError(f"{field}: {value!r} is not a decimal", param=field) from exc
    if not amount.is_finite() or amount < 0:
        raise InvalidRequestError(f"{field} must be a non-negative decimal", param=field)
    if amount.as_tuple().exponent < -places:  # type: ignore[operator]
        raise InvalidRequestError(f"{field} has more than {places} decimal places",
                                  param=field)
    if amount > MAX_PRICE:
        raise InvalidRequestError(f"{field} is more than {MAX_PRICE} USD: not a price",
                                  param=field)
    return amount


def parse_price(row: dict[str, Any]) -> ModelPrice:
    """A price from USD decimals (per 1M tokens; request_fee per call)."""
    values = {f: _decimal(row.get(f), f, 12 if f == "request_fee" else 6) for f in FIELDS}
    for required in ("input", "output"):
        if values[required] is None:
            raise InvalidRequestError(f"{required} is required (USD per 1M tokens)",
                                      param=required)
    return ModelPrice(**values)  # type: ignore[arg-type]


def _to_row(price: ModelPrice) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for f in FIELDS:
        value = getattr(price, f)
        out[f] = None if value is None else int(value * (_PER_CALL if f == "request_fee"
                                                         else _PER_TOKEN))
    return out


def _from_row(row: Any) -> ModelPrice:
    values: dict[str, Decimal | None] = {}
    for f in FIELDS:
        raw = getattr(row, f)
        values[f] = None if raw is None else Decimal(raw) / (
            _PER_CALL if f == "request_fee" else _PER_TOKEN)
    return ModelPrice(**values)  # type: ignore[arg-type]


class PriceBook:
    """Prices in force by model and time, from the config and the catalog table (re-read
    every `refresh_seconds`, so a price set through any worker reaches every worker)."""

    def __init__(self, engine: Engine | None, models: tuple[ModelConfig, ...],
                 refresh_seconds: float = 5.0, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.models = {m.name: m for m in models}
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._loaded_at = -1e9
        self._have_catalog = False  # read from the database at least once
        self._versions: dict[str, list[PriceVersion]] = {}
        self._starts: dict[str, list[datetime]] = {}

    def _load(self) -> dict[str, list[PriceVersion]]:
        now = time.monotonic()
        if now - self._loaded_at < self.refresh_seconds:
            return self._versions
        with self._lock:
            if now - self._loaded_at < self.refresh_seconds:
                return self._versions
            versions: dict[str, list[PriceVersion]] = {
                m.name: [PriceVersion(m.name, EPOCH, m.price, "config")]
                for m in self.models.values() if m.price is not None}
            rows: list[Any] = []
            if self.engine is not None:
                try:
                    with self.engine.connect() as conn:
                        rows = list(conn.execute(select(ModelPriceVersion.__table__).order_by(
                            ModelPriceVersion.model, ModelPriceVersion.effective_from)))
                except Exception:  # noqa: BLE001 - the database is down (calls are spooled)
                    log.warning("could not read the price catalog; keeping the prices read "
                                "before, trying again in %d s", RETRY_SECONDS)
                    # not again on every call (each would wait on the database): in a while
                    self._loaded_at = now - self.refresh_seconds + RETRY_SECONDS
                    if not self._have_catalog:  # never read yet: the config's for now
                        self._versions = versions
                    return self._versions  # else what was read before still holds
            for r in rows:
                versions.setdefault(r.model, []).append(
                    PriceVersion(r.model, r.effective_from, _from_row(r), r.source))
            for items in versions.values():
                items.sort(key=lambda v: v.effective_from)
            # each model's start times, for the lookup on every metered call
            self._starts = {m: [v.effective_from for v in items] for m, items in versions.items()}
            self._versions, self._loaded_at, self._have_catalog = versions, now, True
            return versions

    def refresh(self) -> None:
        self._loaded_at = -1e9

    def price_at(self, model: str, at: datetime) -> ModelPrice | None:
        """The version in force at `at` (None: the model has no price then)."""
        items = self._load().get(model)
        if not items:
            return None
        starts = self._starts.get(model) or [v.effective_from for v in items]
        i = bisect.bisect_right(starts, at) - 1
        return items[i].price if i >= 0 else None

    def versions(self, model: str | None = None) -> list[PriceVersion]:
        found = self._load()
        return [v for name in sorted(found) if model in (None, name) for v in found[name]]

    # -- changing the catalog -------------------------------------------------------------

    def earliest(self) -> datetime:
        """The soonest a new price may take effect: every worker has read it by then (they
        re-read the catalog every refresh_seconds), so each call is priced at the version in
        force when it happens, whichever worker serves it."""
        return (self.clock() + timedelta(seconds=self.refresh_seconds)).replace(microsecond=0) \
            + (timedelta(seconds=1) if self.refresh_seconds else timedelta(0))

    def add(self, model: str, effective_from: datetime | None, price: ModelPrice,
            source: str, actor: Actor | None = None) -> PriceVersion:
        """A new version from `effective_from` (default: as soon as every worker knows it);
        never one in the past: calls already priced keep their price."""
        if model not in self.models:
            raise NotFoundError(f"No model {model!r} in the config.", param="model")
        now = self.clock()
        when = effective_from or self.earliest()
        if when.tzinfo is None:
            raise InvalidRequestError("effective_from needs a time zone", param="effective_from")
        if when < now.replace(microsecond=0) + timedelta(seconds=self.refresh_seconds):
            raise InvalidRequestError(
                f"effective_from is in the past or too soon: calls already metered keep the "
                f"price they were metered at, and a new price needs {self.refresh_seconds:g} s "
                f"to reach every worker; give {self.earliest().isoformat()} or later.",
                param="effective_from")
        assert self.engine is not None
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(ModelPriceVersion).values(
                    model=model, effective_from=when, source=source[:200], created_at=now,
                    **_to_row(price)))
                self._audit(conn, actor, PriceVersion(model, when, price, source))
        except IntegrityError as exc:
            raise ConflictError(f"{model} already has a price from {when.isoformat()}.",
                                code="price_exists") from exc
        self.refresh()
        return PriceVersion(model, when, price, source)

    def _audit(self, conn: Any, actor: Actor | None, version: PriceVersion) -> None:
        """before: the price that was to be in force then; after: the new version."""
        prior = self.price_at(version.model, version.effective_from)
        before = None if prior is None else PriceVersion(
            version.model, version.effective_from, prior, "").as_dict()
        if before is not None:
            del before["source"], before["effective_from"]
        record(conn, actor, "price.create", target_type="model_price",
               target_id=f"{version.model}@{version.effective_from.isoformat()}", app_id=None,
               before=before, after=version.as_dict())

    def import_sheet(self, text: str, fmt: str, source: str,
                     actor: Actor | None = None) -> list[PriceVersion]:
        """Import a price sheet: JSON (a list of objects, or {"prices": [...]}) or CSV with a
        header (model, effective_from, input, output, ...). All or nothing."""
        rows = _sheet_rows(text, fmt)
        parsed = []
        for n, row in enumerate(rows, 1):
            try:
                model = str(row.get("model") or "")
                when = _when(row.get("effective_from"))
                parsed.append((model, when, parse_price(row)))
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"row {n}: {exc.detail}", param=exc.param) from exc
        now, soonest = self.clock(), self.earliest()
        for model, when, _ in parsed:
            if model not in self.models:
                raise NotFoundError(f"No model {model!r} in the config.", param="model")
            if (when or soonest) < soonest - timedelta(seconds=1):
                raise InvalidRequestError(f"{model}: effective_from is in the past or sooner "
                                          f"than {soonest.isoformat()}.",
                                          param="effective_from")
        assert self.engine is not None
        out = []
        try:
            with self.engine.begin() as conn:
                for model, when, price in parsed:
                    conn.execute(insert(ModelPriceVersion).values(
                        model=model, effective_from=when or soonest, source=source[:200],
                        created_at=now, **_to_row(price)))
                    out.append(PriceVersion(model, when or soonest, price, source))
                    self._audit(conn, actor, out[-1])
        except IntegrityError as exc:
            raise ConflictError("The sheet names a price that exists already (same model and "
                                "effective_from): nothing was imported.",
                                code="price_exists") from exc
        self.refresh()
        return out


def _when(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidRequestError(f"effective_from {value!r} is not an ISO 8601 time",
                                  param="effective_from") from exc
    if when.tzinfo is None:
        raise InvalidRequestError("effective_from needs a time zone", param="effective_from")
    try:
        return bounded_time(when, "effective_from")
    except ValidationError as exc:
        raise InvalidRequestError(str(exc.messages[0]), param="effective_from") from exc


def _sheet_rows(text: str, fmt: str) -> list[dict[str, Any]]:
    if fmt == "json":
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequestError(f"The sheet is not JSON: {exc}") from exc
        rows = doc.get("prices") if isinstance(doc, dict) else doc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise InvalidRequestError("A JSON sheet is a list of prices, or {\"prices\": [...]}")
        return rows
    if fmt == "csv":
        try:
            reader = csv.DictReader(io.StringIO(text))
            if not reader.fieldnames or "model" not in reader.fieldnames:
                raise InvalidRequestError("A CSV sheet needs a header with model, input, "
                                          "output")
            unknown = set(reader.fieldnames) - {"model", "effective_from", *FIELDS}
            if unknown:
                raise InvalidRequestError(f"Unknown CSV columns {sorted(unknown)}")
            return [dict(r) for r in reader]
        except csv.Error as exc:
            raise InvalidRequestError(f"The sheet is not valid CSV: {exc}") from exc
    raise InvalidRequestError("format must be json or csv", param="format")
