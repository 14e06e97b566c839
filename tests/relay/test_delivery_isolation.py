"""One bad message never hurts another: a delivery that ends early (an exception, a reply out
of sequence, an address that cannot be encoded) leaves no upstream connection inside a mail
transaction, is never charged to the next message, and a message that can never be sent
fails once, with its DSN. Against the in-process sandbox, whose replies to a session out of
step are Exchange Online's (``503 5.5.1 Sender already specified``)."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import pytest

from smtp365.config import AccountSettings
from smtp365.errors import ProtocolError
from smtp365.models import Envelope, Submission
from smtp365.relay.queue import State
from smtp365.relay.ratelimit import Limits
from smtp365.transport import SmtpTransport
from smtp365.transport import smtp as smtp_transport
from tests.fakesmtp import FakeSMTPServer, Script
from tests.relay.test_delivery import ALICE, RelayFactory
from tests.relay.test_delivery import make_relay as make_relay  # the sandbox-backed relay

# aiosmtpd decodes a command line with surrogateescape: RCPT TO:<b\xff@example.net>
BAD = "b\udcff@example.net"


class Boom(RuntimeError):
    pass


def _fail_once_at_rcpt(monkeypatch: pytest.MonkeyPatch, recipient: str) -> list[str]:
    """The transport raises an unexpected exception between MAIL FROM and this RCPT TO, once."""
    original = smtp_transport._envelope_command
    fired: list[str] = []

    async def command(smtp: Any, verb: bytes, address: str, *args: Any, **kw: Any) -> Any:
        if verb == b"RCPT" and address == recipient and not fired:
            fired.append(address)
            raise Boom("injected between MAIL and RCPT")
        return await original(smtp, verb, address, *args, **kw)

    monkeypatch.setattr(smtp_transport, "_envelope_command", command)
    return fired


async def test_an_exception_between_mail_and_rcpt_never_reaches_the_next_message(
    make_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    relay = await make_relay(limits=Limits(max_connections=1), max_inflight=1)
    fired = _fail_once_at_rcpt(monkeypatch, "first@example.net")
    first, _ = await relay.send(1, rcpts=("first@example.net",))
    await relay.until(lambda: _attempted(relay, first))
    second, second_mid = await relay.send(2, rcpts=("second@example.net",))
    await relay.settled(timeout=15)
    assert fired
    entry = await relay.queue.get(second)
    assert entry is not None and entry.state is State.DELIVERED, entry
    assert second_mid in relay.arrived()
    first_entry = await relay.queue.get(first)
    assert first_entry is not None and first_entry.state is State.DELIVERED  # on its retry
    assert first_entry.attempts == 2
    assert not relay.failed  # nobody bounced
    assert relay.sb.stats.connections == 2  # the connection of the broken attempt was closed
    assert not any("503" in r.getMessage() for r in caplog.records)


async def _attempted(relay: Any, queue_id: str) -> bool:
    entry = await relay.queue.get(queue_id)
    return entry is not None and entry.attempts >= 1 and entry.state is not State.ACTIVE


async def test_an_unencodable_recipient_is_refused_and_the_others_delivered(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(bounces=True, limits=Limits(max_connections=1))
    qid, mid = await relay.send(1, rcpts=("ok@example.net", BAD))
    other, other_mid = await relay.send(2)
    await relay.settled()
    entry = await relay.queue.get(qid)
    assert entry is not None and entry.state is State.DELIVERED and entry.attempts == 1
    assert "553 5.1.3" in entry.last_reason and "b\\xff@example.net" in entry.last_reason
    assert {mid, other_mid} <= relay.arrived()
    [captured] = [m for m in relay.sb.store.list() if m.message_id == mid]
    assert captured.rcpt_tos == ["ok@example.net"]
    # the sender hears about the one refused recipient, once
    [(failed_msg, reason, rcpts)] = relay.failed
    assert failed_msg.id == qid and rcpts == (BAD,)
    assert "not valid UTF-8" in reason


async def test_a_message_that_can_never_be_sent_fails_once_with_its_dsn(
    make_relay: RelayFactory,
) -> None:
    relay = await make_relay(bounces=True)
    qid, _ = await relay.send(1, rcpts=(BAD,))
    _, innocent_mid = await relay.send(3)
    await relay.settled()
    entry = await relay.queue.get(qid)
    assert entry is not None and entry.state is State.FAILED, entry
    assert entry.attempts == 1  # not retried for its whole lifetime
    assert "not valid UTF-8" in entry.last_reason and "b\\xff@example.net" in entry.last_reason
    assert innocent_mid in relay.arrived()
    reasons = {m.id: (reason, rcpts) for m, reason, rcpts in relay.failed}
    assert reasons[qid][1] == (BAD,)
    bounces = [m for m in await relay.queue.list() if m.client == "bounce"]
    assert [b.recipients for b in bounces] == [(ALICE,)]


async def test_transport_drops_a_connection_left_inside_a_transaction(
    server_context: Callable[..., ssl.SSLContext],
    make_account: Callable[..., AccountSettings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fired = _fail_once_at_rcpt(monkeypatch, "first@example.net")
    server = FakeSMTPServer(Script(tls_context=server_context()))
    async with server, SmtpTransport(make_account(server.port)) as t:
        with pytest.raises(Boom):
            await t.submit(Submission(Envelope(ALICE, ("first@example.net",)), b"a\r\n"))
        assert fired and not t.connected
        outcome = await t.submit(Submission(Envelope(ALICE, ("second@example.net",)), b"b\r\n"))
    assert outcome.reply.code == 250
    assert server.connections == 2
    mails = [c for c in server.commands if c.upper().startswith("MAIL")]
    assert len(mails) == 2 and len(server.messages) == 1


@pytest.mark.parametrize("stage", ["mail", "rcpt"])
async def test_a_503_is_the_session_out_of_step_not_a_refusal_of_the_message(
    server_context: Callable[..., ssl.SSLContext],
    make_account: Callable[..., AccountSettings],
    stage: str,
) -> None:
    reply = "503 5.5.1 Sender already specified"
    script = Script(tls_context=server_context())
    if stage == "mail":
        script.mail_reply = reply
    else:
        script.rcpt_replies = {"bob@example.net": reply}
    server = FakeSMTPServer(script)
    async with server, SmtpTransport(make_account(server.port)) as t:
        with pytest.raises(ProtocolError) as info:
            await t.submit(Submission(Envelope(ALICE, ("bob@example.net",)), b"x\r\n"))
        assert not t.connected
    assert info.value.temporary
    assert "out of sequence" in info.value.what and "5.5.1" in info.value.what
