"""Which ledger rows and meter events count once corrections are made (metering/corrections.py
makes them): every reader of usage filters with these."""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, exists, or_
from sqlalchemy.orm import aliased

from metering.models import MeterEvent, UsageEvent

VOID, AMEND = "void", "amend"
ACTIONS = (VOID, AMEND)
_E = UsageEvent


def counting() -> ColumnElement[bool]:
    """The ledger rows that count: not a void, and not superseded by a correction (an index
    lookup per row: supersedes_id is unique)."""
    later = aliased(UsageEvent)
    return and_(or_(_E.correction.is_(None), _E.correction != VOID),
                ~exists().where(later.supersedes_id == _E.id))


def meter_counting() -> ColumnElement[bool]:
    """The meter events that count (as `counting`, for meter_events)."""
    later = aliased(MeterEvent)
    return and_(or_(MeterEvent.correction.is_(None), MeterEvent.correction != VOID),
                ~exists().where(later.supersedes_id == MeterEvent.id))
