from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from .listener_helpers import MakeRelay, relay_factory


class FakeClock:
    """Wall clock for the queue, and the worker's and scheduler's ``Clock`` (wall time,
    monotonic time, sleep): tests move time instead of sleeping. ``sleep`` returns once
    :meth:`advance` has moved the clock past its end."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now
        self._sleepers: dict[asyncio.Future[None], float] = {}

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        wakeup = asyncio.get_running_loop().create_future()
        self._sleepers[wakeup] = self.now + seconds
        try:
            await wakeup
        finally:
            self._sleepers.pop(wakeup, None)

    @property
    def sleeping(self) -> int:
        """Tasks waiting for the clock to move."""
        return sum(1 for wakeup in self._sleepers if not wakeup.done())

    def advance(self, seconds: float) -> float:
        self.now += seconds
        for wakeup, end in self._sleepers.items():
            if end <= self.now and not wakeup.done():
                wakeup.set_result(None)
        return self.now

    def next_wakeup(self) -> float | None:
        ends = [end for wakeup, end in self._sleepers.items() if not wakeup.done()]
        return min(ends) if ends else None

    async def run(
        self,
        done: Callable[[], Awaitable[bool]],
        *,
        tasks: int,
        until: float,
        quiet: Callable[[], bool] = lambda: True,
        timeout: float = 20.0,
    ) -> None:
        """Until ``done()``: whenever ``tasks`` tasks (or more) wait for the clock and
        ``quiet()`` holds, jump to the first wakeup. Fails once the clock would pass
        ``until``, or after ``timeout`` real seconds (the tasks in between do real I/O: the
        queue, the sandbox)."""
        deadline = time.monotonic() + timeout
        while not await done():
            assert time.monotonic() < deadline, "timed out"
            if self.sleeping < tasks or not quiet():
                await asyncio.sleep(0.005)  # real work in progress: poll for the condition
                continue
            wakeup = self.next_wakeup()
            assert wakeup is not None and wakeup <= until, "nothing left to wait for"
            self.advance(max(0.0, wakeup - self.now))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_relay(tmp_path: Path) -> AsyncIterator[MakeRelay]:
    """Listeners on 127.0.0.1 port 0 over real SQLite queues (see listener_helpers)."""
    async with relay_factory(tmp_path) as make:
        yield make
