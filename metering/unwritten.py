"""Calls answered before their ledger row is committed, and the wait for them.

Served under gevent (the gunicorn workers), the gateway answers a call once its ledger row is
priced and written to the worker's intent journal (metering/intents.py), and the row is
committed a moment later by the ledger's group commit, off the answer's path. A worker that
dies in between loses nothing: its journal's row is written by the next process that starts
(or by `meterlane ledger replay`). Elsewhere (tests, the CLI) the row is committed before the
answer, as always.

What the client may then see is a read racing the commit: usage read right after an answer,
through another worker of the same machine. Each process therefore keeps two counters in a
small file of its own in the spool folder: calls answered before their commit, and how many
of those are committed. A request that reads the ledger first waits until every live process
has committed what it had answered when the request came in (`caught_up`): reads see every
answer given before them, on every worker of the machine, as they did when the commit came
first. A process that is gone is not waited for (its rows are replayed from its journal)."""

from __future__ import annotations

import atexit
import os
import struct
import time
from collections.abc import Iterable
from pathlib import Path

from flask import Flask, request

from metering.intents import process_alive

_PAIR = struct.Struct("<QQ")  # answered, committed
_PREFIX = "unwritten-"
POLL_S = 0.001  # how often a waiting read looks again (a commit takes about a millisecond)


class Unwritten:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None
        self._pid: int | None = None
        self.answered = 0
        self.committed = 0

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # first use, or after a fork
            self.folder.mkdir(parents=True, exist_ok=True)
            self._pid = os.getpid()
            self.answered = self.committed = 0
            self._fd = os.open(self.folder / f"{_PREFIX}{self._pid}", os.O_RDWR | os.O_CREAT,
                               0o600)
            atexit.register(self.drain)
        return self._fd

    def answering(self) -> None:
        """A call is about to be answered before its row is committed."""
        fd = self._file()  # (first: a new process's counters start at zero)
        self.answered += 1
        os.pwrite(fd, _PAIR.pack(self.answered, self.committed), 0)

    def written(self) -> None:
        """A row answered before its commit is committed (or spooled: either way it is out of
        this process's hands)."""
        fd = self._file()
        self.committed += 1
        os.pwrite(fd, _PAIR.pack(self.answered, self.committed), 0)

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait (at most `timeout` seconds) for this process's answered rows to be committed:
        a worker that stops (gunicorn's graceful or quick shutdown, which exit through Python)
        commits what it answered first. (A row left, past the timeout or after kill -9, is in
        the journal: the next start writes it.)"""
        deadline = time.monotonic() + timeout
        while self._pid == os.getpid() and self.committed < self.answered:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        return True

    def install(self, app: Flask, *, skip: Iterable[str]) -> None:
        """Every request but those of the `skip` blueprints or endpoints (the calls
        themselves; liveness and readiness, which answer at once) waits for the calls
        answered before it to be committed."""
        skipped = frozenset(skip)

        @app.before_request
        def see_answered_calls() -> None:
            if request.blueprint not in skipped and request.endpoint not in skipped:
                self.caught_up()

    def caught_up(self, timeout: float = 2.0) -> bool:
        """Wait (at most `timeout` seconds) until every live process of this machine has
        committed the rows it had answered when this was called. False on timeout."""
        waiting: list[tuple[Path, int]] = []
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return True
        for name in names:
            if not name.startswith(_PREFIX):
                continue
            path = self.folder / name
            owner = name[len(_PREFIX):]
            if owner.isdigit() and not process_alive(int(owner)):
                path.unlink(missing_ok=True)  # its journal has the rows it had not committed
                continue
            pair = _read(path)
            if pair is not None and pair[1] < pair[0]:
                waiting.append((path, pair[0]))
        deadline = time.monotonic() + timeout
        while waiting:
            waiting = [(path, answered) for path, answered in waiting
                       if (pair := _read(path)) is not None and pair[1] < answered]
            if waiting:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(POLL_S)
        return True


def _read(path: Path) -> tuple[int, int] | None:
    try:
        with path.open("rb") as f:
            data = f.read(_PAIR.size)
    except FileNotFoundError:
        return None
    if len(data) < _PAIR.size:
        return None
    answered, committed = _PAIR.unpack(data)
    return answered, committed
