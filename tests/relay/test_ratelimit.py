"""Per-mailbox budgets with a fake clock: nothing sleeps."""

from __future__ import annotations

import math
import random

import pytest

from smtp365.relay.ratelimit import Limits, RateLimiter, SlidingWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


MBX = "alice@contoso.test"


def test_sliding_window_counts_settled_and_pending() -> None:
    w = SlidingWindow(3, 10.0)
    tickets = [w.reserve(0.0) for _ in range(3)]
    assert w.earliest(0.0) == math.inf  # only a settle can make room
    for i, t in enumerate(tickets):
        w.settle(t, at=1.0 + i)
    assert w.earliest(5.0) == pytest.approx(11.0, abs=0.01)  # oldest completion + window
    assert w.earliest(11.01) == 11.01
    assert w.used(11.01) == 2


def test_weighted_window_and_cancel() -> None:
    w = SlidingWindow(10, 100.0)
    a = w.reserve(0.0, 6)
    assert w.earliest(0.0, 5) == math.inf
    w.cancel(a)
    assert w.earliest(0.0, 10) == 0.0
    w.settle(w.reserve(0.0, 4), at=1.0)
    w.settle(w.reserve(0.0, 4), at=2.0)
    assert w.earliest(3.0, 3) == pytest.approx(101.0, abs=0.01)  # needs the first 4 to expire
    assert w.earliest(3.0, 2) == 3.0
    assert w.earliest(3.0, 11) == math.inf  # never fits
    with pytest.raises(ValueError):
        w.reserve(3.0, 3)


def test_messages_per_window_never_exceeded() -> None:
    clock = Clock()
    rl = RateLimiter(Limits(messages_per_window=30, message_window=60.0), clock=clock)
    sent: list[float] = []
    # Simulate a greedy sender for 10 minutes, each send taking 0.1 s.
    end = clock.now + 600
    while clock.now < end:
        grant = rl.try_acquire(MBX)
        if grant is None:
            clock.now = max(clock.now + 0.001, min(rl.earliest(MBX), end))
            continue
        clock.now += 0.1
        rl.release(grant)
        sent.append(clock.now)
    for t in sent:  # any 60-second window holds at most 30 completions
        assert sum(1 for u in sent if t - 60 < u <= t) <= 30
    assert len(sent) >= 0.98 * 30 * 10  # and the budget is used


def test_recipients_per_day() -> None:
    clock = Clock()
    rl = RateLimiter(Limits(recipients_per_window=10, messages_per_window=1000), clock=clock)
    rl.release(g1 := rl.try_acquire(MBX, 6) or pytest.fail("no grant"))
    assert g1.recipients == 6
    assert rl.try_acquire(MBX, 5) is None
    assert rl.earliest(MBX, 5) == pytest.approx(clock.now + 86_400, abs=0.01)
    grant = rl.try_acquire(MBX, 4)
    assert grant is not None
    rl.release(grant, counted=False)  # not counted: budget returned
    assert rl.try_acquire(MBX, 4) is not None


def test_concurrency_acquire_release_and_fewer_connections() -> None:
    clock = Clock()
    rl = RateLimiter(Limits(max_connections=3, fewer_connections_for=300), clock=clock)
    grants = [rl.try_acquire(MBX) for _ in range(3)]
    assert all(grants) and rl.try_acquire(MBX) is None
    assert rl.in_use(MBX) == 3
    assert rl.fewer_connections(MBX) == 2
    for g in grants:
        assert g is not None
        rl.release(g)
        rl.release(g)  # idempotent
    assert rl.in_use(MBX) == 0
    assert rl.concurrency(MBX) == 2
    a, b = rl.try_acquire(MBX), rl.try_acquire(MBX)
    assert a and b and rl.try_acquire(MBX) is None
    rl.release(a)
    rl.release(b)
    assert rl.fewer_connections(MBX) == 1
    assert rl.fewer_connections(MBX) == 1  # never below one
    clock.now += 301
    assert rl.concurrency(MBX) == 3


def test_pause() -> None:
    clock = Clock()
    rl = RateLimiter(clock=clock)
    rl.pause(MBX, clock.now + 100, "554 5.2.0")
    rl.pause(MBX, clock.now + 50, "shorter pause loses")
    assert rl.paused_until(MBX) == clock.now + 100
    assert rl.try_acquire(MBX) is None
    assert rl.earliest(MBX) == clock.now + 100
    assert rl.state(MBX).pause_reason == "554 5.2.0"
    clock.now += 100
    assert rl.paused_until(MBX) is None
    assert rl.try_acquire(MBX) is not None


def test_mailboxes_are_independent_and_case_insensitive() -> None:
    clock = Clock()
    per = {"a@x.test": Limits(max_connections=1), "b@x.test": Limits(max_connections=2)}
    rl = RateLimiter(lambda m: per[m], clock=clock)
    assert rl.try_acquire("A@X.test") is not None
    assert rl.try_acquire("a@x.test") is None
    assert rl.try_acquire("b@x.test") and rl.try_acquire("b@x.test")


def test_window_totals_match_a_recount_under_random_use() -> None:
    rng = random.Random(7)
    window = SlidingWindow(limit=50, window=10.0)
    settled: list[tuple[float, int]] = []
    pending: dict[int, int] = {}
    now = 0.0
    for _ in range(5000):
        now += rng.random() * 0.5
        action = rng.random()
        if action < 0.5:
            weight = rng.randint(1, 5)
            if window.earliest(now, weight) <= now:
                pending[window.reserve(now, weight)] = weight
        elif action < 0.8 and pending:
            ticket = rng.choice(list(pending))
            window.settle(ticket, now)
            settled.append((now, pending.pop(ticket)))
        elif pending:
            ticket = rng.choice(list(pending))
            window.cancel(ticket)
            del pending[ticket]
        recount = sum(w for t, w in settled if t > now - 10.0) + sum(pending.values())
        assert window.used(now) == recount
        assert recount <= 50


def test_sends_recorded_from_before_a_restart_count_like_granted_ones() -> None:
    clock = Clock()
    limits = Limits(messages_per_window=3, message_window=60.0, recipients_per_window=10)
    rl = RateLimiter(limits, clock=clock)
    rl.record(MBX, clock.now - 50, 4)  # out of the message window in 10 s, the day's in a day
    rl.record(MBX.upper(), clock.now - 10, 4)
    assert rl.try_acquire(MBX, 3) is None  # 8 of 10 recipients used
    assert rl.earliest(MBX, 2) == clock.now
    rl.release(rl.try_acquire(MBX, 2) or pytest.fail("no grant"))
    assert rl.earliest(MBX) == pytest.approx(clock.now + 86_350, abs=0.01)  # recipients full
    clock.now += 86_351
    assert rl.try_acquire(MBX, 4) is not None
    again = RateLimiter(limits, clock=clock)
    for at in (clock.now - 30, clock.now - 20, clock.now - 1):
        again.record(MBX, at)
    assert again.earliest(MBX) == pytest.approx(clock.now + 30, abs=0.01)  # 3 a minute
