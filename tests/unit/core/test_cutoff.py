"""The webhook deadline's timer (core/cutoff.py) ends the connection it watches, and only
that one: once the connection's socket is closed, its descriptor's number may belong to
another socket (a database connection, say) before the deadline passes."""

from __future__ import annotations

import os
import socket

from core.cutoff import Cutoff


def test_the_deadline_ends_the_watched_connection() -> None:
    ours, peer = socket.socketpair()
    with ours, peer, Cutoff(3600) as cut:
        cut.watch(ours)
        cut._expire()  # the deadline passes
        assert cut.expired and ours.recv(1) == b""  # shut down: a read ends at once


def test_the_deadline_never_reaches_a_socket_that_took_the_closed_ones_number() -> None:
    ours, peer = socket.socketpair()
    with peer, Cutoff(3600) as cut:
        cut.watch(ours)
        number = ours.fileno()
        # The exchange ends and its number goes to another socket. dup2 does both at once, so
        # the reuse is certain (waiting for the kernel to hand out the lowest free number is
        # not: another thread may free a lower one in between).
        other_peer_of, other_peer = socket.socketpair()
        os.dup2(other_peer_of.fileno(), number)
        other_peer_of.close()
        other = socket.socket(fileno=ours.detach())
        with other, other_peer:
            assert other.fileno() == number
            cut._expire()  # the deadline passes just then
            other.sendall(b"x")
            assert other_peer.recv(1) == b"x"
