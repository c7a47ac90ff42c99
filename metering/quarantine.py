"""The ledger's quarantine: usage records the database refused, or that break the ledger's own
rules, kept with the reason. Nothing here is retried on its own, so a poisoned record can
neither block start-up nor stop the writer; an operator lists, exports or retries them
(`meterlane ledger quarantine ...`). If even the quarantine table cannot take a record, it
goes to a file beside the spool, and is moved into the table when the table is next read."""

from __future__ import annotations

import logging
import os
import reprlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Engine

from core.audit import Actor, record
from core.db import utcnow
from core.logs import note as safe_note
from core.text import storable
from metering.models import QuarantinedRecord

log = logging.getLogger(__name__)
_Q = QuarantinedRecord
INT64 = 2**63 - 1


def describe(value: Any) -> str:
    """A short text of any value, for a log line: never raises, whatever it holds."""
    try:
        short = reprlib.Repr()
        short.maxstring = short.maxother = 200
        return short.repr(value)
    except Exception:  # noqa: BLE001 - a log line must not fail
        return f"<{type(value).__name__}>"


def note(level: int, message: str, *args: Any) -> None:
    """A log line on the ledger's path (never raises)."""
    safe_note(log, level, message, *args)


def to_json(row: dict[str, Any]) -> str:
    """The record as JSON text that any database stores: times in ISO form, integers past 64
    bits as strings, odd characters escaped (never a NUL byte, never a lone surrogate)."""
    def plain(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, bool) or value is None or isinstance(value, float):
            return value
        if isinstance(value, int):
            return value if -INT64 <= value <= INT64 else str(value)
        if isinstance(value, str):
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return describe(value)
    return orjson.dumps({str(k): plain(v) for k, v in row.items()}).decode()


def from_json(text: str) -> dict[str, Any]:
    row: dict[str, Any] = orjson.loads(text)
    if isinstance(row.get("created_at"), str):
        try:
            row["created_at"] = datetime.fromisoformat(row["created_at"])
        except ValueError:
            pass  # stays text: the record's check names it
    return row


@dataclass(frozen=True)
class Entry:
    id: int
    created_at: datetime
    source: str
    reason: str
    request_id: str | None
    payload: str
    resolved_at: datetime | None
    resolution: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "created_at": self.created_at.isoformat(), "source": self.source,
                "reason": self.reason, "request_id": self.request_id,
                "record": orjson.loads(self.payload),
                "resolved_at": self.resolved_at.isoformat() if self.resolved_at else None,
                "resolution": self.resolution}


