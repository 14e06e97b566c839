"""Delivery status notifications: the report's structure, its status codes, and the bouncer."""

from __future__ import annotations

import email
import email.policy
import logging
from collections.abc import AsyncIterator
from email.message import EmailMessage, Message
from pathlib import Path

import pytest

from smtp365.models import Envelope
from smtp365.relay.dsn import HEADERS_CAP, Bouncer, build_dsn, diagnostic_of, status_of
from smtp365.relay.queue import QueuedMessage, State
from smtp365.relay.queue.sqlite import SqliteQueue
from smtp365.relay.worker import FailedHook
from tests.relay.conftest import FakeClock

ALICE = "alice@contoso.test"
BOB = "bob@example.net"
CAROL = "carol@example.net"
MID = "<orig-1@app.contoso.test>"
PERMS = "DATA rejected: 550 5.7.60 SMTP; Client does not have permissions to send as this sender"
NOT_FOUND = "all recipients refused: 550 5.1.10 RESOLVER.ADR.RecipientNotFound; not found"
BODY_TEXT = "the secret body text"


def original(body: str = BODY_TEXT, subject: str = "Quarterly report") -> bytes:
    return (
        f"From: App <{ALICE}>\r\nTo: {BOB}\r\nSubject: {subject}\r\nMessage-ID: {MID}\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def queued(
    sender: str = ALICE, recipients: tuple[str, ...] = (BOB,), message_id: str = MID
) -> QueuedMessage:
    return QueuedMessage(
        id="01J0000000000000000000TEST",
        sender=sender,
        recipients=recipients,
        size=100,
        received_at=1_750_000_000.0,
        state=State.ACTIVE,
        attempts=1,
        next_attempt_at=1_750_000_000.0,
        message_id=message_id,
    )


def dsn(
    reason: str = PERMS,
    failed: tuple[str, ...] = (BOB,),
    content: bytes | None = None,
    msg: QueuedMessage | None = None,
) -> bytes:
    return build_dsn(
        msg or queued(recipients=failed),
        reason,
        failed,
        content,
        reporting_mta="relay.contoso.test",
        from_address="postmaster@contoso.test",
        now=1_750_000_600.0,
    )


def parse(raw: bytes) -> EmailMessage:
    report = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(report, EmailMessage)
    return report


def parts(report: EmailMessage) -> list[EmailMessage]:
    return list(report.iter_parts())  # type: ignore[arg-type]


def blocks(report: EmailMessage) -> list[Message]:
    """The delivery-status part's field blocks: per-message first, then per recipient."""
    [status] = [p for p in parts(report) if p.get_content_type() == "message/delivery-status"]
    payload = status.get_payload()
    assert isinstance(payload, list)
    return [block for block in payload if isinstance(block, Message)]


