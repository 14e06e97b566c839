from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from .listener_helpers import MakeRelay, relay_factory


class FakeClock:
    """Wall clock for the queue: tests move time instead of sleeping."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_relay(tmp_path: Path) -> AsyncIterator[MakeRelay]:
    """Listeners on 127.0.0.1 port 0 over real SQLite queues (see listener_helpers)."""
    async with relay_factory(tmp_path) as make:
        yield make
