"""Retry timing for deferred messages: exponential backoff with full jitter, and the lifetime.

Pure (no I/O, no clock of its own): callers pass ``now`` and the attempt number, and may
inject a seeded :class:`random.Random` so tests are repeatable.

Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"): the delay before
attempt ``n + 1`` is drawn uniformly from ``[0, min(cap, base * 2 ** (n - 1))]``, raised to
``floor`` so a retry never spins. A message older than ``max_lifetime`` is not retried again:
:meth:`Backoff.next_attempt` returns ``None`` and the relay fails it (Postfix's
``maximal_queue_lifetime``, 5 days by default).
"""

from __future__ import annotations

import random

__all__ = ["DEFAULT_MAX_LIFETIME", "Backoff"]

DEFAULT_MAX_LIFETIME = 5 * 86_400.0


class Backoff:
    """Exponential backoff with full jitter, bounded by the message's maximum lifetime."""

    def __init__(
        self,
        *,
        base: float = 60.0,
        cap: float = 4_000.0,
        floor: float = 1.0,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
        rng: random.Random | None = None,
    ) -> None:
        if base <= 0 or cap < base or floor < 0 or max_lifetime <= 0:
            raise ValueError("need base > 0, cap >= base, floor >= 0 and max_lifetime > 0")
        self.base = base
        self.cap = cap
        self.floor = floor
        self.max_lifetime = max_lifetime
        self._rng = rng or random.Random()

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the delay after failed attempt number ``attempt`` (1-based)."""
        exponent = max(0, attempt - 1)
        if exponent >= 64:  # 2**64 * base overflows nothing in Python, but is pointless
            return self.cap
        return min(self.cap, self.base * 2.0**exponent)

    def delay(self, attempt: int) -> float:
        """A random delay in ``[floor, ceiling(attempt)]`` (full jitter)."""
        ceiling = self.ceiling(attempt)
        return max(self.floor, self._rng.uniform(0.0, ceiling))

    def expires_at(self, received_at: float) -> float:
        return received_at + self.max_lifetime

    def expired(self, received_at: float, now: float) -> bool:
        """The message has been in the queue for at least ``max_lifetime``."""
        return now >= self.expires_at(received_at)

    def next_attempt(
        self, attempt: int, *, now: float, received_at: float, delay: float | None = None
    ) -> float | None:
        """When to try again after failed attempt ``attempt``, or ``None`` to give up.

        ``delay`` overrides the drawn delay (e.g. "until the mailbox's window frees"). The
        result never lies past the expiry, so the last try happens right at it.
        """
        if self.expired(received_at, now):
            return None
        wait = self.delay(attempt) if delay is None else max(0.0, delay)
        return min(now + wait, self.expires_at(received_at))
