"""A closed STARTTLS session leaves no TLS layer behind for the garbage collector.

A session object is freed only by the cycle collector (aiosmtpd's command tables, the
stream writer and the cancelled handler task all refer back to it), which the relay runs
rarely (``settle_gc``). Before the fix the SSLProtocol that STARTTLS made (a 256 KiB read
buffer each), its ``ssl.SSLObject`` and the plain transport under it hung on the dead
session until then: hundreds of them at a time, and the relay's RSS kept rising with the
number of STARTTLS sessions (``bench/starttls_memory.py``). Checked here with the collector
off, on both event loops the relay can run on: no timing, no RSS figure.
"""

from __future__ import annotations

import asyncio
import gc
import smtplib
import ssl
from asyncio.sslproto import SSLProtocol
from pathlib import Path

import pytest

from smtp365.relay.listener import RelaySMTP
from smtp365.relay.loop import EventLoop, run
from tests.relay.listener_helpers import Relay, relay_factory

SESSIONS = 8


def _count(kind: type) -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


def _clients(relay: Relay, how: str) -> None:
    """``SESSIONS`` STARTTLS sessions; ``quit`` ends each with QUIT, ``drop`` closes the
    socket after the second EHLO (no QUIT, no TLS close_notify)."""
    for _ in range(SESSIONS):
        client = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
        try:
            client.ehlo("client.test")
            client.starttls(context=relay.client_context())
            code, _ = client.ehlo("client.test")
            assert code == 250
            if how == "quit":
                client.quit()
        finally:
            client.close()


async def _left_behind(tmp_path: Path, how: str) -> tuple[int, int, int]:
    async with relay_factory(tmp_path) as make:
        relay = await make(mode="starttls")
        protocols, ssl_objects = _count(SSLProtocol), _count(ssl.SSLObject)
        await asyncio.to_thread(_clients, relay, how)
        for _ in range(500):
            if relay.listener.sessions == 0:
                break
            await asyncio.sleep(0.01)
        assert relay.listener.sessions == 0
        for _ in range(5):  # the cancelled handlers finish
            await asyncio.sleep(0)
        return (
            _count(SSLProtocol) - protocols,
            _count(ssl.SSLObject) - ssl_objects,
            relay.listener.sessions,
        )


@pytest.mark.parametrize("how", ["quit", "drop"])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_closed_starttls_session_frees_its_tls_layer_at_once(
    tmp_path: Path, loop: EventLoop, how: str
) -> None:
    pytest.importorskip(loop)
    gc.collect()
    gc.disable()  # what is still alive now is held by a leak or a cycle, not pending garbage
    try:
        protocols, ssl_objects, open_sessions = run(_left_behind(tmp_path, how), loop)
    finally:
        gc.enable()
    assert open_sessions == 0
    assert protocols <= 0, f"{protocols} SSLProtocol(s) of closed sessions still alive"
    assert ssl_objects <= 0, f"{ssl_objects} SSLObject(s) of closed sessions still alive"
    gc.collect()
    assert _count(RelaySMTP) == 0  # and nothing keeps the sessions themselves reachable
