"""The lease heartbeat: one thread per process renews every running call's lease in turn."""

from __future__ import annotations

import threading

from metering.leases import Heartbeat


class Beats:
    def __init__(self, enough: int, keep: bool = True) -> None:
        self.count = 0
        self.enough = enough
        self.keep = keep
        self.done = threading.Event()

    def __call__(self) -> bool:
        self.count += 1
        if self.count >= self.enough:
            self.done.set()
        return self.keep


def test_running_calls_are_renewed_by_one_thread_until_stopped() -> None:
    first, second = Beats(2), Beats(2)
    one, two = Heartbeat(first, 0.05), Heartbeat(second, 0.05)
    try:
        assert first.done.wait(10) and second.done.wait(10)
        beaters = [t for t in threading.enumerate() if t.name == "lease-heartbeat"]
        assert len(beaters) == 1  # one per process, not one per call
        one.stop()
        stopped_at = first.count
        later = Beats(3)
        three = Heartbeat(later, 0.05)
        assert later.done.wait(10)  # three beats of a call started after the stop...
        assert first.count == stopped_at  # ...and none of the stopped one
        assert second.count > 2  # the other call kept beating
        three.stop()
    finally:
        one.stop()
        two.stop()


def test_a_lease_that_is_gone_stops_its_heartbeat() -> None:
    gone, other = Beats(1, keep=False), Beats(3)
    beat = Heartbeat(gone, 0.05)
    watch = Heartbeat(other, 0.05)
    try:
        assert gone.done.wait(10) and other.done.wait(10)
        assert gone.count == 1  # renew said the lease is settled: never renewed again
    finally:
        beat.stop()
        watch.stop()


def test_a_failed_renewal_is_tried_again() -> None:
    calls = Beats(3)

    def flaky() -> bool:
        calls()
        if calls.count < 3:
            raise ConnectionError("the store is away")
        return True

    beat = Heartbeat(flaky, 0.05)
    try:
        assert calls.done.wait(10)
    finally:
        beat.stop()