def header_lines(raw: bytes) -> list[str]:
    """The names of the report's top-level header fields (continuation lines skipped)."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    return [line.split(":", 1)[0] for line in head.split("\r\n") if line[:1] not in (" ", "\t")]


@pytest.fixture
async def queue(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqliteQueue]:
    queue = await SqliteQueue.open(tmp_path / "queue", clock=clock)
    yield queue
    await queue.close()


def bouncer(queue: SqliteQueue, clock: FakeClock, account: str | None = "postmaster") -> Bouncer:
    return Bouncer(
        queue,
        account=account,
        from_address="postmaster@contoso.test",
        reporting_mta="relay.contoso.test",
        clock=clock,
    )


async def bounce(
    hook: Bouncer, msg: QueuedMessage, reason: str, failed: tuple[str, ...]
) -> str | None:
    """The report the hook makes, queued on its own (the worker queues it with the failure);
    its queue id, ``None`` when none is due."""
    report = await hook(msg, reason, failed)
    if report is None:
        return None
    return await hook.queue.enqueue(
        report.envelope,
        report.content,
        message_id=report.message_id,
        account=report.account,
        client=report.client,
        queue_id=report.queue_id,
    )


async def failed_message(
    queue: SqliteQueue,
    reason: str = PERMS,
    *,
    sender: str = ALICE,
    rcpts: tuple[str, ...] = (BOB,),
    content: bytes | None = None,
) -> QueuedMessage:
    """A message enqueued, claimed (the worker's snapshot is returned) and failed."""
    qid = await queue.enqueue(Envelope(sender, rcpts), content or original(), message_id=MID)
    [msg] = await queue.claim(1, 30.0)
    assert msg.id == qid
    await queue.fail(qid, reason=reason)
    return msg


async def bounces(queue: SqliteQueue) -> list[QueuedMessage]:
    return [m for m in await queue.list() if m.client == "bounce"]


# -- the report --------------------------------------------------------------


def test_report_is_a_multipart_report_with_three_parts() -> None:
    raw = dsn(content=original())
    report = parse(raw)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(report)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert report["From"] == "Mail Delivery System <postmaster@contoso.test>"
    assert report["To"].addresses[0].addr_spec == ALICE
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["MIME-Version"] == "1.0"
    assert report["In-Reply-To"] == MID and report["References"] == MID
    assert report["Message-ID"].endswith("@relay.contoso.test>")
    assert report["Date"].datetime.timestamp() == 1_750_000_600.0
    assert not [d for part in report.walk() for d in part.defects]


def test_line_ends_are_crlf_and_lines_short() -> None:
    raw = dsn(reason=PERMS + " " + "x" * 3000, content=original())
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_delivery_status_fields() -> None:
    report = parse(dsn(failed=(BOB, CAROL), content=original()))
    per_message, *per_rcpt = blocks(report)
    assert per_message["Reporting-MTA"] == "dns; relay.contoso.test"
    assert "2025" in per_message["Arrival-Date"]
    assert [b["Final-Recipient"] for b in per_rcpt] == [f"rfc822; {BOB}", f"rfc822; {CAROL}"]
    for block in per_rcpt:
        assert block["Action"] == "failed"
        assert block["Status"] == "5.7.60"
        assert block["Diagnostic-Code"] == (
            "smtp; 550 5.7.60 SMTP; Client does not have permissions to send as this sender"
        )
        assert block["Last-Attempt-Date"]


def test_text_part_explains() -> None:
    [text, *_] = parts(parse(dsn(content=original())))
    body = text.get_content()
    assert f"<{BOB}>" in body
    assert "5.7.60" in body
    assert "01J0000000000000000000TEST" in body
    assert "Sun, 15 Jun 2025" in body  # when it was received
    assert "What to do:" in body


def test_headers_part_has_the_header_section_only() -> None:
    *_, headers = parts(parse(dsn(content=original())))
    text = headers.get_payload(decode=True)
    assert isinstance(text, bytes)
    assert b"Subject: Quarterly report" in text
    assert BODY_TEXT.encode() not in text


def test_no_original_gives_two_parts() -> None:
    report = parse(dsn(content=None))
    assert [p.get_content_type() for p in parts(report)] == [
        "text/plain",
        "message/delivery-status",
    ]
    assert blocks(report)[1]["Status"] == "5.7.60"


@pytest.mark.parametrize("folded", [False, True])
def test_header_section_is_capped_at_a_field_boundary(folded: bool) -> None:
    value = "y" * 45 + ("\r\n " if folded else " ") + "y" * 45
    many = "".join(f"X-Filler-{i}: {value}\r\n" for i in range(1500)).encode()  # ~150 KB
    raw = dsn(content=many + original())
    *_, headers = parts(parse(raw))
    text = headers.get_payload(decode=True)
    assert isinstance(text, bytes)
    assert 60_000 < len(text) <= HEADERS_CAP
    assert text.endswith(value.encode() + b"\r\n")
    fields = [line for line in text.split(b"\r\n") if line and line[:1] != b" "]
    assert all(f.startswith(b"X-Filler-") for f in fields)
    assert text.count(b"\r\n ") == (len(fields) if folded else 0)
    assert len(raw) < 70_000


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        (PERMS, "5.7.60"),
        (NOT_FOUND, "5.1.10"),
        ("expired in the queue; last error: 451 4.7.500 Server busy. Please try again", "4.4.7"),
        ("expired in the queue; last error: 554 5.2.0 SubmissionQuotaExceeded", "4.4.7"),
        ("expired in the queue; last error: SmtpConnectError: connection refused", "4.4.7"),
        ("MAIL rejected: 452 4.5.3 Too many recipients", "5.5.3"),  # failed anyway
        ("message too large for the account", "5.0.0"),
        ("recipient refused", "5.0.0"),
    ],
)
def test_status_code(reason: str, status: str) -> None:
    [_, block] = blocks(parse(dsn(reason=reason)))
    assert block["Status"] == status
    assert status_of(reason, expired=reason.startswith("expired")) == status


