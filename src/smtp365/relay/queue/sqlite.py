"""The default queue: SQLite (WAL, ``synchronous=FULL``) plus a spool directory.

Layout under the state directory ``root``::

    queue.db (+ -wal, -shm)   envelopes, states, leases, small bodies, the delivery log,
                              the sending ledger (tables sent, pauses)
    spool/<queue id>          bodies larger than ``inline_max``, one file each
    incoming/                 temporary files being written (also for listeners: a file
                              written here is moved into the spool without copying)
    queue.lock                flock: shared by every open queue, exclusive for recovery
    queue.wlock               flock: held by whichever process is writing a transaction

Where bodies go: ``bench/queue_store.py`` on this 2-core VM, durable enqueues/s, with one
session enqueueing at a time and with 16 at once (their commits shared, see below)::

    body    sessions   spool file   SQLite blob   hybrid (default)   spool/blob
    10 KB       1          1,014        2,155          2,438            0.47
    10 KB      16          1,761        9,976         10,804            0.18
    1 MB        1            478          243            403            1.96
    1 MB       16            788          217            712            3.63

    crossing (spool/blob = 1): about 200-500 KB with one session, 80-100 KB with 16

A second run gave spool/blob 0.29 and 0.13 (10 KB), 1.70 and 3.41 (1 MB): the absolute
spool figures are the noisiest on this VM (one fsync per file), the direction never changes.

A blob costs one fsync (the WAL commit, shared by every change in the batch) but is written
twice (WAL, then the checkpoint into the database) and passes through memory whole; a spool
file costs its own fsync plus the directory's and the commit's, but is written once and
can be streamed (a listener that writes a 35 MB message to ``incoming/`` and enqueues the
path never holds it in memory). Neither wins
everywhere, so the store is a hybrid: bodies up to ``inline_max`` (default 64 KiB, below
both crossings and above a typical 10 KB message from a scanner or an application) are
blobs in the ``bodies`` table, larger ones spool files. That is 2.4x (one session) to 6x
(16 sessions) the spool-only rate for 10 KB messages, and within noise of spool-only for
1 MB ones.

Durability (security.md §1), in this order, each step finished before the next:

* spool body: write ``incoming/<id>.tmp``, fsync it, rename to ``spool/<id>``, fsync
  ``spool/``; then commit the row. A crash before the commit leaves an orphan file that
  recovery deletes; after it, a complete message.
* inline body: body row and message row in one transaction; the WAL commit is the fsync.

Claims, deliveries and deferrals are committed with ``synchronous=NORMAL`` (written to the
WAL, not fsync'd): a power cut may undo the last of them, and the message is then sent once
more, as Postfix does when it loses a queue file's removal. Everything else, an enqueue
above all, is ``FULL``; a ``FULL`` commit makes every earlier one durable too, and a spool
file is removed only after the WAL holding the change that stopped naming it is fsync'd. A
killed process loses nothing either way (the WAL is in the page cache). Per message that is
one fsync at intake instead of three.

Group commit: every change (enqueue, claim, complete, ...) goes to one writer thread, which
runs whatever has piled up while it was busy in a single transaction (one SAVEPOINT per
change, so one failing change does not take the others with it) and one fsync, then
answers each caller. Concurrent SMTP sessions thus share commits (the 16-session rows
above). Reads use a second connection on a second thread (WAL
readers never wait for the writer); file I/O runs on a small pool. The event loop never
blocks on the disk.

Several ``SqliteQueue`` objects (in one process or several) may share a root: writers take
turns on ``queue.wlock`` (a blocking flock) around each transaction, so a message is claimed
by one of them only. SQLite's own lock would do that too, but a writer that finds it taken
sleeps in growing steps (1, 2, 5, 10 ms ...), which made two processes receiving at once
slower than one; the flock wakes the next writer the moment the commit is done.

Recovery runs when a queue is opened and nobody else has it open (the
flock is free): temporary files and spool files without a committed row are deleted, the
leases of the dead are returned at once, and a row whose spool file is missing (which the
write order above rules out short of disk damage) is logged and made due: ``read`` then
raises :class:`~smtp365.errors.QueueContentLost` (as it does for a spool file that goes
missing later), and the worker fails the message with a delivery status notification.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from smtp365.errors import QueueContentLost, QueueError
from smtp365.models import Envelope
from smtp365.relay.queue import (
    Bounce,
    Content,
    Event,
    Ledger,
    LedgerEntry,
    LogEntry,
    Pause,
    Queue,
    QueuedMessage,
    QueueStats,
    Sent,
    State,
)
from smtp365.relay.queue.ids import IdGenerator, is_queue_id

__all__ = ["DEFAULT_INLINE_MAX", "Recovery", "SqliteQueue"]

log = logging.getLogger("smtp365.relay.queue")

T = TypeVar("T")

SCHEMA_VERSION = 2  # 2: the sending ledger (sent, pauses); a queue of 1 gains it at open
DEFAULT_INLINE_MAX = 64 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,           -- JSON array
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until REAL,
    claimed_at REAL,
    last_reason TEXT NOT NULL DEFAULT '',
    account TEXT,
    client TEXT NOT NULL DEFAULT '',
    message_id TEXT NOT NULL DEFAULT '',
    finished_at REAL,
    body TEXT                           -- 'inline' (bodies table), 'spool' (file) or NULL
);
CREATE INDEX IF NOT EXISTS messages_due ON messages(next_attempt_at, id)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS messages_leases ON messages(lease_until) WHERE state = 'active';
CREATE INDEX IF NOT EXISTS messages_finished ON messages(finished_at)
    WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS bodies (id TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log (
    queue_id TEXT NOT NULL,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    duration REAL
);
CREATE INDEX IF NOT EXISTS log_message ON log(queue_id, at);
CREATE INDEX IF NOT EXISTS log_at ON log(at);
CREATE TABLE IF NOT EXISTS sent (
    mailbox TEXT NOT NULL,
    at REAL NOT NULL,
    recipients INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sent_at ON sent(at);
CREATE TABLE IF NOT EXISTS pauses (
    mailbox TEXT NOT NULL,
    until REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS pauses_until ON pauses(until);
"""

