"""Waiting for a state a test cannot be told about (another process's rows, a child that
restarts, a thread blocked on a held read): poll it, with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(what: Callable[[], T], timeout: float = 60, about: str = "",
             interval: float = 0.05) -> T:
    """Call `what` until it returns something true, and return that; fail the test after
    `timeout` seconds, naming `about`."""
    deadline = time.monotonic() + timeout
    while True:
        found = what()
        if found:
            return found
        assert time.monotonic() < deadline, f"not in {timeout} s: {about or what}"
        time.sleep(interval)  # polling the state, not synchronising with it
