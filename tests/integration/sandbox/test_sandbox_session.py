"""The SMTP dialogue before and around authentication (reference §2)."""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest

from smtp365.sandbox import Sandbox

from .conftest import TAIL

HOST = "SBX0P365CA0001.outlook.sandbox.test"
EHLO_PLAIN = [
    f"{HOST} Hello [127.0.0.1]",
    "SIZE 157286400",
    "PIPELINING",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "STARTTLS",
    "8BITMIME",
    "BINARYMIME",
    "CHUNKING",
    "SMTPUTF8",
]
EHLO_TLS = [line if line != "STARTTLS" else "AUTH LOGIN XOAUTH2" for line in EHLO_PLAIN]


def test_banner_looks_like_exchange(sandbox: Sandbox, wire) -> None:
    greeting = wire(sandbox).greeting
    assert greeting.code == 220
    assert re.fullmatch(
        rf"{re.escape(HOST)} Microsoft ESMTP MAIL Service ready at "
        r"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000 \[[0-9A-F]{16}\]",
        greeting.lines[0],
    )


def test_ehlo_before_tls_lists_starttls_and_no_auth(sandbox: Sandbox, wire) -> None:
    client = wire(sandbox)
    resp = client.ehlo()
    assert resp.code == 250
    assert resp.lines == EHLO_PLAIN
    assert not any(line.startswith("AUTH") for line in resp.lines)


def test_starttls_then_ehlo_lists_auth_login_xoauth2(sandbox: Sandbox, wire, client_tls) -> None:
    client = wire(sandbox)
    client.ehlo()
    assert client.starttls(client_tls(sandbox)).raw == "220 2.0.0 SMTP server ready"
    resp = client.ehlo()
    assert resp.lines == EHLO_TLS
    assert client.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_auth_before_tls_is_unrecognized(sandbox: Sandbox, wire) -> None:
    client = wire(sandbox)
    client.ehlo()
    assert client.cmd("AUTH LOGIN").bare == "504 5.7.4 Unrecognized authentication type"


def test_commands_after_starttls_need_a_new_ehlo(sandbox: Sandbox, wire, client_tls) -> None:
    client = wire(sandbox)
    client.ehlo()
    client.starttls(client_tls(sandbox))
    assert client.cmd("AUTH LOGIN").bare == "503 5.5.2 Send hello first"
    assert client.cmd("MAIL FROM:<alice@contoso.test>").bare == "503 5.5.2 Send hello first"
    assert client.ehlo().code == 250


def test_mail_before_auth_is_refused(sandbox: Sandbox, wire, secured) -> None:
    plain = wire(sandbox)
    plain.ehlo()
    expected = "530 5.7.57 Client not authenticated to send mail"
    assert plain.cmd("MAIL FROM:<alice@contoso.test>").bare == expected
    client = secured(sandbox)
    assert client.cmd("MAIL FROM:<alice@contoso.test>").bare == expected


def test_simple_replies(sandbox: Sandbox, authed) -> None:
    client = authed(sandbox)
    assert client.cmd("NOOP").raw == "250 2.0.0 OK"
    assert client.cmd("RCPT TO:<x@example.net>").raw == "503 5.5.2 Need mail command"
    assert client.cmd("MAIL FROM:<alice@contoso.test>").raw == "250 2.1.0 Sender OK"
    assert client.cmd("MAIL FROM:<alice@contoso.test>").raw == "503 5.5.1 Sender already specified"
    assert client.cmd("DATA").raw == "503 5.5.2 Need rcpt command"
    assert client.cmd("RCPT TO:<x@example.net>").raw == "250 2.1.5 Recipient OK"
    assert client.cmd("RSET").raw == "250 2.0.0 Resetting"
    assert client.cmd("QUIT").raw == "221 2.0.0 Service closing transmission channel"


def test_invalid_ehlo_domain(sandbox: Sandbox, wire) -> None:
    client = wire(sandbox)
    assert client.cmd("EHLO bad/domain!").bare == "501 5.5.4 Invalid domain name"


