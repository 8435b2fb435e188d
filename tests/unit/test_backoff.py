"""Reconnect backoff (shared/connection.py): doubling, capped, jittered, reset on success."""

from __future__ import annotations

from inferq.shared.connection import Backoff


def test_doubles_up_to_the_cap_with_jitter() -> None:
    backoff = Backoff()
    waits = [backoff.next() for _ in range(12)]
    for n, wait in enumerate(waits):
        full = min(Backoff.MAX_S, Backoff.FIRST_S * 2**n)
        assert full / 2 <= wait <= full  # equal jitter: between half and all of the doubled wait
    assert max(waits) <= Backoff.MAX_S


def test_a_fleet_does_not_retry_in_lockstep() -> None:
    fleet = [Backoff() for _ in range(50)]
    fifth = [[b.next() for _ in range(5)][-1] for b in fleet]
    assert len({round(w, 6) for w in fifth}) > 40


def test_reset_starts_over() -> None:
    backoff = Backoff()
    for _ in range(8):
        backoff.next()
    backoff.reset()
    assert backoff.next() <= Backoff.FIRST_S
