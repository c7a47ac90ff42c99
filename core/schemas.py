"""HTTP schemas of the kernel API (end-user keys), and the fields every package's request
schemas use for times and identifiers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from marshmallow import INCLUDE, RAISE, Schema, ValidationError, fields, validate, validates_schema

from core.text import control_free

# -- what every request schema uses for values that reach the database ----------------------

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def bounded_time(value: datetime, name: str = "time") -> datetime:
    """A time in UTC between 1970 and 9000 (what Python's arithmetic, both databases and every
    period computed from it hold); else a ValidationError naming the bound."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        utc = value.astimezone(UTC)
    except OverflowError as exc:
        raise ValidationError(f"{name} must be between 1970 and 9000.") from exc
    if not EARLIEST <= utc < LATEST:
        raise ValidationError(f"{name} must be between 1970 and 9000.")
    return utc


class Timestamp(fields.AwareDateTime):
    """An ISO 8601 time with its zone, between 1970 and 9000, read as UTC."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> datetime:
        return bounded_time(super()._deserialize(value, attr, data, **kwargs),
                            attr or "time")


def single_line(value: str) -> None:
    """A marshmallow validator: an identifier (a key, a name) without control characters,
    line breaks or invisible marks."""
    if not is_single_line(value):
        raise ValidationError("Must be one line of printable text (no control characters, "
                              "line breaks or invisible marks).")


def identifier(max_length: int) -> validate.Validator:
    return validate.And(validate.Length(min=1, max=max_length), single_line)


_FORMAT = frozenset("\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                    "\u2060\u2066\u2067\u2068\u2069\ufeff")


def is_single_line(value: str) -> bool:
    """One line of printable text: no control characters or line breaks, and no invisible
    direction or zero-width marks (they make two different identifiers look the same)."""
    if value.isascii():
        return value.isprintable()
    return control_free(value, multiline=False) and not any(ch in _FORMAT for ch in value)


class RequestSchema(Schema):
    """The base of every request schema: unknown fields refused, and each text field one line
    of printable text unless it says otherwise (metadata multiline=True: notes, copy)."""

    class Meta:
        unknown = RAISE

    @validates_schema
    def _single_lines(self, data: dict[str, Any], **_: Any) -> None:
        bad: dict[str, list[str]] = {}
        for name, field in self.fields.items():
            if field.metadata.get("multiline"):
                continue
            value = data.get(field.attribute or name)
            values = value if isinstance(value, list) else [value]
            if not all(is_single_line(v) for v in values if isinstance(v, str)):
                bad[field.data_key or name] = [
                    "Must be one line of printable text (no control characters, line breaks "
                    "or invisible marks)."]
        if bad:
            raise ValidationError(bad)


# -- the kernel's own API ------------------------------------------------------------------

class UserKeyRequestSchema(RequestSchema):
    class Meta:
        unknown = RAISE

    ttl_seconds = fields.Integer(
        load_default=None, validate=validate.Range(min=60),
        metadata={"description": "Lifetime of the key; default 1 hour, at most 7 days"})
    name = fields.String(load_default=None, validate=validate.Length(max=200))


class UserKeySchema(Schema):
    object = fields.Constant("user_key")
    key = fields.String(metadata={"description": "Shown once; store it client-side"})
    role = fields.String()
    user = fields.String()
    expires_at = fields.AwareDateTime()


class ProblemSchema(Schema):
    """RFC 9457: these members, and extension members of each problem (errors, limit, ...)."""

    class Meta:
        unknown = INCLUDE

    type = fields.String()
    title = fields.String()
    status = fields.Integer()
    detail = fields.String()
    instance = fields.String()
    param = fields.String(metadata={"description": "The field or parameter at fault, when one "
                                    "is"})


# -- scheduled jobs (GET /v1/admin/jobs) -----------------------------------------------------

class JobRunSchema(Schema):
    worker = fields.String(metadata={"description": "host:pid of the worker that ran it"})
    started_at = fields.DateTime()
    finished_at = fields.DateTime(allow_none=True)
    outcome = fields.String(metadata={"description": "running, ok, error, or lost (its worker "
                                      "stopped mid-run; another took the job over)"})
    message = fields.String(allow_none=True)


class JobSchema(Schema):
    name = fields.String()
    about = fields.String()
    interval_seconds = fields.Integer()
    next_run_at = fields.DateTime(allow_none=True)
    last_started_at = fields.DateTime(allow_none=True)
    last_finished_at = fields.DateTime(allow_none=True)
    last_outcome = fields.String(allow_none=True)
    last_error = fields.String(allow_none=True)
    last_success_at = fields.DateTime(allow_none=True)
    last_duration_ms = fields.Integer(allow_none=True)
    running_on = fields.String(allow_none=True, metadata={
        "description": "the worker running it now (None: none, or one that stopped)"})
    overdue = fields.Boolean(metadata={"description": "past its next run by more than an "
                                       "interval and a minute, and not running"})
    runs_ok = fields.Integer()
    runs_error = fields.Integer()
    runs_lost = fields.Integer()
    runs = fields.List(fields.Nested(JobRunSchema), metadata={"description": "the latest "
                                                              "runs, newest first"})


class JobListSchema(Schema):
    jobs = fields.List(fields.Nested(JobSchema))
