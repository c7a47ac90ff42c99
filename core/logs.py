"""Log lines: one format per process (MLANE_LOG_FORMAT: text for a person, json for a
collector), set up once; lines with fields (a request's, a job's) in that format; and `note`
for paths where a record or money is at stake: a failing log handler (a full disk, a broken
collector) must never stop a usage record from being kept or a call from being recorded."""

from __future__ import annotations

import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

FIELDS = "fields"  # the LogRecord attribute that carries a line's fields (extra={FIELDS: ...})
_STANDARD = ("ts", "level", "logger", "msg", "pid")


def note(logger: logging.Logger, level: int, message: str, *args: Any) -> None:
    """logger.log(level, message, *args), never raising."""
    try:
        logger.log(level, message, *args)
    except Exception:  # noqa: BLE001, S110 - the record matters more than its log line
        pass


def event(logger: logging.Logger, message: str, fields: dict[str, Any],
          level: int = logging.INFO) -> None:
    """A line with fields (a request's, a job's), never raising; nothing is built when the
    level is off."""
    if not logger.isEnabledFor(level):
        return
    try:
        logger.log(level, message, extra={FIELDS: fields})
    except Exception:  # noqa: BLE001, S110 - the record matters more than its log line
        pass


_second: list[Any] = [None, ""]  # the last second formatted, and its text (one a line is dear)


def _timestamp(created: float) -> str:
    """`2026-01-31T12:00:00.123Z`."""
    second, micro = divmod(round(created * 1_000_000), 1_000_000)
    if _second[0] != second:
        _second[1] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second[0] = second
    return f"{_second[1]}.{micro // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, msg, pid, then the line's own fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {"ts": _timestamp(record.created),
                               "level": record.levelname.lower(), "logger": record.name,
                               "msg": record.getMessage(), "pid": record.process}
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                if key not in _STANDARD:
                    doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class TextFormatter(logging.Formatter):
    """`ts LEVEL [pid] logger: msg key=value ...` (nested fields as key.sub=value)."""

    def format(self, record: logging.LogRecord) -> str:
        text = (f"{_timestamp(record.created)} {record.levelname} [{record.process}] "
                f"{record.name}: {record.getMessage()}")
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            parts: list[str] = [text]
            _pairs(fields, "", parts)
            text = "".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _pairs(fields: dict[str, Any], prefix: str, out: list[str]) -> None:
    """` key=value` for each field that is not None, nested ones as key.sub=value."""
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, dict):
            _pairs(value, f"{prefix}{key}.", out)
        else:
            out.append(f" {prefix}{key}={_text(value)}")


_QUOTED = re.compile(r'[ "=\n]')


def _text(value: Any) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int:
        return str(value)
    text = str(value)
    return orjson.dumps(text).decode() if not text or _QUOTED.search(text) else text


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr as it is when a line is written, not when the handler was made (a command's
    runner, a test's, swaps it for the command's run)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure(fmt: str, *, stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """The process's log lines in one format, on stderr: its root logger gets one handler
    (a second call replaces it, never stacks)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_meterlane", False):
            root.removeHandler(old)
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None \
        else _Stderr()
    handler.setFormatter(formatter(fmt))
    handler._meterlane = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for chatty in ("alembic", "stripe"):  # a line per migration step, per Stripe request
        logging.getLogger(chatty).setLevel(logging.WARNING)


def json_line(logger: str, message: str, level: str = "info", **fields: Any) -> str:
    """One JSON line, for what a command prints itself before any logger is set up (serve's
    start-up summary)."""
    return orjson.dumps({"ts": _timestamp(datetime.now(UTC).timestamp()), "level": level,
                         "logger": logger, "msg": message, "pid": os.getpid(), **fields},
                        default=str).decode()
