"""Per-mailbox sending budgets of Exchange Online, enforced before anything is sent.

Pure and clock-injected: every method reads ``clock()`` (monotonic seconds) and nothing
sleeps or does I/O, so tests move a fake clock. The relay asks :meth:`RateLimiter.earliest`
when the next send may happen and :meth:`RateLimiter.try_acquire` to take it; it must never
send when the limiter says no, so that Exchange never has to throttle it.

Budgets per mailbox (reference §5, all configurable in :class:`Limits`):

* messages per rolling window (30 per 60 s), a sliding-window log, the same rule Exchange
  and the sandbox apply: at most ``limit`` sends whose *completion* lies in the last window.
  A send counts from the moment it is reserved (as if it completed in the future) until it
  is settled with its completion time, which is never earlier than the time the server
  recorded it; so the relay's window always covers the server's and the relay can go flat
  out at 100 % of the budget without a single throttle reply;
* recipients per rolling 24 h (10,000), the same sliding log weighted by recipients;
* connections (3): :meth:`RateLimiter.try_acquire` holds one slot until
  :meth:`RateLimiter.release`; after a ``432 4.3.2`` :meth:`RateLimiter.fewer_connections`
  lowers the allowance by one (not below 1) for ``fewer_connections_for`` seconds;
* a pause (``554 5.2.0`` quota, ``5.2.25x`` blocks): :meth:`RateLimiter.pause`.

The limiter itself lives in memory; what it counted survives a restart through the queue's
sending ledger: the worker writes each counted send and each pause with its queue change,
and a starting relay hands the ledger's last day back through :meth:`RateLimiter.record`
and :meth:`RateLimiter.pause`.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Grant", "Limits", "MailboxState", "RateLimiter", "SlidingWindow"]

_EPSILON = 1e-3  # seconds past the exact window edge, against float rounding


@dataclass(frozen=True, slots=True)
class Limits:
    """One mailbox's budget (Exchange Online defaults)."""

    messages_per_window: int = 30
    message_window: float = 60.0
    recipients_per_window: int = 10_000
    recipient_window: float = 86_400.0
    max_connections: int = 3
    fewer_connections_for: float = 300.0

    def __post_init__(self) -> None:
        if min(self.messages_per_window, self.recipients_per_window, self.max_connections) < 1:
            raise ValueError("limits must be at least 1")
        if min(self.message_window, self.recipient_window) <= 0:
            raise ValueError("windows must be positive")


class SlidingWindow:
    """A weighted sliding-window log: at most ``limit`` units within any ``window`` seconds.

    Units are *pending* from :meth:`reserve` until :meth:`settle` stamps them with their
    completion time (pending units count as if they lay in the future), or :meth:`cancel`
    returns them (the send provably did not count).
    """

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._times: list[float] = []  # settled completion times, sorted
        self._weights: list[int] = []  # parallel to _times
        self._pending: dict[int, int] = {}
        self._settled = 0  # sum(_weights), kept as it changes: windows hold up to a day
        self._held = 0  # sum(_pending.values())
        self._ids = itertools.count(1)

    def _prune(self, now: float) -> None:
        edge = now - self.window
        cut = bisect.bisect_right(self._times, edge)
        if cut:
            self._settled -= sum(self._weights[:cut])
            del self._times[:cut]
            del self._weights[:cut]

    def used(self, now: float) -> int:
        self._prune(now)
        return self._settled + self._held

    def earliest(self, now: float, weight: int = 1) -> float:
        """The earliest time ``weight`` more units fit: ``now``, a later time, or ``inf``
        (only settling pending units can make room; also when ``weight`` exceeds the limit)."""
        if weight > self.limit:
            return math.inf
        self._prune(now)
        excess = self._settled + self._held + weight - self.limit
        if excess <= 0:
            return now
        freed = 0
        for t, w in zip(self._times, self._weights, strict=True):
            freed += w
            if freed >= excess:
                return t + self.window + _EPSILON
        return math.inf

    def frees_at(self, now: float) -> float | None:
        """When the oldest settled unit leaves the window (``None``: nothing settled)."""
        self._prune(now)
        return self._times[0] + self.window + _EPSILON if self._times else None

    def reserve(self, now: float, weight: int = 1) -> int:
        """Take ``weight`` units now (the caller checked :meth:`earliest`); returns a ticket."""
        if self.earliest(now, weight) > now:
            raise ValueError("no room in the window: check earliest() first")
        ticket = next(self._ids)
        self._pending[ticket] = weight
        self._held += weight
        return ticket

    def settle(self, ticket: int, at: float) -> None:
        """The send finished at ``at``: its units count until ``at + window``."""
        weight = self._pending.pop(ticket, None)
        if weight is None:
            return
        self._held -= weight
        self.add(at, weight)

    def add(self, at: float, weight: int = 1) -> None:
        """Count ``weight`` units settled at ``at`` (never reserved here: before a restart)."""
        i = bisect.bisect_right(self._times, at)
        self._times.insert(i, at)
        self._weights.insert(i, weight)
        self._settled += weight

    def cancel(self, ticket: int) -> None:
        self._held -= self._pending.pop(ticket, 0)


