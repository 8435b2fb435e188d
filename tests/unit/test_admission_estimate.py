"""The retry-after hint a refused submit carries (producer/admission.py), alone."""

from __future__ import annotations

import pytest

from inferq.producer.admission import estimate_retry_after


def test_the_excess_over_the_cap_at_the_drain_rate() -> None:
    # 100 queued at a cap of 100: one must leave before this one gets in; 10 finish per second.
    assert estimate_retry_after(100, 100, 10.0, tenant_full=False) == pytest.approx(0.1)
    assert estimate_retry_after(149, 100, 10.0, tenant_full=False) == pytest.approx(5.0)


def test_a_full_tenant_waits_for_one_of_its_own() -> None:
    assert estimate_retry_after(10_000, 100, 4.0, tenant_full=True) == pytest.approx(0.25)


def test_bounded_and_none_when_nothing_drains() -> None:
    assert estimate_retry_after(100, 100, 1e6, tenant_full=False) == 0.05  # never busy-loops a producer
    assert estimate_retry_after(10**9, 100, 1.0, tenant_full=False) == 30.0  # never an absurd wait
    assert estimate_retry_after(100, 100, 0.0, tenant_full=False) is None
