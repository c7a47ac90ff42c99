"""What an Idempotency-Key is scoped by and compared on (no I/O)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from core.auth import Principal, Role
from core.config import Config, UpstreamConfig
from core.errors import InvalidRequestError
from core.idempotency import MIN_LAPSE, check_key, fingerprint, lapse_for, scope_of


def test_no_two_different_requests_share_a_fingerprint() -> None:
    assert fingerprint([b"ab", b"c"]) != fingerprint([b"a", b"bc"])
    assert fingerprint([b"POST", b"/v1/x", b""]) != fingerprint([b"POST", b"/v1/x"])
    assert fingerprint([b"POST", b"/v1/x", b"{}"]) == fingerprint([b"POST", b"/v1/x", b"{}"])


def test_keys_are_scoped_by_app_role_and_end_user() -> None:
    app_key = Principal(key_pk=1, role=Role.APP, app_id=7, app_name="acme")
    other_app = replace(app_key, key_pk=2, app_id=8, app_name="globex")
    user_a = Principal(key_pk=3, role=Role.USER, app_id=7, app_name="acme", end_user_id=1)
    user_b = replace(user_a, key_pk=4, end_user_id=2)
    operator = Principal(key_pk=5, role=Role.ADMIN, app_id=None, app_name=None)
    scopes = [scope_of(p) for p in (app_key, other_app, user_a, user_b, operator)]
    assert len(set(scopes)) == len(scopes)
    assert scope_of(replace(app_key, key_pk=9)) == scope_of(app_key)  # a rotated key: same


@pytest.mark.parametrize("bad", ["", "x" * 256, "tab\there", "nul\x00"])
def test_a_malformed_key_is_refused(bad: str) -> None:
    with pytest.raises(InvalidRequestError, match="Idempotency-Key"):
        check_key(bad)


def test_a_dead_requests_key_lapses_after_the_longest_upstream_wait() -> None:
    assert lapse_for(Config()) == MIN_LAPSE
    slow = UpstreamConfig(name="slow", base_url="http://127.0.0.1:9/v1",
                          connect_timeout_s=5.0, read_timeout_s=3600.0)
    assert lapse_for(Config(upstreams=(slow,))) == timedelta(seconds=3665)
