"""What is particular to the SQLite queue: storage layout, recovery, group commit, ids."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from smtp365.errors import QueueContentLost, QueueError
from smtp365.models import Envelope
from smtp365.relay.queue import Bounce, Event, Ledger, Pause, Sent, State
from smtp365.relay.queue.ids import IdGenerator, is_queue_id
from smtp365.relay.queue.sqlite import SCHEMA_VERSION, SqliteQueue
from tests.relay.conftest import FakeClock
from tests.relay.queue_contract import ENVELOPE, LARGE

SMALL = b"Subject: small\r\n\r\nbody\r\n"
ORPHAN = "01J0000000000000000000ORPH"


@pytest.fixture
async def root(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def queue(root: Path, clock: FakeClock) -> AsyncIterator[SqliteQueue]:
    queue = await SqliteQueue.open(root, clock=clock)
    yield queue
    await queue.close()


def spool_files(queue: SqliteQueue) -> set[str]:
    return {p.name for p in queue.spool_dir.iterdir()}


async def test_small_bodies_inline_large_ones_spooled(queue: SqliteQueue) -> None:
    small = await queue.enqueue(ENVELOPE, SMALL)
    large = await queue.enqueue(ENVELOPE, LARGE)
    got_small, got_large = await queue.get(small), await queue.get(large)
    assert got_small is not None and got_small.content_path is None
    assert got_large is not None and got_large.content_path == queue.spool_dir / large
    assert got_large.content_path.read_bytes() == LARGE
    assert spool_files(queue) == {large}
    assert os.listdir(queue.incoming_dir) == []

    await queue.claim(2, 60)
    await queue.complete(large, reply="250 OK")  # delivered: the body goes
    assert spool_files(queue) == set()
    other = await queue.enqueue(ENVELOPE, LARGE)
    await queue.claim(1, 60)
    await queue.fail(other, reason="550")  # failed: kept until purged
    assert spool_files(queue) == {other}
    assert await queue.purge_log(0, now=queue._clock() + 1) == 2
    assert spool_files(queue) == set()


async def test_file_in_incoming_is_moved_not_copied(queue: SqliteQueue) -> None:
    source = queue.incoming_dir / "session-1.eml"
    source.write_bytes(LARGE)
    inode = source.stat().st_ino
    qid = await queue.enqueue(ENVELOPE, source)
    assert not source.exists()
    assert (queue.spool_dir / qid).stat().st_ino == inode


async def test_recovery_removes_orphans_and_keeps_messages(root: Path, clock: FakeClock) -> None:
    queue = await SqliteQueue.open(root, clock=clock)
    assert queue.recovery is not None and not queue.recovery.changed
    small = await queue.enqueue(ENVELOPE, SMALL)
    large = await queue.enqueue(ENVELOPE, LARGE)
    [active] = await queue.claim(1, 3600)
    await queue.close()
    # what a crash leaves: half-written temp files, a spool file whose row never committed
    (root / "incoming" / f"{ORPHAN}.tmp").write_bytes(b"half")
    (root / "incoming" / "session").mkdir()
    (root / "spool" / ORPHAN).write_bytes(b"never committed")

    clock.advance(10)
    queue = await SqliteQueue.open(root, clock=clock)
    try:
        assert queue.recovery is not None
        assert (queue.recovery.incoming_removed, queue.recovery.orphans_removed) == (2, 1)
        assert (queue.recovery.requeued, queue.recovery.lost) == (1, ())
        assert os.listdir(queue.incoming_dir) == []
        assert spool_files(queue) == {large}
        assert await queue.read(small) == SMALL
        assert await queue.read(large) == LARGE
        # the lease of the dead worker is returned at once, not after it runs out
        again = await queue.get(active.id)
        assert again is not None and again.state is State.QUEUED
        assert [e.event for e in await queue.history(active.id)] == [Event.EXPIRED]
        assert {m.id for m in await queue.claim(5, 60)} == {small, large}
    finally:
        await queue.close()


async def test_a_large_bounce_not_queued_leaves_no_spool_file(queue: SqliteQueue) -> None:
    qid = await queue.enqueue(ENVELOPE, SMALL)
    [msg] = await queue.claim(1, 60)

    def bounce() -> Bounce:
        return Bounce(queue.new_id(), Envelope("", (ENVELOPE.sender,)), LARGE)

    assert not await queue.fail(qid, reason="550", attempt=msg.attempts + 1, bounce=bounce())
    assert spool_files(queue) == set()
    with pytest.raises(QueueError, match="UNIQUE"):  # an id in use: the spool file goes
        await queue.enqueue(ENVELOPE, LARGE, queue_id=qid)
    assert spool_files(queue) == set()
    spooled = bounce()
    assert await queue.fail(qid, reason="550", attempt=msg.attempts, bounce=spooled)
    assert spool_files(queue) == {spooled.queue_id}
    assert os.listdir(queue.incoming_dir) == []


async def test_recovery_reports_lost_content(root: Path, clock: FakeClock) -> None:
    queue = await SqliteQueue.open(root, clock=clock)
    qid = await queue.enqueue(ENVELOPE, LARGE)
    await queue.close()
    (root / "spool" / qid).unlink()  # disk damage: cannot happen through the queue
    queue = await SqliteQueue.open(root, clock=clock)
    try:
        assert queue.recovery is not None and queue.recovery.lost == (qid,)
        # left for the worker, which fails it with a DSN
        [got] = await queue.claim(1, 60)
        assert got.id == qid and got.content_path is None
        with pytest.raises(QueueContentLost, match="missing"):
            await queue.read(qid)
        await queue.fail(qid, reason="the queue file of this message is missing")
        with pytest.raises(QueueError, match="content is gone"):
            await queue.retry(qid)
        # a spool file that goes missing later reads the same
        other = await queue.enqueue(ENVELOPE, LARGE)
        (root / "spool" / other).unlink()
        with pytest.raises(QueueContentLost):
            await queue.read(other)
    finally:
        await queue.close()


async def test_recovery_waits_until_nobody_else_has_the_queue(root: Path, clock: FakeClock) -> None:
    first = await SqliteQueue.open(root, clock=clock)
    try:
        # maybe another process between rename and commit: must not be touched
        (root / "spool" / ORPHAN).write_bytes(b"in flight elsewhere")
        second = await SqliteQueue.open(root, clock=clock)
        assert second.recovery is None
        assert (root / "spool" / ORPHAN).exists()
        await second.close()
    finally:
        await first.close()
    third = await SqliteQueue.open(root, clock=clock)
    try:
        assert third.recovery is not None and third.recovery.orphans_removed == 1
    finally:
        await third.close()


async def test_concurrent_changes_share_commits(
    queue: SqliteQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    run_batch = queue._run_batch

    def recording(batch: list[Any]) -> list[tuple[bool, Any]]:
        sizes.append(len(batch))
        return run_batch(batch)

    monkeypatch.setattr(queue, "_run_batch", recording)
    ids = await asyncio.gather(
        *(queue.enqueue(ENVELOPE, LARGE if i % 5 == 0 else SMALL) for i in range(40))
    )
    assert sum(sizes) == 40 and len(sizes) < 40
    assert len(set(ids)) == 40
    assert [await queue.read(i) for i in ids] == [LARGE if i % 5 == 0 else SMALL for i in range(40)]


async def test_a_failing_change_does_not_spoil_its_batch(
    queue: SqliteQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    run_batch = queue._run_batch

    def recording(batch: list[Any]) -> list[tuple[bool, Any]]:
        sizes.append(len(batch))
        return run_batch(batch)

    monkeypatch.setattr(queue, "_run_batch", recording)
    results = await asyncio.gather(
        queue.enqueue(ENVELOPE, SMALL),
        queue.complete("01J00000000000000000000000", reply="250"),
        queue.enqueue(ENVELOPE, SMALL),
        return_exceptions=True,
    )
    assert sizes == [3]
    assert isinstance(results[1], QueueError)
    assert [m.id for m in await queue.list()] == [results[0], results[2]]


async def test_storage_errors_are_temporary_and_leave_nothing(
    queue: SqliteQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("smtp365.relay.queue.sqlite._write_all", disk_full)
    with pytest.raises(QueueError, match="No space left") as info:
        await queue.enqueue(ENVELOPE, LARGE)
    assert info.value.temporary
    assert await queue.list() == []
    assert os.listdir(queue.incoming_dir) == [] and spool_files(queue) == set()


async def test_a_queue_from_a_newer_version_is_refused(root: Path, clock: FakeClock) -> None:
    queue = await SqliteQueue.open(root, clock=clock)
    await queue.close()
    with sqlite3.connect(root / "queue.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(QueueError, match="newer smtp365"):
        await SqliteQueue.open(root, clock=clock)


async def test_a_queue_of_schema_1_gains_the_ledger(root: Path, clock: FakeClock) -> None:
    queue = await SqliteQueue.open(root, clock=clock)
    qid = await queue.enqueue(ENVELOPE, SMALL)
    await queue.close()
    with sqlite3.connect(root / "queue.db") as conn:  # what the first release made
        conn.executescript("DROP TABLE sent; DROP TABLE pauses; PRAGMA user_version = 1;")
    conn.close()
    queue = await SqliteQueue.open(root, clock=clock)
    try:
        assert await queue.ledger(0) == Ledger()
        assert len(await queue.claim(1, 60)) == 1
        await queue.complete(qid, reply="250", ledger=[Sent("a@b.test", clock.now, 1)])
        assert (await queue.ledger(0)).sent == (Sent("a@b.test", clock.now, 1),)
        version = await queue._read(lambda c: c.execute("PRAGMA user_version").fetchone()[0])
        assert version == SCHEMA_VERSION
    finally:
        await queue.close()


async def test_a_queue_with_the_old_state_index_loses_it(root: Path, clock: FakeClock) -> None:
    queue = await SqliteQueue.open(root, clock=clock)
    qid = await queue.enqueue(ENVELOPE, SMALL)
    await queue.close()
    with sqlite3.connect(root / "queue.db") as conn:  # what schema 2 had
        conn.execute("CREATE INDEX messages_state ON messages(state, id)")
    conn.close()
    queue = await SqliteQueue.open(root, clock=clock)
    try:
        indexes = await queue._read(
            lambda c: [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index'")]
        )
        assert "messages_state" not in indexes
        assert [m.id for m in await queue.list(State.QUEUED)] == [qid]
    finally:
        await queue.close()


async def test_the_ledger_costs_no_commit_of_its_own(
    queue: SqliteQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [await queue.enqueue(ENVELOPE, SMALL) for _ in range(20)]
    await queue.claim(20, 60)
    sizes: list[int] = []
    synchronous: list[str] = []
    run_batch = queue._run_batch

    def recording(batch: list[Any]) -> list[tuple[bool, Any]]:
        sizes.append(len(batch))
        try:
            return run_batch(batch)
        finally:
            synchronous.append(queue._synchronous)

    monkeypatch.setattr(queue, "_run_batch", recording)
    now = queue._clock()
    await queue.complete(ids[0], reply="250", ledger=[Sent("a@b.test", now, 1)])
    assert sizes == [1] and synchronous == ["NORMAL"]  # one change, one commit, no fsync
    pause = Pause("a@b.test", now + 60, "554 5.2.0")
    await asyncio.gather(
        *(queue.complete(i, reply="250", ledger=[Sent("a@b.test", now, 2)]) for i in ids[1:10]),
        *(queue.defer(i, until=now, reason="x", ledger=[pause]) for i in ids[10:]),
    )
    assert sum(sizes) == 20 and len(sizes) < 20  # batched like any other change
    got = await queue.ledger(0)
    assert [s.recipients for s in got.sent] == [1] + [2] * 9 and got.pauses == (pause,) * 10


async def test_database_is_wal_with_full_sync(queue: SqliteQueue) -> None:
    conn = sqlite3.connect(queue.db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    sync = await queue._read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
    assert sync == 2  # FULL


def test_ids_increase_even_when_the_clock_steps_back() -> None:
    clock = FakeClock(1_750_000_000.0)
    make = IdGenerator(clock)
    ids = [make()]
    for step in (0, -5, 0.0001, -0.5, 3):
        clock.advance(step)
        ids.append(make())
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(is_queue_id(i) for i in ids)
    assert not is_queue_id("../" + ids[0][3:])
    assert not is_queue_id(ids[0].lower())