def test_diagnostic_code_only_for_smtp_replies() -> None:
    expired = "expired in the queue; last error: 451 4.7.500 Server busy. Please try again"
    [_, block] = blocks(parse(dsn(reason=expired)))
    assert block["Diagnostic-Code"] == "smtp; 451 4.7.500 Server busy. Please try again"
    [_, block] = blocks(parse(dsn(reason="message too large for the account")))
    assert block["Diagnostic-Code"] is None
    assert diagnostic_of("resolved 10.0.0.250 at 5.1.1") is None


def test_each_recipient_gets_its_own_reply() -> None:
    reason = (
        f"recipient refused: <{BOB}>: 550 5.1.10 RESOLVER.ADR.RecipientNotFound; "
        f"<{CAROL}>: 550 5.7.1 Delivery not authorized"
    )
    [_, bob, carol] = blocks(parse(dsn(reason=reason, failed=(BOB, CAROL))))
    assert bob["Status"] == "5.1.10"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.10 RESOLVER.ADR.RecipientNotFound"
    assert carol["Status"] == "5.7.1"
    assert carol["Diagnostic-Code"] == "smtp; 550 5.7.1 Delivery not authorized"


def test_header_injection_adds_no_header_lines() -> None:
    evil = "\r\nBcc: victim@example.org\r\nX-Evil: 1"
    msg = queued(sender=ALICE + evil, message_id=MID + evil)
    raw = build_dsn(
        msg,
        "550 5.1.1 bad" + evil + "\nStatus: 2.0.0",
        (BOB + evil,),
        original(),
        reporting_mta="relay.contoso.test" + evil,
        from_address="postmaster@contoso.test" + evil,
        now=1_750_000_600.0,
    )
    assert header_lines(raw) == [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "Auto-Submitted",
        "MIME-Version",
        "Content-Type",
    ]
    report = parse(raw)
    assert report["Bcc"] is None and report["X-Evil"] is None
    [_, block] = blocks(report)
    assert block["Status"] == "5.1.1"
    assert list(block.keys()) == [
        "Final-Recipient",
        "Action",
        "Status",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    ]
    assert "\n" not in block["Final-Recipient"]


def test_non_ascii_addresses() -> None:
    sender, rcpt = "jörg@exämple.test", "zoë@例え.テスト"
    msg = queued(sender=sender, recipients=(rcpt,))
    raw = dsn(failed=(rcpt,), content=original(subject="Grüße"), msg=msg)
    assert f"To: <{sender}>\r\n".encode() in raw  # RFC 6532: UTF-8 header, as in SMTPUTF8
    report = parse(raw)
    [_, block] = blocks(report)
    assert (
        block["Final-Recipient"]
        == "utf-8; zo\\x{EB}@\\x{4F8B}\\x{3048}.\\x{30C6}\\x{30B9}\\x{30C8}"
    )
    [text, *_] = parts(report)
    assert rcpt in text.get_content()


# -- the bouncer -------------------------------------------------------------


async def test_bounce_goes_to_the_sender_with_a_null_sender(
    queue: SqliteQueue, clock: FakeClock
) -> None:
    msg = await failed_message(queue)
    await bounce(bouncer(queue, clock), msg, PERMS, (BOB,))
    [report] = await bounces(queue)
    assert report.sender == "" and report.recipients == (ALICE,)
    assert report.account == "postmaster"
    assert report.state is State.QUEUED
    content = parse(await queue.read(report.id))
    assert content["Message-ID"] == report.message_id
    assert [p.get_content_type() for p in parts(content)][-1] == "text/rfc822-headers"
    assert blocks(content)[1]["Status"] == "5.7.60"


async def test_a_bouncer_without_an_account_leaves_the_report_to_routing(
    queue: SqliteQueue, clock: FakeClock
) -> None:
    msg = await failed_message(queue)
    new_id = await bounce(bouncer(queue, clock, account=None), msg, PERMS, (BOB,))
    assert new_id is not None
    report = await queue.get(new_id)
    assert report is not None and report.account is None


