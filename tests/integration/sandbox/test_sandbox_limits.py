"""SendAs and the per-mailbox limits (reference §2 "Where SendAs is enforced", §5)."""

from __future__ import annotations

import pytest

from smtp365.sandbox import LimitSettings, Sandbox, SandboxSettings

HOST = "SBX0P365CA0001.outlook.sandbox.test"
SEND_AS_AT_MAIL = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"


def send_as_denied(mailbox: str, sender: str) -> str:
    return (
        f"554 5.2.252 SendAsDenied; {mailbox} not allowed to send as {sender}; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; "
        "Failed to process message due to a permanent exception with message "
        "[BeginDiagnosticData]Cannot submit message."
    )


def test_send_as_denied_after_data_for_envelope_sender(
    sandbox: Sandbox, authed, make_message
) -> None:
    client = authed(sandbox, "bob@contoso.test")
    assert client.cmd("MAIL FROM:<noreply@contoso.test>").raw == "250 2.1.0 Sender OK"
    assert client.cmd("RCPT TO:<x@example.net>").code == 250
    assert client.cmd("DATA").raw == "354 Start mail input; end with <CRLF>.<CRLF>"
    client.send(make_message("noreply@contoso.test") + b".\r\n")
    resp = client.read()
    assert resp.raw.startswith(send_as_denied("bob@contoso.test", "noreply@contoso.test"))
    assert resp.raw.endswith(f"[Hostname={HOST}]")
    assert sandbox.store.list() == []
    assert sandbox.stats.send_as_denied == 1


def test_send_as_denied_for_from_header_only(sandbox: Sandbox, authed, make_message) -> None:
    client = authed(sandbox, "bob@contoso.test")
    resp = client.send_message(
        "bob@contoso.test", ["x@example.net"], make_message('"Alice" <alice@contoso.test>')
    )
    assert resp.raw.startswith(send_as_denied("bob@contoso.test", "alice@contoso.test"))


def test_send_as_granted(sandbox: Sandbox, authed, make_message) -> None:
    client = authed(sandbox, "alice@contoso.test")
    resp = client.send_message(
        "noreply@contoso.test", ["x@example.net"], make_message("noreply@contoso.test")
    )
    assert resp.code == 250
    assert sandbox.store.list()[0].mail_from == "noreply@contoso.test"


def test_send_as_checked_at_mail_when_configured(start_sandbox, authed, make_message) -> None:
    sb = start_sandbox(SandboxSettings(send_as_check="mail"))
    client = authed(sb, "bob@contoso.test")
    assert client.cmd("MAIL FROM:<noreply@contoso.test>").raw == SEND_AS_AT_MAIL
    # The From header is still checked after the data.
    resp = client.send_message("bob@contoso.test", ["x@example.net"], make_message())
    assert resp.raw.startswith(send_as_denied("bob@contoso.test", "alice@contoso.test"))


def test_fourth_concurrent_session_is_refused(sandbox: Sandbox, authed, secured) -> None:
    sessions = [authed(sandbox, "alice@contoso.test") for _ in range(3)]
    fourth = secured(sandbox)
    resp = fourth.auth_login("alice@contoso.test", sandbox.password("alice@contoso.test"))
    assert resp.raw == (
        "432 4.3.2 Concurrent connections limit exceeded. Visit "
        f"https://aka.ms/concurrent_sending for more information. [Hostname={HOST}]"
    )
    # Another mailbox is not affected.
    assert fourth.auth_login("bob@contoso.test", sandbox.password("bob@contoso.test")).code == 235
    assert sandbox.stats.concurrency_limited == 1
    assert sandbox.stats.throttle_replies == 1
    # A session that ends frees its slot.
    assert sessions[0].cmd("QUIT").code == 221
    sessions[0].close()
    fifth = secured(sandbox)
    for _ in range(100):  # the slot is freed just after the 221 is sent: retry, never sleep
        resp = fifth.auth_login("alice@contoso.test", sandbox.password("alice@contoso.test"))
        if resp.code == 235:
            break
        assert resp.code == 432
    assert resp.code == 235


