"""The relay's queue: the one place where accepted mail lives until it is delivered or failed.

Life of a message::

    enqueue ─▶ queued ─claim─▶ active ─complete─▶ delivered ┐
                 ▲               │  ├──defer────▶ deferred  │ kept as the delivery log
                 │               │  └──fail─────▶ failed    ┘ until purge_log()
                 │   lease expires (worker crashed): claimable again
        release ─┴── held ◀─hold── queued / deferred / active

Rules every backend keeps (checked by ``tests/relay/queue_contract.py``):

* ``enqueue`` returns only once the content and the envelope are durable (data fsync'd,
  directory entry or database commit fsync'd). A crash at any instant leaves either no
  trace of a message or a complete one.
* ``claim`` hands each due message to one claimer only, with a lease; a lease that runs out
  (its worker died or hung) makes the message claimable again. Every claim counts as an
  attempt, and the attempt number it hands out (:attr:`QueuedMessage.attempts`) is the
  lease token.
* ``defer``, ``fail`` and ``renew`` given the ``attempt`` a worker holds apply only while
  that is still the message's current attempt and the message is neither delivered nor
  failed. Otherwise the worker lost its lease (the message was claimed again, or settled by
  the attempt that has it): nothing changes and they return ``False``, so a stale worker can
  neither fail nor re-defer a message another attempt is delivering. Without ``attempt``
  (the operator's tools) they apply to any message that is not delivered or failed.
* ``fail`` and ``complete`` given a ``bounce`` (the delivery status notification) queue it
  in the same transaction as the outcome: both are stored or neither, so a crash in
  between cannot lose the report, and an outcome that is ignored queues no report.
* ``complete`` wins over anything else, stale or not: delivery is at-least-once, and a
  message the upstream accepted is marked delivered whatever state it is in, failed
  included. Only an already delivered message stays as it is (``complete`` returns
  ``False``: the second delivery was a duplicate).
* Delivered and failed messages stay as the delivery log (with an event history per
  message) until ``purge_log``. Delivered content is dropped at once; failed content is
  kept (for ``retry`` and the delivery status notification) until ``purge_log``.
* The queue also keeps the sending **ledger**, the history of the mailboxes' budgets: each
  submission the upstream may have counted (:class:`Sent`) and each pause Exchange Online
  imposed (:class:`Pause`), so a restarted relay (or, with a shared backend, another node)
  counts what was sent before. ``complete``, ``defer`` and ``fail`` take the entries of
  their attempt (``ledger=``) and write them in the same transaction, at no extra cost;
  they are recorded even when the change itself is refused or ignored (the sends happened).
  ``record`` writes entries on their own; ``ledger`` reads them back; ``purge_log`` prunes
  them.

Times are seconds since the epoch (``float``, UTC), taken from the clock the backend was
given, so tests move time instead of sleeping.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

from smtp365.models import Envelope

__all__ = [
    "Bounce",
    "Content",
    "Event",
    "Ledger",
    "LedgerEntry",
    "LogEntry",
    "Pause",
    "Queue",
    "QueueStats",
    "QueuedMessage",
    "Sent",
    "State",
]

Content = bytes | bytearray | memoryview | os.PathLike[str]
"""Message bytes, or the path of a finished file that the queue takes over (moves in)."""


class State(StrEnum):
    QUEUED = "queued"  # waiting for its first attempt
    ACTIVE = "active"  # leased to a worker
    DEFERRED = "deferred"  # a temporary failure; waits for next_attempt_at
    HELD = "held"  # stopped by the operator until released
    DELIVERED = "delivered"  # the upstream said 250 (delivery log)
    FAILED = "failed"  # permanently failed (delivery log)

    @property
    def terminal(self) -> bool:
        return self in (State.DELIVERED, State.FAILED)


class Event(StrEnum):
    """What the per-message history records (one :class:`LogEntry` each)."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"
    EXPIRED = "expired"  # a lease ran out (worker crashed or hung); the message was taken back
    HELD = "held"
    RELEASED = "released"
    RETRIED = "retried"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class QueuedMessage:
    """One message as the queue knows it (a snapshot; the queue may have moved on)."""

    id: str
    sender: str
    recipients: tuple[str, ...]
    size: int
    received_at: float
    state: State
    attempts: int
    next_attempt_at: float
    lease_until: float | None = None
    last_reason: str = ""  # last defer/fail reason, or the upstream reply once delivered
    account: str | None = None  # sending account chosen at intake; None: route later
    client: str = ""  # who handed it to us (user name or address)
    message_id: str = ""  # the Message-ID header, to match duplicates across the relay
    finished_at: float | None = None  # when it was delivered or failed
    content_path: Path | None = None  # the spool file, when the body is not stored inline

    @property
    def envelope(self) -> Envelope:
        return Envelope(sender=self.sender, recipients=self.recipients)


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One event in a message's history: the delivery log."""

    queue_id: str
    at: float
    event: Event
    attempt: int
    detail: str = ""  # upstream reply, defer/fail reason
    duration: float | None = None  # seconds from claim to outcome, for attempts


@dataclass(frozen=True, slots=True)
class Sent:
    """One submission a mailbox's budget counts: when it finished, and its recipients."""

    mailbox: str  # the sending mailbox, lower case (the budgets' key)
    at: float
    recipients: int = 1


@dataclass(frozen=True, slots=True)
class Pause:
    """Exchange Online stopped a mailbox (``554 5.2.0`` quota, ``5.2.251``-``5.2.255``
    blocks): nothing is sent from it before ``until``."""

    mailbox: str
    until: float
    reason: str = ""


LedgerEntry = Sent | Pause


