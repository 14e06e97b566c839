"""Abuse limits of the listener (security.md §5): failed AUTH per address with a growing
delay and then 421, password checks one at a time, connections per client address, unknown
commands."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import threading
import time

import pytest

from smtp365.relay.listener import Limits
from smtp365.relay.policy import NetworkRule

from .listener_helpers import MakeRelay, Relay

LAN = NetworkRule.parse("127.0.0.0/8", name="lan")
PLAIN_AUTH_OK = {"networks": (LAN,), "plain_auth_networks": frozenset({"lan"})}
_FAILED = re.compile(
    r"AUTH failed from \[(?P<ip>[^\]]+)\]: mechanism=PLAIN user='(?P<user>[^']*)' "
    r"failures_last_minute=(?P<n>\d+) delay=(?P<delay>[\d.]+)s"
)


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class Client:
    """A raw SMTP client from a chosen 127.0.0.x source address."""

    def __init__(self, relay: Relay, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", relay.port), timeout=10, source_address=(source, 0)
        )
        self.file = self.sock.makefile("rb")

    def reply(self) -> bytes:
        lines = b""
        while True:
            line = self.file.readline()
            if not line:
                return lines
            lines += line
            if line[3:4] != b"-":
                return lines

    def say(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _auth_round(
    relay: Relay, source: str, password: str, attempts: int, took: list[float] | None = None
) -> list[bytes]:
    """Greeting, EHLO and up to ``attempts`` AUTHs (each one's reply time into ``took``);
    after a 421, what the relay sent before it closed the connection."""
    client = Client(relay, source)
    try:
        replies = [client.reply(), client.say("EHLO client.test")]
        for _ in range(attempts):
            start = time.monotonic()
            replies.append(client.say(f"AUTH PLAIN {_plain('app', password)}"))
            if took is not None:
                took.append(time.monotonic() - start)
            if replies[-1].startswith(b"421"):
                client.sock.settimeout(5)
                replies.append(client.file.read())  # b"": closed by the relay
                break
        return replies
    finally:
        client.close()


async def test_failed_auth_per_address_delay_doubles_then_421(
    make_relay: MakeRelay, caplog: pytest.LogCaptureFixture
) -> None:
    limits = Limits(auth_delay=0.2, auth_delay_max=0.8, auth_failures_per_ip=4)
    relay = await make_relay(**PLAIN_AUTH_OK, limits=limits)
    relay.users.add("app", "right-password", ["*"])
    caplog.set_level("WARNING", logger="smtp365")

    # Two connections of wrong passwords from 127.0.0.1: 3 + 1 failures (3 per connection).
    took: list[float] = []
    first = await asyncio.to_thread(_auth_round, relay, "127.0.0.1", "wrong", 3, took)
    second = await asyncio.to_thread(_auth_round, relay, "127.0.0.1", "wrong", 1, took)
    assert [r[:3] for r in first[2:] + second[2:]] == [b"535"] * 4
    lines = [m for m in map(_FAILED.search, caplog.messages) if m]
    assert [(m["ip"], m["user"], int(m["n"])) for m in lines] == [
        ("127.0.0.1", "app", n) for n in range(1, 5)
    ]
    # The delay before each 535 doubles with the address's failures, up to the cap: as
    # logged, and as waited (a lower bound, whatever the machine's speed).
    delays = [0.2, 0.4, 0.8, 0.8]
    assert [float(m["delay"]) for m in lines] == delays
    assert all(t >= d for t, d in zip(took, delays, strict=True)), took

    # The address is now refused at AUTH, even with the right password, and closed ...
    blocked = await asyncio.to_thread(_auth_round, relay, "127.0.0.1", "right-password", 1)
    assert blocked[2].startswith(b"421 4.7.0"), blocked
    assert blocked[3] == b"", blocked
    assert any("AUTH refused for [127.0.0.1]: 4 failures" in m for m in caplog.messages)
    # ... while another address signs in.
    other = await asyncio.to_thread(_auth_round, relay, "127.0.0.2", "right-password", 1)
    assert other[2].startswith(b"235"), other


async def test_password_checks_run_one_at_a_time(make_relay: MakeRelay) -> None:
    # Each argon2 check takes 64 MiB for a moment: a burst of AUTHs must queue for the one
    # thread that checks passwords, not run side by side.
    relay = await make_relay(**PLAIN_AUTH_OK)
    relay.users.add("app", "right-password", ["*"])
    real_verify = relay.users.verify
    lock = threading.Lock()
    running = [0, 0]  # now, most at once

    def verify(user: str, password: str) -> bool:
        with lock:
            running[0] += 1
            running[1] = max(running)
        try:
            time.sleep(0.05)  # as long as a real check, about
            return real_verify(user, password)
        finally:
            with lock:
                running[0] -= 1

    relay.users.verify = verify  # type: ignore[method-assign]
    clients = 4
    together = threading.Barrier(clients)

    def sign_in(n: int) -> bytes:
        client = Client(relay, f"127.0.1.{n + 1}")
        try:
            client.reply()
            client.say("EHLO client.test")
            together.wait(10)
            return client.say(f"AUTH PLAIN {_plain('app', 'right-password')}")
        finally:
            client.close()

    replies = await asyncio.gather(*(asyncio.to_thread(sign_in, n) for n in range(clients)))
    assert all(r.startswith(b"235") for r in replies), replies
    assert running[1] == 1


async def test_connections_per_client_address(make_relay: MakeRelay) -> None:
    relay = await make_relay(limits=Limits(max_connections_per_client=3))
    held: list[Client] = []

    def crowd() -> tuple[list[bytes], bytes, bytes]:
        held.extend(Client(relay) for _ in range(3))
        greetings = [c.reply() for c in held]
        fourth = Client(relay)
        refused = fourth.reply() + fourth.file.read()  # 421, then the relay closes
        fourth.close()
        elsewhere = Client(relay, "127.0.0.3")
        other = elsewhere.reply()
        elsewhere.close()
        return greetings, refused, other

    def one_more() -> bytes:
        again = Client(relay)
        try:
            return again.reply()
        finally:
            again.close()

    try:
        greetings, refused, other = await asyncio.to_thread(crowd)
        assert all(g.startswith(b"220") for g in greetings)
        assert refused == b"421 4.7.0 Error: too many connections from your address\r\n"
        assert other.startswith(b"220")
        held.pop().close()
        clients = relay.listener._shared.clients
        async with asyncio.timeout(10):
            while clients.connections("127.0.0.1") > 2:  # the relay has seen the close
                await asyncio.sleep(0.01)
        assert (await asyncio.to_thread(one_more)).startswith(b"220")
    finally:
        for c in held:
            c.close()


async def test_unknown_commands_then_421(make_relay: MakeRelay) -> None:
    relay = await make_relay(limits=Limits(unknown_command_limit=3))

    def run() -> list[bytes]:
        client = Client(relay)
        try:
            replies = [client.reply(), client.say("EHLO client.test")]
            for verb in ("FOO", "BAR", "BAZ"):
                replies.append(client.say(verb))
            replies.append(client.file.read())  # the relay closed the connection
            return replies
        finally:
            client.close()

    replies = await asyncio.to_thread(run)
    assert [r[:3] for r in replies[2:5]] == [b"500", b"500", b"500"]
    assert replies[5] == b"421 4.7.0 Error: too many unknown commands\r\n"  # then closed
