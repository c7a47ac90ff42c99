"""Meter events that a call the gateway relayed caused upstream (the web searches a Responses
upstream ran): recorded after the call's ledger row, once per item, never refused and never
failing the call; spooled to disk while the database is away and replayed with the ledger's
spool."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import orjson

from core.errors import DomainError
from metering.ledger import is_poison
from metering.meters import MeterService
from metering.quarantine import describe, note
from metering.records import CallRecord
from metering.spool import Spool

log = logging.getLogger(__name__)


class RelayedEvents:
    """Records (meter id, item id) pairs for a relayed call. An item of a meter that is not
    in [[meters]] is not recorded. Each event's idempotency key is `<request id>:<item id>`:
    the same item is one event however often it is seen or replayed."""

    def __init__(self, meters: MeterService, spool: Spool,
                 on_error: Callable[[str], None] = lambda _kind: None) -> None:
        self.meters = meters
        self.spool = spool
        self.on_error = on_error  # counts a failure by kind (a metric)

    def record(self, call: CallRecord, items: Iterable[tuple[str, str]]) -> int:
        """Record each item's event for the call's end user; returns how many were new. Never
        raises: an event the database cannot take now is spooled, anything else is logged
        and counted."""
        return self._record(call.app_id, call.end_user_id, call.request_id,
                            call.created_at.isoformat(), items)

    def record_items(self, row: dict[str, Any], items: Iterable[Any]) -> int:
        """record() for a call known by its ledger row (a dead worker's journal)."""
        try:
            pairs = [(str(meter), str(item)) for meter, item in items]
            return self._record(int(row["app_id"]), int(row["end_user_id"]),
                                str(row["request_id"]), str(row["created_at"]), pairs)
        except (KeyError, TypeError, ValueError) as exc:  # a journal line cut or mangled
            self._failed("meter_event_lost", {"request_id": row.get("request_id")}, exc)
            return 0

    def _record(self, app_id: int, end_user_id: int, request_id: str, occurred_at: str,
                items: Iterable[tuple[str, str]]) -> int:
        new, away = 0, None
        for meter_id, item_id in dict.fromkeys(items):
            if self.meters.config.meter(meter_id) is None:
                continue
            row = {"app_id": app_id, "end_user_id": end_user_id, "meter": meter_id,
                   "key": f"{request_id}:{item_id}", "request_id": request_id,
                   "occurred_at": occurred_at}
            if away is not None:  # the database failed this call's last event: the rest
                self._spool(row, away)  # are not tried one by one
                continue
            try:
                new += self._write(row) == "written"
            except DomainError as exc:  # can never be recorded (a key reused by another meter)
                self._failed("meter_event_refused", row, exc)
            except Exception as exc:  # noqa: BLE001 - the database is away: kept on disk
                away = exc
                self._spool(row, exc)
        return new

    def _spool(self, row: dict[str, Any], exc: Exception) -> None:
        self._failed("meter_event_spooled", row, exc)
        try:
            self.spool.append(row)
        except Exception:  # noqa: BLE001 - neither database nor disk took it
            self._failed("meter_event_lost", row, exc)

    def _write(self, row: dict[str, Any]) -> str:
        outcome = self.meters.record_for_user(
            int(row["app_id"]), int(row["end_user_id"]), str(row["meter"]), str(row["key"]),
            datetime.fromisoformat(row["occurred_at"]), str(row["request_id"]))
        return "duplicate" if outcome.duplicate else "written"

    def _failed(self, kind: str, row: dict[str, Any], exc: Exception) -> None:
        level = logging.CRITICAL if kind == "meter_event_lost" else logging.ERROR
        note(level, "meter event %s of request %s (%s): %s", describe(row.get("key")),
             describe(row.get("request_id")), kind, describe(exc))
        try:
            self.on_error(kind)
        except Exception:  # noqa: BLE001, S110 - a metric never stops the call
            pass

    def spooled(self) -> int:
        return self.spool.count()

    def replay(self) -> int:
        """Record every spooled event; returns how many were written. A database still away
        stops the replay with the rest kept; an event that can never be recorded (its meter
        is no longer configured, a value the database refuses) is logged with its data and
        dropped. Never raises."""
        return self.spool.drain(self._replay_line)

    def _replay_line(self, raw: bytes) -> str:
        try:
            row = orjson.loads(raw)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            return self._write(row)
        except (DomainError, ValueError, KeyError, TypeError) as exc:
            note(logging.CRITICAL, "spooled meter event dropped, it can never be recorded "
                 "(%s): %s", describe(exc), raw.decode("utf-8", "replace")[:500])
            return "dropped"
        except Exception as exc:  # noqa: BLE001 - sorted as the ledger's replay sorts it
            if is_poison(exc):
                note(logging.CRITICAL, "spooled meter event dropped, the database refuses it "
                     "(%s): %s", describe(exc), raw.decode("utf-8", "replace")[:500])
                return "dropped"
            note(logging.ERROR, "replaying the meter event spool stopped, the database is "
                 "away: %s", describe(exc))
            return "away"
