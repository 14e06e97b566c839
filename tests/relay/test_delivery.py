"""Scheduler + worker + SQLite queue against the in-process sandbox (STARTTLS + XOAUTH2)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from smtp365.config import Account, AccountSettings
from smtp365.config.model import resolve
from smtp365.models import Envelope
from smtp365.relay.backoff import Backoff
from smtp365.relay.dsn import Bouncer
from smtp365.relay.queue import Bounce, Event, QueuedMessage, State
from smtp365.relay.queue.sqlite import SqliteQueue
from smtp365.relay.ratelimit import Limits, RateLimiter
from smtp365.relay.scheduler import Scheduler, make_router
from smtp365.relay.worker import DeliveryPolicy, Result, Worker
from smtp365.sandbox import Sandbox, SandboxSettings
from smtp365.sandbox.settings import LimitSettings
from tests.relay.conftest import FakeClock

ALICE = "alice@contoso.test"
BOB = "bob@contoso.test"


def account_for(
    sb: Sandbox, mailbox: str = ALICE, *, timeout: float = 10, token: str | None = None
) -> AccountSettings:
    fields: dict[str, Any] = {
        "profile": "custom",
        "host": "localhost",
        "port": sb.smtp_port,
        "ca_file": sb.ca_file,
        "username": mailbox,
        "auth": "xoauth2",
        "timeout": timeout,
        "token": token or sb.issue_token(mailbox),
    }
    return resolve("alice", Account.model_validate(fields), "(test)")


def message(n: int, sender: str = ALICE) -> tuple[str, bytes]:
    mid = f"<relay-{n}-{random.getrandbits(32):08x}@relay.test>"
    body = (
        f"From: {sender}\r\nTo: someone@example.net\r\nSubject: n{n}\r\n"
        f"Message-ID: {mid}\r\n\r\nhello {n}\r\n"
    ).encode()
    return mid, body


@dataclass
class Relay:
    sb: Sandbox
    queue: SqliteQueue
    worker: Worker
    scheduler: Scheduler
    failed: list[tuple[QueuedMessage, str, tuple[str, ...]]] = field(default_factory=list)

    async def send(
        self, n: int, *, sender: str = ALICE, rcpts: tuple[str, ...] = ("x@example.net",)
    ) -> tuple[str, str]:
        mid, body = message(n, sender)
        qid = await self.queue.enqueue(Envelope(sender, rcpts), body, message_id=mid)
        self.scheduler.wake()
        return qid, mid

    async def until(self, check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.02)

    async def settled(self, timeout: float = 10.0) -> None:
        async def done() -> bool:
            return (await self.queue.stats()).pending == 0

        await self.until(done, timeout)

    def arrived(self) -> set[str]:
        return {m.message_id for m in self.sb.store.list()}


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def make_relay(tmp_path: Path) -> AsyncIterator[RelayFactory]:
    made: list[Relay] = []
    sandboxes: list[Sandbox] = []

    async def make(
        settings: SandboxSettings | None = None,
        *,
        limits: Limits | None = None,
        policy: DeliveryPolicy | None = None,
        max_inflight: int = 8,
        backoff: Backoff | None = None,
        timeout: float = 10,
        clock: FakeClock | None = None,
        lease_seconds: float = 30.0,
        bounces: bool = False,
    ) -> Relay:
        """A relay on the real clock, or on ``clock`` (then the test moves time); with
        ``bounces``, failures are reported by a Bouncer through a ``postmaster`` account
        (Bob's mailbox)."""
        sb = Sandbox(tmp_path / "sbx", settings)
        await sb.start()
        sandboxes.append(sb)
        queue = await SqliteQueue.open(tmp_path / "queue", clock=clock or time.time)
        failed: list[tuple[QueuedMessage, str, tuple[str, ...]]] = []
        accounts = {"alice": account_for(sb, timeout=timeout)}
        bouncer = None
        if bounces:
            accounts["postmaster"] = account_for(sb, BOB)
            bouncer = Bouncer(
                queue,
                account="postmaster",
                from_address=BOB,
                reporting_mta="relay.test",
                clock=clock or time.time,
            )

        async def on_failed(
            msg: QueuedMessage, reason: str, rcpts: tuple[str, ...]
        ) -> Bounce | None:
            failed.append((msg, reason, rcpts))
            return await bouncer(msg, reason, rcpts) if bouncer else None

        worker = Worker(
            queue,
            accounts,
            limiter=RateLimiter(limits or Limits(), clock=(clock or time).monotonic),
            backoff=backoff or Backoff(base=0.2, cap=0.4, floor=0.1, rng=random.Random(1)),
            clock=clock,
            policy=policy or DeliveryPolicy(max_budget_wait=10.0),
            on_failed=on_failed,
        )
        scheduler = Scheduler(
            queue,
            worker,
            make_router(default="alice"),
            max_inflight=max_inflight,
            lease_seconds=lease_seconds,
            poll_interval=0.05 if clock is None else 1.0,
        )
        scheduler.start()
        relay = Relay(sb, queue, worker, scheduler, failed)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        await relay.scheduler.stop(grace=5)
        await relay.queue.close()
    for sb in sandboxes:
        await sb.stop()


async def test_all_arrive_over_one_reused_connection(make_relay: RelayFactory) -> None:
    relay = await make_relay(limits=Limits(max_connections=1))
    mids = [(await relay.send(i))[1] for i in range(12)]
    await relay.settled()
    assert set(mids) <= relay.arrived()
    assert (await relay.queue.stats())[State.DELIVERED] == 12
    assert relay.sb.stats.connections == 1
    assert relay.worker.connections_opened("alice") == 1
    assert relay.sb.stats.throttle_replies == 0
    [entry] = await relay.queue.list(State.DELIVERED, limit=1)
    assert entry.last_reason.startswith("250 2.0.0")


async def test_concurrent_deliveries_stay_within_three_connections(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay()
    mids = [(await relay.send(i))[1] for i in range(20)]
    await relay.settled()
    assert set(mids) <= relay.arrived()
    assert relay.sb.stats.connections <= 3
    assert relay.sb.stats.concurrency_limited == 0


async def test_budget_is_used_without_a_single_throttle_reply(make_relay: RelayFactory) -> None:
    limit, window, n = 5, 2.0, 15
    relay = await make_relay(
        SandboxSettings(
            limits=LimitSettings(messages_per_minute=limit, rate_window_seconds=window)
        ),
        limits=Limits(messages_per_window=limit, message_window=window),
    )
    for i in range(n):
        await relay.send(i)
    await relay.settled(timeout=15)
    assert relay.sb.stats.throttle_replies == 0
    assert len(relay.arrived()) == n
    done = sorted(m.finished_at or 0.0 for m in await relay.queue.list(State.DELIVERED))
    # After the first burst of `limit`, the rest arrives at the budget's rate.
    rate = (n - limit) / (done[-1] - done[limit - 1])
    ratio = rate / (limit / window)
    print(f"throughput {rate:.2f} msg/s = {ratio:.1%} of the budget")
    assert ratio >= 0.9


async def test_451_is_deferred_then_delivered(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    relay.sb.faults.set("data", reply="451 4.3.0 Temporary server error", times=1)
    qid, mid = await relay.send(1)
    await relay.settled()
    events = [e.event for e in await relay.queue.history(qid)]
    assert events == [Event.DEFERRED, Event.DELIVERED]
    assert mid in relay.arrived()
    assert (await relay.queue.get(qid)).attempts == 2  # type: ignore[union-attr]


async def test_permanent_send_as_denied_fails_with_reason(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    qid, _ = await relay.send(1, sender=BOB)
    await relay.settled()
    msg = await relay.queue.get(qid)
    assert msg is not None and msg.state is State.FAILED
    assert "5.2.252" in msg.last_reason and "SendAsDenied" in msg.last_reason
    [(failed, reason, rcpts)] = relay.failed
    assert failed.id == qid and "SendAsDenied" in reason and rcpts == ("x@example.net",)


async def test_quota_pauses_the_mailbox_and_defers(make_relay: RelayFactory) -> None:
    relay = await make_relay(SandboxSettings(limits=LimitSettings(recipients_per_day=3)))
    two = ("a@example.net", "b@example.net")
    first, _ = await relay.send(1, rcpts=two)
    await relay.settled()
    second, _ = await relay.send(2, rcpts=two)

    async def deferred() -> bool:
        msg = await relay.queue.get(second)
        return msg is not None and msg.state is State.DEFERRED

    await relay.until(deferred)
    msg = await relay.queue.get(second)
    assert msg is not None and "SubmissionQuotaExceeded" in msg.last_reason
    assert msg.next_attempt_at > time.time() + 3600  # until the 24-hour window frees
    assert relay.worker.limiter.paused_until(ALICE) is not None
    assert relay.sb.stats.quota_exceeded == 1 and not relay.failed
    # While paused, nothing else is sent to the upstream.
    third, _ = await relay.send(3)
    await relay.until(lambda: _state_is(relay, third, State.DEFERRED))
    assert relay.sb.stats.quota_exceeded == 1


async def _state_is(relay: Relay, qid: str, state: State) -> bool:
    msg = await relay.queue.get(qid)
    return msg is not None and msg.state is state


async def test_upstream_down_defers_then_delivers(make_relay: RelayFactory) -> None:
    relay = await make_relay()
    port = relay.sb.smtp_port
    await relay.sb.stop()
    ids = [await relay.send(i) for i in range(3)]

    async def all_deferred() -> bool:
        return (await relay.queue.stats())[State.DEFERRED] == 3

    await relay.until(all_deferred)
    assert all("ConnectError" in m.last_reason for m in await relay.queue.list(State.DEFERRED))
    relay.sb.settings.smtp_port = port
    await relay.sb.start()
    await relay.settled()
    assert {mid for _, mid in ids} <= relay.arrived()


async def test_recipients_above_the_limit_are_split(make_relay: RelayFactory) -> None:
    relay = await make_relay(
        policy=DeliveryPolicy(max_recipients_per_message=2, max_budget_wait=10.0)
    )
    rcpts = tuple(f"r{i}@example.net" for i in range(5))
    _, mid = await relay.send(1, rcpts=rcpts)
    await relay.settled()
    copies = [m for m in relay.sb.store.list() if m.message_id == mid]
    assert sorted(len(m.rcpt_tos) for m in copies) == [1, 2, 2]
    assert sorted(r for m in copies for r in m.rcpt_tos) == sorted(rcpts)


async def test_stop_finishes_in_flight_and_defers_waiting(make_relay: RelayFactory) -> None:
    relay = await make_relay(limits=Limits(messages_per_window=2, message_window=60.0))
    for i in range(5):
        await relay.send(i)

    async def two_delivered() -> bool:
        return (await relay.queue.stats())[State.DELIVERED] == 2

    await relay.until(two_delivered)
    await relay.scheduler.stop(grace=5)
    stats = await relay.queue.stats()
    assert stats[State.DELIVERED] == 2 and stats[State.ACTIVE] == 0
    assert stats[State.DEFERRED] + stats[State.QUEUED] == 3


async def test_new_mail_while_every_slot_is_busy_does_not_spin_the_scheduler(
    make_relay: RelayFactory,
) -> None:
    """All deliveries in flight (here: waiting for the budget) and mail keeps arriving: the
    scheduler waits for a slot instead of going round its loop for every wake."""
    relay = await make_relay(
        limits=Limits(messages_per_window=1, message_window=5.0), max_inflight=2
    )
    turns = 0
    idle = relay.scheduler._idle

    async def counted(timeout: float) -> None:
        nonlocal turns
        turns += 1
        await idle(timeout)

    relay.scheduler._idle = counted  # type: ignore[method-assign]
    for i in range(3):  # one sent, two waiting for the window: both slots busy
        await relay.send(i)
    await relay.until(lambda: _true(len(relay.arrived()) == 1 and relay.scheduler.inflight == 2))
    before = turns
    for i in range(3, 8):  # each enqueue wakes the scheduler
        await relay.send(i)
        await asyncio.sleep(0.05)
    # Before: thousands of turns in these 0.25 s (each wake left set); now one per wake.
    assert turns - before <= 10, turns - before


async def _true(value: bool) -> bool:
    return value


async def test_432_lowers_concurrency_and_still_delivers(make_relay: RelayFactory) -> None:
    # The relay believes in 3 connections, the upstream allows 1: it must adapt.
    relay = await make_relay(
        SandboxSettings(limits=LimitSettings(max_connections=1)),
        policy=DeliveryPolicy(fewer_connections_retry=0.1, max_budget_wait=10.0),
    )
    mids = [(await relay.send(i))[1] for i in range(6)]
    await relay.settled()
    assert set(mids) <= relay.arrived()
    assert relay.sb.stats.concurrency_limited >= 1
    assert relay.worker.limiter.concurrency(ALICE) < 3
    assert not relay.failed


async def test_sender_blocked_pauses_long_and_alerts(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await make_relay(policy=DeliveryPolicy(pause_long=7200, max_budget_wait=10.0))
    relay.sb.faults.set(
        "data", reply="550 5.2.254 Sender throttled due to too many recipients", times=1
    )
    qid, _ = await relay.send(1)
    await relay.until(lambda: _state_is(relay, qid, State.DEFERRED))
    msg = await relay.queue.get(qid)
    assert msg is not None and msg.next_attempt_at > time.time() + 7000
    assert relay.worker.limiter.paused_until(ALICE) is not None
    assert any("ALERT" in r.message for r in caplog.records)
    assert not relay.failed


async def test_deleted_during_its_delivery_is_logged_not_a_crash(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await make_relay()
    relay.sb.faults.set("data", delay=1.0, times=1)  # the upstream is slow to answer DATA
    qid, mid = await relay.send(1)

    async def active() -> bool:
        msg = await relay.queue.get(qid)
        return msg is not None and msg.state is State.ACTIVE

    await relay.until(active)
    await relay.queue.delete(qid)
    await relay.until(lambda: _true(mid in relay.arrived()))  # it went out all the same
    _, later = await relay.send(2)
    await relay.settled()
    assert later in relay.arrived()
    assert f"{qid} was deleted from the queue during its delivery attempt" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert qid not in relay.worker._done


async def _true(value: bool) -> bool:
    return value


async def test_recipients_done_are_not_sent_again_after_a_deferral(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(backoff=Backoff(base=3600, cap=3600, rng=random.Random(1)))
    relay.sb.faults.set("rcpt", reply="451 4.3.0 Try again later", times=1)  # the first RCPT
    qid, mid = await relay.send(1, rcpts=("a@example.net", "b@example.net"))

    async def deferred() -> bool:
        msg = await relay.queue.get(qid)
        return msg is not None and msg.state is State.DEFERRED

    await relay.until(deferred)
    msg = await relay.queue.get(qid)
    assert msg is not None and msg.recipients == ("a@example.net",)  # kept by the queue
    await relay.queue.retry(qid)
    relay.scheduler.wake()
    await relay.settled()
    got = sorted(r for m in relay.sb.store.list() if m.message_id == mid for r in m.rcpt_tos)
    assert got == ["a@example.net", "b@example.net"]  # each exactly once


MAYBE_DELIVERED = "may have been delivered; the retry can duplicate it"
TIMEOUT = 1.0  # the account's timeout in the fault tests: "slow" means slower than this
SLOW = 1.5


# What a fault does to the attempt it hits: slows it down, defers it (nothing reached the
# mailbox), or defers it after the mailbox stored the message (the retry duplicates it).
SLOWED, DEFERRED, DUPLICATED = "slowed", "deferred", "duplicated"


@pytest.mark.parametrize(
    ("stage", "fault", "effect"),
    [
        ("greeting", {"reply": "421 4.3.2 Service not available, closing channel"}, DEFERRED),
        ("ehlo", {"drop": True}, DEFERRED),
        ("starttls", {"reply": "454 4.7.0 TLS not available due to temporary reason"}, DEFERRED),
        ("starttls", {"drop": True}, DEFERRED),
        ("starttls", {"drop": True, "late": True}, DEFERRED),  # the 220, then no handshake
        ("auth", {"reply": "454 4.7.0 Temporary authentication failure"}, DEFERRED),
        ("mail", {"delay": 0.3}, SLOWED),
        ("mail", {"delay": SLOW}, DEFERRED),
        ("data", {"drop": True}, DEFERRED),
        ("data", {"reply": "421 4.4.2 Connection dropped"}, DEFERRED),
        ("data", {"drop": True, "late": True}, DUPLICATED),  # stored, dropped before the 250
        ("data", {"delay": SLOW, "late": True}, DUPLICATED),  # stored, the 250 too late
    ],
    ids=[
        "421-greeting",
        "drop-ehlo",
        "starttls-454",
        "drop-at-starttls",
        "drop-at-tls-handshake",
        "auth-454",
        "slow-mail",
        "mail-slower-than-timeout",
        "drop-data",
        "421-data",
        "drop-after-stored",
        "250-slower-than-timeout",
    ],
)
async def test_upstream_faults_lose_nothing_and_leave_nothing_stuck(
    make_relay: RelayFactory,
    caplog: pytest.LogCaptureFixture,
    stage: str,
    fault: dict[str, Any],
    effect: str,
) -> None:
    caplog.set_level("INFO", logger="smtp365.relay")
    relay = await make_relay(timeout=TIMEOUT)
    relay.sb.faults.set(stage, times=3, **fault)  # type: ignore[arg-type]
    sent = [await relay.send(i) for i in range(6)]
    await relay.settled(timeout=30)
    stats = await relay.queue.stats()
    fired = relay.sb.faults.fired[stage]  # type: ignore[index]
    arrived = [m.message_id for m in relay.sb.store.list()]
    lost = {mid for _, mid in sent} - set(arrived)
    duplicates = len(arrived) - len(set(arrived))
    deferrals = [
        e for qid, _ in sent for e in await relay.queue.history(qid) if e.event is Event.DEFERRED
    ]
    maybe = [r for r in caplog.messages if r.startswith("deferred ") and MAYBE_DELIVERED in r]
    print(
        f"{stage} {fault}: fired {fired}, deferred {len(deferrals)}, delivered "
        f"{stats[State.DELIVERED]}, lost {len(lost)}, {duplicates} duplicate(s) upstream, "
        f"{len(maybe)} deferral(s) logged as possibly delivered"
    )
    assert fired == 3
    # Never in clear text: the sandbox saw no AUTH, MAIL, RCPT or DATA outside TLS.
    assert relay.sb.stats.commands_in_clear == 0
    assert all(m.tls_version for m in relay.sb.store.list())
    assert not lost and stats[State.DELIVERED] == 6
    assert stats.pending == 0 and stats[State.FAILED] == 0 and not relay.failed
    # Each fault that broke an attempt deferred it, and the retry delivered it.
    assert len(deferrals) == (0 if effect == SLOWED else fired)
    # The budget (and its ledger) counts every submission the mailbox may have counted: the
    # deliveries, and each attempt that got as far as DATA (refused there, or cut off once
    # the whole message was sent: it may have been delivered).
    counted_by_the_mailbox = fired if stage == "data" else 0
    assert len((await relay.queue.ledger(0)).sent) == 6 + counted_by_the_mailbox
    if effect == DUPLICATED:
        # The mailbox had each of those messages when the connection failed: the retry
        # delivered it again, and the relay said it might.
        assert duplicates == fired
        assert len(maybe) == fired
        assert all(MAYBE_DELIVERED in e.detail for e in deferrals)
    else:
        assert duplicates == 0
        if stage != "data":  # failed before the final dot went out: no duplicate possible
            assert maybe == []


async def test_a_delivery_longer_than_its_lease_keeps_it(
    make_relay: RelayFactory, clock: FakeClock
) -> None:
    # One recipient per submission and one submission per 20 s: three recipients take 40 s
    # of budget waits, more than the 30 s lease. The lease is renewed, so the message is
    # not handed out again while its delivery runs.
    relay = await make_relay(
        limits=Limits(messages_per_window=1, message_window=20.0),
        policy=DeliveryPolicy(max_recipients_per_message=1, max_budget_wait=25.0),
        clock=clock,
        lease_seconds=30.0,
    )
    rcpts = ("a@example.net", "b@example.net", "c@example.net")
    t0 = clock.now
    qid, mid = await relay.send(1, rcpts=rcpts)

    async def delivered() -> bool:
        return await _state_is(relay, qid, State.DELIVERED)

    await clock.run(delivered, tasks=2, until=t0 + 100)  # the delivery and the poll
    assert clock.now >= t0 + 40
    got = sorted(r for m in relay.sb.store.list() if m.message_id == mid for r in m.rcpt_tos)
    assert got == list(rcpts)  # each exactly once
    msg = await relay.queue.get(qid)
    assert msg is not None and msg.attempts == 1
    assert [e.event for e in await relay.queue.history(qid)] == [Event.DELIVERED]
    assert relay.scheduler.results[Result.DELIVERED] == 1
    assert relay.scheduler.results[Result.LOST] == 0


async def test_a_stale_attempt_settles_nothing(make_relay: RelayFactory, clock: FakeClock) -> None:
    relay = await make_relay(clock=clock)
    # the scheduler polls and the lease renewals wait for a clock that stands still
    await relay.until(lambda: _true(clock.sleeping == 2))
    qid = await relay.queue.enqueue(Envelope(BOB, ("x@example.net",)), message(1, BOB)[1])
    [stale] = await relay.queue.claim(1, 30)
    [current] = await relay.queue.claim(1, 30, now=clock.now + 30)  # the lease ran out
    # the stale attempt is refused upstream (SendAs): its failure is not recorded
    assert await relay.worker.deliver(stale, "alice") is Result.LOST
    msg = await relay.queue.get(qid)
    assert msg is not None and (msg.state, msg.attempts) == (State.ACTIVE, 2)
    assert [e.event for e in await relay.queue.history(qid)] == [Event.EXPIRED]
    assert await relay.worker.deliver(current, "alice") is Result.FAILED
    history = await relay.queue.history(qid)
    assert [e.attempt for e in history if e.event is Event.FAILED] == [2]


async def test_a_report_that_cannot_be_made_does_not_stop_the_failure(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await make_relay()

    async def broken(msg: QueuedMessage, reason: str, rcpts: tuple[str, ...]) -> None:
        raise RuntimeError("no report today")

    relay.worker.on_failed = broken
    qid, _ = await relay.send(1, sender=BOB)  # SendAs denied: a permanent failure
    await relay.settled()
    assert await _state_is(relay, qid, State.FAILED)
    assert f"no bounce for {qid}: the report could not be made" in caplog.messages
    assert len(await relay.queue.list()) == 1


def _dsns(relay: Relay) -> list[str]:
    """The delivery status notifications that reached the sandbox, as text."""
    return [
        relay.sb.store.content(m.id).decode()
        for m in relay.sb.store.list()
        if "multipart/report" in relay.sb.store.content(m.id).decode()
    ]


async def test_expiry_comes_after_the_last_try_and_bounces_with_4_4_7(
    make_relay: RelayFactory, clock: FakeClock
) -> None:
    lifetime = 600.0
    relay = await make_relay(
        clock=clock,
        backoff=Backoff(base=60, cap=120, max_lifetime=lifetime, rng=random.Random(1)),
        bounces=True,
    )
    relay.sb.faults.set("rcpt", reply="451 4.3.0 Try again later")  # every time
    t0 = clock.now
    qid, _ = await relay.send(1)

    async def failed() -> bool:
        return await _state_is(relay, qid, State.FAILED)

    def idle() -> bool:
        return relay.scheduler.inflight == 0

    await clock.run(failed, tasks=2, quiet=idle, until=t0 + lifetime + 5)
    history = await relay.queue.history(qid)
    deferrals = [e for e in history if e.event is Event.DEFERRED]
    [failure] = [e for e in history if e.event is Event.FAILED]
    assert len(deferrals) >= 3 and deferrals[-1].at < t0 + lifetime
    # the last try is made at the expiry, and only its 451 fails the message
    assert t0 + lifetime <= failure.at < t0 + lifetime + 2
    assert relay.sb.faults.fired["rcpt"] == len(deferrals) + 1
    assert failure.detail.startswith("expired in the queue; last error: ")
    assert "451 4.3.0" in failure.detail
    [(_, reason, rcpts)] = relay.failed
    assert rcpts == ("x@example.net",)

    relay.sb.faults.clear()

    async def settled() -> bool:
        return (await relay.queue.stats()).pending == 0

    await clock.run(settled, tasks=2, quiet=idle, until=t0 + lifetime + 3600)
    [dsn] = [m for m in relay.sb.store.list()]
    assert (dsn.mailbox, dsn.mail_from, dsn.rcpt_tos) == (BOB, BOB, [ALICE])  # postmaster
    report = relay.sb.store.content(dsn.id).decode()
    assert "Status: 4.4.7" in report and "Diagnostic-Code: smtp; 451 4.3.0" in report


async def test_no_sending_account_fails_at_expiry_with_a_dsn(
    make_relay: RelayFactory, clock: FakeClock
) -> None:
    lifetime = 300.0
    relay = await make_relay(
        clock=clock,
        backoff=Backoff(base=60, cap=120, max_lifetime=lifetime, rng=random.Random(1)),
        bounces=True,
    )
    t0 = clock.now
    _, body = message(1)
    qid = await relay.queue.enqueue(Envelope(ALICE, ("x@example.net",)), body, account="gone")
    relay.scheduler.wake()

    async def settled() -> bool:
        return (await relay.queue.stats()).pending == 0

    await clock.run(settled, tasks=2, quiet=lambda: relay.scheduler.inflight == 0, until=t0 + 900)
    msg = await relay.queue.get(qid)
    assert msg is not None and msg.state is State.FAILED
    assert "unknown sending account 'gone'" in msg.last_reason
    [report] = _dsns(relay)
    assert "Status: 4.4.7" in report and "unknown sending account" in report


async def test_a_message_whose_spool_file_is_lost_fails_with_a_dsn(
    make_relay: RelayFactory, clock: FakeClock
) -> None:
    relay = await make_relay(clock=clock, bounces=True)
    await relay.until(lambda: _true(clock.sleeping == 2))  # the scheduler waits for the clock
    mid, body = message(1)
    big = body + b"x" * 100 + b"\r\n" * 40_000  # spooled
    qid = await relay.queue.enqueue(Envelope(ALICE, ("x@example.net",)), big, message_id=mid)
    (relay.queue.spool_dir / qid).unlink()  # disk damage
    relay.scheduler.wake()

    async def delivered_report() -> bool:
        return len(_dsns(relay)) == 1

    await relay.until(delivered_report)
    msg = await relay.queue.get(qid)
    assert msg is not None and msg.state is State.FAILED and "missing" in msg.last_reason
    assert mid not in relay.arrived()
    [report] = _dsns(relay)
    assert "queue file of this message is missing" in " ".join(report.split())
    assert "text/rfc822-headers" not in report  # the original is gone


def _alerts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT")]


async def test_a_refused_sign_in_pauses_the_account_and_fails_no_message(
    make_relay: RelayFactory, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await make_relay(
        clock=clock, backoff=Backoff(base=60, cap=240, rng=random.Random(1)), bounces=True
    )
    relay.worker.accounts["alice"] = account_for(relay.sb, token="not-a-valid-token")
    t0 = clock.now
    ids = [(await relay.send(i))[0] for i in range(3)]

    async def all_deferred() -> bool:
        return (await relay.queue.stats())[State.DEFERRED] == 3

    await relay.until(all_deferred)  # refused at once: the clock need not move
    # one alert for the three refusals (the three connections went at once), with the fix
    [alert] = _alerts(caplog)
    assert "535 5.7.3" in alert and "New-ServicePrincipal" in alert and "60 s" in alert
    assert relay.worker.limiter.paused_until(ALICE) == t0 + 60
    for msg in await relay.queue.list(State.DEFERRED):
        assert msg.next_attempt_at == t0 + 60 and "auth rejected: 535 5.7.3" in msg.last_reason
    assert relay.sb.stats.auth_failures >= 1

    def idle() -> bool:
        return relay.scheduler.inflight == 0

    # after the pause: refused again, paused twice as long, a second alert
    async def retried() -> bool:
        msgs = await relay.queue.list(State.DEFERRED)
        return len(msgs) == 3 and all(m.next_attempt_at > t0 + 60 for m in msgs)

    await clock.run(retried, tasks=2, quiet=idle, until=t0 + 61)
    assert len(alerts := _alerts(caplog)) == 2 and "120 s" in alerts[1]
    assert all(m.next_attempt_at == t0 + 180 for m in await relay.queue.list(State.DEFERRED))

    # the operator fixes the credentials: everything goes out after the pause
    relay.worker.accounts["alice"] = account_for(relay.sb)
    relay.worker.pool("alice").account = relay.worker.accounts["alice"]

    async def settled() -> bool:
        return (await relay.queue.stats()).pending == 0

    await clock.run(settled, tasks=2, quiet=idle, until=t0 + 181)
    assert all([await _state_is(relay, qid, State.DELIVERED) for qid in ids])
    assert not relay.failed and len(_alerts(caplog)) == 2
    assert relay.worker._refusals == {}


async def test_an_account_refused_until_expiry_bounces_with_4_4_7(
    make_relay: RelayFactory, clock: FakeClock
) -> None:
    lifetime = 400.0
    relay = await make_relay(
        clock=clock,
        backoff=Backoff(base=60, cap=120, max_lifetime=lifetime, rng=random.Random(1)),
        bounces=True,
    )
    relay.worker.accounts["alice"] = account_for(relay.sb, token="not-a-valid-token")
    t0 = clock.now
    ids = [(await relay.send(i))[0] for i in range(2)]

    async def settled() -> bool:
        return (await relay.queue.stats()).pending == 0

    await clock.run(
        settled, tasks=2, quiet=lambda: relay.scheduler.inflight == 0, until=t0 + lifetime + 60
    )
    for qid in ids:
        msg = await relay.queue.get(qid)
        assert msg is not None and msg.state is State.FAILED
        assert msg.finished_at is not None and msg.finished_at >= t0 + lifetime
        assert msg.last_reason.startswith("expired in the queue; last error: ")
        assert "535 5.7.3" in msg.last_reason
    # the reports go out through the postmaster account, which can sign in
    reports = _dsns(relay)
    assert len(reports) == 2
    assert all("Status: 4.4.7" in r and "Diagnostic-Code: smtp; 535 5.7.3" in r for r in reports)


async def test_smtp_auth_disabled_for_the_tenant_defers_with_the_fix(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await make_relay(
        SandboxSettings(smtp_auth_enabled=False),
        backoff=Backoff(base=3600, cap=3600, rng=random.Random(1)),
    )
    qid, _ = await relay.send(1)
    await relay.until(lambda: _state_is(relay, qid, State.DEFERRED))
    msg = await relay.queue.get(qid)
    assert msg is not None and "535 5.7.139" in msg.last_reason
    [alert] = _alerts(caplog)
    assert "Set-TransportConfig -SmtpClientAuthenticationDisabled $false" in alert
    assert not relay.failed
