"""Slowloris: 500 connections that say nothing (or half a command) and never finish. Memory
stays bounded, other clients are still served, and the session timeout closes them all."""

from __future__ import annotations

import asyncio
import smtplib
import socket
from pathlib import Path

from smtp365.relay.listener import Limits

from .listener_helpers import LOCALHOST, MakeRelay

IDLE = 500
PER_ADDRESS = 50  # the default per-client limit: 10 addresses x 50


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_idle_connections_are_bounded_and_time_out(make_relay: MakeRelay) -> None:
    relay = await make_relay(
        networks=(LOCALHOST,), limits=Limits(session_timeout=3.0, auth_delay=0.001)
    )
    port = relay.port

    def open_idle() -> list[socket.socket]:
        socks = []
        for i in range(IDLE):
            source = f"127.0.0.{10 + i // PER_ADDRESS}"
            s = socket.create_connection(
                ("127.0.0.1", port), timeout=10, source_address=(source, 0)
            )
            if i % 2:
                s.sendall(b"EHLO slow")  # half a command, never finished
            socks.append(s)
        return socks

    before = _rss_kb()
    idle = await asyncio.to_thread(open_idle)
    try:
        async with asyncio.timeout(30):
            while relay.listener.sessions < IDLE:  # the relay has them all
                await asyncio.sleep(0.01)
        grown_mb = (_rss_kb() - before) / 1024
        print(f"{IDLE} idle sessions: +{grown_mb:.1f} MB (this process holds both ends)")
        assert grown_mb < 100  # about 100 KB per connection and its two socket ends at most

        # Someone else is served meanwhile.
        def send() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("lan.example")
                smtp.mail("a@corp.example")
                smtp.rcpt("t@x.example")
                return smtp.data(b"Subject: during\r\n\r\nhello\r\n")

        code, _ = await asyncio.to_thread(send)
        assert code == 250

        # The session timeout ends every idle connection, from the relay's side.
        await asyncio.wait_for(relay.listener._shared.drained.wait(), 30)

        def ended() -> int:
            closed = 0
            for s in idle:
                s.settimeout(5)
                try:
                    data = s.recv(4096)
                    while data:
                        data = s.recv(4096)
                    closed += 1
                except ConnectionResetError:
                    closed += 1
            return closed

        assert await asyncio.to_thread(ended) == IDLE
    finally:
        for s in idle:
            s.close()
