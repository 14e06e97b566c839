"""Stopping the whole relay (SIGTERM's path): sessions and deliveries share the grace."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from smtp365.relay.queue import State
from smtp365.relay.service import RelayService
from smtp365.sandbox import Sandbox, SandboxSettings
from smtp365.sandbox.settings import FaultRule, FaultSettings
from tests.relay.service_helpers import ALICE, settings, until


def _send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(
            ALICE, ["x@example.net"], f"From: {ALICE}\r\nSubject: s\r\n\r\nhi\r\n".encode()
        )


async def test_an_idle_client_does_not_cost_a_delivery_its_grace(tmp_path: Path) -> None:
    """A device keeping an idle connection open while the relay stops: it gets 421 at once,
    and the delivery in flight finishes within the grace instead of being cancelled."""
    sandbox = Sandbox(
        tmp_path / "sbx", SandboxSettings(faults=FaultSettings(data=FaultRule(delay=1.0)))
    )
    await sandbox.start()
    try:
        relay = RelayService(
            settings(sandbox, tmp_path / "relay", relay={"grace": 30, "processes": 1})
        )
        await relay.start()
        port = relay.listeners[0].port
        idle = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", port, timeout=30)
        try:
            await asyncio.to_thread(idle.ehlo)
            await asyncio.to_thread(_send, port)
            assert relay.scheduler is not None
            scheduler = relay.scheduler
            await until(lambda: scheduler.inflight == 1)  # waiting for the upstream's DATA
            queue = relay.queue
            assert queue is not None
            [message] = await queue.list()
            # Old behaviour: the idle session held the stop for all 30 s, and the delivery
            # got what was left of the grace (nothing) and was cancelled.
            await asyncio.wait_for(relay.stop(), 20)
            assert len(sandbox.store.list()) == 1
            code, _ = await asyncio.to_thread(idle.getreply)
            assert code == 421  # the idle session was told, not left open
        finally:
            idle.close()
        reopened = RelayService(settings(sandbox, tmp_path / "relay", relay={"processes": 1}))
        await reopened.start()
        try:
            assert reopened.queue is not None
            got = await reopened.queue.get(message.id)
            assert got is not None and got.state is State.DELIVERED
        finally:
            await reopened.stop(grace=0)
    finally:
        await sandbox.stop()
