"""Bad input at the relay's door gets a 5xx that says what is wrong, never ``451 internal
error`` (which a well-behaved client retries for ever), never a traceback in the log, and a
reply never echoes bytes it cannot carry. Over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from smtp365.models import Envelope
from smtp365.relay.intake import ClientInfo, Intake, Route
from smtp365.relay.listener import ListenerConfig, RelayListener
from smtp365.relay.policy import RelayPolicy
from smtp365.relay.queue.sqlite import SqliteQueue

from .listener_helpers import HOSTNAME, LOCALHOST

MAILBOX = "alice@contoso.test"


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> bytes:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            assert line, "the relay closed the connection"
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    async def cmd(self, line: bytes) -> bytes:
        self.writer.write(line + b"\r\n")
        return await self.reply()


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[RelayListener, SqliteQueue]]:
    queue = await SqliteQueue.open(tmp_path / "queue")

    def router(client: ClientInfo, envelope: Envelope) -> Route:
        return Route("alice", rewrite_to=MAILBOX)

    listener = RelayListener(
        ListenerConfig(host="127.0.0.1", port=0, hostname=HOSTNAME),
        queue=queue,
        policy=RelayPolicy((LOCALHOST,)),
        intake=Intake(queue, hostname=HOSTNAME, router=router),
    )
    await listener.start()
    yield listener, queue
    await listener.stop()
    await queue.close()


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO, logger="smtp365")
    yield
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


@pytest.fixture
async def smtp(relay: tuple[RelayListener, SqliteQueue]) -> AsyncIterator[Session]:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay[0].port)
    session = Session(reader, writer)
    assert (await session.reply()).startswith(b"220 ")
    assert (await session.cmd(b"EHLO client.test")).startswith(b"250-")
    yield session
    writer.close()
    await writer.wait_closed()


pytestmark = pytest.mark.usefixtures("no_tracebacks")


async def test_an_invalid_utf8_recipient_is_refused_at_rcpt_and_the_rest_queued(
    smtp: Session, relay: tuple[RelayListener, SqliteQueue]
) -> None:
    assert (await smtp.cmd(b"MAIL FROM:<a@printer.local> SMTPUTF8")).startswith(b"250 ")
    assert (await smtp.cmd(b"RCPT TO:<ok@example.net>")).startswith(b"250 ")
    reply = await smtp.cmd(b"RCPT TO:<b\xff@example.net>")
    assert reply.startswith(b"553 5.1.3 ") and b"UTF-8" in reply
    reply.decode("ascii")  # the reply carries no byte the client sent
    assert (await smtp.cmd(b"DATA")).startswith(b"354 ")
    assert (await smtp.cmd(b"Subject: x\r\n\r\nhi\r\n.")).startswith(b"250 2.0.0 Ok: queued")
    [queued] = await relay[1].list()
    assert queued.recipients == ("ok@example.net",)


@pytest.mark.parametrize("utf8", [b" SMTPUTF8", b""])
async def test_an_invalid_utf8_sender_is_refused_at_mail(smtp: Session, utf8: bytes) -> None:
    reply = await smtp.cmd(b"MAIL FROM:<x\xff@printer.local>" + utf8)
    assert reply.startswith(b"553 5.1.7 ") and b"UTF-8" in reply
    reply.decode("ascii")
    assert (await smtp.cmd(b"MAIL FROM:<a@printer.local>")).startswith(b"250 ")


async def test_an_undecodable_recipient_without_smtputf8_is_refused_not_echoed(
    smtp: Session,
) -> None:
    assert (await smtp.cmd(b"MAIL FROM:<a@printer.local>")).startswith(b"250 ")
    reply = await smtp.cmd(b"RCPT TO:<\xff\xfe@example.net>")
    assert reply.startswith(b"553 5.1.3 "), reply
    assert b"\xff" not in reply and b"\xfe" not in reply
    reply = await smtp.cmd("RCPT TO:<jösé@example.net>".encode())
    assert reply.startswith(b"553 5.1.3 ") and b"SMTPUTF8" in reply  # 8-bit, no SMTPUTF8
    assert (await smtp.cmd(b"NOOP")).startswith(b"250 ")


@pytest.mark.parametrize("value", ["²", "①", "٣", "1²", "", "-1", "1e3"])
async def test_size_takes_ascii_digits_only(smtp: Session, value: str) -> None:
    reply = await smtp.cmd(f"MAIL FROM:<a@printer.local> SIZE={value}".encode())
    assert reply.startswith(b"501 5.5.4 "), reply
    assert (await smtp.cmd(b"MAIL FROM:<a@printer.local> SIZE=100")).startswith(b"250 ")


@pytest.mark.parametrize("param", ["ſIZE=10", "BODY=８BITMIME", "SMTPUTF８", "X\udcff=1"])
async def test_mail_parameters_are_ascii(smtp: Session, param: str) -> None:
    # "ſ".upper() == "S": a parameter is matched on its ASCII spelling only
    reply = await smtp.cmd(
        f"MAIL FROM:<a@printer.local> {param}".encode("utf-8", "surrogateescape")
    )
    assert reply[:1] == b"5", reply
    reply.decode("ascii")


async def test_an_unknown_command_with_undecodable_bytes_is_answered(smtp: Session) -> None:
    reply = await smtp.cmd(b"X\xff\xfe hello")
    assert reply.startswith(b"500 "), reply
    assert b"\xff" not in reply


async def test_a_sender_rewrite_sees_every_header_or_the_message_is_refused(
    smtp: Session, relay: tuple[RelayListener, SqliteQueue]
) -> None:
    assert (await smtp.cmd(b"MAIL FROM:<dev@printer.local>")).startswith(b"250 ")
    assert (await smtp.cmd(b"RCPT TO:<t@example.net>")).startswith(b"250 ")
    assert (await smtp.cmd(b"DATA")).startswith(b"354 ")
    filler = b"".join(b"X-Filler-%06d: x\r\n" % i for i in range(100_000))
    smtp.writer.write(
        filler + b"From: ceo@contoso.test\r\nSender: ceo@contoso.test\r\n\r\nhi\r\n.\r\n"
    )
    reply = await smtp.reply()
    assert reply.startswith(b"552 5.3.4 ") and b"header section" in reply, reply
    assert await relay[1].list() == []
    # within the limit, every From:/Sender: is the policy's, however far down it is
    assert (await smtp.cmd(b"MAIL FROM:<dev@printer.local>")).startswith(b"250 ")
    assert (await smtp.cmd(b"RCPT TO:<t@example.net>")).startswith(b"250 ")
    assert (await smtp.cmd(b"DATA")).startswith(b"354 ")
    filler = b"".join(b"X-Filler-%05d: x\r\n" % i for i in range(10_000))
    body = filler + b"From: ceo@contoso.test\r\nSender: ceo@contoso.test\r\n\r\nhi\r\n."
    assert (await smtp.cmd(body)).startswith(b"250 2.0.0 Ok: queued")
    [queued] = await relay[1].list()
    content = await relay[1].read(queued.id)
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert [a.addr_spec for a in msg["From"].addresses] == [MAILBOX]
    assert len(msg.get_all("From", [])) == 1 and msg["Sender"] is None
