"""The delivery loop (Postfix's ``qmgr``): claim due messages, route, pace, hand to workers.

:class:`Scheduler` claims due messages from the queue under a lease, maps each to a sending
account (the account chosen at intake, else the ``router``), and runs a bounded number of
deliveries at once through the shared :class:`~smtp365.relay.worker.Worker`, which waits for
the mailbox's budget before every submission: the relay never sends when the budget says no.

Leases: a claim leases a message for ``lease_seconds`` and hands out its attempt number,
the lease token the worker reports its outcome with. A delivery can run longer than a lease
(it waits for the budget of each recipient chunk, and sends the content once per chunk), so
every ``lease_seconds / 3`` the scheduler renews the leases of the deliveries that have run
that long, all in one queue transaction; short deliveries cost nothing extra. A lease that
is lost all the same (the relay stalled) only makes the queue ignore that attempt's report.

``stop(grace)``: no new claims; deliveries still waiting for a budget give up at once and
defer (their lease is released cleanly); deliveries already talking to the upstream finish
within ``grace`` seconds. Anything still running after that is cancelled and keeps its lease,
so the queue hands it out again when the lease runs out: delivery is at-least-once, nothing
is half-settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

from smtp365.errors import QueueError
from smtp365.relay.queue import Queue, QueuedMessage
from smtp365.relay.worker import Clock, Result, Worker

__all__ = ["Router", "Scheduler", "make_router"]

log = logging.getLogger("smtp365.relay.scheduler")

Router = Callable[[QueuedMessage], str | None]
"""Maps a message to the name of its sending account; ``None``: no account fits."""


def make_router(
    *,
    default: str | None = None,
    by_sender: Mapping[str, str] | None = None,
    by_client: Mapping[str, str] | None = None,
) -> Router:
    """Route by envelope sender (address or ``@domain``), then by client identity, then
    ``default``. Keys are matched case-insensitively."""
    senders = {k.lower(): v for k, v in (by_sender or {}).items()}
    clients = {k.lower(): v for k, v in (by_client or {}).items()}

    def route(msg: QueuedMessage) -> str | None:
        sender = msg.sender.lower()
        if sender in senders:
            return senders[sender]
        domain = "@" + sender.rpartition("@")[2] if "@" in sender else None
        if domain is not None and domain in senders:
            return senders[domain]
        if msg.client.lower() in clients:
            return clients[msg.client.lower()]
        return default

    return route


class Scheduler:
    """Runs deliveries until :meth:`stop`."""

    def __init__(
        self,
        queue: Queue,
        worker: Worker,
        router: Router,
        *,
        max_inflight: int = 16,
        lease_seconds: float = 300.0,
        poll_interval: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        if worker.policy.max_budget_wait >= lease_seconds:
            raise ValueError("max_budget_wait must be shorter than the lease")
        self.queue = queue
        self.worker = worker
        self.router = router
        self.max_inflight = max_inflight
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.clock: Clock = clock or worker.clock
        self.results: dict[Result, int] = dict.fromkeys(Result, 0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._leases: dict[tuple[str, int], float] = {}  # (id, attempt) in flight -> lease end
        self._renewer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        if self._runner is None:
            self._runner = asyncio.create_task(self.run(), name="smtp365-relay-scheduler")
        return self._runner

    def wake(self) -> None:
        """New mail is due (intake calls this after an enqueue): claim without waiting."""
        self._wake.set()

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop claiming, let sending deliveries finish within ``grace``, close connections."""
        self._stopping = True
        self._wake.set()
        self.worker.stop_waiting()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d deliveries cancelled after the grace period", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        await self.worker.close()

    # -- the loop -------------------------------------------------------------

    async def run(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_leases(), name="smtp365-relay-leases")
        while not self._stopping:
            free = self.max_inflight - len(self._tasks)
            if free <= 0:
                # Nothing can be claimed until a delivery finishes (which sets _wake): a wake
                # for new mail meanwhile must not turn this into a busy loop.
                self._wake.clear()
                await self._idle(self.poll_interval)
                continue
            self._wake.clear()
            try:
                claimed = await self.queue.claim(free, self.lease_seconds)
            except Exception:
                log.exception("claiming from the queue failed")
                claimed = []
            for msg in claimed:
                lease_until = msg.lease_until
                if lease_until is None:  # pragma: no cover - a claim always sets one
                    lease_until = self.clock.time() + self.lease_seconds
                self._leases[msg.id, msg.attempts] = lease_until
                task = asyncio.create_task(self._handle(msg), name=f"deliver-{msg.id}")
                self._tasks.add(task)
                task.add_done_callback(self._done)
            if not claimed:
                await self._idle(self.poll_interval)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def _renew_leases(self) -> None:
        """Every third of a lease: renew those with no more than two thirds left."""
        period = self.lease_seconds / 3
        while True:
            await self.clock.sleep(period)
            now = self.clock.time()
            due = [key for key, until in self._leases.items() if until - now <= 2 * period]
            if not due:
                continue
            outcomes = await asyncio.gather(
                *(
                    self.queue.renew(qid, attempt=attempt, lease_seconds=self.lease_seconds)
                    for qid, attempt in due
                ),
                return_exceptions=True,
            )
            for key, outcome in zip(due, outcomes, strict=True):
                if outcome is True:
                    if key in self._leases:
                        self._leases[key] = now + self.lease_seconds
                elif isinstance(outcome, BaseException):
                    if isinstance(outcome, asyncio.CancelledError):
                        raise outcome
                    log.warning("renewing the lease of %s failed: %s", key[0], outcome)
                else:
                    log.warning("%s: attempt %d lost its lease before it was renewed", *key)

    async def _idle(self, timeout: float) -> None:
        waiters: set[asyncio.Future[object]] = {
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self.clock.sleep(timeout)),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _handle(self, msg: QueuedMessage) -> None:
        try:
            await self._attempt(msg)
        finally:
            self._leases.pop((msg.id, msg.attempts), None)

    async def _attempt(self, msg: QueuedMessage) -> None:
        account = msg.account or self.router(msg)
        try:
            if account is None or account not in self.worker.accounts:
                reason = f"no sending account for sender <{msg.sender}>"
                if account is not None:
                    reason = f"unknown sending account {account!r}"
                log.error("%s: %s", msg.id, reason)
                # Retried like any temporary failure; past its lifetime it fails with a DSN.
                self.results[await self.worker.defer(msg, reason)] += 1
                return
            result = await self.worker.deliver(msg, account)
            self.results[result] += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, QueueError) and not await self._still_queued(msg.id):
                # `smtp365 queue delete` during the attempt: the outcome has nowhere to go.
                log.warning("%s was deleted from the queue during its delivery attempt", msg.id)
                self.worker.forget(msg.id)
                return
            # A queue error: leave the message leased; the lease expiry hands it out again.
            log.exception("delivery of %s failed unexpectedly", msg.id)

    async def _still_queued(self, queue_id: str) -> bool:
        try:
            return await self.queue.get(queue_id) is not None
        except QueueError:
            return True  # cannot tell: treat it as the unexpected error it is