@dataclass(slots=True)
class MailboxState:
    limits: Limits
    messages: SlidingWindow
    recipients: SlidingWindow
    in_use: int = 0
    reduced_to: int | None = None
    reduced_until: float = 0.0
    paused_until: float = 0.0
    pause_reason: str = ""
    grants: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Grant:
    """Permission for one submission: a connection slot plus its share of both windows."""

    mailbox: str
    id: int
    message_ticket: int
    recipient_ticket: int
    recipients: int


class RateLimiter:
    """Budgets for every sending mailbox; ``limits`` is one :class:`Limits` for all, or a
    function of the mailbox address."""

    def __init__(
        self,
        limits: Limits | Callable[[str], Limits] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits or Limits()
        self._clock = clock
        self._boxes: dict[str, MailboxState] = {}
        self._ids = itertools.count(1)

    def state(self, mailbox: str) -> MailboxState:
        key = mailbox.lower()
        box = self._boxes.get(key)
        if box is None:
            limits = self._limits if isinstance(self._limits, Limits) else self._limits(key)
            box = MailboxState(
                limits=limits,
                messages=SlidingWindow(limits.messages_per_window, limits.message_window),
                recipients=SlidingWindow(limits.recipients_per_window, limits.recipient_window),
            )
            self._boxes[key] = box
        return box

    def limits(self, mailbox: str) -> Limits:
        return self.state(mailbox).limits

    # -- connections ----------------------------------------------------------

    def concurrency(self, mailbox: str) -> int:
        """How many connections the mailbox may use right now."""
        box = self.state(mailbox)
        if box.reduced_to is not None and self._clock() >= box.reduced_until:
            box.reduced_to = None
        return box.limits.max_connections if box.reduced_to is None else box.reduced_to

    def in_use(self, mailbox: str) -> int:
        return self.state(mailbox).in_use

    def fewer_connections(self, mailbox: str) -> int:
        """After a ``432 4.3.2``: one connection fewer (at least 1) for a while; returns the
        new allowance."""
        box = self.state(mailbox)
        current = self.concurrency(mailbox)
        box.reduced_to = max(1, min(current, max(box.in_use, 1)) - 1)
        box.reduced_until = self._clock() + box.limits.fewer_connections_for
        return box.reduced_to

    # -- pauses ---------------------------------------------------------------

    def pause(self, mailbox: str, until: float, reason: str = "") -> None:
        """No sends for this mailbox before ``until`` (monotonic); a later pause wins."""
        box = self.state(mailbox)
        if until > box.paused_until:
            box.paused_until = until
            box.pause_reason = reason

    def paused_until(self, mailbox: str) -> float | None:
        box = self.state(mailbox)
        return box.paused_until if box.paused_until > self._clock() else None

    # -- budgets --------------------------------------------------------------

    def record(self, mailbox: str, at: float, recipients: int = 1) -> None:
        """A submission that finished at ``at`` (this limiter's clock) without a grant from
        it: one the relay made before it restarted, read back from the queue's ledger."""
        box = self.state(mailbox)
        box.messages.add(at, 1)
        box.recipients.add(at, max(1, recipients))

    def earliest(self, mailbox: str, recipients: int = 1) -> float:
        """The earliest time a submission with ``recipients`` recipients fits the pause and
        both windows (connections not counted); ``inf`` if only a settle or never can."""
        return self._earliest(self.state(mailbox), self._clock(), recipients)

    @staticmethod
    def _earliest(box: MailboxState, now: float, recipients: int) -> float:
        return max(
            now,
            box.paused_until,
            box.messages.earliest(now, 1),
            box.recipients.earliest(now, recipients),
        )

    def try_acquire(self, mailbox: str, recipients: int = 1) -> Grant | None:
        """Take a connection slot and the budget for one submission, if all allow it now."""
        box = self.state(mailbox)
        now = self._clock()
        if box.in_use >= self.concurrency(mailbox) or self._earliest(box, now, recipients) > now:
            return None
        grant = Grant(
            mailbox=mailbox.lower(),
            id=next(self._ids),
            message_ticket=box.messages.reserve(now, 1),
            recipient_ticket=box.recipients.reserve(now, recipients),
            recipients=recipients,
        )
        box.in_use += 1
        box.grants.add(grant.id)
        return grant

    def settle(self, grant: Grant, *, counted: bool = True) -> None:
        """The submission is over: ``counted`` if the server may have counted it (stamped
        now, its completion time), else its budget is returned. Keeps the connection slot."""
        box = self.state(grant.mailbox)
        now = self._clock()
        if counted:
            box.messages.settle(grant.message_ticket, now)
            box.recipients.settle(grant.recipient_ticket, now)
        else:
            box.messages.cancel(grant.message_ticket)
            box.recipients.cancel(grant.recipient_ticket)

    def release(self, grant: Grant, *, counted: bool = True) -> None:
        """Settle (if not yet) and give the connection slot back."""
        box = self.state(grant.mailbox)
        self.settle(grant, counted=counted)
        if grant.id in box.grants:
            box.grants.discard(grant.id)
            box.in_use -= 1
