"""A worker's intent journal is rewritten with only its open calls once it grows past a size.
With more open calls than that size (a backlog of answered calls waiting for their commit),
the journal was rewritten, whole, at every call's close: quadratic in the backlog, and it
kept the backlog from draining. A rewrite must follow as many bytes appended as it writes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from metering import intents as intents_module
from metering.intents import IntentJournal


def open_calls(journal: Path, tmp: Path) -> set[str]:
    """The calls a journal holds open, read as recovery reads a dead worker's journal."""
    folder = tmp / "read"
    folder.mkdir(exist_ok=True)
    shutil.copy(journal, folder / "intent-retry0.jsonl")  # a name no live process owns
    return {str(i.get("request_id") or i["settled"]["request_id"])
            for _, found in IntentJournal(folder).orphans() for i in found}


def test_closing_a_backlog_rewrites_the_journal_in_proportion(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intents_module, "ROTATE_BYTES", 2_000)
    journal = IntentJournal(tmp_path / "spool")
    ids = [f"req_{i:04d}" for i in range(300)]
    for rid in ids:  # 300 open calls: about ten times ROTATE_BYTES
        journal.open({"request_id": rid, "model": "m", "estimate": 12})
    for rid in ids[::2]:  # half of them answered: their rows replace their intents
        journal.settled(rid, {"request_id": rid, "input_tokens": 3, "output_tokens": 4})
    path = journal._path(journal._pid or 0)
    appended = path.stat().st_size
    rewritten, inode = 0, path.stat().st_ino
    for n, rid in enumerate(ids, 1):
        before = path.stat().st_size
        journal.close(rid)
        now = path.stat()
        if now.st_ino != inode:  # renamed over: rewritten
            rewritten += now.st_size
            inode = now.st_ino
        else:
            appended += now.st_size - before
        if n == 150:
            assert open_calls(path, tmp_path) == set(ids[150:])
    assert open_calls(path, tmp_path) == set()
    # each rewrite follows at least as many bytes appended as it writes
    assert rewritten <= appended, (rewritten, appended)
