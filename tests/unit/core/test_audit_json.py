"""What an audit row keeps of a change: JSON with sorted keys, exact decimals, and never more
than a bound (a huge before/after becomes the list of its fields)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import orjson

from core.audit import MAX_JSON, Actor, to_json
from core.auth import Principal, Role


def test_values_keep_their_exact_form() -> None:
    doc = {"b": Decimal("0.15"), "a": datetime(2026, 12, 6, tzinfo=UTC), "c": None}
    assert to_json(doc) == '{"a":"2026-12-06T00:00:00+00:00","b":"0.15","c":null}'
    assert to_json(None) is None


def test_a_document_past_the_bound_keeps_its_field_names_only() -> None:
    text = to_json({"content": "x" * (MAX_JSON + 1), "plan": "pro"})
    assert text is not None and orjson.loads(text) == {"truncated": True,
                                                       "fields": ["content", "plan"]}


def test_an_actor_names_a_key_by_its_public_id_only() -> None:
    principal = Principal(key_pk=7, role=Role.ADMIN, app_id=3, app_name="acme",
                          key_id="0123456789abcdef")
    actor = Actor.of_key(principal, "req_1")
    assert (actor.key_id, actor.role, actor.app_id, actor.request_id) == (
        "0123456789abcdef", "admin", 3, "req_1")
    assert not actor.is_operator and Actor.cli().is_operator
    assert Actor.cli().role == "cli" and Actor.cli().name
