"""A full disk, for real: the queue on a small tmpfs this test mounts. The relay answers
``452 4.3.1`` at MAIL when space runs low (or at the end of a DATA during which the disk
filled), acknowledged messages stay intact, the queue database passes SQLite's integrity
check after a reopen, and it accepts again once space returns.

Mounting needs root; otherwise the test runs itself again in a user and mount namespace
(``unshare -rm``). When neither works it is skipped, or fails when ``CI`` is set (.ci/run
sets it): in CI a missing defence test is a failure, not a skip."""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from smtp365.relay.listener import Limits, ListenerConfig, RelayListener
from smtp365.relay.policy import RelayPolicy
from smtp365.relay.queue import State
from smtp365.relay.queue.sqlite import SqliteQueue

from .listener_helpers import LOCALHOST, cannot_run

SIZE = "3m"
IN_NAMESPACE = "SMTP365_TEST_IN_NAMESPACE"  # set in the run unshare -rm starts


def mount_tmpfs(mount: Path) -> str | None:
    """Mount a small tmpfs on ``mount``; the error when that is not possible."""
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if done.returncode == 0 else done.stderr.strip() or f"exit {done.returncode}"


def run_in_namespace(request: pytest.FixtureRequest, error: str) -> None:
    """Run this test again in a user and mount namespace, where an unprivileged user may
    mount a tmpfs; returns when it passed there."""
    if os.environ.get(IN_NAMESPACE) or shutil.which("unshare") is None:
        cannot_run(f"cannot mount a small tmpfs here: {error}")
    done = subprocess.run(
        ["unshare", "-rm", sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
        + [request.node.nodeid],
        cwd=request.config.rootpath,
        env={**os.environ, IN_NAMESPACE: "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    if done.returncode == 0 and "1 passed" in done.stdout:
        return
    if "1 failed" in done.stdout:
        pytest.fail(f"failed in a user and mount namespace:\n{output}")
    cannot_run(f"cannot mount a small tmpfs ({error}), nor in a namespace: {output.strip()}")


def integrity(queue: SqliteQueue) -> list[str]:
    with sqlite3.connect(queue.db_path) as conn:
        return [row[0] for row in conn.execute("PRAGMA integrity_check")]


def message(size: int) -> tuple[str, bytes]:
    mid = f"<{uuid.uuid4().hex}@disk.test>"
    head = f"From: a@corp.example\r\nTo: t@x.example\r\nMessage-ID: {mid}\r\n\r\n".encode()
    line = b"x" * 78 + b"\r\n"
    return mid, head + line * (size // len(line))


def send(port: int, data: bytes) -> tuple[str, int, bytes]:
    """(stage, reply code, reply text) of the first refusal, or of the final 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("lan.example")
        code, text = smtp.docmd("MAIL FROM:<a@corp.example>")
        if code != 250:
            return "mail", code, text
        code, text = smtp.rcpt("t@x.example")
        if code != 250:
            return "rcpt", code, text
        return ("data", *smtp.data(data))


@pytest.mark.parametrize(
    ("min_free", "stage"), [(None, "mail"), (0, "data")], ids=["at-mail", "during-data"]
)
async def test_full_disk_refuses_keeps_what_was_acked_and_recovers(
    request: pytest.FixtureRequest, tmp_path: Path, min_free: int | None, stage: str
) -> None:
    small_fs = tmp_path / "small"
    small_fs.mkdir()
    error = mount_tmpfs(small_fs)
    if error is not None:
        run_in_namespace(request, error)
        return
    try:
        await full_disk(small_fs, min_free, stage)
    finally:
        subprocess.run(["umount", "-l", str(small_fs)], check=False)


async def full_disk(small_fs: Path, min_free: int | None, stage: str) -> None:
    queue = await SqliteQueue.open(small_fs / "queue")
    cfg = ListenerConfig(
        host="127.0.0.1",
        port=0,
        hostname="relay.test",
        limits=Limits(max_message_size=400_000),
        min_free_bytes=min_free,  # None: 1.5 x the size limit; 0: never refuse at MAIL
    )
    listener = RelayListener(cfg, queue=queue, policy=RelayPolicy([LOCALHOST]))
    await listener.start()
    ballast = small_fs / "ballast"  # someone else's file, removed later
    ballast.write_bytes(b"\0" * 1_000_000)
    try:
        acked: dict[str, bytes] = {}
        refusal: tuple[str, int, bytes] | None = None
        for _ in range(40):  # 3 MB of disk, 1 MB taken, 200 KB messages: full well before 40
            mid, data = message(200_000)
            where, code, text = await asyncio.to_thread(send, listener.port, data)
            if code != 250:
                refusal = (where, code, text)
                break
            acked[text.decode().rsplit(" ", 1)[-1]] = data
        assert refusal is not None, "the disk never filled"
        # At MAIL (free space checked), or at the end of DATA when the disk filled while the
        # message was being written: then the rest of the data was read and dropped, never
        # taken for commands.
        assert refusal == (stage, 452, b"4.3.1 Insufficient system storage")
        assert len(acked) >= 3

        # Everything acknowledged is there, byte-exact; nothing half-written is left over.
        assert {m.id for m in await queue.list(State.QUEUED)} == set(acked)
        for queue_id, data in acked.items():
            assert (await queue.read(queue_id)).endswith(data)
        assert list(queue.incoming_dir.iterdir()) == []

        # Space returns: accepted again.
        ballast.unlink()
        mid, data = message(200_000)
        where, code, text = await asyncio.to_thread(send, listener.port, data)
        assert (where, code) == ("data", 250), (where, code, text)
        acked[text.decode().rsplit(" ", 1)[-1]] = data
    finally:
        await listener.stop()
        await queue.close()

    # Reopened (recovery runs), the queue is intact: the database and every message.
    queue = await SqliteQueue.open(small_fs / "queue")
    try:
        assert integrity(queue) == ["ok"]
        assert {m.id for m in await queue.list(State.QUEUED)} == set(acked)
        for queue_id, data in acked.items():
            assert (await queue.read(queue_id)).endswith(data)
    finally:
        await queue.close()
