"""A folder of fsync'd JSON-lines files: what could not be written while the database was
away, kept until a replay drains it (the ledger's usage rows, the gateway's meter events)."""

from __future__ import annotations

import fcntl
import functools
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from metering.intents import process_alive


class Spool:
    """Lines appended to `<prefix>-<pid>.jsonl` in one folder (each synced before `append`
    returns), drained by `drain`: each file is claimed by a rename, so two processes never
    replay the same line; a file claimed by a process that died mid-replay is claimed again."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder = folder
        self.prefix = prefix
        self._lock = threading.Lock()

    def path(self) -> Path:
        return self.folder / f"{self.prefix}-{os.getpid()}.jsonl"

    def append(self, row: dict[str, Any]) -> None:
        line = orjson.dumps(row) + b"\n"
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.path()
            while True:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A replayer may have claimed (renamed) the file between open and lock.
                if _same_file(fd, path):
                    break
                os.close(fd)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def count(self) -> int:
        """Lines waiting for a replay (every process's: one folder)."""
        return sum(_lines(path) for path in self.folder.glob(f"{self.prefix}-*.jsonl"))

    def drain(self, replay_line: Callable[[bytes], str]) -> int:
        """Hand every spooled line to `replay_line`, which answers what became of it
        ("written", "duplicate", "quarantined", ...) or "away": the database cannot take it
        now, and that line and the rest stay in the spool for the next drain. Returns how
        many were written."""
        written = 0
        if not self.folder.is_dir():
            return 0
        for path in sorted(self.folder.iterdir()):
            if path.name.endswith(".replaying"):
                if _claimer_alive(path.name):
                    continue
            elif not path.name.startswith(f"{self.prefix}-"):
                continue
            claimed = self.folder / f"replay-{os.getpid()}-{uuid.uuid4().hex}.replaying"
            try:
                path.rename(claimed)
            except FileNotFoundError:
                continue  # another process claimed it
            with claimed.open("rb") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)  # wait out a writer mid-append
                lines = [raw for raw in fh.read().splitlines() if raw.strip()]
            for n, raw in enumerate(lines):
                result = replay_line(raw)
                if result == "away":  # keep this line and the rest for the next replay
                    self._respool(lines[n:])
                    claimed.unlink()
                    return written
                written += result == "written"
            claimed.unlink()
        return written

    def _respool(self, lines: list[bytes]) -> None:
        """Lines not replayed, back in the spool: written whole and synced under a name no
        replay reads, then renamed into place (atomic)."""
        token = f"{os.getpid()}-{uuid.uuid4().hex}"
        tmp = self.folder / f".rest-{token}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\n".join(lines) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.rename(self.folder / f"{self.prefix}-rest-{token}.jsonl")


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            chunks = iter(functools.partial(f.read, 1 << 16), b"")
            return sum(chunk.count(b"\n") for chunk in chunks)
    except FileNotFoundError:  # replayed and removed meanwhile
        return 0


def _claimer_alive(name: str) -> bool:
    """Whether the process that claimed a spool file for replay (its pid is in the name:
    replay-PID-..., or usage-PID-... from earlier versions) still runs."""
    parts = name.split("-")
    return len(parts) >= 2 and parts[1].isdigit() and process_alive(int(parts[1]))


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
