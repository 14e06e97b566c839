"""Delivery of what hostile sessions leave queued (security.md §7, the delivery side): one
bad message must never break the delivery of others.

The messages come from the hostile sessions of ``test_fuzz_listener`` (SMTPUTF8, non-ASCII
and invalid UTF-8 addresses, Unicode ESMTP parameters, 8-bit header lines, huge header
sections), run through the real listener over the in-memory transport; each is followed by
an innocent message from a device (``scan@printer.local``). The relay rewrites every sender
to Alice's mailbox (``rewrite_sender``); the real scheduler and worker deliver it all to the
in-process sandbox, one delivery at a time, so each message goes out on the connection the
one before it left in the pool.

Oracle, for each example: every innocent message ends DELIVERED (none bounced); every
message ends delivered or failed within bounded time (none left leased, none deferred: the
sandbox injects no fault, so a deferral is a retry that fails the same way) and never with
``SendAsDenied`` (a ``From:`` the rewrite missed); a failed message whose sender is not
``<>`` has its DSN, and that report is delivered too; no log record with a traceback or at
ERROR and above; no ``451 4.3.0`` and no reply that is not UTF-8 from the listener.

The cases written out: the audit's sessions, each followed by an innocent message; a
recipient that cannot be encoded, queued as an older relay queued it; and a failure injected
in the transport between MAIL and RCPT, after which the next message on the pooled
connection must be delivered.

The default run tries ``FUZZ_EXAMPLES`` (30) fixed generated examples; ``make fuzz`` tries
3,000 from a random ``FUZZ_SEED`` (printed, to replay a failure).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import smtp365.transport.smtp as smtp_transport
from smtp365.models import Envelope
from smtp365.relay.backoff import Backoff
from smtp365.relay.dsn import Bouncer
from smtp365.relay.intake import ClientInfo, Intake, Route
from smtp365.relay.listener import Limits as ListenerLimits
from smtp365.relay.listener import ListenerConfig, RelayListener
from smtp365.relay.policy import RelayPolicy
from smtp365.relay.queue import Bounce, Event, QueuedMessage, State
from smtp365.relay.queue.sqlite import SqliteQueue
from smtp365.relay.ratelimit import Limits, RateLimiter
from smtp365.relay.scheduler import Scheduler, make_router
from smtp365.relay.worker import DeliveryPolicy, Result, Worker
from smtp365.sandbox import Sandbox, SandboxSettings
from smtp365.sandbox.settings import LimitSettings
from tests.relay.test_delivery import ALICE, BOB, account_for, message

from .listener_helpers import HOSTNAME, LOCALHOST
from .test_fuzz_listener import (
    FUZZ_SETTINGS,
    WRITTEN_OUT,
    CrashTrap,
    crash_replies,
    drive,
    hostile_transaction,
    no_crash,
    queued_ids,
    trapping,
)

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))
SEED = os.environ.get("FUZZ_SEED")  # set: a random search from this seed; unset: fixed
SETTLE = 20.0  # seconds an example's messages get to end delivered or failed
INNOCENT = "scan@printer.local"
EHLO = b"EHLO fuzz.example\r\n"
MANY = 1_000_000_000  # budgets nobody reaches here


@dataclass
class Rig:
    """Listener (not listening: sessions run over the in-memory transport), queue,
    scheduler, worker and the sandbox they deliver to."""

    sb: Sandbox
    queue: SqliteQueue
    listener: RelayListener
    worker: Worker
    scheduler: Scheduler
    trap: CrashTrap
    reports: dict[str, Bounce | None] = field(default_factory=dict)  # queue id -> its DSN
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # renewed as each delivery ends
    peers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    innocents: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def delivery_ended(self) -> None:
        self.ended.set()
        self.ended = asyncio.Event()

    async def session(self, segments: list[bytes]) -> list[str]:
        """One session from its own address; the ids of the messages it got queued."""
        n = next(self.peers)
        out = await drive(self.listener, segments, f"127.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
        problems = crash_replies(out)
        assert not problems, "\n".join(problems)
        return queued_ids(out)

    async def innocent(self) -> tuple[str, str]:
        """An innocent message from a device: (queue id, Message-ID)."""
        n = next(self.innocents)
        mid = f"<innocent-{n}@printer.local>"
        data = (
            f"From: Scanner <{INNOCENT}>\r\nTo: someone@example.net\r\nSubject: scan {n}\r\n"
            f"Message-ID: {mid}\r\n\r\nscan {n}\r\n.\r\n"
        ).encode()
        ids = await self.session(
            [
                EHLO,
                f"MAIL FROM:<{INNOCENT}>\r\n".encode(),
                b"RCPT TO:<someone@example.net>\r\n",
                b"DATA\r\n",
                data,
            ]
        )
        assert len(ids) == 1, f"the innocent message {n} was not accepted"
        return ids[0], mid

    async def states(self, ids: set[str]) -> dict[str, QueuedMessage]:
        found = {qid: await self.queue.get(qid) for qid in ids}
        return {qid: msg for qid, msg in found.items() if msg is not None}

    async def settle(self, ids: set[str]) -> dict[str, QueuedMessage]:
        """Until the messages ``ids`` and their reports have ended delivered or failed and no
        delivery runs; fails at once on a deferral or a crash, and after SETTLE seconds."""
        msgs: dict[str, QueuedMessage] = {}
        try:
            async with asyncio.timeout(SETTLE):
                while True:
                    ended = self.ended
                    ids |= {b.queue_id for i in ids if (b := self.reports.get(i)) is not None}
                    msgs = await self.states(ids)
                    no_crash(self.trap.take())
                    deferred = [m for m in msgs.values() if m.state is State.DEFERRED]
                    assert not deferred, "deferred (retried for nothing): " + _show(deferred)
                    done = all(m.state.terminal for m in msgs.values())
                    if done and self.scheduler.inflight == 0:
                        return msgs
                    await ended.wait()
        except TimeoutError:
            left = [m for m in msgs.values() if not m.state.terminal]
            raise AssertionError(f"not settled after {SETTLE:g} s: {_show(left)}") from None

    async def clean_up(self, ids: set[str]) -> None:
        """What an example leaves behind goes (so the next one starts afresh): its messages
        that did not end, and the pooled connections (one left in a bad state included)."""
        for qid, msg in (await self.states(ids)).items():
            if not msg.state.terminal:
                await self.queue.delete(qid)
        async with asyncio.timeout(SETTLE):
            while self.scheduler.inflight:
                await self.ended.wait()
        await self.worker.close()
        self.trap.take()


def _show(msgs: Any) -> str:
    return "; ".join(
        f"{m.id} {m.state.value} after {m.attempts} attempt(s): {m.last_reason[:300]}" for m in msgs
    )


def _route(client: ClientInfo, envelope: Envelope) -> Route:
    return Route("alice", rewrite_to=ALICE)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    with trapping() as trap:
        limits = LimitSettings(messages_per_minute=MANY, recipients_per_day=MANY)
        sb = Sandbox(tmp_path / "sbx", SandboxSettings(limits=limits))
        await sb.start()
        queue = await SqliteQueue.open(tmp_path / "queue")
        scheduler: Scheduler | None = None
        try:
            bouncer = Bouncer(queue, account="postmaster", from_address=BOB, reporting_mta=HOSTNAME)
            reports: dict[str, Bounce | None] = {}

            async def on_failed(
                msg: QueuedMessage, reason: str, rcpts: tuple[str, ...]
            ) -> Bounce | None:
                reports[msg.id] = bounce = await bouncer(msg, reason, rcpts)
                return bounce

            worker = Worker(
                queue,
                {"alice": account_for(sb), "postmaster": account_for(sb, BOB)},
                limiter=RateLimiter(Limits(messages_per_window=MANY, recipients_per_window=MANY)),
                backoff=Backoff(base=0.2, cap=0.4, floor=0.1, rng=random.Random(1)),
                policy=DeliveryPolicy(max_budget_wait=10.0),
                on_failed=on_failed,
            )
            # One delivery at a time, in the order of arrival: each message goes out on
            # the connection the one before it left in the pool.
            scheduler = Scheduler(
                queue,
                worker,
                make_router(default="alice"),
                max_inflight=1,
                lease_seconds=30.0,
                poll_interval=0.05,
            )
            config = ListenerConfig(
                host="127.0.0.1", port=0, hostname=HOSTNAME, limits=ListenerLimits(auth_delay=0)
            )
            intake = Intake(
                queue, hostname=HOSTNAME, router=_route, on_enqueued=lambda _: scheduler.wake()
            )
            listener = RelayListener(
                config, queue=queue, policy=RelayPolicy((LOCALHOST,)), intake=intake
            )
            made = Rig(sb, queue, listener, worker, scheduler, trap, reports)
            done = scheduler._done

            def ended(task: asyncio.Task[None]) -> None:  # a delivery task is over
                done(task)
                made.delivery_ended()

            scheduler._done = ended  # type: ignore[method-assign]
            scheduler.start()
            yield made
        finally:
            if scheduler is not None:
                await scheduler.stop(grace=5)
            await queue.close()
            await sb.stop()


async def _check(rig: Rig, ids: set[str], innocents: dict[str, str]) -> None:
    """The oracle for the messages ``ids`` (``innocents``: queue id -> Message-ID)."""
    msgs = await rig.settle(set(ids))
    arrived = {m.message_id for m in rig.sb.store.list()}
    for qid, mid in innocents.items():
        msg = msgs[qid]
        assert msg.state is State.DELIVERED, f"innocent message {mid}: {_show([msg])}"
        assert mid in arrived, mid
        assert rig.reports.get(qid) is None, f"innocent message {mid} was bounced"
    for msg in msgs.values():
        events = {e.event for e in await rig.queue.history(msg.id)}
        assert events <= {Event.DELIVERED, Event.FAILED}, (_show([msg]), events)
        assert "5.2.252" not in msg.last_reason, f"From: not rewritten: {_show([msg])}"
        if msg.state is State.FAILED and msg.sender:
            bounce = rig.reports.get(msg.id)
            assert bounce is not None, f"failed without a DSN: {_show([msg])}"
            assert bounce.envelope.recipients == (msg.sender,)
        if (bounce := rig.reports.get(msg.id)) is not None:
            assert msgs[bounce.queue_id].state is State.DELIVERED, _show([msgs[bounce.queue_id]])
    assert rig.scheduler.results[Result.LOST] == 0


async def _example(rig: Rig, sessions: list[list[bytes]]) -> None:
    """``sessions`` (hostile), each followed by an innocent message, after a first one."""
    ids: set[str] = set()
    innocents: dict[str, str] = {}
    try:
        qid, mid = await rig.innocent()
        ids.add(qid)
        innocents[qid] = mid
        for segments in sessions:
            ids.update(await rig.session(segments))
            qid, mid = await rig.innocent()
            ids.add(qid)
            innocents[qid] = mid
        await _check(rig, ids, innocents)
    finally:
        await rig.clean_up(ids | {b.queue_id for i in ids if (b := rig.reports.get(i))})


hostile_sessions = st.lists(
    st.lists(hostile_transaction, min_size=1, max_size=2).map(
        lambda txs: [EHLO, *(p for tx in txs for p in tx)]
    ),
    min_size=1,
    max_size=3,
)


def _sync(rig: Rig, loop: asyncio.AbstractEventLoop) -> Callable[[list[list[bytes]]], None]:
    def check(sessions: list[list[bytes]]) -> None:
        future = asyncio.run_coroutine_threadsafe(_example(rig, sessions), loop)
        future.result(timeout=3 * SETTLE + 60)

    return check


async def test_bad_messages_never_break_the_delivery_of_others(rig: Rig) -> None:
    budget = settings(FUZZ_SETTINGS, max_examples=EXAMPLES)  # deliveries: fewer by default
    run = budget(given(hostile_sessions)(_sync(rig, asyncio.get_running_loop())))
    if SEED is not None:
        run = hypothesis.seed(int(SEED))(run)
    # hypothesis is synchronous: it runs in a thread, each example on this loop.
    await asyncio.to_thread(run)
    stats = await rig.queue.stats()
    print({state.value: n for state, n in stats.counts.items()}, rig.scheduler.results)
    assert stats[State.DELIVERED] > 0


# The audit's sessions (those that can leave a message queued), each then an innocent one.
@pytest.mark.parametrize(
    "segments", [pytest.param(s, id=name) for name, s, n in WRITTEN_OUT if n != 0]
)
async def test_written_out_sessions_then_an_innocent_message(
    rig: Rig, segments: list[bytes]
) -> None:
    await _example(rig, [segments])


async def test_a_recipient_that_cannot_be_encoded_does_not_poison_the_connection(
    rig: Rig,
) -> None:
    """Queued as a relay before the listener refused such addresses queued it: MAIL FROM
    goes out, the bad recipient cannot; the next message on the connection is delivered."""
    _, body = message(1)
    qid = await rig.queue.enqueue(
        Envelope(ALICE, ("ok@example.net", "b\udcff@example.net")), body, account="alice"
    )
    rig.scheduler.wake()
    await rig.settle({qid})
    later, mid = await rig.innocent()
    await _check(rig, {qid, later}, {later: mid})


Injected = Callable[[], BaseException]


@pytest.mark.parametrize(
    "injected",
    [
        lambda: UnicodeEncodeError("utf-8", "b\udcff", 1, 2, "surrogates not allowed"),
        lambda: RuntimeError("injected between MAIL and RCPT"),
        lambda: asyncio.CancelledError(),
    ],
    ids=["unicode-error", "runtime-error", "cancelled"],
)
async def test_a_failure_between_mail_and_rcpt_leaves_the_next_message_deliverable(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, injected: Injected
) -> None:
    """An exception in the transport after MAIL FROM was accepted (the first RCPT of one
    message raises, once): the message ends delivered or failed, not leased, and the next
    message on the pooled connection is delivered, not refused (``503 5.5.1 Sender already
    specified``) and bounced."""
    command = smtp_transport._envelope_command
    fired: list[bytes] = []

    async def failing(smtp: Any, verb: bytes, address: str, *args: Any, **kw: Any) -> Any:
        if verb == b"RCPT" and address == "poison@example.net" and not fired:
            fired.append(verb)
            raise injected()
        return await command(smtp, verb, address, *args, **kw)

    monkeypatch.setattr(smtp_transport, "_envelope_command", failing)
    cancelled = isinstance(injected(), asyncio.CancelledError)
    _, body = message(1)
    qid = await rig.queue.enqueue(Envelope(ALICE, ("poison@example.net",)), body, account="alice")
    rig.scheduler.wake()
    await _until(rig, lambda: _true(bool(fired) and rig.scheduler.inflight == 0))
    later, mid = await rig.innocent()
    rig.trap.take()  # the injected exception may well be logged with its traceback
    msgs: dict[str, QueuedMessage] = {}
    try:
        async with asyncio.timeout(SETTLE):
            while True:
                ended = rig.ended
                msgs = await rig.states({qid, later})
                # A cancelled delivery keeps its lease (as at a stop): the first message
                # ends when the lease does; only the next message matters here.
                waiting = [later] if cancelled else [qid, later]
                if all(msgs[i].state.terminal for i in waiting):
                    break
                await ended.wait()
    except TimeoutError:
        raise AssertionError(f"not settled: {_show(msgs.values())}") from None
    assert msgs[later].state is State.DELIVERED, _show([msgs[later]])
    assert mid in {m.message_id for m in rig.sb.store.list()}
    assert rig.reports.get(later) is None
    if msgs[qid].state is State.FAILED:
        assert rig.reports.get(qid) is not None
    assert cancelled or msgs[qid].state.terminal


async def _until(rig: Rig, check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(SETTLE):
        while True:
            ended = rig.ended
            if await check():
                return
            await ended.wait()


async def _true(value: bool) -> bool:
    return value
