"""Building a whole relay (RelayService) in front of an in-process sandbox."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from smtp365.config import Settings
from smtp365.relay.queue import State
from smtp365.relay.service import RelayService
from smtp365.sandbox import Sandbox

ALICE = "alice@contoso.test"
BOB = "bob@contoso.test"


def account(sb: Sandbox, mailbox: str = ALICE, **extra: Any) -> dict[str, Any]:
    """An account table that signs in to the sandbox with STARTTLS + XOAUTH2."""
    return {
        "profile": "custom",
        "host": "localhost",
        "port": sb.smtp_port,
        "ca_file": str(sb.ca_file),
        "username": mailbox,
        "auth": "xoauth2",
        "timeout": 10,
        "token": sb.issue_token(mailbox, lifetime=3600),
        **extra,
    }


def settings(
    sb: Sandbox, state_dir: Path, *, relay: dict[str, Any] | None = None, **accounts: Any
) -> Settings:
    relay_table: dict[str, Any] = {
        "state_dir": str(state_dir),
        "hostname": "relay.test",
        "retry_base": 0.2,
        "retry_max": 0.5,
        "grace": 5,
        "listeners": [{"host": "127.0.0.1", "port": 0}],
        **(relay or {}),
    }
    return Settings.model_validate(
        {
            "default_account": "alice",
            "accounts": {"alice": account(sb), **accounts},
            "relay": relay_table,
        }
    )


async def until(check: Callable[[], Awaitable[bool] | bool], timeout: float = 15.0) -> None:
    """Wait for a condition that other tasks make true (polled: it spans processes)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "timed out waiting for the relay"
        await asyncio.sleep(0.02)


async def settled(service: RelayService, timeout: float = 15.0) -> None:
    queue = service.queue
    assert queue is not None

    async def done() -> bool:
        stats = await queue.stats()
        return stats.pending == 0

    await until(done, timeout)


async def states(service: RelayService) -> dict[State, int]:
    assert service.queue is not None
    return dict((await service.queue.stats()).counts)


class SteppedClock:
    """A relay's clock (:class:`~smtp365.relay.worker.Clock`) that moves only when the test
    calls :meth:`advance`: wall and monotonic time start at the real ones and stand still,
    and a sleep ends once the clock has been moved past its end, never by itself."""

    def __init__(self) -> None:
        self.wall = time.time()
        self.mono = time.monotonic()
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._slept: Counter[float] = Counter()  # sleeps begun, by length
        self._changed = asyncio.Event()

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        wake = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.mono + max(0.0, seconds), wake))
        self._slept[seconds] += 1
        self._changed.set()
        try:
            await wake
        finally:
            self._sleepers = [(end, f) for end, f in self._sleepers if f is not wake]

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds
        for end, wake in self._sleepers:
            if end <= self.mono and not wake.done():
                wake.set_result(None)

    async def slept(self, seconds: float, times: int, timeout: float = 15.0) -> None:
        """Until sleeps of ``seconds`` have begun ``times`` times (a loop that sleeps after
        each round has then finished that many rounds)."""
        async with asyncio.timeout(timeout):
            while self._slept[seconds] < times:
                self._changed.clear()
                await self._changed.wait()
