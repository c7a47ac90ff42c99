"""The limit store unreachable (its database or its Redis): one error the engine decides on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import OperationalError

from core.errors import ServiceUnavailableError


class LimitStoreUnavailableError(Exception):
    """The limit store cannot be reached; the plan decides whether calls go on."""



@contextmanager
def store_errors() -> Iterator[None]:
    """Turn the store's outage errors (database or Redis) into LimitStoreUnavailableError."""
    try:
        yield
    except OperationalError as exc:
        raise LimitStoreUnavailableError(str(exc)) from exc
    except Exception as exc:
        if _is_redis_outage(exc):
            raise LimitStoreUnavailableError(str(exc)) from exc
        raise


@contextmanager
def store_down_is_503() -> Iterator[None]:
    """For the API's own reads and writes: an unreachable store is a 503 (no plan setting
    applies to them)."""
    try:
        with store_errors():
            yield
    except LimitStoreUnavailableError as exc:
        raise ServiceUnavailableError("The limits store is unavailable; try again shortly.",
                                      headers={"Retry-After": "1"}) from exc


def _is_redis_outage(exc: Exception) -> bool:
    try:
        import redis
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            redis.exceptions.BusyLoadingError))
