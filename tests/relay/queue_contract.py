"""The contract every :class:`~smtp365.relay.queue.Queue` backend must pass.

``QueueContract`` is collected through ``test_queue_contract.py``; its ``queue_factory``
fixture is parametrized over :data:`BACKENDS`. A new backend (PostgreSQL) adds an opener
there (skipping when its server is not available) and gets every test below.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from smtp365.errors import QueueError
from smtp365.models import Envelope
from smtp365.relay.queue import Bounce, Event, Ledger, Pause, Queue, QueuedMessage, Sent, State
from smtp365.relay.queue.sqlite import SqliteQueue
from tests.relay.conftest import FakeClock

Opener = Callable[[Path, FakeClock], Awaitable[Queue]]
QueueFactory = Callable[[], Awaitable[Queue]]

BACKENDS: dict[str, Opener] = {
    # the default: small bodies inline, large ones in the spool
    "sqlite": lambda root, clock: SqliteQueue.open(root, clock=clock),
    "sqlite-spool": lambda root, clock: SqliteQueue.open(root, clock=clock, inline_max=-1),
    "sqlite-inline": lambda root, clock: SqliteQueue.open(root, clock=clock, inline_max=1 << 30),
}

ENVELOPE = Envelope("app@contoso.test", ("a@example.test", "b@example.test"))
LARGE = bytes(range(256)) * 800  # 200 KB: above the default inline limit

PAYLOADS = {
    "empty": b"",
    "crlf": b"Subject: hi\r\n\r\nline 1\r\nline 2\r\n",
    "bare-lf-cr": b"a\nb\rc\r\r\nd\n.\n\r.\r\r\n.\r\n\x00end",
    "8bit": "Subject: caf\u00e9 \u2603\r\n\r\n\u00fcber \U0001f600\r\n".encode() + b"\xff\xfe\x80",
    "all-bytes": bytes(range(256)) * 4,
    "large": LARGE,
}


def message(index: int, size: int = 300) -> bytes:
    head = f"Message-ID: <{index}@contract.test>\r\n\r\n".encode()
    return head + bytes((index + i) % 256 for i in range(size))


class QueueContract:
    @pytest.fixture(params=sorted(BACKENDS))
    async def queue_factory(
        self, request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
    ) -> AsyncIterator[QueueFactory]:
        """Opens queues on one shared storage; each call is another instance on it."""
        opener = BACKENDS[request.param]
        opened: list[Queue] = []

        async def factory() -> Queue:
            queue = await opener(tmp_path / "queue", clock)
            opened.append(queue)
            return queue

        yield factory
        for queue in opened:
            await queue.close()

    @pytest.fixture
    async def queue(self, queue_factory: QueueFactory) -> Queue:
        return await queue_factory()

    async def _get(self, queue: Queue, queue_id: str) -> QueuedMessage:
        found = await queue.get(queue_id)
        assert found is not None
        return found

    # ------------------------------------------------------------------ basics

    async def test_enqueue_claim_complete(self, queue: Queue, clock: FakeClock) -> None:
        t0 = clock.now
        qid = await queue.enqueue(
            ENVELOPE, b"hello\r\n", message_id="<m1@x>", account="alice", client="printer"
        )
        assert isinstance(queue, Queue)
        got = await self._get(queue, qid)
        assert (got.id, got.state, got.attempts) == (qid, State.QUEUED, 0)
        assert got.envelope == ENVELOPE
        assert (got.size, got.message_id, got.account, got.client) == (
            7,
            "<m1@x>",
            "alice",
            "printer",
        )
        assert got.received_at == got.next_attempt_at == t0
        assert got.lease_until is None and got.finished_at is None

        [claimed] = await queue.claim(10, 60)
        assert (claimed.id, claimed.state, claimed.attempts) == (qid, State.ACTIVE, 1)
        assert claimed.lease_until == t0 + 60
        assert await queue.read(qid) == b"hello\r\n"
        assert await queue.claim(10, 60) == []

        clock.advance(2)
        await queue.complete(qid, reply="250 2.0.0 OK <abc@exchange> [Hostname=X]")
        done = await self._get(queue, qid)
        assert done.state is State.DELIVERED
        assert done.finished_at == t0 + 2
        assert done.last_reason == "250 2.0.0 OK <abc@exchange> [Hostname=X]"
        assert done.lease_until is None
        assert await queue.claim(10, 60, now=clock.now + 10**6) == []
        with pytest.raises(QueueError, match="content is gone"):
            await queue.read(qid)
        # a second delivery (a duplicate) changes nothing
        assert await queue.complete(qid, reply="250 again") is False
        assert (await self._get(queue, qid)).last_reason.startswith("250 2.0.0 OK <abc@")

    async def test_enqueue_under_an_id_chosen_before(self, queue: Queue) -> None:
        first, second = queue.new_id(), queue.new_id()
        assert first != second
        assert await queue.enqueue(ENVELOPE, message(1), queue_id=second) == second
        assert await queue.enqueue(ENVELOPE, message(2), queue_id=first) == first
        assert await queue.read(second) == message(1)
        with pytest.raises(QueueError, match="not a queue id"):
            await queue.enqueue(ENVELOPE, message(3), queue_id="../../etc/passwd")

    async def test_defer_keeps_only_the_recipients_left(
        self, queue: Queue, clock: FakeClock
    ) -> None:
        envelope = Envelope("a@b.test", ("x@c.test", "y@c.test", "z@c.test"))
        qid = await queue.enqueue(envelope, message(1))
        [msg] = await queue.claim(1, 60)
        with pytest.raises(QueueError, match="recipients left"):
            await queue.defer(qid, until=clock.now, reason="r", recipients=["w@c.test"])
        with pytest.raises(QueueError, match="recipients left"):
            await queue.defer(qid, until=clock.now, reason="r", recipients=[])
        await queue.defer(
            qid, until=clock.now, reason="y done", recipients=["x@c.test", "z@c.test"]
        )
        [again] = await queue.claim(1, 60)
        assert again.recipients == ("x@c.test", "z@c.test")
        await queue.defer(qid, until=clock.now, reason="no change")
        [third] = await queue.claim(1, 60)
        assert third.recipients == ("x@c.test", "z@c.test") and msg.id == qid

    async def test_enqueue_needs_a_recipient(self, queue: Queue) -> None:
        with pytest.raises(QueueError, match="recipient"):
            await queue.enqueue(Envelope("a@b.test", ()), b"x")

    async def test_claim_respects_n_and_arrival_order(self, queue: Queue, clock: FakeClock) -> None:
        ids = []
        for i in range(5):
            ids.append(await queue.enqueue(ENVELOPE, message(i)))
            clock.advance(0.001)
        assert [m.id for m in await queue.claim(2, 60)] == ids[:2]
        assert await queue.claim(0, 60) == []
        assert [m.id for m in await queue.claim(10, 60)] == ids[2:]
        assert await queue.claim(10, 60) == []

    async def test_claim_respects_next_attempt_at(self, queue: Queue, clock: FakeClock) -> None:
        t0 = clock.now
        a = await queue.enqueue(ENVELOPE, message(1))
        b = await queue.enqueue(ENVELOPE, message(2))
        assert len(await queue.claim(5, 30)) == 2
        await queue.defer(a, until=t0 + 100, reason="451 4.3.2 later")
        await queue.defer(b, until=t0 + 50, reason="451 4.3.2 later")
        assert await queue.claim(5, 30) == []
        assert await queue.claim(5, 30, now=t0 + 49.9) == []
        assert [m.id for m in await queue.claim(5, 30, now=t0 + 50)] == [b]
        await queue.complete(b, reply="250 OK")
        clock.advance(100)
        assert [m.id for m in await queue.claim(5, 30)] == [a]

    async def test_expired_lease_comes_back(self, queue: Queue, clock: FakeClock) -> None:
        qid = await queue.enqueue(ENVELOPE, message(1))
        [first] = await queue.claim(1, 30)
        clock.advance(29)
        assert await queue.claim(1, 30) == []
        clock.advance(1)
        [again] = await queue.claim(1, 30)
        assert again.id == qid and again.attempts == 2
        assert again.lease_until == clock.now + 30
        assert [e.event for e in await queue.history(qid)] == [Event.EXPIRED]
        # the worker that lost its lease still delivered it: delivered wins
        await queue.complete(first.id, reply="250 OK")
        assert (await self._get(queue, qid)).state is State.DELIVERED
        assert await queue.claim(1, 30, now=clock.now + 60) == []

    # ------------------------------------------------------------------ lease tokens

    async def test_a_stale_attempt_cannot_defer_fail_or_renew(
        self, queue: Queue, clock: FakeClock
    ) -> None:
        qid = await queue.enqueue(ENVELOPE, message(1))
        [first] = await queue.claim(1, 30)
        clock.advance(30)
        [second] = await queue.claim(1, 30)
        assert (first.attempts, second.attempts) == (1, 2)
        # the first worker reports late: nothing changes, the second keeps its lease
        assert await queue.defer(qid, until=clock.now, reason="451", attempt=1) is False
        assert await queue.fail(qid, reason="550 5.1.1 stale", attempt=1) is False
        assert await queue.renew(qid, attempt=1, lease_seconds=600) is False
        got = await self._get(queue, qid)
        assert (got.state, got.attempts, got.lease_until) == (State.ACTIVE, 2, clock.now + 30)
        assert await queue.claim(1, 30) == []  # not handed out a third time
        assert [e.event for e in await queue.history(qid)] == [Event.EXPIRED]
        # the current attempt settles it
        assert await queue.defer(qid, until=clock.now + 60, reason="451 later", attempt=2)
        got = await self._get(queue, qid)
        assert (got.state, got.last_reason) == (State.DEFERRED, "451 later")

    async def test_complete_wins_over_a_stale_failure(self, queue: Queue, clock: FakeClock) -> None:
        qid = await queue.enqueue(ENVELOPE, LARGE)
        [first] = await queue.claim(1, 30)
        clock.advance(30)
        [second] = await queue.claim(1, 30)
        assert await queue.fail(qid, reason="550 5.7.1 no", attempt=second.attempts) is True
        # the first attempt had been accepted upstream all along: delivered wins
        assert await queue.complete(first.id, reply="250 2.0.0 OK") is True
        got = await self._get(queue, qid)
        assert (got.state, got.last_reason) == (State.DELIVERED, "250 2.0.0 OK")
        with pytest.raises(QueueError, match="content is gone"):
            await queue.read(qid)
        # settled: the attempts still out report in vain
        assert await queue.defer(qid, until=clock.now, reason="451", attempt=2) is False
        assert await queue.fail(qid, reason="550", attempt=2) is False
        assert await queue.renew(qid, attempt=2, lease_seconds=30) is False
        assert await queue.complete(qid, reply="250 again") is False
        events = [e.event for e in await queue.history(qid)]
        assert events == [Event.EXPIRED, Event.FAILED, Event.DELIVERED]
        assert await queue.claim(1, 30, now=clock.now + 10**6) == []

    async def test_renew_keeps_a_long_delivery_leased(self, queue: Queue, clock: FakeClock) -> None:
        qid = await queue.enqueue(ENVELOPE, message(1))
        [msg] = await queue.claim(1, 30)
        for _ in range(4):  # 100 s of delivery on a 30 s lease, renewed every 25 s
            clock.advance(25)
            assert await queue.renew(qid, attempt=msg.attempts, lease_seconds=30) is True
            assert (await self._get(queue, qid)).lease_until == clock.now + 30
            assert await queue.claim(1, 30) == []
        clock.advance(30)  # no renewal: the lease runs out
        [again] = await queue.claim(1, 30)
        assert again.attempts == 2
        assert [e.event for e in await queue.history(qid)] == [Event.EXPIRED]

    async def test_held_during_the_attempt_is_still_the_attempts(
        self, queue: Queue, clock: FakeClock
    ) -> None:
        qid = await queue.enqueue(ENVELOPE, message(1))
        [msg] = await queue.claim(1, 30)
        await queue.hold(qid)
        assert await queue.renew(qid, attempt=msg.attempts, lease_seconds=30) is True
        got = await self._get(queue, qid)
        assert (got.state, got.lease_until) == (State.HELD, None)  # held: no lease to renew
        assert await queue.defer(qid, until=clock.now, reason="451", attempt=msg.attempts)
        assert (await self._get(queue, qid)).state is State.HELD

    # ------------------------------------------------------------------ bounces

    def _bounce(self, queue: Queue, content: bytes, queue_id: str | None = None) -> Bounce:
        return Bounce(
            queue_id=queue_id or queue.new_id(),
            envelope=Envelope("", (ENVELOPE.sender,)),
            content=content,
            message_id="<dsn-1@relay.test>",
            account="postmaster",
        )

    @pytest.mark.parametrize("content", [message(7), LARGE], ids=["small", "large"])
    async def test_fail_queues_its_bounce_with_it(
        self, queue: Queue, clock: FakeClock, content: bytes
    ) -> None:
        qid = await queue.enqueue(ENVELOPE, message(1))
        [msg] = await queue.claim(1, 60)
        bounce = self._bounce(queue, content)
        assert await queue.fail(qid, reason="550 5.1.1", attempt=msg.attempts, bounce=bounce)
        assert (await self._get(queue, qid)).state is State.FAILED
        report = await self._get(queue, bounce.queue_id)
        assert (report.state, report.sender, report.recipients) == (
            State.QUEUED,
            "",
            (ENVELOPE.sender,),
        )
        assert (report.account, report.client, report.message_id) == (
            "postmaster",
            "bounce",
            "<dsn-1@relay.test>",
        )
        assert await queue.read(bounce.queue_id) == content
        assert [m.id for m in await queue.claim(5, 60)] == [bounce.queue_id]

    async def test_a_bounce_that_cannot_be_stored_undoes_the_failure(
        self, queue: Queue, clock: FakeClock
    ) -> None:
        qid = await queue.enqueue(ENVELOPE, message(1))
        other = await queue.enqueue(ENVELOPE, LARGE)
        [msg, _] = await queue.claim(2, 60)
        taken = self._bounce(queue, LARGE[::-1], queue_id=other)  # its insert fails
        with pytest.raises(QueueError):
            await queue.fail(qid, reason="550 5.1.1", attempt=msg.attempts, bounce=taken)
        got = await self._get(queue, qid)
        assert (got.state, got.attempts) == (State.ACTIVE, msg.attempts)
        assert await queue.history(qid) == []
        assert await queue.read(other) == LARGE  # the message with that id is untouched
        # an ignored outcome queues no report either
        stale = self._bounce(queue, LARGE)
        assert not await queue.fail(qid, reason="550", attempt=msg.attempts + 1, bounce=stale)
        assert await queue.get(stale.queue_id) is None
        assert await queue.fail(qid, reason="550 5.1.1", attempt=msg.attempts)
        assert (await self._get(queue, qid)).state is State.FAILED

    async def test_complete_queues_a_bounce_for_the_refused(
        self, queue: Queue, clock: FakeClock
    ) -> None:
        qid = await queue.enqueue(ENVELOPE, message(1))
        await queue.claim(1, 60)
        bounce = self._bounce(queue, message(2))
        assert await queue.complete(qid, reply="250 OK (refused: ...)", bounce=bounce)
        assert (await self._get(queue, qid)).state is State.DELIVERED
        assert (await self._get(queue, bounce.queue_id)).state is State.QUEUED
        again = self._bounce(queue, message(3))  # a duplicate delivery: no second report
        assert await queue.complete(qid, reply="250 OK", bounce=again) is False
        assert await queue.get(again.queue_id) is None

    async def test_defer_keeps_reason_and_counts_attempts(
        self, queue: Queue, clock: FakeClock
    ) -> None:
        qid = await queue.enqueue(ENVELOPE, message(1))
        await queue.claim(1, 60)
        clock.advance(2.5)
        await queue.defer(qid, until=clock.now + 300, reason="451 4.4.1 connection lost")
        got = await self._get(queue, qid)
        assert got.state is State.DEFERRED
        assert got.last_reason == "451 4.4.1 connection lost"
        assert (got.attempts, got.next_attempt_at) == (1, clock.now + 300)
        assert got.lease_until is None
        clock.advance(300)
        [again] = await queue.claim(1, 60)
        assert again.attempts == 2
        await queue.defer(qid, until=clock.now + 600, reason="432 4.3.2 too many connections")
        history = await queue.history(qid)
        assert [(e.event, e.attempt, e.detail) for e in history] == [
            (Event.DEFERRED, 1, "451 4.4.1 connection lost"),
            (Event.DEFERRED, 2, "432 4.3.2 too many connections"),
        ]
        assert history[0].duration == 2.5 and history[1].duration == 0
        assert (await self._get(queue, qid)).attempts == 2

    async def test_fail_keeps_a_failed_entry(self, queue: Queue, clock: FakeClock) -> None:
        qid = await queue.enqueue(ENVELOPE, LARGE)
        await queue.claim(1, 60)
        await queue.fail(qid, reason="550 5.1.10 RESOLVER.ADR.RecipientNotFound")
        got = await self._get(queue, qid)
        assert got.state is State.FAILED and got.finished_at == clock.now
        assert got.last_reason.startswith("550 5.1.10")
        assert await queue.read(qid) == LARGE  # kept for the DSN and for retry
        assert await queue.claim(5, 60, now=clock.now + 10**6) == []
        assert [m.id for m in await queue.list(State.FAILED)] == [qid]
        with pytest.raises(QueueError, match="already failed"):
            await queue.defer(qid, until=clock.now, reason="x")
        await queue.retry(qid)
        [again] = await queue.claim(5, 60)
        assert again.id == qid and again.finished_at is None and again.attempts == 2

    async def test_hold_release_delete(self, queue: Queue, clock: FakeClock) -> None:
        a = await queue.enqueue(ENVELOPE, message(1))
        b = await queue.enqueue(ENVELOPE, LARGE)
        await queue.hold(a)
        await queue.hold(a)  # twice is fine
        assert (await self._get(queue, a)).state is State.HELD
        assert [m.id for m in await queue.claim(5, 60)] == [b]
        await queue.hold(b)  # held while a worker has it
        await queue.defer(b, until=clock.now + 60, reason="451 later")  # the worker reports
        assert (await self._get(queue, b)).state is State.HELD
        with pytest.raises(QueueError, match="release it"):
            await queue.retry(b)
        clock.advance(5)
        await queue.release(a)
        got = await self._get(queue, a)
        assert (got.state, got.next_attempt_at) == (State.QUEUED, clock.now)
        with pytest.raises(QueueError, match="not held"):
            await queue.release(a)
        assert [m.id for m in await queue.claim(5, 60)] == [a]
        await queue.delete(b)
        assert await queue.get(b) is None
        with pytest.raises(QueueError):
            await queue.read(b)
        events = [e.event for e in await queue.history(b)]
        assert events == [Event.HELD, Event.DEFERRED, Event.DELETED]
        await queue.delete(a)  # even while active
        assert await queue.list() == []

    async def test_retry_makes_deferred_due_now(self, queue: Queue, clock: FakeClock) -> None:
        qid = await queue.enqueue(ENVELOPE, message(1))
        await queue.claim(1, 60)
        with pytest.raises(QueueError, match="active"):
            await queue.retry(qid)
        await queue.defer(qid, until=clock.now + 3600, reason="451")
        await queue.retry(qid)
        assert [m.id for m in await queue.claim(1, 60)] == [qid]

    async def test_unknown_ids(self, queue: Queue) -> None:
        missing = "01JZZZZZZZZZZZZZZZZZZZZZZZ"
        assert await queue.get(missing) is None
        assert await queue.history(missing) == []
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: queue.read(missing),
            lambda: queue.read("../../etc/passwd"),
            lambda: queue.complete(missing, reply="250"),
            lambda: queue.defer(missing, until=0, reason="x"),
            lambda: queue.fail(missing, reason="x"),
            lambda: queue.fail(missing, reason="x", attempt=1),
            lambda: queue.renew(missing, attempt=1, lease_seconds=30),
            lambda: queue.hold(missing),
            lambda: queue.release(missing),
            lambda: queue.retry(missing),
            lambda: queue.delete(missing),
        ]
        for call in calls:
            with pytest.raises(QueueError, match="no message") as info:
                await call()
            assert not info.value.temporary

    # ------------------------------------------------------------------ views

    async def test_list_and_stats_by_state(self, queue: Queue, clock: FakeClock) -> None:
        t0 = clock.now
        ids = []
        for i in range(6):
            ids.append(await queue.enqueue(ENVELOPE, message(i, size=100 * (i + 1))))
            clock.advance(1)
        sizes = {m.id: m.size for m in await queue.list()}
        claimed = [m.id for m in await queue.claim(4, 60)]
        assert claimed == ids[:4]
        await queue.complete(ids[0], reply="250")
        await queue.fail(ids[1], reason="550")
        await queue.defer(ids[2], until=clock.now + 60, reason="451")
        await queue.hold(ids[4])

        expected = {
            State.DELIVERED: [ids[0]],
            State.FAILED: [ids[1]],
            State.DEFERRED: [ids[2]],
            State.ACTIVE: [ids[3]],
            State.HELD: [ids[4]],
            State.QUEUED: [ids[5]],
        }
        for state, want in expected.items():
            assert [m.id for m in await queue.list(state)] == want
        assert [m.id for m in await queue.list()] == ids
        assert [m.id for m in await queue.list(limit=2)] == ids[:2]

        stats = await queue.stats()
        assert {s: stats[s] for s in State} == {s: len(v) for s, v in expected.items()}
        assert stats.pending == 4
        assert stats.pending_bytes == sum(sizes[i] for i in ids[2:])
        assert stats.oldest_pending_at == t0 + 2

    async def test_delivery_log_kept_and_purged(self, queue: Queue, clock: FakeClock) -> None:
        t0 = clock.now
        delivered = await queue.enqueue(ENVELOPE, message(1))
        failed = await queue.enqueue(ENVELOPE, LARGE)
        waiting = await queue.enqueue(ENVELOPE, message(3))
        await queue.claim(2, 60)
        clock.advance(1.5)
        await queue.complete(delivered, reply="250 2.0.0 OK <q1@eop> [Hostname=EOP]")
        clock.advance(10)
        await queue.fail(failed, reason="550 5.7.60 SendAs denied")

        [entry] = await queue.history(delivered)
        assert (entry.event, entry.attempt, entry.at) == (Event.DELIVERED, 1, t0 + 1.5)
        assert entry.detail == "250 2.0.0 OK <q1@eop> [Hostname=EOP]"
        assert entry.duration == 1.5

        assert await queue.purge_log(3600, now=t0 + 3600) == 0
        assert await queue.purge_log(3600, now=t0 + 3602) == 1
        assert await queue.get(delivered) is None
        assert await queue.history(delivered) == []
        assert (await self._get(queue, failed)).state is State.FAILED
        clock.now = t0 + 3700
        assert await queue.purge_log(3600) == 1
        assert await queue.get(failed) is None
        with pytest.raises(QueueError):
            await queue.read(failed)
        # pending messages are never purged, however old
        assert await queue.purge_log(0, now=t0 + 10**7) == 0
        assert (await self._get(queue, waiting)).state is State.QUEUED

    async def test_purge_keeps_the_history_of_messages_still_kept(
        self, queue: Queue, clock: FakeClock
    ) -> None:
        t0 = clock.now
        held = await queue.enqueue(ENVELOPE, message(1))
        waiting = await queue.enqueue(ENVELOPE, message(2))
        late = await queue.enqueue(ENVELOPE, message(3))
        gone = await queue.enqueue(ENVELOPE, message(4))
        await queue.claim(4, 60)
        await queue.defer(held, until=t0 + 60, reason="451 4.4.1 later")
        await queue.hold(held)
        await queue.defer(waiting, until=t0 + 10**7, reason="451 4.7.500 later")
        await queue.defer(late, until=t0 + 60, reason="451 4.3.2 later")
        await queue.delete(gone)
        clock.advance(30 * 86_400)
        await queue.claim(1, 60)
        await queue.complete(late, reply="250 OK")  # delivered a month after its deferral

        assert await queue.purge_log(86_400) == 0
        assert [e.event for e in await queue.history(held)] == [Event.DEFERRED, Event.HELD]
        assert [e.event for e in await queue.history(waiting)] == [Event.DEFERRED]
        assert [e.event for e in await queue.history(late)] == [Event.DEFERRED, Event.DELIVERED]
        assert await queue.history(gone) == []  # deleted long ago: its trace goes

        clock.advance(2 * 86_400)
        assert await queue.purge_log(86_400) == 1  # the delivered one, with its history
        assert await queue.history(late) == []
        assert [e.event for e in await queue.history(held)] == [Event.DEFERRED, Event.HELD]

    # ------------------------------------------------------------------ the sending ledger

    async def test_ledger_goes_with_complete_defer_fail_and_record(
        self, queue: Queue, clock: FakeClock
    ) -> None:
        t0 = clock.now
        a, b, c = [await queue.enqueue(ENVELOPE, message(i)) for i in range(3)]
        await queue.claim(3, 60)
        assert await queue.ledger(0) == Ledger()
        await queue.complete(
            a,
            reply="250 OK",
            ledger=[Sent("Alice@Contoso.test", t0 + 1, 2), Sent("alice@contoso.test", t0 + 2)],
        )
        quota = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
        await queue.defer(
            b,
            until=t0 + 600,
            reason=quota,
            ledger=[
                Sent("alice@contoso.test", t0 + 3, 2),
                Pause("alice@contoso.test", t0 + 600, quota),
            ],
        )
        await queue.fail(
            c, reason="550 5.2.252 SendAsDenied", ledger=[Sent("bob@contoso.test", t0 + 4, 1)]
        )
        await queue.record(
            [Sent("bob@contoso.test", t0 + 0.5, 3), Pause("bob@contoso.test", t0 + 50)]
        )
        await queue.record([])

        got = await queue.ledger(t0)
        assert got.sent == (
            Sent("bob@contoso.test", t0 + 0.5, 3),
            Sent("alice@contoso.test", t0 + 1, 2),  # mailboxes in lower case
            Sent("alice@contoso.test", t0 + 2, 1),
            Sent("alice@contoso.test", t0 + 3, 2),
            Sent("bob@contoso.test", t0 + 4, 1),
        )
        assert got.pauses == (
            Pause("bob@contoso.test", t0 + 50, ""),
            Pause("alice@contoso.test", t0 + 600, quota),
        )
        later = await queue.ledger(t0 + 2)  # sends from then on, pauses lasting past it
        assert [s.at for s in later.sent] == [t0 + 2, t0 + 3, t0 + 4]
        assert len(later.pauses) == 2
        assert (await queue.ledger(t0 + 100)).pauses == (got.pauses[1],)
        # the message changes happened as they would have without a ledger
        assert [(await self._get(queue, i)).state for i in (a, b, c)] == [
            State.DELIVERED,
            State.DEFERRED,
            State.FAILED,
        ]

    async def test_ledger_is_kept_when_the_change_is_refused(
        self, queue: Queue, clock: FakeClock
    ) -> None:
        qid = await queue.enqueue(ENVELOPE, message(1))
        await queue.claim(1, 60)
        await queue.complete(qid, reply="250 OK")
        sent = Sent("alice@contoso.test", clock.now, 1)
        # a worker whose lease ran out sent it again: the message is settled, the send counts
        assert await queue.complete(qid, reply="250 OK", ledger=[sent]) is False
        assert not await queue.defer(qid, until=0, reason="x", ledger=[sent], attempt=1)
        with pytest.raises(QueueError, match="no message"):
            await queue.defer("01JZZZZZZZZZZZZZZZZZZZZZZZ", until=0, reason="x", ledger=[sent])
        assert (await queue.ledger(0)).sent == (sent, sent, sent)

    async def test_ledger_is_shared_and_survives_reopen(
        self, queue_factory: QueueFactory, clock: FakeClock
    ) -> None:
        first, second = await queue_factory(), await queue_factory()
        await first.record([Sent("alice@contoso.test", clock.now, 7)])
        pause = Pause("alice@contoso.test", clock.now + 3600, "550 5.2.251 throttled")
        await second.record([pause])
        expected = Ledger(sent=(Sent("alice@contoso.test", clock.now, 7),), pauses=(pause,))
        assert await first.ledger(0) == await second.ledger(0) == expected
        await first.close()
        await second.close()
        assert await (await queue_factory()).ledger(0) == expected

    async def test_purge_prunes_the_ledger(self, queue: Queue, clock: FakeClock) -> None:
        t0 = clock.now
        await queue.record(
            [
                Sent("alice@contoso.test", t0, 1),
                Sent("alice@contoso.test", t0 + 100, 1),
                Pause("alice@contoso.test", t0 + 10, "ended"),
                Pause("alice@contoso.test", t0 + 200, "later"),
            ]
        )
        assert await queue.purge_log(86_400, now=t0 + 150, keep_ledger=100) == 0
        left = await queue.ledger(0)
        assert [s.at for s in left.sent] == [t0 + 100]
        assert [p.reason for p in left.pauses] == ["later"]
        await queue.purge_log(50, now=t0 + 260)  # the ledger kept as long as the log
        assert await queue.ledger(0) == Ledger()

    # ------------------------------------------------------------------ ids, concurrency

    async def test_ids_unique_and_sortable(self, queue: Queue, clock: FakeClock) -> None:
        ids = [await queue.enqueue(ENVELOPE, b"x") for _ in range(50)]  # same millisecond
        for _ in range(50):
            clock.advance(0.0007)
            ids.append(await queue.enqueue(ENVELOPE, b"x"))
        ids += await asyncio.gather(*(queue.enqueue(ENVELOPE, b"x") for _ in range(50)))
        assert len(set(ids)) == 150
        assert ids[:100] == sorted(ids[:100])
        assert max(ids[:100]) < min(ids[100:])
        assert all(len(i) == 26 and i.isalnum() and i.isupper() for i in ids)
        assert [m.id for m in await queue.list()] == sorted(ids)

    async def test_two_claimers_never_get_the_same_message(
        self, queue_factory: QueueFactory
    ) -> None:
        first, second = await queue_factory(), await queue_factory()
        ids = set(await asyncio.gather(*(first.enqueue(ENVELOPE, message(i)) for i in range(80))))
        ids |= set(await asyncio.gather(*(second.enqueue(ENVELOPE, message(i)) for i in range(40))))

        async def drain(queue: Queue) -> list[str]:
            got: list[str] = []
            while batch := await queue.claim(3, 300):
                got += [m.id for m in batch]
                await asyncio.sleep(0)  # let the other claimer's tasks interleave
            return got

        results = await asyncio.gather(*(drain(q) for q in (first, second, first, second)))
        claimed = [i for r in results for i in r]
        assert len(claimed) == len(set(claimed)) == 120
        assert set(claimed) == ids
        assert (await first.stats())[State.ACTIVE] == 120

    async def test_second_instance_sees_changes(self, queue_factory: QueueFactory) -> None:
        first, second = await queue_factory(), await queue_factory()
        qid = await first.enqueue(ENVELOPE, LARGE)
        assert await second.read(qid) == LARGE
        await second.hold(qid)
        assert (await self._get(first, qid)).state is State.HELD

    # ------------------------------------------------------------------ content

    @pytest.mark.parametrize("name", sorted(PAYLOADS))
    async def test_content_round_trip_is_byte_exact(self, queue: Queue, name: str) -> None:
        data = PAYLOADS[name]
        qid = await queue.enqueue(ENVELOPE, data)
        assert (await self._get(queue, qid)).size == len(data)
        assert await queue.read(qid) == data
        [claimed] = await queue.claim(1, 60)
        assert await queue.read(claimed.id) == data

    @pytest.mark.parametrize("size", [10, 200_000])
    async def test_enqueue_takes_over_a_file(self, queue: Queue, tmp_path: Path, size: int) -> None:
        data = (b"\r\n\xe9\n\r" * size)[:size]
        source = tmp_path / "incoming.eml"
        source.write_bytes(data)
        qid = await queue.enqueue(ENVELOPE, source)
        assert not source.exists()
        assert (await self._get(queue, qid)).size == size
        assert await queue.read(qid) == data
        qid2 = await queue.enqueue(ENVELOPE, bytearray(data))
        assert await queue.read(qid2) == data

    async def test_enqueue_refuses_a_missing_file(self, queue: Queue, tmp_path: Path) -> None:
        with pytest.raises(QueueError, match="cannot queue"):
            await queue.enqueue(ENVELOPE, tmp_path / "nope")
        with pytest.raises(QueueError, match="not a regular file"):
            await queue.enqueue(ENVELOPE, tmp_path)
        assert await queue.list() == []

    # ------------------------------------------------------------------ lifecycle

    async def test_reopen_keeps_everything(
        self, queue_factory: QueueFactory, clock: FakeClock
    ) -> None:
        queue = await queue_factory()
        a = await queue.enqueue(ENVELOPE, message(1), message_id="<a@x>", account="alice")
        b = await queue.enqueue(ENVELOPE, LARGE)
        c = await queue.enqueue(ENVELOPE, message(3))
        await queue.claim(1, 60)
        await queue.complete(a, reply="250 OK")
        await queue.hold(c)
        before = await queue.list()
        await queue.close()
        await queue.close()
        with pytest.raises(QueueError, match="closed"):
            await queue.enqueue(ENVELOPE, b"late")

        reopened = await queue_factory()
        assert await reopened.list() == before
        assert await reopened.read(b) == LARGE
        assert [e.event for e in await reopened.history(a)] == [Event.DELIVERED]
