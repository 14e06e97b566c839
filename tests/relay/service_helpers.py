"""Building a whole relay (RelayService) in front of an in-process sandbox."""

from __future__ import annotations

import asyncio
import time
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