class Quarantine:
    def __init__(self, engine: Engine, folder: Path) -> None:
        self.engine = engine
        self.folder = folder

    def put(self, row: dict[str, Any], reason: str, source: str) -> None:
        """Keep a refused record with its reason; raises only when neither the table nor the
        file could take it."""
        payload = to_json(row)
        now = utcnow()
        values: dict[str, Any] = {
            "created_at": now, "source": source, "reason": storable(reason, 500),
            "request_id": storable(str(row.get("request_id") or ""), 40) or None,
            "payload": payload}
        note(logging.ERROR, "usage record of request %s quarantined (%s): %s",
                  values["request_id"], values["reason"], describe(row))
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(QuarantinedRecord).values(**values))
        except Exception as exc:  # noqa: BLE001 - the file below keeps it
            note(logging.ERROR, "the quarantine table refused a record (%s); keeping it in a "
                 "file", describe(exc))
            self._append_file({**values, "created_at": now.isoformat()})

    def _file(self) -> Path:
        return self.folder / f"quarantine-{os.getpid()}.jsonl"

    def _append_file(self, values: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._file(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, orjson.dumps(values) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def _absorb_files(self) -> None:
        """Move records kept in files into the table (once the table takes them)."""
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("quarantine-*.jsonl")):
            claimed = path.with_suffix(f".{os.getpid()}.absorbing")
            try:
                path.rename(claimed)
            except FileNotFoundError:
                continue
            try:
                rows = [orjson.loads(line) for line in claimed.read_bytes().splitlines()
                        if line.strip()]
                with self.engine.begin() as conn:
                    for values in rows:
                        values["created_at"] = datetime.fromisoformat(values["created_at"])
                        conn.execute(insert(QuarantinedRecord).values(**values))
            except Exception as exc:  # noqa: BLE001 - left as a file, read next time
                note(logging.ERROR, "could not move %s into the quarantine table: %s",
                     path.name, describe(exc))
                claimed.rename(path)
                continue
            claimed.unlink()

    def file_count(self) -> int:
        if not self.folder.is_dir():
            return 0
        return sum(len([x for x in p.read_bytes().splitlines() if x.strip()])
                   for p in self.folder.glob("quarantine-*.jsonl"))

    def count(self) -> int:
        """Records waiting in quarantine (table and files)."""
        with self.engine.connect() as conn:
            held = conn.execute(select(func.count()).select_from(_Q).where(
                _Q.resolved_at.is_(None))).scalar() or 0
        return int(held) + self.file_count()

    def count_since(self, since: datetime | None) -> int:
        """Records put in quarantine since then (all of them for None), files included."""
        stmt = select(func.count()).select_from(_Q).where(_Q.resolved_at.is_(None))
        if since is not None:
            stmt = stmt.where(_Q.created_at >= since)
        with self.engine.connect() as conn:
            held = conn.execute(stmt).scalar() or 0
        return int(held) + self.file_count()

    def entries(self, *, include_resolved: bool = False, after: int = 0,
                limit: int = 1000) -> list[Entry]:
        self._absorb_files()
        stmt = select(_Q).where(_Q.id > after).order_by(_Q.id).limit(limit)
        if not include_resolved:
            stmt = stmt.where(_Q.resolved_at.is_(None))
        with self.engine.connect() as conn:
            return [Entry(r.id, r.created_at, r.source, r.reason, r.request_id, r.payload,
                          r.resolved_at, r.resolution)
                    for r in conn.execute(stmt.with_only_columns(*_Q.__table__.columns))]

    def all_entries(self, include_resolved: bool = False) -> Iterator[Entry]:
        after = 0
        while True:
            page = self.entries(include_resolved=include_resolved, after=after)
            yield from page
            if len(page) < 1000:
                return
            after = page[-1].id

    def retry(self, write: Callable[[dict[str, Any]], str],
              ids: list[int] | None = None, actor: Actor | None = None) -> dict[str, int]:
        """Try each record again through `write` (the ledger's own checks and insert): a
        record written (or found already there) leaves the quarantine; one refused again
        stays, with the new reason. Returns how many ended each way. Each retry is audited
        (the actor: the CLI's)."""
        outcome = {"written": 0, "duplicate": 0, "refused": 0}
        for entry in list(self.all_entries()):
            if ids is not None and entry.id not in ids:
                continue
            try:
                result = write(from_json(entry.payload))
            except Exception as exc:  # noqa: BLE001 - refused again: the reason is kept
                result, reason = "refused", f"{type(exc).__name__}: {exc}"
            else:
                reason = result
            with self.engine.begin() as conn:
                if result in ("written", "duplicate"):
                    after: dict[str, Any] = {"resolved_at": datetime.now(UTC),
                                             "resolution": result}
                else:
                    after = {"reason": storable(reason, 500)}
                conn.execute(update(_Q).where(_Q.id == entry.id).values(**after))
                record(conn, actor, "quarantine.retry", target_type="quarantined_record",
                       target_id=entry.id, app_id=_app_of(entry.payload),
                       before={"reason": entry.reason, "resolution": entry.resolution},
                       after=after)
            outcome[result if result in outcome else "refused"] += 1
        return outcome


def _app_of(payload: str) -> int | None:
    """The app of a quarantined record, when its payload names one as an integer."""
    try:
        app_id = orjson.loads(payload).get("app_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return app_id if isinstance(app_id, int) and 0 < app_id <= INT64 else None
