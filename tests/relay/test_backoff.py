"""Backoff: exponential growth, full jitter, cap, floor and the queue lifetime."""

from __future__ import annotations

import random

import pytest

from smtp365.relay.backoff import DEFAULT_MAX_LIFETIME, Backoff


def test_ceiling_doubles_up_to_the_cap() -> None:
    b = Backoff(base=10, cap=100)
    assert [b.ceiling(n) for n in range(1, 7)] == [10, 20, 40, 80, 100, 100]
    assert b.ceiling(10_000) == 100


def test_full_jitter_stays_in_range_and_spreads() -> None:
    b = Backoff(base=10, cap=1000, floor=0.5, rng=random.Random(7))
    draws = [b.delay(4) for _ in range(2000)]
    assert all(0.5 <= d <= 80 for d in draws)
    # Full jitter: roughly uniform over [0, 80], so the mean is near 40 and both halves occur.
    assert 35 < sum(draws) / len(draws) < 45
    assert min(draws) < 5 and max(draws) > 75


def test_seeded_rng_is_repeatable() -> None:
    a = Backoff(rng=random.Random(1))
    b = Backoff(rng=random.Random(1))
    assert [a.delay(n) for n in range(1, 8)] == [b.delay(n) for n in range(1, 8)]


def test_next_attempt_is_clamped_to_the_expiry_then_gives_up() -> None:
    b = Backoff(base=100, cap=100, floor=100, max_lifetime=1000, rng=random.Random(0))
    assert b.next_attempt(1, now=500, received_at=0) == 600
    assert b.next_attempt(1, now=950, received_at=0) == 1000  # last try right at expiry
    assert b.next_attempt(1, now=1000, received_at=0) is None
    assert b.expired(0, 1000) and not b.expired(0, 999.9)


def test_explicit_delay_overrides_the_draw() -> None:
    b = Backoff(max_lifetime=10_000)
    assert b.next_attempt(3, now=0, received_at=0, delay=42) == 42


def test_defaults() -> None:
    b = Backoff()
    assert b.max_lifetime == DEFAULT_MAX_LIFETIME == 5 * 86_400
    with pytest.raises(ValueError):
        Backoff(base=10, cap=5)
