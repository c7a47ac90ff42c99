"""Burning credits: the order (priority, soonest expiry, oldest), only live grants, and
conservation (granted = burned + expired + balance) on random grants and usage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from plans.credits import GrantBalance, burn, summarise

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def at(hours: int) -> datetime:
    return T0 + timedelta(hours=hours)


def test_burn_order_is_priority_then_soonest_expiry_then_oldest() -> None:
    grants = [
        GrantBalance(1, 10, 100, at(0), None),       # no expiry: after those that expire
        GrantBalance(2, 10, 100, at(1), at(50)),     # expires later
        GrantBalance(3, 10, 100, at(2), at(40)),     # expires soonest
        GrantBalance(4, 10, 50, at(3), None),        # lower priority number: first of all
        GrantBalance(5, 10, 100, at(0), at(40)),     # same expiry as 3, older
    ]
    taken = burn(grants, 45, at(10))
    assert taken == [(4, 10), (5, 10), (3, 10), (2, 10), (1, 5)]
    assert [g.remaining for g in grants] == [5, 0, 0, 0, 0]


def test_only_grants_live_when_the_usage_happened_are_burned() -> None:
    grants = [GrantBalance(1, 10, 100, at(5), None),    # granted after the usage
              GrantBalance(2, 10, 100, at(0), at(3)),   # expired before it
              GrantBalance(3, 4, 100, at(0), at(9))]
    assert burn(grants, 10, at(4)) == [(3, 4)]          # 6 credits find no grant: overage
    summary = summarise(grants, at(10))
    assert (summary.granted, summary.burned, summary.expired, summary.balance) == (24, 4, 10, 10)


grant_st = st.tuples(st.integers(1, 1000), st.integers(0, 3), st.integers(0, 100),
                     st.one_of(st.none(), st.integers(1, 150)))
usage_st = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 700)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(grant_st, max_size=12), usage_st, st.integers(0, 300))
def test_credits_are_conserved(raw_grants: list[tuple[int, int, int, int | None]],
                               usage: list[tuple[int, int]], now_h: int) -> None:
    grants = [GrantBalance(i, amount, prio, at(start),
                           at(start + life) if life is not None else None)
              for i, (amount, prio, start, life) in enumerate(raw_grants, start=1)]
    burned_total = 0
    for hour, credits in sorted(usage):
        if hour > now_h:
            continue
        live_before = sum(g.remaining for g in grants if g.live_at(at(hour)))
        taken = burn(grants, credits, at(hour))
        got = sum(amount for _, amount in taken)
        assert got == min(credits, live_before)  # everything live is usable, nothing more
        burned_total += got
    for g in grants:
        assert 0 <= g.burned <= g.amount
    summary = summarise(grants, at(now_h))
    assert summary.granted == summary.burned + summary.expired + summary.balance
    assert summary.burned == sum(g.burned for g in grants if g.granted_at <= at(now_h))
    assert burned_total == sum(g.burned for g in grants)
