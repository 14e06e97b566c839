"""Sender rewrite at intake: From becomes the mailbox, the original moves to Reply-To."""

from __future__ import annotations

import email
import email.policy

from smtp365.relay.intake import rewrite_headers

MBX = "alice@contoso.test"


def parse(head: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(head + b"\r\n", policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def test_from_becomes_the_mailbox_and_the_original_goes_to_reply_to() -> None:
    head = b"From: Scanner 3F <scan@printer.local>\r\nSender: x@y.z\r\nSubject: s\r\n"
    msg = parse(rewrite_headers(head, MBX, "scan@printer.local"))
    assert msg["From"].addresses[0].addr_spec == MBX
    assert msg["From"].addresses[0].display_name == "Scanner 3F"
    assert msg["Reply-To"].addresses[0].addr_spec == "scan@printer.local"
    assert msg["Sender"] is None and msg["Subject"] == "s"


def test_an_existing_reply_to_is_kept() -> None:
    head = b"From: scan@printer.local\r\nReply-To: helpdesk@contoso.test\r\n"
    msg = parse(rewrite_headers(head, MBX, "scan@printer.local"))
    assert msg["Reply-To"].addresses[0].addr_spec == "helpdesk@contoso.test"
    assert msg["From"].addresses[0].display_name == "scan@printer.local"


def test_folded_from_and_no_from_at_all() -> None:
    head = b'From: "Very long\r\n name" <a@b.example>\r\nTo: t@example.net\r\n'
    out = rewrite_headers(head, MBX, "a@b.example")
    assert out.count(b"From:") == 1 and b"\r\n name" not in out.split(b"Reply-To")[0]
    msg = parse(rewrite_headers(b"Subject: none\r\n", MBX, "dev@printer.local"))
    assert msg["From"].addresses[0].addr_spec == MBX
    assert msg["Reply-To"].addresses[0].addr_spec == "dev@printer.local"


def test_display_name_cannot_inject_headers_or_quotes() -> None:
    head = b'From: "evil\\" <x@y>, Bcc: z" <scan@printer.local>\r\n'
    out = rewrite_headers(head, MBX, "scan@printer.local")
    msg = parse(out)
    assert [a.addr_spec for a in msg["From"].addresses] == [MBX]
    assert msg["Bcc"] is None


def test_a_leading_continuation_line_cannot_continue_the_new_from() -> None:
    head = b" , a@printer.local\r\nReply-To: help@printer.local\r\n"
    out = rewrite_headers(head, MBX, "a@printer.local")
    assert out.startswith(b" , a@printer.local\r\n")  # continues what stands before, as sent
    msg = parse(b"Received: x\r\n" + out)
    assert [a.addr_spec for a in msg["From"].addresses] == [MBX]
