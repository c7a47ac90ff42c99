"""The worker beside serve (core/server.py _Kept) is started again whenever it exits, also after
a start that failed (the program missing for a moment, no memory): the scheduled jobs never
stay without a worker while serve runs. The tests/e2e/test_worker.py serve test kills it."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

from core import server
from tests.support.polling import wait_for


def test_a_start_that_fails_is_tried_again_until_one_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(server, "RESTART_PAUSE", (0.01, 0.05))
    runs = tmp_path / "runs"
    program = tmp_path / "child.sh"
    program.write_text(f"#!/bin/sh\necho run >> {runs}\nexec sleep 60\n")
    program.chmod(0o755)

    def started(n: int) -> bool:
        return runs.exists() and len(runs.read_text().split()) == n

    caplog.set_level(logging.WARNING, logger="core.server")
    kept = server._Kept([str(program)], dict(os.environ))
    try:
        wait_for(lambda: started(1), 20, "the first start", interval=0.01)
        program.rename(tmp_path / "moved")  # the program is gone (a deploy, say) ...
        os.kill(kept.proc.pid, signal.SIGKILL)  # ... as the worker dies
        wait_for(lambda: "could not start the worker beside serve" in caplog.text, 20,
                 "a failed start", interval=0.01)
        (tmp_path / "moved").rename(program)  # back: the next try starts it
        wait_for(lambda: started(2), 20, "the start after the failed ones", interval=0.01)
        assert "exited (code -9)" in caplog.text
    finally:
        kept.stop()
    assert kept.proc.poll() is not None  # stopped with its owner
