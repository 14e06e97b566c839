"""The kill -9 soak: load the relay, kill it every few seconds, restart it on the same port
and state, until SOAK_MESSAGES messages got 250; then everything acknowledged must arrive.

The default run is a bounded slice (1,500 messages, under 300 s); ``make soak`` runs 10,000
without a time limit. Prints accepted / delivered / lost / duplicates, also when it fails;
lost must be 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtp365.sandbox import Sandbox, SandboxSettings
from smtp365.sandbox.settings import LimitSettings
from tests.e2e.relay_process import RelayProcess
from tests.e2e.test_cli_relay import Sender, arrived, config

TARGET = int(os.environ.get("SOAK_MESSAGES", "1500"))
MANY = 10**8  # no budget or quota in the way: this is about losing nothing


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    limits = LimitSettings(messages_per_minute=MANY, recipients_per_day=MANY, max_connections=20)
    sb = Sandbox(tmp_path / "sbx", SandboxSettings(limits=limits))
    await sb.start()
    yield sb
    await sb.stop()


@pytest.mark.timeout(0 if "SOAK_MESSAGES" in os.environ else 300)
async def test_kill_9_soak(sandbox: Sandbox, tmp_path: Path) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    budget = {"messages_per_minute": MANY, "recipients_per_day": MANY, "connections": 10}
    relay = await RelayProcess(config(tmp_path, sandbox, budget=budget), cwd=tmp_path).start()
    port = relay.port
    cfg = config(
        tmp_path,
        sandbox,
        budget=budget,
        listeners=[{"host": "127.0.0.1", "port": port, "mode": "plain"}],
    )
    kills = 0
    started = time.monotonic()
    try:
        with Sender({"plain": port}, sessions=4) as sender:
            while len(sender.acked) < TARGET:
                await asyncio.sleep(rng.uniform(0.2, 1.5))  # a random moment of the load
                await relay.kill()
                kills += 1
                relay = await RelayProcess(cfg, cwd=tmp_path).start()
        acked = set(sender.acked)
        with contextlib.suppress(AssertionError):  # what never arrived is counted below
            await arrived(sandbox, acked, timeout=120)
        exit_code = await relay.terminate()
    finally:
        if relay.proc is not None and relay.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                relay.proc.kill()  # failed or timed out: no relay left running
    counts = Counter(m.message_id for m in sandbox.store.list())
    lost = acked - set(counts)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    summary = (
        f"soak (seed {seed}, {time.monotonic() - started:.0f} s, kill -9 x{kills}): "
        f"attempted {sender.attempted}, accepted {len(acked)}, delivered {len(acked - lost)}, "
        f"lost {len(lost)}, duplicates {duplicates}, "
        f"delivered without a 250 {len(set(counts) - acked)}"
    )
    print(f"\n{summary}")
    assert not lost, f"{summary}; lost, for example: {sorted(lost)[:5]}"
    assert exit_code == 0, summary