_COLUMNS = (
    "id, sender, recipients, size, received_at, state, attempts, next_attempt_at, lease_until,"
    " last_reason, account, client, message_id, finished_at, body"
)
_STORAGE_FIX = "check free disk space and the permissions of the relay's state directory"
_LOST = "the queue file of this message is missing (disk damage?)"


@dataclass(frozen=True, slots=True)
class Recovery:
    """What opening the queue repaired (only when no other process had it open)."""

    incoming_removed: int = 0  # temporary files of interrupted writes
    orphans_removed: int = 0  # spool files whose enqueue never committed
    requeued: int = 0  # messages leased to workers that are gone
    lost: tuple[str, ...] = ()  # rows whose spool file is missing: left for the worker to fail

    @property
    def changed(self) -> bool:
        return bool(self.incoming_removed or self.orphans_removed or self.requeued or self.lost)


@dataclass(frozen=True, slots=True)
class _Stored:
    size: int
    inline: bytes | None = None
    spool: Path | None = None
    consumed: Path | None = None  # a caller's file to remove once the row is committed


@dataclass(frozen=True, slots=True)
class _New:
    """A message to insert (see ``SqliteQueue._prepare``)."""

    id: str
    row: tuple[object, ...]
    stored: _Stored

    def spooling(self) -> dict[str, Any]:
        """``_write`` arguments: sync the spool before the commit, remove the file on abort."""
        spool = self.stored.spool
        return {"sync_spool": spool is not None, "abort_unlink": (spool,) if spool else ()}

    def unused(self) -> list[Path]:
        """The files to remove when the message is not inserted after all."""
        return [self.stored.spool] if self.stored.spool else []


@dataclass(eq=False, slots=True)
class _Op:
    run: Callable[[sqlite3.Connection], tuple[Any, Sequence[Path]]]
    future: asyncio.Future[Any]
    sync_spool: bool
    abort_unlink: tuple[Path, ...]
    durable: bool
    ledger: tuple[LedgerEntry, ...] = ()  # written in the transaction even if run raises


def _storage_error(exc: BaseException, doing: str) -> QueueError:
    if isinstance(exc, QueueError):
        return exc
    return QueueError(f"the queue could not {doing}: {exc}", fix=_STORAGE_FIX, temporary=True)


def _unknown(queue_id: str) -> QueueError:
    return QueueError(
        f"no message {queue_id!r} in the queue",
        fix="list the queue with `smtp365 queue list`",
        temporary=False,
    )


