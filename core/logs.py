"""Log lines on paths where a record or money is at stake: a failing log handler (a full disk,
a broken collector) must never stop a usage record from being kept or a call from being
recorded."""

from __future__ import annotations

import logging
from typing import Any


def note(logger: logging.Logger, level: int, message: str, *args: Any) -> None:
    """logger.log(level, message, *args), never raising."""
    try:
        logger.log(level, message, *args)
    except Exception:  # noqa: BLE001, S110 - the record matters more than its log line
        pass
