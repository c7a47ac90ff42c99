"""Work that must not hold up a response, run beside it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)


def run_inline(fn: Callable[[], None]) -> None:
    """The runner outside gevent: the job runs at once, in the caller."""
    fn()


def background_runner() -> Callable[[Callable[[], None]], None]:
    """A greenlet per job when gevent has patched this process (the gunicorn workers), else
    the job runs inline (tests, the CLI). Jobs log their own failures."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("socket"):
        return run_inline
    import gevent

    def spawn(fn: Callable[[], None]) -> None:
        gevent.spawn(fn)

    return spawn