def _refuse(queue_id: str, what: str) -> QueueError:
    return QueueError(f"message {queue_id}: {what}", temporary=False)


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # the next recovery removes it
        log.warning("could not remove %s: %s", path, exc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _checked(entry: LedgerEntry) -> LedgerEntry:
    """A ledger entry with the types the tables want (so it cannot fail a transaction)."""
    if isinstance(entry, Sent):
        return Sent(str(entry.mailbox).lower(), float(entry.at), max(1, int(entry.recipients)))
    if isinstance(entry, Pause):
        return Pause(str(entry.mailbox).lower(), float(entry.until), str(entry.reason))
    raise TypeError(f"not a ledger entry: {entry!r}")


def _insert_ledger(conn: sqlite3.Connection, ledger: Sequence[LedgerEntry]) -> None:
    sent = [(e.mailbox, e.at, e.recipients) for e in ledger if isinstance(e, Sent)]
    pauses = [(e.mailbox, e.until, e.reason) for e in ledger if isinstance(e, Pause)]
    if sent:
        conn.executemany("INSERT INTO sent (mailbox, at, recipients) VALUES (?, ?, ?)", sent)
    if pauses:
        conn.executemany("INSERT INTO pauses (mailbox, until, reason) VALUES (?, ?, ?)", pauses)


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SqliteQueue:
    """The :class:`~smtp365.relay.queue.Queue` on SQLite; make one with :meth:`open`."""

    def __init__(
        self,
        root: Path,
        *,
        clock: Callable[[], float],
        inline_max: int,
        busy_timeout: float,
        io_threads: int,
    ) -> None:
        self.root = root
        self.db_path = root / "queue.db"
        self.spool_dir = root / "spool"
        self.incoming_dir = root / "incoming"
        self.inline_max = inline_max
        self.recovery: Recovery | None = None
        self._clock = clock
        self._ids = IdGenerator(clock)
        self._busy_timeout = busy_timeout
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="smtp365-queue-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="smtp365-queue-reader")
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="smtp365-queue-io")
        self._wconn: sqlite3.Connection | None = None  # used on the writer thread only
        self._synchronous = "FULL"  # the writer connection's setting (see _run_batch)
        self._rconn: sqlite3.Connection | None = None  # used on the reader thread only
        self._lock_fd = -1
        self._wlock_fd = -1
        self._spool_fd = -1
        self._pending: list[_Op] = []
        self._flusher: asyncio.Task[None] | None = None
        self._calls = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        root: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        inline_max: int = DEFAULT_INLINE_MAX,
        busy_timeout: float = 30.0,
        io_threads: int = 4,
    ) -> SqliteQueue:
        """Open (creating if needed) the queue under ``root`` and recover it if nobody else
        has it open."""
        queue = cls(
            Path(root),
            clock=clock,
            inline_max=inline_max,
            busy_timeout=busy_timeout,
            io_threads=io_threads,
        )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(queue._writer, queue._open_writer)
            await loop.run_in_executor(queue._reader, queue._open_reader)
        except BaseException as exc:
            await queue._shutdown()
            if isinstance(exc, Exception):
                raise _storage_error(exc, f"open {queue.root}") from exc
            raise
        return queue

    async def close(self) -> None:
        """Finish every call in progress, then release the files. Safe to call twice."""
        if self._closing:
            return
        self._closing = True
        await self._idle.wait()
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        await self._shutdown()

    async def __aenter__(self) -> SqliteQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._reader, self._close_reader)
        await loop.run_in_executor(self._writer, self._close_writer)
        for pool in (self._reader, self._writer, self._io):
            pool.shutdown(wait=True)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.db_path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=True
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=FULL")
        # Each change in a batch has its savepoint, whose journal would be a temporary file.
        conn.execute("PRAGMA temp_store=MEMORY")
        return conn

    def _open_writer(self) -> None:
        """Writer thread: directories, lock, schema, recovery."""
        new_dirs = [d for d in (self.root, self.spool_dir, self.incoming_dir) if not d.is_dir()]
        for directory in (self.root, self.spool_dir, self.incoming_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for directory in new_dirs:
            _fsync_path(directory.parent, directory=True)
        self._lock_fd = os.open(self.root / "queue.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            exclusive = True
        except BlockingIOError:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # waits while someone recovers
            exclusive = False
        self._wlock_fd = os.open(self.root / "queue.wlock", os.O_RDWR | os.O_CREAT, 0o600)
        self._spool_fd = os.open(self.spool_dir, os.O_RDONLY | os.O_DIRECTORY)
        conn = self._wconn = self._connect()
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise QueueError(f"SQLite refused WAL mode for {self.db_path} (got {mode})")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"{self.db_path} was made by a newer smtp365 (schema {version})",
                fix="run the smtp365 version that made this queue, or another state directory",
            )
        if version < SCHEMA_VERSION:
            conn.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
            _fsync_path(self.root, directory=True)  # the new queue.db and -wal entries
        # An index on state made every claim and completion dearer, for one operator listing;
        # queues made before it was dropped lose it here (readable either way).
        old = "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'messages_state'"
        if conn.execute(old).fetchone() is not None:
            conn.execute("DROP INDEX IF EXISTS messages_state")
        if exclusive:
            self.recovery = self._recover(conn)
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def _open_reader(self) -> None:
        self._rconn = self._connect()
        self._rconn.execute("PRAGMA query_only=1")

    def _close_reader(self) -> None:
        if self._rconn is not None:
            self._rconn.close()
            self._rconn = None

    def _close_writer(self) -> None:
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None
        for fd in (self._spool_fd, self._wlock_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._spool_fd = self._wlock_fd = self._lock_fd = -1

    def _recover(self, conn: sqlite3.Connection) -> Recovery:
        incoming = 0
        for entry in os.scandir(self.incoming_dir):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            incoming += 1
        expected = {row[0] for row in conn.execute("SELECT id FROM messages WHERE body = 'spool'")}
        present: set[str] = set()
        orphans = 0
        for entry in os.scandir(self.spool_dir):
            if entry.name in expected:
                present.add(entry.name)
            else:
                os.unlink(entry.path)
                orphans += 1
        if orphans:
            os.fsync(self._spool_fd)
        lost = sorted(expected - present)
        now = self._clock()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Without content a pending message is only good for failing (read() says so,
            # and the worker fails it with a DSN), so it is due now.
            conn.executemany(
                "UPDATE messages SET body = NULL, next_attempt_at = min(next_attempt_at, ?)"
                " WHERE id = ?",
                [(now, queue_id) for queue_id in lost],
            )
            active = conn.execute(
                "SELECT id, attempts FROM messages WHERE state = 'active'"
            ).fetchall()
            for row in active:
                self._log(
                    conn,
                    row["id"],
                    now,
                    Event.EXPIRED,
                    row["attempts"],
                    "the relay stopped during the attempt; taken back at restart",
                )
            conn.execute(
                "UPDATE messages SET state = 'queued', lease_until = NULL,"
                " next_attempt_at = min(next_attempt_at, ?) WHERE state = 'active'",
                (now,),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        recovery = Recovery(incoming, orphans, len(active), tuple(lost))
        if recovery.changed:
            log.warning(
                "queue recovery in %s: %d temporary files and %d orphan spool files removed,"
                " %d interrupted deliveries requeued, %d messages lost%s",
                self.root,
                incoming,
                orphans,
                len(active),
                len(lost),
                f" ({', '.join(lost)})" if lost else "",
            )
        return recovery

    # ------------------------------------------------------------------ machinery

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        if self._closing:
            raise QueueError("the queue is closed", temporary=True)
        self._calls += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._calls -= 1
            if not self._calls:
                self._idle.set()

    async def _write(
        self,
        run: Callable[[sqlite3.Connection], tuple[T, Sequence[Path]]],
        *,
        sync_spool: bool = False,
        abort_unlink: tuple[Path, ...] = (),
        durable: bool = True,
        ledger: Sequence[LedgerEntry] = (),
    ) -> T:
        """Run ``run`` in the writer's next transaction; return once it is committed.

        ``run`` returns its result and the files to remove after the commit; if it raises,
        its changes are rolled back alone and ``abort_unlink`` files are removed. The
        ``ledger`` entries go into the same transaction whether or not ``run`` raises.
        """
        loop = asyncio.get_running_loop()
        entries = tuple(_checked(entry) for entry in ledger) if ledger else ()
        op = _Op(run, loop.create_future(), sync_spool, abort_unlink, durable, entries)
        self._pending.append(op)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="smtp365-queue-commit")
        return cast(T, await op.future)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                outcomes = await loop.run_in_executor(self._writer, self._run_batch, batch)
            except asyncio.CancelledError:
                for op in batch + self._pending:
                    op.future.cancel()
                raise
            except Exception as exc:
                # Nothing of the batch is known to be committed. Spool files are left for
                # recovery, which keeps exactly those with a committed row.
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(_storage_error(exc, "commit"))
                continue
            for op, (ok, value) in zip(batch, outcomes, strict=True):
                if op.future.done():
                    continue
                if ok:
                    op.future.set_result(value)
                else:
                    op.future.set_exception(_storage_error(value, "store the change"))

    def _run_batch(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """Writer thread: one transaction, one savepoint per change, one commit."""
        conn = self._writer_conn()
        if any(op.sync_spool for op in batch):
            os.fsync(self._spool_fd)  # the renames into spool/ before the rows that name them
        outcomes: list[tuple[bool, Any]] = []
        unlink: list[Path] = []
        synchronous = "FULL" if any(op.durable for op in batch) else "NORMAL"
        if synchronous != self._synchronous:
            conn.execute(f"PRAGMA synchronous={synchronous}")
            self._synchronous = synchronous
        fcntl.flock(self._wlock_fd, fcntl.LOCK_EX)
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._run_ops(conn, batch, outcomes, unlink)
            if unlink and synchronous != "FULL":
                # Files go only once the rows that stop naming them are on disk.
                with contextlib.suppress(FileNotFoundError):  # no WAL: checkpointed, synced
                    _fsync_path(Path(f"{self.db_path}-wal"))
        finally:
            fcntl.flock(self._wlock_fd, fcntl.LOCK_UN)
        for path in unlink:
            _unlink(path)
        return outcomes

    def _run_ops(
        self,
        conn: sqlite3.Connection,
        batch: list[_Op],
        outcomes: list[tuple[bool, Any]],
        unlink: list[Path],
    ) -> None:
        try:
            ledger = [entry for op in batch for entry in op.ledger]
            if ledger:  # outside the savepoints: kept whether or not each change is
                _insert_ledger(conn, ledger)
            for op in batch:
                conn.execute("SAVEPOINT change")
                try:
                    result, after = op.run(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO change")
                    conn.execute("RELEASE change")
                    outcomes.append((False, exc))
                    unlink.extend(op.abort_unlink)
                else:
                    conn.execute("RELEASE change")
                    outcomes.append((True, result))
                    unlink.extend(after)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            assert self._rconn is not None
            return fn(self._rconn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, run)
        except (sqlite3.Error, OSError) as exc:
            raise _storage_error(exc, "read") from exc

    def _writer_conn(self) -> sqlite3.Connection:
        assert self._wconn is not None
        return self._wconn

    def _spool_path(self, queue_id: str) -> Path:
        if not is_queue_id(queue_id):
            raise _unknown(queue_id)
        return self.spool_dir / queue_id

    def _message(self, row: sqlite3.Row) -> QueuedMessage:
        return QueuedMessage(
            id=row["id"],
            sender=row["sender"],
            recipients=tuple(json.loads(row["recipients"])),
            size=row["size"],
            received_at=row["received_at"],
            state=State(row["state"]),
            attempts=row["attempts"],
            next_attempt_at=row["next_attempt_at"],
            lease_until=row["lease_until"],
            last_reason=row["last_reason"],
            account=row["account"],
            client=row["client"],
            message_id=row["message_id"],
            finished_at=row["finished_at"],
            content_path=self.spool_dir / row["id"] if row["body"] == "spool" else None,
        )

    @staticmethod
    def _row(conn: sqlite3.Connection, queue_id: str) -> sqlite3.Row:
        row = conn.execute(
            "SELECT state, attempts, claimed_at, body, recipients FROM messages WHERE id = ?",
            (queue_id,),
        ).fetchone()
        if row is None:
            raise _unknown(queue_id)
        return cast(sqlite3.Row, row)

    @staticmethod
    def _log(
        conn: sqlite3.Connection,
        queue_id: str,
        at: float,
        event: Event,
        attempt: int,
        detail: str = "",
        duration: float | None = None,
    ) -> None:
        conn.execute(
            "INSERT INTO log (queue_id, at, event, attempt, detail, duration)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (queue_id, at, event.value, attempt, detail, duration),
        )

    # ------------------------------------------------------------------ enqueue

    def _free_spool_path(self, queue_id: str) -> Path:
        """I/O thread: the spool path of a new message; refuses an id in use (a rename
        would replace that message's content)."""
        final = self._spool_path(queue_id)
        if os.path.lexists(final):
            raise QueueError(f"queue id {queue_id} is already in use", temporary=False)
        return final

    def _spool_bytes(self, queue_id: str, data: bytes) -> _Stored:
        """I/O thread: a durable spool file (not yet named by any row)."""
        tmp = self.incoming_dir / f"{queue_id}.tmp"
        final = self._free_spool_path(queue_id)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        return _Stored(size=len(data), spool=final)

    def _take_file(self, queue_id: str, source: Path) -> _Stored:
        """I/O thread: inline a small file, move (or copy) a large one into the spool."""
        try:
            info = os.stat(source)
        except OSError as exc:
            raise QueueError(f"cannot queue {source}: {exc}", temporary=False) from exc
        if not stat.S_ISREG(info.st_mode):
            raise QueueError(f"cannot queue {source}: not a regular file", temporary=False)
        if info.st_size <= self.inline_max:
            data = source.read_bytes()
            if len(data) <= self.inline_max:
                return _Stored(size=len(data), inline=data, consumed=source)
            return _Stored(size=len(data), spool=self._spool_bytes(queue_id, data).spool)
        final = self._free_spool_path(queue_id)
        _fsync_path(source)
        try:
            os.rename(source, final)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        else:
            return _Stored(size=info.st_size, spool=final)
        # Another file system: copy, then remove the original once the row is committed.
        tmp = self.incoming_dir / f"{queue_id}.tmp"
        try:
            shutil.copyfile(source, tmp)
            _fsync_path(tmp)
            size = tmp.stat().st_size
            os.rename(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        return _Stored(size=size, spool=final, consumed=source)

    def new_id(self) -> str:
        return self._ids()

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
        with self._call():
            new = await self._prepare(
                envelope,
                content,
                message_id=message_id,
                account=account,
                client=client,
                queue_id=queue_id,
            )

            def run(conn: sqlite3.Connection) -> tuple[str, list[Path]]:
                self._insert(conn, new)
                return new.id, [new.stored.consumed] if new.stored.consumed else []

            return await self._write(run, **new.spooling())

    async def _prepare(
        self,
        envelope: Envelope,
        content: Content,
        *,
        message_id: str,
        account: str | None,
        client: str,
        queue_id: str | None,
    ) -> _New:
        """A new message with its content stored (a spool file not yet named by any row, or
        bytes to insert), ready for :meth:`_insert` in a transaction."""
        if not envelope.recipients:
            raise QueueError("a message needs at least one recipient", temporary=False)
        if queue_id is None:
            queue_id = self._ids()
        elif not is_queue_id(queue_id):
            raise QueueError(f"{queue_id!r} is not a queue id", temporary=False)
        now = self._clock()
        loop = asyncio.get_running_loop()
        try:
            if isinstance(content, bytes | bytearray | memoryview):
                data = bytes(content)
                if len(data) <= self.inline_max:
                    stored = _Stored(size=len(data), inline=data)
                else:
                    stored = await loop.run_in_executor(self._io, self._spool_bytes, queue_id, data)
            else:
                stored = await loop.run_in_executor(
                    self._io, self._take_file, queue_id, Path(os.fspath(content))
                )
        except OSError as exc:
            raise _storage_error(exc, "write the message") from exc
        row = (
            queue_id,
            envelope.sender,
            json.dumps(list(envelope.recipients)),
            stored.size,
            now,
            State.QUEUED.value,
            now,
            account,
            client,
            message_id,
            "inline" if stored.inline is not None else "spool",
        )
        return _New(queue_id, row, stored)

    @staticmethod
    def _insert(conn: sqlite3.Connection, new: _New) -> None:
        conn.execute(
            "INSERT INTO messages (id, sender, recipients, size, received_at, state,"
            " next_attempt_at, account, client, message_id, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            new.row,
        )
        if new.stored.inline is not None:
            conn.execute("INSERT INTO bodies (id, data) VALUES (?, ?)", (new.id, new.stored.inline))

    async def _prepare_bounce(self, bounce: Bounce | None) -> _New | None:
        if bounce is None:
            return None
        return await self._prepare(
            bounce.envelope,
            bounce.content,
            message_id=bounce.message_id,
            account=bounce.account,
            client=bounce.client,
            queue_id=bounce.queue_id,
        )

    # ------------------------------------------------------------------ workers

    async def claim(
        self, n: int, lease_seconds: float, *, now: float | None = None
    ) -> builtins.list[QueuedMessage]:
        with self._call():
            if n <= 0:
                return []
            at = self._clock() if now is None else now
            until = at + lease_seconds

            def run(conn: sqlite3.Connection) -> tuple[list[QueuedMessage], list[Path]]:
                expired = conn.execute(
                    "SELECT id, attempts FROM messages INDEXED BY messages_leases"
                    " WHERE state = 'active' AND lease_until <= ? ORDER BY lease_until LIMIT ?",
                    (at, n),
                ).fetchall()
                due = conn.execute(
                    "SELECT id FROM messages INDEXED BY messages_due"
                    " WHERE state IN ('queued', 'deferred')"
                    " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
                    (at, n - len(expired)),
                ).fetchall()
                for row in expired:
                    self._log(
                        conn,
                        row["id"],
                        at,
                        Event.EXPIRED,
                        row["attempts"],
                        "the lease ran out before the worker reported",
                    )
                ids = [row["id"] for row in expired] + [row["id"] for row in due]
                claimed = []
                for queue_id in ids:
                    row = conn.execute(
                        "UPDATE messages SET state = 'active', lease_until = ?, claimed_at = ?,"
                        f" attempts = attempts + 1 WHERE id = ? RETURNING {_COLUMNS}",
                        (until, at, queue_id),
                    ).fetchone()
                    claimed.append(self._message(row))
                return claimed, []

            return await self._write(run, durable=False)

    async def read(self, queue_id: str) -> bytes:
        with self._call():

            def lookup(conn: sqlite3.Connection) -> tuple[str, str | None, bytes | None]:
                row = conn.execute(
                    "SELECT m.state, m.body, b.data FROM messages m"
                    " LEFT JOIN bodies b ON b.id = m.id WHERE m.id = ?",
                    (queue_id,),
                ).fetchone()
                if row is None:
                    raise _unknown(queue_id)
                return row[0], row[1], row[2]

            state, where, data = await self._read(lookup)
            if where == "inline" and data is not None:
                return bytes(data)
            if where == "spool":
                path = self._spool_path(queue_id)
                try:
                    return await asyncio.get_running_loop().run_in_executor(
                        self._io, path.read_bytes
                    )
                except FileNotFoundError:
                    # Delivered or deleted meanwhile, or lost: ask again.
                    state, where, data = await self._read(lookup)
                except OSError as exc:
                    raise _storage_error(exc, f"read message {queue_id}") from exc
            if not State(state).terminal:
                raise QueueContentLost(
                    f"message {queue_id}: {_LOST}",
                    fix="restore the state directory from a backup; the message fails with a"
                    " delivery status notification to its sender",
                    temporary=False,
                )
            raise _refuse(queue_id, "its content is gone (delivered, purged or deleted)")

    async def complete(
        self,
        queue_id: str,
        *,
        reply: str,
        ledger: Sequence[LedgerEntry] = (),
        bounce: Bounce | None = None,
    ) -> bool:
        with self._call():
            new = await self._prepare_bounce(bounce)
            now = self._clock()

            def run(conn: sqlite3.Connection) -> tuple[bool, list[Path]]:
                row = self._row(conn, queue_id)
                if row["state"] == State.DELIVERED:
                    return False, new.unused() if new else []
                conn.execute(
                    "UPDATE messages SET state = 'delivered', finished_at = ?, last_reason = ?,"
                    " lease_until = NULL, body = NULL WHERE id = ?",
                    (now, reply, queue_id),
                )
                conn.execute("DELETE FROM bodies WHERE id = ?", (queue_id,))
                self._log(
                    conn,
                    queue_id,
                    now,
                    Event.DELIVERED,
                    row["attempts"],
                    reply,
                    self._duration(row, now),
                )
                if new is not None:
                    self._insert(conn, new)
                return True, [self._spool_path(queue_id)] if row["body"] == "spool" else []

            if new is None:
                return await self._write(run, durable=False, ledger=ledger)
            return await self._write(run, ledger=ledger, **new.spooling())

    @staticmethod
    def _current(row: sqlite3.Row, attempt: int | None) -> bool:
        """``attempt`` (a lease token; ``None``: the operator) may settle the message."""
        if attempt is None:
            return True
        return row["attempts"] == attempt and not State(row["state"]).terminal

    @staticmethod
    def _duration(row: sqlite3.Row, now: float) -> float | None:
        claimed = row["claimed_at"]
        return None if claimed is None else max(now - claimed, 0.0)

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
        with self._call():
            now = self._clock()
            left = list(recipients) if recipients is not None else None

            def run(conn: sqlite3.Connection) -> tuple[bool, list[Path]]:
                row = self._row(conn, queue_id)
                if not self._current(row, attempt):
                    return False, []
                state = State(row["state"])
                if state.terminal:
                    raise _refuse(queue_id, f"already {state}")
                new_state = State.HELD if state is State.HELD else State.DEFERRED
                conn.execute(
                    "UPDATE messages SET state = ?, next_attempt_at = ?, last_reason = ?,"
                    " lease_until = NULL WHERE id = ?",
                    (new_state.value, until, reason, queue_id),
                )
                if left is not None:
                    current = json.loads(row["recipients"])
                    if not left or not set(left) <= set(current):
                        raise QueueError(
                            f"{queue_id}: the recipients left must be some of {current}",
                            temporary=False,
                        )
                    conn.execute(
                        "UPDATE messages SET recipients = ? WHERE id = ?",
                        (json.dumps(left), queue_id),
                    )
                self._log(
                    conn,
                    queue_id,
                    now,
                    Event.DEFERRED,
                    row["attempts"],
                    reason,
                    self._duration(row, now),
                )
                return True, []

            return await self._write(run, durable=False, ledger=ledger)

    async def fail(
        self,
        queue_id: str,
        *,
        reason: str,
        ledger: Sequence[LedgerEntry] = (),
        attempt: int | None = None,
        bounce: Bounce | None = None,
    ) -> bool:
        with self._call():
            new = await self._prepare_bounce(bounce)
            now = self._clock()

            def run(conn: sqlite3.Connection) -> tuple[bool, list[Path]]:
                row = self._row(conn, queue_id)
                if not self._current(row, attempt):
                    return False, new.unused() if new else []
                state = State(row["state"])
                if state.terminal:
                    raise _refuse(queue_id, f"already {state}")
                conn.execute(
                    "UPDATE messages SET state = 'failed', finished_at = ?, last_reason = ?,"
                    " lease_until = NULL WHERE id = ?",
                    (now, reason, queue_id),
                )
                self._log(
                    conn,
                    queue_id,
                    now,
                    Event.FAILED,
                    row["attempts"],
                    reason,
                    self._duration(row, now),
                )
                if new is not None:
                    self._insert(conn, new)
                return True, []

            return await self._write(run, ledger=ledger, **(new.spooling() if new else {}))

    async def renew(self, queue_id: str, *, attempt: int, lease_seconds: float) -> bool:
        with self._call():
            until = self._clock() + lease_seconds

            def run(conn: sqlite3.Connection) -> tuple[bool, list[Path]]:
                renewed = conn.execute(
                    "UPDATE messages SET lease_until = ?"
                    " WHERE id = ? AND attempts = ? AND state = 'active'",
                    (until, queue_id, attempt),
                ).rowcount
                if renewed:
                    return True, []
                # Held (or held and released) during the attempt: no lease, still current.
                return self._current(self._row(conn, queue_id), attempt), []

            return await self._write(run, durable=False)

    # ------------------------------------------------------------------ operator

    async def hold(self, queue_id: str) -> None:
        with self._call():
            now = self._clock()

            def run(conn: sqlite3.Connection) -> tuple[None, list[Path]]:
                row = self._row(conn, queue_id)
                state = State(row["state"])
                if state.terminal:
                    raise _refuse(queue_id, f"already {state}")
                if state is not State.HELD:
                    conn.execute(
                        "UPDATE messages SET state = 'held', lease_until = NULL WHERE id = ?",
                        (queue_id,),
                    )
                    self._log(conn, queue_id, now, Event.HELD, row["attempts"], f"was {state}")
                return None, []

            await self._write(run)

    async def release(self, queue_id: str) -> None:
        with self._call():
            now = self._clock()

            def run(conn: sqlite3.Connection) -> tuple[None, list[Path]]:
                row = self._row(conn, queue_id)
                if row["state"] != State.HELD:
                    raise _refuse(queue_id, f"not held but {row['state']}")
                conn.execute(
                    "UPDATE messages SET state = 'queued', next_attempt_at = ? WHERE id = ?",
                    (now, queue_id),
                )
                self._log(conn, queue_id, now, Event.RELEASED, row["attempts"])
                return None, []

            await self._write(run)

    async def retry(self, queue_id: str) -> None:
        with self._call():
            now = self._clock()

            def run(conn: sqlite3.Connection) -> tuple[None, list[Path]]:
                row = self._row(conn, queue_id)
                state = State(row["state"])
                if state is State.HELD:
                    raise _refuse(queue_id, "held; release it instead")
                if state in (State.ACTIVE, State.DELIVERED):
                    raise _refuse(queue_id, f"{state}; nothing to retry")
                if state is State.FAILED and row["body"] is None:
                    raise _refuse(queue_id, "failed and its content is gone")
                new_state = State.QUEUED if state is State.FAILED else state
                conn.execute(
                    "UPDATE messages SET state = ?, next_attempt_at = ?, finished_at = NULL"
                    " WHERE id = ?",
                    (new_state.value, now, queue_id),
                )
                self._log(conn, queue_id, now, Event.RETRIED, row["attempts"], f"was {state}")
                return None, []

            await self._write(run)

    async def delete(self, queue_id: str) -> None:
        with self._call():
            now = self._clock()

            def run(conn: sqlite3.Connection) -> tuple[None, list[Path]]:
                row = self._row(conn, queue_id)
                conn.execute("DELETE FROM messages WHERE id = ?", (queue_id,))
                conn.execute("DELETE FROM bodies WHERE id = ?", (queue_id,))
                self._log(conn, queue_id, now, Event.DELETED, row["attempts"], row["state"])
                return None, [self._spool_path(queue_id)] if row["body"] == "spool" else []

            await self._write(run)

    async def purge_log(
        self, older_than: float, *, now: float | None = None, keep_ledger: float | None = None
    ) -> int:
        with self._call():
            at = self._clock() if now is None else now
            cutoff = at - older_than
            ledger_cutoff = at - (older_than if keep_ledger is None else keep_ledger)

            def run(conn: sqlite3.Connection) -> tuple[int, list[Path]]:
                rows = conn.execute(
                    "DELETE FROM messages INDEXED BY messages_finished"
                    " WHERE finished_at IS NOT NULL AND finished_at < ?"
                    " AND state IN ('delivered', 'failed') RETURNING id, body",
                    (cutoff,),
                ).fetchall()
                conn.executemany(
                    "DELETE FROM bodies WHERE id = ?",
                    [(row["id"],) for row in rows if row["body"] == "inline"],
                )
                conn.executemany("DELETE FROM log WHERE queue_id = ?", [(r["id"],) for r in rows])
                # A message's history stays as long as the message does (pending ones above
                # all); what is left of messages deleted by the operator goes with its age.
                conn.execute(
                    "DELETE FROM log INDEXED BY log_at WHERE at < ?"
                    " AND NOT EXISTS (SELECT 1 FROM messages WHERE id = log.queue_id)",
                    (cutoff,),
                )
                conn.execute("DELETE FROM sent WHERE at < ?", (ledger_cutoff,))
                conn.execute("DELETE FROM pauses WHERE until < ?", (ledger_cutoff,))
                spool = [self._spool_path(row["id"]) for row in rows if row["body"] == "spool"]
                return len(rows), spool

            return await self._write(run)

    async def record(self, ledger: Sequence[LedgerEntry]) -> None:
        with self._call():
            if ledger:
                await self._write(lambda conn: (None, []), durable=False, ledger=ledger)

    # ------------------------------------------------------------------ queries

    async def ledger(self, since: float) -> Ledger:
        with self._call():

            def run(conn: sqlite3.Connection) -> Ledger:
                conn.execute("BEGIN")  # one snapshot for both tables
                try:
                    sent = conn.execute(
                        "SELECT mailbox, at, recipients FROM sent INDEXED BY sent_at"
                        " WHERE at >= ? ORDER BY at",
                        (since,),
                    ).fetchall()
                    pauses = conn.execute(
                        "SELECT mailbox, until, reason FROM pauses INDEXED BY pauses_until"
                        " WHERE until > ? ORDER BY until",
                        (since,),
                    ).fetchall()
                finally:
                    conn.execute("COMMIT")
                return Ledger(
                    sent=tuple(Sent(r[0], r[1], r[2]) for r in sent),
                    pauses=tuple(Pause(r[0], r[1], r[2]) for r in pauses),
                )

            return await self._read(run)

    async def get(self, queue_id: str) -> QueuedMessage | None:
        with self._call():

            def run(conn: sqlite3.Connection) -> QueuedMessage | None:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (queue_id,)
                ).fetchone()
                return None if row is None else self._message(row)

            return await self._read(run)

    async def list(
        self, state: State | None = None, *, limit: int | None = None
    ) -> builtins.list[QueuedMessage]:
        with self._call():
            where = "" if state is None else "WHERE state = ?"
            args: tuple[object, ...] = () if state is None else (State(state).value,)

            def run(conn: sqlite3.Connection) -> builtins.list[QueuedMessage]:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM messages {where} ORDER BY id LIMIT ?",
                    (*args, -1 if limit is None else limit),
                )
                return [self._message(row) for row in rows]

            return await self._read(run)

    async def history(self, queue_id: str) -> builtins.list[LogEntry]:
        with self._call():

            def run(conn: sqlite3.Connection) -> builtins.list[LogEntry]:
                rows = conn.execute(
                    "SELECT queue_id, at, event, attempt, detail, duration FROM log"
                    " WHERE queue_id = ? ORDER BY at, rowid",
                    (queue_id,),
                )
                return [
                    LogEntry(
                        queue_id=row["queue_id"],
                        at=row["at"],
                        event=Event(row["event"]),
                        attempt=row["attempt"],
                        detail=row["detail"],
                        duration=row["duration"],
                    )
                    for row in rows
                ]

            return await self._read(run)

    async def stats(self) -> QueueStats:
        with self._call():

            def run(conn: sqlite3.Connection) -> QueueStats:
                counts: dict[State, int] = {}
                pending_bytes = 0
                oldest: float | None = None
                for row in conn.execute(
                    "SELECT state, count(*), coalesce(sum(size), 0), min(received_at)"
                    " FROM messages GROUP BY state"
                ):
                    state = State(row[0])
                    counts[state] = row[1]
                    if not state.terminal:
                        pending_bytes += row[2]
                        oldest = row[3] if oldest is None else min(oldest, row[3])
                return QueueStats(
                    counts=counts, pending_bytes=pending_bytes, oldest_pending_at=oldest
                )

            return await self._read(run)


if TYPE_CHECKING:
    _conforms: type[Queue] = SqliteQueue