@dataclass(frozen=True, slots=True)
class Ledger:
    """What :meth:`Queue.ledger` returns, each part oldest first."""

    sent: tuple[Sent, ...] = ()
    pauses: tuple[Pause, ...] = ()


@dataclass(frozen=True, slots=True)
class Bounce:
    """A report (a DSN) to queue together with the outcome it reports on: ``queue_id``
    from :meth:`Queue.new_id`, the rest as for :meth:`Queue.enqueue`."""

    queue_id: str
    envelope: Envelope
    content: bytes
    message_id: str = ""
    account: str | None = None
    client: str = "bounce"


@dataclass(frozen=True, slots=True)
class QueueStats:
    counts: Mapping[State, int] = field(default_factory=dict)
    pending_bytes: int = 0  # size of every message not yet delivered or failed
    oldest_pending_at: float | None = None  # received_at of the oldest such message

    @property
    def pending(self) -> int:
        return sum(n for state, n in self.counts.items() if not state.terminal)

    def __getitem__(self, state: State) -> int:
        return self.counts.get(state, 0)


@runtime_checkable
class Queue(Protocol):
    """Durable message store with leases. Unknown ids and forbidden moves raise QueueError."""

    def new_id(self) -> str:
        """A fresh queue id, for a message whose id must be known before it is stored (the
        listener writes it into the Received: header)."""
        ...

    async def enqueue(
        self,
        envelope: Envelope,
        content: Content,
        *,
        message_id: str = "",
        account: str | None = None,
        client: str = "",
        queue_id: str | None = None,
    ) -> str:
        """Store a message durably and return its queue id (``queue_id`` from
        :meth:`new_id`, or a new one).

        A path is taken over: moved into the queue's storage (or copied, then removed).
        """
        ...

    async def claim(
        self, n: int, lease_seconds: float, *, now: float | None = None
    ) -> builtins.list[QueuedMessage]:
        """Lease up to ``n`` due messages (queued/deferred with next_attempt_at <= now, or
        active with an expired lease), oldest due first, and count an attempt on each."""
        ...

    async def read(self, queue_id: str) -> bytes:
        """The message content, byte-exact as enqueued. A message still to be delivered
        whose content is missing (disk damage) raises
        :class:`~smtp365.errors.QueueContentLost`: it can only be failed."""
        ...

    async def complete(
        self,
        queue_id: str,
        *,
        reply: str,
        ledger: Sequence[LedgerEntry] = (),
        bounce: Bounce | None = None,
    ) -> bool:
        """The upstream accepted it: delivered, with ``reply`` kept in the log, whatever
        state the message is in; ``False`` (nothing changed) if it was already delivered.
        ``bounce``: a report for the recipients refused, queued in the same transaction.

        ``ledger``: the attempt's sends and pauses (see the module's rules), also for
        :meth:`defer` and :meth:`fail`."""
        ...

    async def defer(
        self,
        queue_id: str,
        *,
        until: float,
        reason: str,
        recipients: Sequence[str] | None = None,
        ledger: Sequence[LedgerEntry] = (),
        attempt: int | None = None,
    ) -> bool:
        """A temporary failure: try again at ``until``. A held message stays held.

        ``recipients``: those still to be sent to, when the attempt got some of them
        through (a non-empty subset of the message's recipients); the others are done and
        are not sent to again, even after a restart.

        ``attempt``: the lease token from :meth:`claim`; ``False`` (nothing changed) when it
        is no longer the message's current attempt, or the message was settled meanwhile."""
        ...

    async def fail(
        self,
        queue_id: str,
        *,
        reason: str,
        ledger: Sequence[LedgerEntry] = (),
        attempt: int | None = None,
        bounce: Bounce | None = None,
    ) -> bool:
        """A permanent failure: kept as failed (with its content) until purged. ``attempt``
        as for :meth:`defer`. ``bounce``: the report to the sender, queued in the same
        transaction (if storing it fails, the failure is not recorded either)."""
        ...

    async def renew(self, queue_id: str, *, attempt: int, lease_seconds: float) -> bool:
        """Extend the lease of a delivery still running to ``lease_seconds`` from now;
        ``False`` when ``attempt`` is no longer the current one (as for :meth:`defer`)."""
        ...

    async def hold(self, queue_id: str) -> None: ...

    async def release(self, queue_id: str) -> None:
        """A held message becomes due now."""
        ...

    async def retry(self, queue_id: str) -> None:
        """A queued, deferred or failed message becomes due now."""
        ...

    async def delete(self, queue_id: str) -> None:
        """Remove a message and its content, whatever its state."""
        ...

    async def get(self, queue_id: str) -> QueuedMessage | None: ...

    async def list(
        self, state: State | None = None, *, limit: int | None = None
    ) -> builtins.list[QueuedMessage]:
        """Messages in id (arrival) order, optionally of one state."""
        ...

    async def history(self, queue_id: str) -> builtins.list[LogEntry]: ...

    async def stats(self) -> QueueStats: ...

    async def purge_log(
        self, older_than: float, *, now: float | None = None, keep_ledger: float | None = None
    ) -> int:
        """Forget delivered/failed messages finished more than ``older_than`` seconds ago
        (``now`` minus ``older_than``) with their history, and log entries as old of
        messages no longer in the queue (deleted); the history of a message still in the
        queue is kept whatever its age. Returns how many messages went.

        Sends more than ``keep_ledger`` seconds old (default: ``older_than``) and pauses
        that ended as long ago leave the ledger."""
        ...

    async def record(self, ledger: Sequence[LedgerEntry]) -> None:
        """Add sends and pauses to the ledger without a queue change (like a claim: no
        fsync of its own)."""
        ...

    async def ledger(self, since: float) -> Ledger:
        """The sends that finished at or after ``since`` and the pauses lasting past it."""
        ...

    async def close(self) -> None: ...