async def test_null_sender_is_never_bounced(
    queue: SqliteQueue, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    msg = await failed_message(queue, sender="")
    with caplog.at_level(logging.INFO, logger="smtp365.relay.dsn"):
        await bouncer(queue, clock)(msg, PERMS, (BOB,))
    assert await bounces(queue) == []
    assert f"no bounce for {msg.id}: null sender" in caplog.messages


async def test_nothing_failed_nothing_bounced(queue: SqliteQueue, clock: FakeClock) -> None:
    msg = await failed_message(queue)
    assert await bounce(bouncer(queue, clock), msg, PERMS, ()) is None
    assert await bounces(queue) == []


async def test_partly_refused_after_delivery(queue: SqliteQueue, clock: FakeClock) -> None:
    """The worker's partial refusal: the queue completed the message and dropped its content;
    the per-recipient reply comes from the delivery log."""
    qid = await queue.enqueue(Envelope(ALICE, (BOB, CAROL)), original(), message_id=MID)
    [msg] = await queue.claim(1, 30.0)
    reply = f"250 2.0.0 OK (refused: <{CAROL}>: 550 5.1.10 RESOLVER.ADR.RecipientNotFound)"
    await queue.complete(qid, reply=reply)
    new_id = await bounce(bouncer(queue, clock), msg, "recipient refused", (CAROL,))
    assert new_id is not None
    report = parse(await queue.read(new_id))
    assert [p.get_content_type() for p in parts(report)] == [
        "text/plain",
        "message/delivery-status",
    ]
    [_, block] = blocks(report)
    assert block["Final-Recipient"] == f"rfc822; {CAROL}"
    assert block["Status"] == "5.1.10"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.10 RESOLVER.ADR.RecipientNotFound"


async def test_large_original_gives_a_small_report(queue: SqliteQueue, clock: FakeClock) -> None:
    big = original(body=BODY_TEXT + "\r\n" + ("z" * 998 + "\r\n") * 1050)  # ~1 MB, spooled
    msg = await failed_message(queue, content=big)
    assert msg.content_path is not None
    new_id = await bounce(bouncer(queue, clock), msg, PERMS, (BOB,))
    assert new_id is not None
    raw = await queue.read(new_id)
    assert len(raw) < 70_000
    assert BODY_TEXT.encode() not in raw and b"zzzz" not in raw
    *_, headers = parts(parse(raw))
    assert "Subject: Quarterly report" in headers.get_content()


async def test_the_hook_makes_the_report_for_the_worker_to_queue(
    queue: SqliteQueue, clock: FakeClock
) -> None:
    qid = await queue.enqueue(Envelope(ALICE, (BOB,)), original(), message_id=MID)
    [msg] = await queue.claim(1, 30.0)
    hook: FailedHook = bouncer(queue, clock)
    report = await hook(msg, PERMS, (BOB,))
    assert report is not None and await bounces(queue) == []  # made, not queued
    assert (report.envelope.sender, report.envelope.recipients) == ("", (ALICE,))
    assert (report.account, report.client) == ("postmaster", "bounce")
    assert parse(report.content)["Message-ID"] == report.message_id
    assert await queue.fail(qid, reason=PERMS, attempt=msg.attempts, bounce=report)
    [queued_report] = await bounces(queue)
    assert queued_report.id == report.queue_id
    assert blocks(parse(await queue.read(report.queue_id)))[1]["Status"] == "5.7.60"


async def test_unusable_sender_is_not_bounced(queue: SqliteQueue, clock: FakeClock) -> None:
    msg = queued(sender=ALICE + "\r\nBcc: x@example.org")
    assert await bounce(bouncer(queue, clock), msg, PERMS, (BOB,)) is None
    assert await bounces(queue) == []


def test_bare_line_feeds_in_the_original_become_crlf() -> None:
    raw = dsn(content=b"Subject: lf only\nX-Folded: a\n b\n\nbody text\n")
    *_, headers = parts(parse(raw))
    text = headers.get_payload(decode=True)
    assert text == b"Subject: lf only\r\nX-Folded: a\r\n b\r\n"
