"""Lists a page at a time, as Stripe pages them: `limit` items, `starting_after` the id of the
last item of the previous page, and `has_more` saying whether another page follows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from marshmallow import fields, validate

from core.errors import InvalidRequestError

T = TypeVar("T")
DEFAULT_LIMIT = 20
MAX_LIMIT = 100


def limit_field(default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> fields.Integer:
    return fields.Integer(load_default=default, validate=validate.Range(min=1, max=maximum),
                          metadata={"description": f"Items on this page (1 to {maximum}, "
                                    f"default {default}); `has_more` says whether another "
                                    "follows"})


def starting_after_field(*, integer: bool = False) -> fields.Field[Any]:
    about = {"description": "The id of the last item of the previous page: this page starts "
                            "after it"}
    if integer:
        return fields.Integer(validate=validate.Range(min=1, max=2**63 - 1), metadata=about)
    return fields.String(validate=validate.Length(min=1, max=200), metadata=about)


def has_more_field() -> fields.Boolean:
    return fields.Boolean(metadata={"description": "Another page follows: ask again with "
                                    "starting_after set to this page's last id"})


def trimmed(rows: Sequence[T], limit: int) -> tuple[list[T], bool]:
    """A page read with limit + 1 rows: (the page, whether more follow)."""
    return list(rows[:limit]), len(rows) > limit


def page_of(items: Sequence[T], id_of: Callable[[T], Any], starting_after: Any | None,
            limit: int) -> tuple[list[T], bool]:
    """A page of a list already in order (held in memory): the items after the one whose id
    is starting_after; an id not in the list is a 400, not an empty page."""
    start = 0
    if starting_after is not None:
        ids = [id_of(item) for item in items]
        if starting_after not in ids:
            raise unknown_cursor(starting_after)
        start = ids.index(starting_after) + 1
    return trimmed(items[start:start + limit + 1], limit)


def unknown_cursor(value: Any) -> InvalidRequestError:
    return InvalidRequestError(f"starting_after {value!r} is not the id of an item of this "
                               "list.", param="starting_after")
