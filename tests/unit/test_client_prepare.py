"""Message preparation: headers filled, envelope derived, Bcc hidden, injection refused."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from smtp365.client import build_message, prepare
from smtp365.config import load
from smtp365.config.model import AccountSettings
from smtp365.errors import MessageError


@pytest.fixture
def account(tmp_path: Path) -> AccountSettings:
    env = {"HOME": str(tmp_path), "SMTP365_USERNAME": "alice@contoso.com"}
    return load(env=env).account()


def test_fields_build_full_message(account: AccountSettings, tmp_path: Path) -> None:
    att = tmp_path / "report.csv"
    att.write_text("a,b\n1,2\n")
    msg = build_message(
        sender=account.sender,
        to=["bob@example.net", "carol@example.net"],
        cc="dave@example.net",
        bcc=["eve@example.net"],
        reply_to="help@contoso.com",
        subject="Report",
        text="plain",
        html="<p>html</p>",
        attachments=[att, ("note.txt", b"hi")],
    )
    sub = prepare(msg, account)
    assert sub.envelope.sender == "alice@contoso.com"
    assert sub.envelope.recipients == (
        "bob@example.net",
        "carol@example.net",
        "dave@example.net",
        "eve@example.net",
    )
    assert b"\r\n" in sub.content and b"\n" not in sub.content.replace(b"\r\n", b"")
    parsed = message_from_bytes(sub.content, policy=policy.default)
    assert parsed["Bcc"] is None, "Bcc must never be transmitted"
    assert parsed["Message-ID"] == sub.message_id and sub.message_id.endswith("@contoso.com>")
    assert parsed["Date"] is not None
    assert parsed["Reply-To"] == "help@contoso.com"
    names = [p.get_filename() for p in parsed.iter_attachments()]
    assert names == ["report.csv", "note.txt"]
    assert msg["Bcc"] is not None, "the caller's message is left untouched"


def test_existing_headers_kept(account: AccountSettings) -> None:
    msg = EmailMessage()
    msg["From"] = "Reports <reports@contoso.com>"
    msg["To"] = "bob@example.net"
    msg["Message-ID"] = "<fixed@contoso.com>"
    msg["Date"] = "Sun, 23 Nov 2025 11:12:20 +0000"
    msg.set_content("x")
    sub = prepare(msg, account)
    assert sub.message_id == "<fixed@contoso.com>"
    assert sub.envelope.sender == "reports@contoso.com"
    assert b"Date: Sun, 23 Nov 2025 11:12:20 +0000" in sub.content


def test_explicit_envelope_and_recipients(account: AccountSettings) -> None:
    msg = build_message(to="bob@example.net", subject="s", text="t")
    sub = prepare(msg, account, envelope_from="bounce@contoso.com", recipients=["x@example.net"])
    assert sub.envelope == type(sub.envelope)("bounce@contoso.com", ("x@example.net",))
    assert b"From: alice@contoso.com" in sub.content


@pytest.mark.parametrize(
    "bad",
    ["bob@example.net\r\nRCPT TO:<evil@x>", "a\x00@b", "a\n@b", "a\t@b", "a\x7f@b", "a@b> SIZE=1"],
)
def test_address_injection_refused(account: AccountSettings, bad: str) -> None:
    msg = build_message(to="bob@example.net", text="t")
    with pytest.raises(MessageError, match="CR, LF, NUL"):
        prepare(msg, account, recipients=[bad])
    with pytest.raises(MessageError, match="CR, LF, NUL"):
        prepare(msg, account, envelope_from=bad)


def test_header_injection_refused() -> None:
    with pytest.raises(MessageError, match="Subject"):
        build_message(to="bob@example.net", subject="hi\r\nBcc: evil@example.net", text="t")


def test_no_recipients(account: AccountSettings) -> None:
    with pytest.raises(MessageError, match="no recipients"):
        prepare(build_message(subject="s", text="t"), account)


def test_missing_attachment(tmp_path: Path) -> None:
    with pytest.raises(MessageError, match="cannot read attachment"):
        build_message(to="b@example.net", attachments=[tmp_path / "nope.pdf"])


def test_non_ascii_uses_smtputf8(account: AccountSettings) -> None:
    msg = build_message(to="jörg@exämple.de", subject="Grüße", text="Hallo")
    sub = prepare(msg, account)
    assert sub.envelope.recipients == ("jörg@exämple.de",)
    assert "jörg@exämple.de".encode() in sub.content
