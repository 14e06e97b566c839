"""Real crashes: a child enqueues in a loop and is killed with SIGKILL at random moments.

Oracle (security.md §1): every id the child printed (its enqueue had returned, so a client
would have had its 250) is in the reopened queue with byte-exact content; every message in
the queue is complete; no temporary or orphan file survives recovery.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from smtp365.relay.queue import State
from smtp365.relay.queue.sqlite import SqliteQueue
from tests.relay.crash_child import content

CHILD = Path(__file__).with_name("crash_child.py")
ROUNDS = 10


def run_and_kill(root: Path, start: int, kill_after: int) -> dict[str, int]:
    """Start the child, SIGKILL it once it has printed ``kill_after`` ids; return all ids
    it printed in full."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(root), str(start)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[bytes] = []
    try:
        while len(lines) < kill_after:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        os.kill(proc.pid, signal.SIGKILL)
        lines += proc.stdout.read().splitlines(keepends=True)
        proc.wait(timeout=10)
        errors = proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"the child died by itself:\n{errors}"
    printed: dict[str, int] = {}
    for line in lines:
        if line.endswith(b"\n"):  # a torn last line names no id we can check
            qid, index = line.decode().split()
            printed[qid] = int(index)
    return printed


async def check(root: Path, acknowledged: dict[str, int]) -> int:
    queue = await SqliteQueue.open(root)
    try:
        assert queue.recovery is not None  # nobody else had it open: recovery ran
        messages = await queue.list()
        by_id = {m.id: m for m in messages}
        missing = set(acknowledged) - set(by_id)
        assert not missing, f"acknowledged but lost: {sorted(missing)}"
        indexes = []
        for m in messages:
            assert m.state is State.QUEUED
            index = int(m.message_id.strip("<>").split("@")[0])
            indexes.append(index)
            if m.id in acknowledged:
                assert acknowledged[m.id] == index
            data = await queue.read(m.id)
            assert data == content(index), f"{m.id} (index {index}) is not byte-exact"
            assert m.size == len(data)
        assert len(indexes) == len(set(indexes)), "one enqueue stored twice"
        assert os.listdir(queue.incoming_dir) == [], "temporary files survived recovery"
        spooled = {m.id for m in messages if m.content_path is not None}
        assert set(os.listdir(queue.spool_dir)) == spooled, "orphan or missing spool files"
        return len(messages)
    finally:
        await queue.close()


@pytest.mark.timeout(60)
def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    root = tmp_path / "queue"
    acknowledged: dict[str, int] = {}
    stored = 0
    for round_ in range(ROUNDS):
        kill_after = 0 if round_ == 0 else rng.randrange(1, 40)
        printed = run_and_kill(root, start=round_ * 100_000, kill_after=kill_after)
        acknowledged.update(printed)
        try:
            stored = asyncio.run(check(root, acknowledged))
        except AssertionError as exc:
            raise AssertionError(f"round {round_}, seed {seed}: {exc}") from exc
    assert len(acknowledged) >= ROUNDS - 1  # the child got going in every round but the first
    assert stored >= len(acknowledged)
