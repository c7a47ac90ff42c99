"""What sdk/python/README.md says `verify()` does, claim by claim ("Paywall webhooks"), with
deliveries signed by the server's own signer (core.events.sign)."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
from pathlib import Path

import pytest

from core.events import sign

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sdk" / "python"))

from meterlane_sdk import InvalidSignature, verify  # noqa: E402

SECRET = "whsec_test"
NOW = 1_800_000_000
BODY = json.dumps({"id": "evt_1", "type": "usage.limit_reached", "created": NOW,
                   "data": {"user": "user-42"}}).encode()


def v1(body: bytes, t: int, secret: str = SECRET) -> str:
    """The documented algorithm, written out apart from the server's and the SDK's code."""
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def test_it_returns_the_event_of_a_delivery_the_server_signed() -> None:
    assert verify(BODY, sign(SECRET, BODY, NOW), SECRET, now=NOW) == json.loads(BODY)
    assert sign(SECRET, BODY, NOW) == f"t={NOW},v1={v1(BODY, NOW)}"  # the algorithm as written


def test_the_raw_body_counts_not_its_json() -> None:
    reencoded = json.dumps(json.loads(BODY), indent=1).encode()
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(reencoded, sign(SECRET, BODY, NOW), SECRET, now=NOW)
    with pytest.raises(InvalidSignature):
        verify(BODY, sign("whsec_other", BODY, NOW), SECRET, now=NOW)


@pytest.mark.parametrize("offset", [-300, 300, 0, 299.5])
def test_a_time_within_the_tolerance_before_or_after_is_accepted(offset: float) -> None:
    assert verify(BODY, sign(SECRET, BODY, NOW), SECRET, now=NOW + offset)["id"] == "evt_1"


@pytest.mark.parametrize("offset", [-301, 301, 3600])
def test_a_time_outside_the_tolerance_is_refused(offset: int) -> None:
    with pytest.raises(InvalidSignature, match="tolerance"):
        verify(BODY, sign(SECRET, BODY, NOW), SECRET, now=NOW + offset)


def test_the_tolerance_and_the_clock_can_be_given() -> None:
    with pytest.raises(InvalidSignature, match="tolerance"):
        verify(BODY, sign(SECRET, BODY, NOW), SECRET, now=NOW + 61, tolerance=60)
    assert verify(BODY, sign(SECRET, BODY, NOW), SECRET, now=NOW + 900, tolerance=900)
    with pytest.raises(InvalidSignature, match="tolerance"):  # the default: this clock
        verify(BODY, sign(SECRET, BODY, NOW), SECRET)


def test_any_of_several_v1_may_match_and_other_parts_are_ignored() -> None:
    good, bad = v1(BODY, NOW), v1(BODY, NOW, "whsec_old")
    for header in (f"t={NOW},v1={bad},v1={good}", f"t={NOW},v1={good},v1={bad}",
                   f" t={NOW} , v0=abc, v1={good} ", f"v1={good},t={NOW}"):
        assert verify(BODY, header, SECRET, now=NOW)["id"] == "evt_1", header
    with pytest.raises(InvalidSignature, match="does not match"):
        verify(BODY, f"t={NOW},v1={bad},v1={bad[::-1]}", SECRET, now=NOW)
    with pytest.raises(InvalidSignature):  # a v0 is not a v1
        verify(BODY, f"t={NOW},v0={good}", SECRET, now=NOW)


@pytest.mark.parametrize("header", [
    None, "", "garbage", f"v1={'0' * 64}", f"t={NOW}", f"t=,v1={'0' * 64}",
    f"t=-{NOW},v1={'0' * 64}", f"t={NOW}.5,v1={'0' * 64}", f"t=١٢٣,v1={'0' * 64}",
    f"t={NOW},t={NOW},v1={'0' * 64}"])
def test_a_malformed_header_is_refused(header: str | None) -> None:
    with pytest.raises(InvalidSignature):
        verify(BODY, header, SECRET, now=NOW)


def test_a_two_t_header_is_refused_even_when_one_signs() -> None:
    with pytest.raises(InvalidSignature, match="malformed"):
        verify(BODY, f"t={NOW},t={NOW + 5},v1={v1(BODY, NOW)}", SECRET, now=NOW)


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b"\xff\xfe"])
def test_a_signed_body_that_is_no_json_object_is_refused(body: bytes) -> None:
    with pytest.raises(InvalidSignature, match="JSON"):
        verify(body, sign(SECRET, body, NOW), SECRET, now=NOW)
