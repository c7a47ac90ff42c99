"""The arithmetic of withdrawals (CXL-04) and the notice windows (NTC-01 ... NTC-04). No I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

import pytest

from paywall.notices import ANNUAL, PRICE, RENEWAL, add_years, trial_window
from paywall.withdrawals import add_interval, refund_due


@pytest.mark.parametrize(("paid", "used", "term"), [
    (9600, 5, 365), (2000, 3, 30), (1, 1, 365), (999, 0, 31), (12345, 14, 366), (9600, 365, 365)])
def test_cxl_04_the_refund_is_the_unused_part_rounded_half_up(paid: int, used: int,
                                                             term: int) -> None:
    exact = Fraction(paid) * Fraction(term - used, term)
    got = refund_due(paid, True, used, term)
    assert isinstance(got, int) and abs(Fraction(got) - exact) <= Fraction(1, 2)
    assert refund_due(paid, False, used, term) == paid  # no early-start request: all of it


def test_cxl_04_refunds_by_hand() -> None:
    assert refund_due(9600, True, 5, 365) == 9468    # 9,468.49...
    assert refund_due(2000, True, 3, 30) == 1800
    assert refund_due(1, True, 1, 2) == 1             # 0.5 rounds half up
    assert refund_due(999, True, 0, 31) == 999


def test_one_term_later_follows_the_calendar() -> None:
    at = datetime(2027, 1, 31, 9, tzinfo=UTC)
    assert add_interval(at, "month") == datetime(2027, 2, 28, 9, tzinfo=UTC)
    assert add_interval(datetime(2027, 12, 15, tzinfo=UTC), "month") == datetime(
        2028, 1, 15, tzinfo=UTC)
    assert (add_interval(at, "year") - at).days == 365
    assert add_interval(datetime(2028, 2, 29, tzinfo=UTC), "year") == datetime(
        2029, 2, 28, tzinfo=UTC)
    assert add_years(datetime(2028, 2, 29, tzinfo=UTC), 1).day == 28


@pytest.mark.parametrize(("trial", "earliest", "target", "latest"), [
    (60, 21, 14, 7),   # over 31 days: California 3-21 and Visa 7+ -> 7-21, sent at 14
    (30, 21, 10, 7),   # 8-31 days: sent 10 days ahead, on time until 7
    (10, 10, 10, 7),   # a 10-day trial: at its start, 10 days ahead
    (8, 8, 8, 7),
    (7, 7, 7, 0)])     # 7 days or fewer: Visa's 7 days cannot be met: at the start
def test_ntc_01_the_trial_window(trial: int, earliest: int, target: int, latest: int) -> None:
    window = trial_window(trial)
    assert (window.earliest, window.target, window.latest) == (earliest, target, latest)
    assert window.latest <= window.target <= window.earliest <= max(trial, 0)


def test_ntc_02_03_04_windows_sit_inside_every_jurisdictions() -> None:
    # renewal: California 15-45, Colorado 25-40; price change: CA 7-30, NY 5-30, Visa 7+
    assert 25 <= RENEWAL.latest <= RENEWAL.target <= RENEWAL.earliest <= 40
    assert 7 <= PRICE.latest <= PRICE.target <= PRICE.earliest <= 30
    assert ANNUAL.earliest == 30 and str(PRICE) == "7-30 days before"
