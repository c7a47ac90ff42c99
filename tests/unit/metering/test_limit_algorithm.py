"""Property tests of the limit algorithm (the SQL store's, which the Lua scripts mirror and
the contract suite holds them to), on a frozen clock: whatever the sequence of calls, no
true span of a rolling window and no stretch of a token bucket's life holds more than the
limit allows."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from metering.limitstore import Check, _Counters, reserve_in
from plans.windows import parse_window, rolling_slots

START_MS = 1_800_000_000_000

calls = st.lists(st.tuples(st.integers(0, 20_000), st.integers(1, 400)), min_size=1,
                 max_size=60)


@settings(deadline=None, max_examples=300)
@given(steps=calls, span_s=st.sampled_from([60, 300, 3600, 5 * 3600]),
       amount=st.integers(100, 2_000))
def test_rolling_window_never_holds_more_than_the_amount_in_any_span(
        steps: list[tuple[int, int]], span_s: int, amount: int) -> None:
    window = parse_window(f"rolling:{span_s}s")
    rows: dict[tuple[str, int], list[int]] = {}
    now = START_MS
    granted: list[tuple[int, int]] = []
    for gap_ms, want in steps:
        now += gap_ms * span_s // 60  # gaps scale with the span
        slots = rolling_slots(window, datetime.fromtimestamp(now / 1000, UTC))
        check = Check(key="r", kind="rolling", metric="t", amount=amount, fixed=0, per_out=1,
                      slot_ms=slots.size * 1000, slots=slots.count, slot=slots.current)
        counters = _Counters(rows, now)
        result, _ = reserve_in(counters, [check.wire()], want, 1, True)
        if result.granted:
            granted.append((now, result.out))
    span_ms = span_s * 1000
    for t, _ in granted:  # every true span that ends at a grant
        inside = sum(out for when, out in granted if t - span_ms < when <= t)
        assert inside <= amount


@settings(deadline=None, max_examples=300)
@given(steps=calls, refill=st.integers(1, 500), interval_s=st.sampled_from([1, 60, 3600]),
       capacity=st.integers(1, 5_000))
def test_token_bucket_never_grants_more_than_capacity_plus_refill(
        steps: list[tuple[int, int]], refill: int, interval_s: int, capacity: int) -> None:
    interval_ms = interval_s * 1000
    check = Check(key="b", kind="bucket", metric="t", amount=capacity, fixed=0, per_out=1,
                  refill=refill, interval_ms=interval_ms)
    rows: dict[tuple[str, int], list[int]] = {}
    now = START_MS
    total = 0
    for gap_ms, want in steps:
        now += gap_ms
        counters = _Counters(rows, now)
        result, _ = reserve_in(counters, [check.wire()], want, 1, True)
        if result.granted:
            total += result.out
            assert result.out <= want
        elapsed = now - START_MS
        assert total <= capacity + elapsed * refill // interval_ms


@settings(deadline=None, max_examples=300)
@given(wants=st.lists(st.integers(0, 300), min_size=1, max_size=40),
       amount=st.integers(1, 3_000), prompt=st.integers(0, 50), clip=st.booleans())
def test_a_counter_grants_exactly_up_to_its_amount(wants: list[int], amount: int, prompt: int,
                                                   clip: bool) -> None:
    check = Check(key="c", kind="counter", metric="t", amount=amount, fixed=prompt, per_out=1,
                  expires_ms=START_MS + 10**9)
    rows: dict[tuple[str, int], list[int]] = {}
    charged = 0
    for want in wants:
        result, _ = reserve_in(_Counters(rows, START_MS), [check.wire()], want, 1, clip)
        left = amount - charged
        fits = left - prompt
        if clip:
            assert result.granted == (fits >= 1 and want >= 1)
        else:
            assert result.granted == (want >= 1 and fits >= want)
        if result.granted:
            assert result.out == min(want, fits)
            charged += prompt + result.out
        assert rows.get(("c", 0), [0])[0] == charged <= amount
