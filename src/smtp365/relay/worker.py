"""Delivery of one claimed message to Exchange Online (Postfix's ``smtp`` process).

A :class:`Worker` keeps a pool of reusable :class:`~smtp365.transport.smtp.SmtpTransport`
connections per sending account, takes a budget from the :class:`RateLimiter` before every
submission (never sending when it says no), splits recipients above the per-message limit
into several submissions, and settles the queue entry from the outcome:

=================================  ==========================================================
outcome                            queue
=================================  ==========================================================
accepted                           ``complete`` with the upstream reply
``Action.RETRY``, network, token   ``defer`` with exponential backoff and full jitter
``Action.FEWER_CONNECTIONS``       that connection closed, mailbox allowance lowered, short defer
``Action.PAUSE_MAILBOX``           mailbox paused until its window frees, ``defer`` to then
``Action.PAUSE_LONG``              mailbox paused ``pause_long``, alert logged, ``defer``
account refused before MAIL FROM   mailbox paused (growing), ``ALERT`` logged, ``defer``
``Action.FIX`` (permanent)         ``fail`` with the reason and the DSN ``on_failed`` made
a temporary outcome past the       ``fail`` (expired, ``Status: 4.4.7``) with its DSN
maximum lifetime
=================================  ==========================================================

A message past its maximum lifetime still gets its attempt (the backoff schedules the last
one right at the expiry); only a temporary outcome of that attempt fails it. A message that
cannot get an attempt because its mailbox is paused fails once it is past its lifetime.

Recipients already accepted upstream are remembered (in memory) for the message's next
attempt, so a retry after a partial delivery does not send to them again.

Every submission the budget counts and every pause goes into the queue's sending ledger with
the queue change that ends the attempt (``ledger=``, same transaction), so that a restarted
relay starts from the budgets as they were.

Every outcome but ``complete`` is reported with the attempt the claim handed out (the lease
token): if the lease was lost meanwhile (the scheduler renews it, so only a stalled relay or
another process loses one), the queue ignores the report and the delivery ends as
``Result.LOST``; the attempt that has the message settles it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from smtp365 import replies
from smtp365.config import AccountSettings
from smtp365.errors import (
    AuthenticationRejected,
    MessageError,
    QueueContentLost,
    Smtp365Error,
    SubmissionRejected,
)
from smtp365.models import Envelope, Reply, Submission, shown, undecodable
from smtp365.relay.backoff import Backoff
from smtp365.relay.queue import Bounce, LedgerEntry, Pause, Queue, QueuedMessage, Sent
from smtp365.relay.ratelimit import Grant, RateLimiter
from smtp365.replies import Action
from smtp365.transport.smtp import SmtpTransport

__all__ = [
    "Clock",
    "ConnectionPool",
    "DeliveryPolicy",
    "FailedHook",
    "Result",
    "SystemClock",
    "Worker",
]

log = logging.getLogger("smtp365.relay.worker")


class Clock(Protocol):
    """Time seam: wall time for the queue, monotonic time for budgets, and sleeping."""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


FailedHook = Callable[[QueuedMessage, str, tuple[str, ...]], Awaitable[Bounce | None]]
"""``on_failed(message, reason, failed_recipients)``: a permanent failure is about to be
recorded; the report it returns (the DSN, see :class:`~smtp365.relay.dsn.Bouncer`) is queued
in the same transaction."""

TransportFactory = Callable[[AccountSettings], SmtpTransport]


class Result(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"
    LOST = "lost"  # the lease was lost: another attempt settles the message


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    max_recipients_per_message: int = 500
    fewer_connections_retry: float = 30.0  # defer after a 432 4.3.2
    quota_pause: float = 3600.0  # pause after 554 5.2.0 when we counted no send in the window
    quota_pause_min: float = 60.0  # never pause shorter than this after 554 5.2.0
    pause_long: float = 3600.0  # pause after 5.2.251-5.2.255
    max_budget_wait: float = 120.0  # wait in-process for a budget at most this, else defer


class ConnectionPool:
    """Idle connections of one account, reused across messages (the transport checks one that
    sat idle with RSET before it carries the next)."""

    def __init__(self, account: AccountSettings, factory: TransportFactory) -> None:
        self.account = account
        self._factory = factory
        self._idle: list[SmtpTransport] = []
        self._busy: set[SmtpTransport] = set()
        self._retired_opened = 0  # connections opened by transports since dropped

    @property
    def connections_opened(self) -> int:
        """TCP+TLS+AUTH sessions opened so far (reuse keeps this low)."""
        live = sum(t.connections_opened for t in (*self._idle, *self._busy))
        return self._retired_opened + live

    def get(self) -> SmtpTransport:
        """An idle connection (most recently used first) or a new, not yet connected one."""
        transport = self._idle.pop() if self._idle else self._factory(self.account)
        self._busy.add(transport)
        return transport

    async def put(self, transport: SmtpTransport, *, keep: bool, limit: int) -> None:
        """Back to the pool, or closed when ``keep`` is false, it is broken, or more than
        ``limit`` connections would stay open."""
        self._busy.discard(transport)
        if keep and transport.connected and len(self._idle) + len(self._busy) < limit:
            self._idle.append(transport)
        else:
            self._retired_opened += transport.connections_opened
            await transport.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for transport in idle:
            self._retired_opened += transport.connections_opened
            await transport.close()


def _chunks(items: Sequence[str], size: int) -> list[tuple[str, ...]]:
    return [tuple(items[i : i + size]) for i in range(0, len(items), size)]


def _reply_text(reply: Reply) -> str:
    return f"{reply.code} {reply.enhanced} {reply.text}".replace("  ", " ").strip()


class Worker:
    """Delivers claimed messages; shared by all scheduler tasks (one pool per account)."""

    def __init__(
        self,
        queue: Queue,
        accounts: Mapping[str, AccountSettings],
        *,
        limiter: RateLimiter | None = None,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
        policy: DeliveryPolicy | None = None,
        on_failed: FailedHook | None = None,
        transport_factory: TransportFactory | None = None,
    ) -> None:
        self.queue = queue
        self.accounts = dict(accounts)
        self.clock: Clock = clock or SystemClock()
        self.limiter = limiter or RateLimiter(clock=self.clock.monotonic)
        self.backoff = backoff or Backoff()
        self.policy = policy or DeliveryPolicy()
        self.on_failed = on_failed
        self._factory: TransportFactory = transport_factory or SmtpTransport
        self._pools: dict[str, ConnectionPool] = {}
        self._done: dict[str, set[str]] = {}  # queue id -> accepted in the current attempt
        self._ledger: dict[str, list[LedgerEntry]] = {}  # queue id -> for its queue change
        self._refusals: dict[str, tuple[int, float]] = {}  # mailbox -> (refusals, paused to)
        self._changed = asyncio.Event()
        self._stopping = False

    # -- plumbing -------------------------------------------------------------

    @staticmethod
    def mailbox_of(account: AccountSettings) -> str:
        return (account.username or account.name).lower()

    def pool(self, account_name: str) -> ConnectionPool:
        pool = self._pools.get(account_name)
        if pool is None:
            pool = self._pools[account_name] = ConnectionPool(
                self.accounts[account_name], self._factory
            )
        return pool

    def connections_opened(self, account_name: str) -> int:
        pool = self._pools.get(account_name)
        return pool.connections_opened if pool else 0

    def stop_waiting(self) -> None:
        """Deliveries still waiting for a budget give up (and defer); sending ones finish."""
        self._stopping = True
        self._notify()

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _wall(self, mono: float) -> float:
        """A monotonic instant as wall time (the queue's clock)."""
        return self.clock.time() + max(0.0, mono - self.clock.monotonic())

    async def _wait(self, timeout: float) -> None:
        changed = asyncio.ensure_future(self._changed.wait())
        sleeper = asyncio.ensure_future(self.clock.sleep(max(0.0, timeout)))
        try:
            await asyncio.wait({changed, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (changed, sleeper):
                task.cancel()
            await asyncio.gather(changed, sleeper, return_exceptions=True)

    def budget_ready_at(self, account_name: str, recipients: int = 1) -> float:
        """Monotonic time the account's mailbox may send next (pause and windows)."""
        mailbox = self.mailbox_of(self.accounts[account_name])
        return self.limiter.earliest(mailbox, recipients)

    async def acquire(self, mailbox: str, recipients: int) -> Grant | None:
        """A budget for one submission, waiting at most ``max_budget_wait``; ``None``: defer."""
        deadline = self.clock.monotonic() + self.policy.max_budget_wait
        while not self._stopping:
            grant = self.limiter.try_acquire(mailbox, recipients)
            if grant is not None:
                return grant
            now = self.clock.monotonic()
            ready = self.limiter.earliest(mailbox, recipients)
            if ready > deadline and not math.isinf(ready):
                return None
            if now >= deadline:
                return None
            # A slot or a pending send frees on release (_notify); time frees the windows.
            blocked_by_time = now + 0.001 < ready < math.inf
            wait = ready - now if blocked_by_time else deadline - now
            await self._wait(min(wait, deadline - now))
        return None

    def _release(self, grant: Grant, *, counted: bool) -> None:
        self.limiter.release(grant, counted=counted)
        self._notify()

    # -- delivery -------------------------------------------------------------

    def forget(self, queue_id: str) -> None:
        """Drop what is known about a message that left the queue behind the worker's back."""
        self._done.pop(queue_id, None)
        self._ledger.pop(queue_id, None)

    def _note(self, queue_id: str, entry: LedgerEntry) -> None:
        """A send or a pause, for the ledger of the message's next queue change."""
        self._ledger.setdefault(queue_id, []).append(entry)

    def _ledger_of(self, queue_id: str) -> list[LedgerEntry]:
        return self._ledger.pop(queue_id, [])

    def _counted(self, queue_id: str, grant: Grant) -> None:
        """The upstream may have counted the submission: settled now (before the queue
        change that goes with it), and noted for the ledger."""
        self.limiter.settle(grant)
        self._note(queue_id, Sent(grant.mailbox, self.clock.time(), grant.recipients))

    async def deliver(self, msg: QueuedMessage, account_name: str) -> Result:
        """Deliver one claimed message and settle it in the queue; never raises for
        delivery problems (only for queue errors and cancellation)."""
        account = self.accounts[account_name]
        mailbox = self.mailbox_of(account)
        done = self._done.setdefault(msg.id, set())
        remaining = [r for r in msg.recipients if r not in done]
        content: bytes | None = None  # read once a budget is granted, not while waiting
        limits = self.limiter.limits(mailbox)
        size = max(1, min(self.policy.max_recipients_per_message, limits.recipients_per_window))
        replies_seen: list[str] = []
        # Recipients no attempt can ever send (not valid UTF-8: queued by an older relay that
        # let them in) are refused here, for good; the others still go.
        refused: dict[str, Reply] = {r: _UNSENDABLE for r in remaining if undecodable(r)}
        if refused:
            remaining = [r for r in remaining if r not in refused]
        pool = self.pool(account_name)
        sender = account.sender or mailbox
        for chunk in _chunks(remaining, size):
            grant = await self.acquire(mailbox, len(chunk))
            if grant is None:
                return await self._defer_for_budget(msg, mailbox, len(chunk))
            if content is None:
                try:
                    content = await self.queue.read(msg.id)
                except QueueContentLost as exc:
                    self._release(grant, counted=False)
                    return await self.fail(msg, exc.what)
                except BaseException:
                    self._release(grant, counted=False)
                    raise
            transport = pool.get()
            keep, counted = True, True
            try:
                outcome = await transport.submit(
                    Submission(
                        # A null sender (a bounce) goes out from the mailbox itself:
                        # Exchange Online sends only as the signed-in mailbox.
                        envelope=Envelope(sender=msg.sender or sender, recipients=chunk),
                        content=content,
                        message_id=msg.message_id,
                    )
                )
            except SubmissionRejected as exc:
                # Rejected before MAIL FROM: nothing the server counts as a send.
                refuses_the_account = _refuses_the_account(exc)
                counted = exc.stage not in _BEFORE_MAIL and not refuses_the_account
                if counted:
                    self._counted(msg.id, grant)
                if refuses_the_account:
                    return await self._account_refused(msg, mailbox, exc, _rejection(exc))
                self._signed_in(mailbox)
                action = self._action(exc)
                keep = action is not Action.FEWER_CONNECTIONS
                return await self._rejected(msg, mailbox, exc, action, grant)
            except MessageError as exc:
                # Refused before anything was sent (an address that cannot be encoded, no
                # SMTPUTF8 upstream): no attempt will ever send it, so it fails now, once.
                counted = False
                return await self.fail(msg, str(exc.what))
            except Smtp365Error as exc:  # network, TLS, token, config: not the message's fault
                counted = False
                keep = False
                why = f"{type(exc).__name__}: {exc.what}"
                if getattr(exc, "possibly_delivered", False):  # lost between the dot and 250
                    why += "; may have been delivered; the retry can duplicate it"
                    # The mailbox may have counted it: so does its budget (and the ledger).
                    counted = True
                    self._counted(msg.id, grant)
                if not exc.temporary:  # no connection will do until someone fixes it
                    return await self._account_refused(msg, mailbox, exc, why)
                return await self.defer(msg, why)
            except Exception as exc:
                # A defect, not the message's or the upstream's doing: the connection is not
                # reused, the upstream may have counted the attempt, the message backs off
                # (and expires with its DSN) instead of sitting leased.
                keep = False
                self._counted(msg.id, grant)
                log.exception("%s: delivery attempt failed unexpectedly", msg.id)
                return await self.defer(msg, f"internal error: {type(exc).__name__}")
            except BaseException:  # cancelled (the relay stops): the connection goes too
                keep = False
                raise
            else:
                self._counted(msg.id, grant)
            finally:
                self._release(grant, counted=counted)
                await pool.put(transport, keep=keep, limit=self.limiter.concurrency(mailbox))
            self._signed_in(mailbox)
            done.update(outcome.accepted)
            refused.update(outcome.refused)
            replies_seen.append(_reply_text(outcome.reply))
        return await self._finish(msg, replies_seen, refused)

    async def _finish(
        self, msg: QueuedMessage, replies_seen: list[str], refused: dict[str, Reply]
    ) -> Result:
        temporary = {r: rep for r, rep in refused.items() if _temporary(rep)}
        permanent = {r: rep for r, rep in refused.items() if r not in temporary}
        if temporary:
            first = next(iter(temporary.values()))
            return await self.defer(msg, f"recipients deferred: {_reply_text(first)}")
        done = self._done.pop(msg.id, set())
        if permanent and not done:
            first = next(iter(permanent.values()))
            reason = f"all recipients refused: {_reply_text(first)}"
            if first is _UNSENDABLE:  # the relay's own refusal: name the address
                reason += f" (<{shown(next(iter(permanent)))}>)"
            return await self.fail(msg, reason)
        reply = replies_seen[-1] if replies_seen else "250 nothing left to send"
        bounce = None
        if permanent:
            reason = "; ".join(f"<{shown(r)}>: {_reply_text(rep)}" for r, rep in permanent.items())
            reply = f"{reply} (refused: {reason})"
            bounce = await self._report(msg, f"recipient refused: {reason}", tuple(permanent))
        if not await self.queue.complete(
            msg.id, reply=reply, ledger=self._ledger_of(msg.id), bounce=bounce
        ):
            log.warning("delivered %s again (a duplicate: it was delivered already)", msg.id)
            return Result.DELIVERED
        log.info("delivered %s to %d recipient(s): %s", msg.id, len(done), reply)
        self._log_bounce(msg, bounce)
        return Result.DELIVERED

    @staticmethod
    def _action(exc: SubmissionRejected) -> Action:
        if exc.entry is not None:
            return exc.entry.action
        return Action.RETRY if exc.temporary else Action.FIX

    async def _rejected(
        self,
        msg: QueuedMessage,
        mailbox: str,
        exc: SubmissionRejected,
        action: Action,
        grant: Grant,
    ) -> Result:
        reply = _reply_of(exc)
        now = self.clock.monotonic()
        if action is Action.FIX or not exc.temporary:
            return await self.fail(msg, _rejection(exc))
        if action is Action.FEWER_CONNECTIONS:
            allowed = self.limiter.fewer_connections(mailbox)
            log.warning("%s: 432 from upstream, now %d connection(s): %s", mailbox, allowed, reply)
            return await self.defer(msg, reply, delay=self.policy.fewer_connections_retry)
        if action is Action.PAUSE_MAILBOX:
            # Settle our share first so the window's own answer includes this send.
            self.limiter.settle(grant)
            # Until the window frees: by our own count if it explains the refusal, else (the
            # mailbox also sends from elsewhere) when our oldest counted send leaves it.
            window = self.limiter.state(mailbox).recipients
            frees = window.earliest(now, grant.recipients)
            if not now + 1.0 < frees < math.inf:
                oldest = window.frees_at(now)
                frees = oldest if oldest is not None else now + self.policy.quota_pause
            until = max(now + self.policy.quota_pause_min, frees)
            self.limiter.pause(mailbox, until, reply)
            self._note(msg.id, Pause(mailbox, self._wall(until), reply))
            log.warning("%s: quota reached, paused for %.0f s: %s", mailbox, until - now, reply)
            return await self.defer(msg, reply, delay=until - now)
        if action is Action.PAUSE_LONG:
            until = now + self.policy.pause_long
            self.limiter.pause(mailbox, until, reply)
            self._note(msg.id, Pause(mailbox, self._wall(until), reply))
            log.error(
                "ALERT %s is blocked by Exchange Online; paused for %.0f s: %s",
                mailbox,
                self.policy.pause_long,
                reply,
            )
            return await self.defer(msg, reply, delay=self.policy.pause_long)
        return await self.defer(msg, reply)

    async def _account_refused(
        self, msg: QueuedMessage, mailbox: str, exc: Smtp365Error, reason: str
    ) -> Result:
        """The account cannot sign in or submit (``535 5.7.3``, ``5.7.139``, ``530``, TLS or
        credentials refused): a problem of the account, not of the message, so the message
        waits (never failed for that; at its maximum lifetime it expires) while the mailbox
        is paused, ``retry_base`` doubling per refusal up to ``retry_max``, with an alert
        per pause (Postfix: ``smtp_sasl_auth_soft_bounce = yes``)."""
        now = self.clock.monotonic()
        refusals, until = self._refusals.get(mailbox, (0, 0.0))
        if until <= now:  # not a delivery that ran into the same refusal at once
            refusals += 1
            until = now + self.backoff.ceiling(refusals)
            self._refusals[mailbox] = (refusals, until)
            # Not in the ledger: a relay restarted (after a fix, likely) tries again at once.
            self.limiter.pause(mailbox, until, reason)
            fix = f"; fix: {exc.fix}" if exc.fix else ""
            log.error(
                "ALERT %s cannot send: %s%s (its mail waits; paused for %.0f s, refusal %d)",
                mailbox,
                exc.what,
                fix,
                until - now,
                refusals,
            )
        return await self.defer(msg, reason, delay=until - now)

    def _signed_in(self, mailbox: str) -> None:
        """The mailbox got past AUTH: its refusals (if any) are over."""
        if self._refusals:
            self._refusals.pop(mailbox, None)

    async def _defer_for_budget(self, msg: QueuedMessage, mailbox: str, recipients: int) -> Result:
        ready = self.limiter.earliest(mailbox, recipients)
        now = self.clock.monotonic()
        delay = (ready - now) if ready < math.inf else 1.0
        reason = "mailbox budget exhausted"
        paused = self.limiter.paused_until(mailbox)
        if paused is not None:
            reason = f"mailbox paused: {self.limiter.state(mailbox).pause_reason}"
        if self._stopping:
            reason = "relay stopping"
        elif paused is not None and self.backoff.expired(msg.received_at, self.clock.time()):
            # No attempt before the pause ends, and the message has no time left.
            return await self.fail(msg, f"expired in the queue; last error: {reason}")
        # Waits for a window are not failed attempts: they do not expire a message.
        until = self.clock.time() + max(0.0, delay)
        if not await self._put_back(msg, until, reason):
            return Result.LOST
        if self._stopping:
            log.info("%s back in the queue: the relay is stopping", msg.id)
        else:
            log.info("deferred %s until budget frees (%.1f s): %s", msg.id, delay, reason)
        return Result.DEFERRED

    async def defer(self, msg: QueuedMessage, reason: str, *, delay: float | None = None) -> Result:
        """A temporary failure: back off (or wait ``delay``), or fail the message as expired
        when its lifetime is over."""
        now = self.clock.time()
        until = self.backoff.next_attempt(
            msg.attempts, now=now, received_at=msg.received_at, delay=delay
        )
        if until is None:
            return await self.fail(msg, f"expired in the queue; last error: {reason}")
        if not await self._put_back(msg, until, reason):
            return Result.LOST
        log.info("deferred %s for %.1f s: %s", msg.id, until - now, reason)
        return Result.DEFERRED

    async def _put_back(self, msg: QueuedMessage, until: float, reason: str) -> bool:
        if await self.queue.defer(
            msg.id,
            until=until,
            reason=shown(reason),
            recipients=self._left(msg),
            ledger=self._ledger_of(msg.id),
            attempt=msg.attempts,
        ):
            return True
        self._lost(msg, f"deferred: {reason}")
        return False

    @staticmethod
    def _lost(msg: QueuedMessage, outcome: str) -> None:
        log.warning(
            "%s: attempt %d lost its lease (the message was claimed again or settled);"
            " its outcome is not recorded: %s",
            msg.id,
            msg.attempts,
            outcome,
        )

    def _left(self, msg: QueuedMessage) -> list[str] | None:
        """The recipients still to do when this attempt got some through (the queue keeps
        them, so a restart does not send to the others again); ``None``: all of them."""
        done = self._done.pop(msg.id, set())
        if not done:
            return None
        return [r for r in msg.recipients if r not in done] or None

    async def fail(self, msg: QueuedMessage, reason: str) -> Result:
        """A permanent failure, recorded with its DSN (the ``on_failed`` hook's report)."""
        done = self._done.pop(msg.id, set())
        failed = tuple(r for r in msg.recipients if r not in done)
        bounce = await self._report(msg, reason, failed)
        if not await self.queue.fail(
            msg.id,
            reason=shown(reason),
            ledger=self._ledger_of(msg.id),
            attempt=msg.attempts,
            bounce=bounce,
        ):
            self._lost(msg, f"failed: {reason}")
            return Result.LOST
        log.warning("failed %s: %s", msg.id, reason)
        self._log_bounce(msg, bounce)
        return Result.FAILED

    async def _report(
        self, msg: QueuedMessage, reason: str, failed: tuple[str, ...]
    ) -> Bounce | None:
        """The DSN to queue with the outcome (from the ``on_failed`` hook), if any."""
        if self.on_failed is None:
            return None
        try:
            return await self.on_failed(msg, reason, failed)
        except Exception:
            log.exception("no bounce for %s: the report could not be made", msg.id)
            return None

    @staticmethod
    def _log_bounce(msg: QueuedMessage, bounce: Bounce | None) -> None:
        if bounce is not None:
            to = ", ".join(bounce.envelope.recipients)
            log.info("bounce %s for %s to %s", bounce.queue_id, msg.id, to)


_UNSENDABLE = Reply(553, "5.1.3", "address is not valid UTF-8; refused by the relay, not sent")

_BEFORE_MAIL = frozenset({"connect", "ehlo", "starttls", "auth"})
"""Stages of a submission before this message's MAIL FROM: the session, not the message."""

_ACCOUNT_REPLIES = frozenset({"not-authenticated", "basic-auth-retired"})
"""Catalogue entries that refuse the account's sign-in whatever command they answer."""


def _refuses_the_account(exc: SubmissionRejected) -> bool:
    """A permanent refusal of the session or the sign-in, not of this message."""
    if exc.temporary and (exc.entry is None or exc.entry.action is not Action.FIX):
        return False  # e.g. 421 or 454 at the greeting or AUTH: back off and retry
    return (
        exc.stage in _BEFORE_MAIL
        or isinstance(exc, AuthenticationRejected)
        or (exc.entry is not None and exc.entry.key in _ACCOUNT_REPLIES)
    )


def _reply_of(exc: SubmissionRejected) -> str:
    return f"{exc.code} {exc.enhanced} {exc.text}".replace("  ", " ").strip()


def _rejection(exc: SubmissionRejected) -> str:
    return f"{exc.stage} rejected: {_reply_of(exc)}"


def _temporary(reply: Reply) -> bool:
    entry = replies.lookup(reply)
    if entry is not None:
        return entry.temporary
    return 400 <= reply.code < 500
