"""A hypothesis state machine over command orderings on a STARTTLS listener, over real
sockets and real TLS: EHLO, STARTTLS (also with a command injected behind it), AUTH right
and wrong, MAIL, RCPT, DATA (also the three pipelined in one segment), RSET, NOOP in any
order. A model of the session says what each reply must be; after every step the queue
holds exactly the messages that got ``250``.

Checked among others: AUTH is never accepted before TLS, everything is forgotten after
STARTTLS (EHLO again, AUTH again, no envelope), commands sent behind STARTTLS are never
executed, one message per DATA. ``FUZZ_EXAMPLES`` runs (default 25; ``make fuzz``: more).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from smtp365.relay.listener import Limits

from .listener_helpers import LOCALHOST, Relay, relay_factory

RUNS = int(os.environ.get("FUZZ_EXAMPLES", "25"))
PASSWORD = "right-password"


class Background:
    """A STARTTLS listener on its own event loop thread (the state machine is synchronous)."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._factory = relay_factory(tmp_path)
        self._make = self.call(self._factory.__aenter__())
        limits = Limits(
            hard_error_limit=10_000,
            unknown_command_limit=10_000,
            auth_delay=0.0,
        )
        self.relay: Relay = self.call(
            self._make(mode="starttls", networks=(LOCALHOST,), limits=limits)
        )
        self.relay.users.add("app", PASSWORD, ["*"])

    def call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def queued(self) -> int:
        return len(self.call(self.relay.queue.list()))  # type: ignore[arg-type]

    def close(self) -> None:
        self.call(self._factory.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Background]:
    bg = Background(tmp_path)
    try:
        yield bg
    finally:
        bg.close()


def _plain(password: str) -> str:
    return base64.b64encode(f"\0app\0{password}".encode()).decode()