def test_full_send_with_smtplib(sandbox: Sandbox, client_tls, make_message) -> None:
    with smtplib.SMTP("127.0.0.1", sandbox.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=client_tls(sandbox))
        smtp.login("alice@contoso.test", sandbox.password("alice@contoso.test"))
        refused = smtp.sendmail("alice@contoso.test", ["someone@example.net"], make_message())
        assert refused == {}
        code, text = smtp.noop()
        assert code == 250
    [stored] = sandbox.store.list()
    assert stored.tls_version in ("TLSv1.2", "TLSv1.3")


def test_final_reply_quotes_the_message_id_and_names_the_server(
    sandbox: Sandbox, authed, make_message
) -> None:
    client = authed(sandbox)
    resp = client.send_message("alice@contoso.test", ["x@example.net"], make_message())
    assert resp.raw == f"250 2.0.0 OK <Hello@client.example> [Hostname={HOST}]"
    assert sandbox.store.list()[0].smtp_id == "<Hello@client.example>"


@pytest.mark.parametrize(
    "header",
    [
        b"",  # none: the sandbox makes one
        b"Message-ID: <" + b"x" * 300 + b"@client.example>\r\n",  # too long to quote
        b"Message-ID: <caf\xc3\xa9@client.example>\r\n",  # not ASCII
    ],
    ids=["missing", "too-long", "non-ascii"],
)
def test_final_reply_makes_an_id_when_the_message_has_none_it_can_quote(
    sandbox: Sandbox, authed, header: bytes
) -> None:
    client = authed(sandbox)
    content = b"From: alice@contoso.test\r\nSubject: x\r\n" + header + b"\r\nHi.\r\n"
    resp = client.send_message("alice@contoso.test", ["x@example.net"], content)
    match = re.fullmatch(rf"250 2\.0\.0 OK (<[0-9A-F]{{32}}@[^>]+>) \[Hostname={HOST}\]", resp.raw)
    assert match, resp.raw
    assert sandbox.store.list()[0].smtp_id == match.group(1)


def test_bdat_reply_quotes_the_message_id(sandbox: Sandbox, authed, make_message) -> None:
    client = authed(sandbox)
    assert client.cmd("MAIL FROM:<alice@contoso.test>").code == 250
    assert client.cmd("RCPT TO:<x@example.net>").code == 250
    content = make_message(subject="chunked")
    client.send(f"BDAT {len(content)} LAST\r\n".encode() + content)
    assert client.read().raw == f"250 2.0.0 OK <chunked@client.example> [Hostname={HOST}]"


def test_front_end_refusals_carry_the_diagnostic_tail(sandbox: Sandbox, wire, secured) -> None:
    client = wire(sandbox)
    session = client.greeting.raw.rsplit("[", 1)[1].rstrip("]")  # the banner's session id
    replies = [client.cmd("EHLO bad/domain!"), client.cmd("FROB")]
    tls = secured(sandbox)
    replies.append(tls.auth_login("alice@contoso.test", "wrong"))
    replies.append(tls.cmd("AUTH LOGIN x y z"))
    for resp in replies[:2]:
        found = TAIL.search(resp.raw)
        assert found and found["host"] == HOST and found["session"] == session, resp.raw
    for resp in replies[2:]:
        found = TAIL.search(resp.raw)
        assert found and found["host"] == HOST and found["session"], resp.raw
    assert [r.code for r in replies] == [501, 500, 535, 501]


def test_tls_1_1_is_refused_after_the_handshake(
    sandbox: Sandbox, wire, legacy_tls: Callable[[Path], ssl.SSLContext]
) -> None:
    client = wire(sandbox)
    client.ehlo()
    assert client.starttls(legacy_tls(sandbox.ca_file)).code == 220
    assert client.sock.version() == "TLSv1.1"
    assert client.ehlo().bare == (
        "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client "
        "to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls."
    )
    with pytest.raises((EOFError, ConnectionError, ssl.SSLError)):
        client.cmd("NOOP")
    assert sandbox.stats.legacy_tls_refused == 1
