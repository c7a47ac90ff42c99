"""Intents: a line written before a call is forwarded, so that a call whose worker dies
(kill -9, out of memory) after the upstream served it is still recorded. Each worker appends
to a journal of its own; a line "done" follows once the call's ledger row is written. A
later process (a new worker starting, `meterlane ledger replay`) reads the journals of workers
that are gone and records each call left open as `worker_lost`, with its estimated usage:
finance sees its inference cost even though the client saw an error. A call answered before
its row was committed (metering/unwritten.py) has a line "settled" with that row: the row is
written as it was answered.

The journal is the page cache's (no fsync per call: a killed process loses nothing; a
crashed machine may lose the last lines)."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from core.logs import note

log = logging.getLogger(__name__)
# A journal is rewritten with only its open intents once it is past ROTATE_BYTES and at least
# twice what they hold: each rewrite then follows as many bytes appended as it writes, so its
# cost stays proportional to the calls (a backlog of open intents past ROTATE_BYTES must not
# make every call's close rewrite all of them).
ROTATE_BYTES = 4 * 1024 * 1024


class IntentJournal:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid: int | None = None
        self._open: dict[str, bytes] = {}  # request id -> its line, while the call runs
        self._size = 0  # the journal file's length
        self._live = 0  # the bytes of the lines in _open

    def _path(self, pid: int) -> Path:
        return self.folder / f"intent-{pid}.jsonl"

    def _ensure(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # first use, or after a fork
            self.folder.mkdir(parents=True, exist_ok=True)
            self._pid = os.getpid()
            self._open = {}
            self._live = 0
            self._fd = os.open(self._path(self._pid), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                               0o600)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def open(self, intent: dict[str, Any]) -> None:
        """Before forwarding: what the call is and what it may cost (never fails a call)."""
        line = orjson.dumps(intent, default=str) + b"\n"
        try:
            with self._lock:
                fd = self._ensure()
                os.write(fd, line)
                self._size += len(line)
                self._keep(str(intent["request_id"]), line)
        except OSError as exc:
            note(log, logging.ERROR, "could not write the intent of request %s: %s",
                 intent.get("request_id"), exc)

    def settled(self, request_id: str, row: dict[str, Any],
                meters: list[tuple[str, str]] | None = None) -> None:
        """The call's ledger row, priced, and the (meter, item) events it caused upstream,
        before the call is answered and they are committed (metering/unwritten.py): a worker
        that dies before the commit leaves the very row and events."""
        doc: dict[str, Any] = {"settled": row}
        if meters:
            doc["meters"] = meters
        line = orjson.dumps(doc, default=str) + b"\n"
        try:
            with self._lock:
                fd = self._ensure()
                os.write(fd, line)
                self._size += len(line)
                self._keep(request_id, line)
        except OSError as exc:
            note(log, logging.ERROR, "could not write the row of request %s: %s",
                 request_id, exc)

    def close(self, request_id: str) -> None:
        """After the call's ledger row is written (or spooled, or quarantined)."""
        line = orjson.dumps({"done": request_id}) + b"\n"
        try:
            with self._lock:
                kept = self._open.pop(request_id, None)
                if kept is None:
                    return
                self._live -= len(kept)
                fd = self._ensure()
                os.write(fd, line)
                self._size += len(line)
                if self._size > ROTATE_BYTES and self._size > 2 * self._live:
                    self._rotate()
        except OSError as exc:
            note(log, logging.ERROR, "could not close the intent of request %s: %s",
                 request_id, exc)

    def _keep(self, request_id: str, line: bytes) -> None:
        """The call's line to keep while it is open (its "settled" line replaces its intent)."""
        old = self._open.get(request_id)
        self._live += len(line) - (len(old) if old is not None else 0)
        self._open[request_id] = line

    def _rotate(self) -> None:
        """Rewrite the journal with only the calls still running (atomic rename)."""
        assert self._pid is not None
        tmp = self.folder / f".intent-{self._pid}-{uuid.uuid4().hex}.tmp"
        body = b"".join(self._open.values())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        tmp.rename(self._path(self._pid))
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self._path(self._pid), os.O_WRONLY | os.O_APPEND)
        self._size = len(body)

    def orphans(self) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
        """Each journal of a process that is gone, with the intents it left open."""
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("intent-*.jsonl")):
            owner = path.stem.split("-", 1)[1]
            if owner.isdigit() and process_alive(int(owner)):
                continue  # (a journal kept for a retry names no process: it is read)
            claimed = path.with_name(f"claimed-{os.getpid()}-{uuid.uuid4().hex}.jsonl")
            try:
                path.rename(claimed)
            except FileNotFoundError:
                continue  # another process took it
            opened: dict[str, dict[str, Any]] = {}
            for raw in claimed.read_bytes().splitlines():
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue  # a line cut by the kill: nothing was forwarded after it
                if "done" in doc:
                    opened.pop(str(doc["done"]), None)
                elif "settled" in doc:  # its row, priced: replaces the intent's estimate
                    opened[str(doc["settled"].get("request_id"))] = doc
                elif "request_id" in doc:
                    opened[str(doc["request_id"])] = doc
            yield claimed, list(opened.values())

    def recover(self, record_lost: Callable[[dict[str, Any]], None]) -> int:
        """Record every call a dead worker left open (`record_lost` writes its row, unless
        the ledger has it); a journal is removed once all its calls are recorded."""
        done = 0
        for claimed, intents in self.orphans():
            try:
                for intent in intents:
                    record_lost(intent)
                    done += 1
            except Exception as exc:  # noqa: BLE001 - kept for the next start
                note(log, logging.ERROR, "recovering lost calls from %s failed: %s",
                     claimed.name, exc)
                claimed.rename(claimed.with_name(f"intent-retry{uuid.uuid4().hex[:8]}.jsonl"))
                # (its calls already recorded are found in the ledger next time, not doubled)
                continue
            claimed.unlink()
        return done


def process_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (this one does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