def test_command_orderings_follow_the_model(background: Background) -> None:
    relay = background.relay
    addresses = itertools.count()

    class Session(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.expected = background.queued()
            self._connect()

        def _connect(self) -> None:
            # Each connection from its own address: the per-address AUTH limit (which the
            # model does not follow) never comes into play.
            n = next(addresses)
            self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
                ("127.0.0.1", relay.port),
                timeout=10,
                source_address=(f"127.2.{n // 250 % 250}.{n % 250 + 1}", 0),
            )
            self.file = self.sock.makefile("rb")
            self.closed = False
            self.greeted = self.tls = self.authed = self.mail = False
            self.rcpts = self.auth_failures = 0
            assert self.reply().startswith(b"220 ")

        # -- plumbing ---------------------------------------------------------

        def reply(self) -> bytes:
            lines = b""
            while True:
                line = self.file.readline()
                assert line, f"connection closed after {lines!r}"
                lines += line
                if line[3:4] != b"-":
                    return lines

        def say(self, line: str) -> bytes:
            self.sock.sendall(line.encode() + b"\r\n")
            return self.reply()

        def teardown(self) -> None:
            self.file.close()
            self.sock.close()

        def _reset_envelope(self) -> None:
            self.mail = False
            self.rcpts = 0

        # -- rules ----------------------------------------------------------------

        @precondition(lambda self: not self.closed)
        @rule()
        def ehlo(self) -> None:
            r = self.say("EHLO fuzz.example")
            assert r.startswith(b"250-") and b"PIPELINING" in r, r
            assert (b"STARTTLS" in r) == (not self.tls)
            assert (b"AUTH PLAIN LOGIN" in r) == (self.tls and not self.authed)
            self.greeted = True
            self._reset_envelope()

        @precondition(lambda self: not self.closed)
        @rule(injected=st.sampled_from(["", "RSET", "NOOP", "MAIL FROM:<x@corp.example>"]))
        def starttls(self, injected: str) -> None:
            self.sock.sendall(b"STARTTLS\r\n" + (injected.encode() + b"\r\n" if injected else b""))
            r = self.reply()
            if self.tls:
                assert r.startswith(b"502"), r
            elif not self.greeted:
                assert r.startswith(b"503"), r
            else:
                assert r.startswith(b"220"), r
                self.sock = relay.client_context().wrap_socket(
                    self.sock, server_hostname="relay.test"
                )
                self.file = self.sock.makefile("rb")
                self.tls = True
                self.greeted = self.authed = False
                self._reset_envelope()
                return
            if injected:  # not a TLS start: the injected command is an ordinary command
                r = self.reply()
                if injected == "RSET":
                    assert r.startswith(b"250"), r
                    self._reset_envelope()
                elif injected.startswith("MAIL"):
                    ok = self.greeted and not self.mail
                    assert r.startswith(b"250" if ok else b"503"), r
                    self.mail = self.mail or ok
                else:
                    assert r.startswith(b"250"), r

        @precondition(lambda self: not self.closed)
        @rule(right=st.booleans())
        def auth(self, right: bool) -> None:
            r = self.say(f"AUTH PLAIN {_plain(PASSWORD if right else 'wrong')}")
            if not self.greeted or self.authed or self.mail:
                assert r.startswith(b"503"), r
            elif self.auth_failures >= 3:
                assert r.startswith(b"421"), r
                assert self.file.read() == b""  # and the relay closed the connection
                self.closed = True
            elif not self.tls:
                assert r.startswith(b"538"), r  # never AUTH in clear text
            elif right:
                assert r.startswith(b"235"), r
                self.authed = True
            else:
                assert r.startswith(b"535"), r
                self.auth_failures += 1

        @precondition(lambda self: not self.closed)
        @rule()
        def mail(self) -> None:
            r = self.say("MAIL FROM:<app@corp.example>")
            expected = b"503" if not self.greeted or self.mail else b"250"
            assert r.startswith(expected), r
            self.mail = self.mail or expected == b"250"

        @precondition(lambda self: not self.closed)
        @rule()
        def rcpt(self) -> None:
            r = self.say("RCPT TO:<t@foreign.example>")
            if not self.greeted or not self.mail:
                assert r.startswith(b"503"), r
            else:
                assert r.startswith(b"250"), r
                self.rcpts += 1

        @precondition(lambda self: not self.closed)
        @rule(dots=st.booleans())
        def data(self, dots: bool) -> None:
            r = self.say("DATA")
            if not self.greeted or not self.mail or not self.rcpts:
                assert r.startswith(b"503"), r
                return
            assert r.startswith(b"354"), r
            body = b"Subject: m\r\n\r\n" + (b"..leading dot\r\n" if dots else b"") + b"x\r\n.\r\n"
            self.sock.sendall(body)
            r = self.reply()
            assert r.startswith(b"250 2.0.0 Ok: queued as "), r
            self.expected += 1
            self._reset_envelope()

        @precondition(lambda self: not self.closed)
        @rule()
        def pipelined_transaction(self) -> None:
            # RFC 2920: MAIL, RCPT and DATA in one segment, then the replies in order.
            self.sock.sendall(
                b"MAIL FROM:<app@corp.example>\r\nRCPT TO:<t@foreign.example>\r\nDATA\r\n"
            )
            mail, rcpt, data = self.reply(), self.reply(), self.reply()
            mail_ok = self.greeted and not self.mail
            assert mail.startswith(b"250" if mail_ok else b"503"), mail
            self.mail = self.mail or mail_ok
            assert rcpt.startswith(b"250" if self.greeted and self.mail else b"503"), rcpt
            self.rcpts += rcpt.startswith(b"250")
            if not self.greeted or not self.mail or not self.rcpts:
                assert data.startswith(b"503"), data
                return
            assert data.startswith(b"354"), data
            self.sock.sendall(b"Subject: pipelined\r\n\r\nx\r\n.\r\n")
            r = self.reply()
            assert r.startswith(b"250 2.0.0 Ok: queued as "), r
            self.expected += 1
            self._reset_envelope()

        @precondition(lambda self: not self.closed)
        @rule()
        def rset(self) -> None:
            assert self.say("RSET").startswith(b"250")
            self._reset_envelope()

        @precondition(lambda self: not self.closed)
        @rule()
        def noop(self) -> None:
            assert self.say("NOOP").startswith(b"250")

        @precondition(lambda self: self.closed)
        @rule()
        def reconnect(self) -> None:
            self.teardown()
            self._connect()

        @invariant()
        def one_message_per_data(self) -> None:
            assert background.queued() == self.expected

    run_state_machine_as_test(
        Session,
        settings=settings(
            max_examples=RUNS,
            stateful_step_count=25,
            deadline=None,
            derandomize=os.environ.get("FUZZ_SEED") is None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