def test_messages_per_minute(start_sandbox, authed, clock, make_message) -> None:
    settings = SandboxSettings(limits=LimitSettings(messages_per_minute=2))
    sb = start_sandbox(settings, clock=clock)
    client = authed(sb)
    for _ in range(2):
        assert (
            client.send_message("alice@contoso.test", ["x@example.net"], make_message()).code == 250
        )
    resp = client.cmd("MAIL FROM:<alice@contoso.test>")
    assert resp.raw == "451 4.7.500 Access denied, please try again later"
    assert sb.stats.rate_limited == 1
    assert sb.stats.throttle_replies == 1
    clock.advance(61)
    assert client.send_message("alice@contoso.test", ["x@example.net"], make_message()).code == 250


def test_recipients_per_rolling_day(start_sandbox, authed, clock, make_message) -> None:
    settings = SandboxSettings(limits=LimitSettings(recipients_per_day=3))
    sb = start_sandbox(settings, clock=clock)
    client = authed(sb)
    resp = client.send_message(
        "alice@contoso.test", ["a@example.net", "b@example.net"], make_message()
    )
    assert resp.code == 250
    clock.advance(3600)
    resp = client.send_message(
        "alice@contoso.test", ["c@example.net", "d@example.net"], make_message()
    )
    assert resp.raw.startswith(
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; "
        "Failed to process message due to a permanent exception with message"
    )
    assert sb.stats.quota_exceeded == 1
    assert client.send_message("alice@contoso.test", ["c@example.net"], make_message()).code == 250
    clock.advance(86_400 - 3600 + 1)  # the first message leaves the window
    resp = client.send_message(
        "alice@contoso.test", ["e@example.net", "f@example.net"], make_message()
    )
    assert resp.code == 250


def test_size_limit(start_sandbox, authed, make_message) -> None:
    sb = start_sandbox(SandboxSettings(limits=LimitSettings(max_message_size=1000)))
    client = authed(sb)
    assert "SIZE 1000" in client.ehlo().lines
    too_big = "552 5.3.4 Message size exceeds fixed maximum message size"
    assert client.cmd("MAIL FROM:<alice@contoso.test> SIZE=1001").raw == too_big
    resp = client.send_message(
        "alice@contoso.test", ["x@example.net"], make_message(body="x" * 2000)
    )
    assert resp.raw == too_big
    # The session goes on normally afterwards.
    assert client.send_message("alice@contoso.test", ["x@example.net"], make_message()).code == 250
    assert len(sb.store.list()) == 1


def test_too_many_recipients_per_message(start_sandbox, authed) -> None:
    sb = start_sandbox(SandboxSettings(limits=LimitSettings(max_recipients_per_message=2)))
    client = authed(sb)
    client.cmd("MAIL FROM:<alice@contoso.test>")
    assert client.cmd("RCPT TO:<a@example.net>").code == 250
    assert client.cmd("RCPT TO:<b@example.net>").code == 250
    assert client.cmd("RCPT TO:<c@example.net>").raw == "452 4.5.3 Too many recipients"


def test_rate_limit_reply_is_configurable(start_sandbox, authed) -> None:
    limits = LimitSettings(
        messages_per_minute=0, rate_limit_reply="421 4.3.2 Service not available"
    )
    sb = start_sandbox(SandboxSettings(limits=limits))
    client = authed(sb)
    assert client.cmd("MAIL FROM:<alice@contoso.test>").raw == "421 4.3.2 Service not available"
    with pytest.raises((EOFError, ConnectionError)):  # a 421 closes the connection
        client.cmd("NOOP")


def test_size_limit_with_bdat(start_sandbox, authed) -> None:
    sb = start_sandbox(SandboxSettings(limits=LimitSettings(max_message_size=1000)))
    client = authed(sb)
    client.cmd("MAIL FROM:<alice@contoso.test>")
    client.cmd("RCPT TO:<x@example.net>")
    client.send(b"BDAT 600\r\n" + b"x" * 600)
    assert client.read().code == 250
    client.send(b"BDAT 600 LAST\r\n" + b"y" * 600)
    assert client.read().raw == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert client.cmd("NOOP").raw == "250 2.0.0 OK"  # the oversized chunk was consumed
    assert sb.store.list() == []
