"""The client's defences (security.md §3) over real sockets and real TLS on 127.0.0.1."""

from __future__ import annotations

import ssl
from collections.abc import Callable

import pytest

from smtp365 import replies
from smtp365.config import AccountSettings
from smtp365.errors import (
    AuthenticationRejected,
    ConnectError,
    MessageError,
    ProtocolError,
    StartTLSInjection,
    StartTLSUnavailable,
    SubmissionRejected,
    TLSError,
    TransportTimeout,
)
from smtp365.models import Envelope, Submission
from smtp365.transport import SmtpTransport
from smtp365.transport import smtp as smtp_transport
from tests.fakesmtp import FakeSMTPServer, Script
from tests.unit.test_replies import CASES

MakeAccount = Callable[..., AccountSettings]
SUB = Submission(Envelope("alice@contoso.test", ("bob@example.net",)), b"Subject: t\r\n\r\nhi\r\n")


def _no_secrets_sent(server: FakeSMTPServer) -> None:
    verbs = [c.split(" ", 1)[0].upper() for c in server.commands]
    assert "AUTH" not in verbs and "MAIL" not in verbs and "RCPT" not in verbs
    assert not any("test-token" in c for c in server.commands)


async def test_starttls_not_offered_stops_before_auth(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    script = Script(starttls_offered=False, tls_context=server_context())
    async with FakeSMTPServer(script) as server:
        with pytest.raises(StartTLSUnavailable, match="does not offer STARTTLS") as info:
            async with SmtpTransport(make_account(server.port)) as t:
                await t.submit(SUB)
    assert info.value.temporary, "a relay must defer, not bounce"
    _no_secrets_sent(server)


async def test_starttls_refused_stops(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    script = Script(starttls_reply="454 4.7.0 TLS not available", tls_context=server_context())
    async with FakeSMTPServer(script) as server:
        with pytest.raises(StartTLSUnavailable, match="refused STARTTLS"):
            async with SmtpTransport(make_account(server.port)) as t:
                await t.submit(SUB)
    _no_secrets_sent(server)


async def test_bytes_after_220_abort(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    script = Script(
        inject_after_starttls=b"250-injected\r\n250 AUTH PLAIN\r\n", tls_context=server_context()
    )
    async with FakeSMTPServer(script) as server:
        with pytest.raises(StartTLSInjection, match="sent data after its 220"):
            async with SmtpTransport(make_account(server.port)) as t:
                await t.submit(SUB)
    _no_secrets_sent(server)


async def test_wrong_host_certificate(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    script = Script(tls_context=server_context("mail.other.test"))
    async with FakeSMTPServer(script) as server:
        with pytest.raises(TLSError) as info:
            async with SmtpTransport(make_account(server.port)) as t:
                await t.submit(SUB)
    assert "not valid for 'localhost'" in info.value.fix
    assert "smtp.office365.com" in info.value.fix
    _no_secrets_sent(server)


async def test_untrusted_chain_names_ca_file(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    script = Script(tls_context=server_context())
    async with FakeSMTPServer(script) as server:
        with pytest.raises(TLSError) as info:
            async with SmtpTransport(make_account(server.port, ca_file=None)) as t:
                await t.submit(SUB)
    assert "ca_file" in info.value.fix
    _no_secrets_sent(server)


async def test_server_limited_to_tls_1_1_is_refused(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = server_context(max_version=ssl.TLSVersion.TLSv1_1)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    async with FakeSMTPServer(Script(tls_context=ctx)) as server:
        with pytest.raises(TLSError, match="TLS failed"):
            async with SmtpTransport(make_account(server.port)) as t:
                await t.submit(SUB)
    _no_secrets_sent(server)


async def test_crlf_in_addresses_refused_before_connecting(make_account: MakeAccount) -> None:
    async with FakeSMTPServer(Script()) as server:
        bad = Submission(Envelope("a@b.c", ("bob@example.net>\r\nRCPT TO:<evil@x",)), b"x\r\n")
        async with SmtpTransport(make_account(server.port, tls="none")) as t:
            with pytest.raises(MessageError):
                await t.submit(bad)
        assert server.connections == 0


async def test_connection_refused(make_account: MakeAccount) -> None:
    async with FakeSMTPServer(Script()) as server:
        port = server.port
    with pytest.raises(ConnectError, match="refused") as info:
        async with SmtpTransport(make_account(port)) as t:
            await t.submit(SUB)
    assert info.value.temporary
    assert isinstance(info.value, ConnectionError)


async def test_silent_server_times_out(make_account: MakeAccount) -> None:
    async with FakeSMTPServer(Script(silent=True)) as server:
        with pytest.raises(TransportTimeout) as info:
            async with SmtpTransport(make_account(server.port, timeout=0.5)) as t:
                await t.submit(SUB)
    assert isinstance(info.value, TimeoutError)
    assert "firewall" in info.value.fix


async def test_tls_happy_path_reuses_one_connection(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    async with FakeSMTPServer(Script(tls_context=server_context())) as server:
        async with SmtpTransport(make_account(server.port)) as t:
            for _ in range(3):
                outcome = await t.submit(SUB)
                assert outcome.reply.code == 250
            assert t.tls_version in ("TLSv1.2", "TLSv1.3")
        assert server.connections == 1
        assert len(server.messages) == 3
        ehlos = [c for c in server.commands if c.startswith("EHLO")]
        assert len(ehlos) == 2, "EHLO again after STARTTLS"


async def test_reconnects_when_server_closed_idle_connection(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    script = Script(tls_context=server_context(), close_after_messages=1)
    async with FakeSMTPServer(script) as server:
        async with SmtpTransport(make_account(server.port)) as t:
            await t.submit(SUB)
            await t.submit(SUB)
        assert server.connections == 2
        assert len(server.messages) == 2


async def test_back_to_back_messages_need_no_rset(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    script = Script(tls_context=server_context())
    async with FakeSMTPServer(script) as server, SmtpTransport(make_account(server.port)) as t:
        for _ in range(3):
            await t.submit(SUB)
    assert not [c for c in server.commands if c.upper() == "RSET"]
    assert server.connections == 1


async def test_an_idle_connection_is_checked_with_rset_before_reuse(
    server_context: Callable[..., ssl.SSLContext],
    make_account: MakeAccount,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection that sat idle is asked RSET first; one that no longer answers (here:
    421, as a server that timed it out would) is replaced before MAIL FROM is sent."""
    monkeypatch.setattr(smtp_transport, "IDLE_CHECK", 0.0)
    script = Script(tls_context=server_context(), rset_reply="421 4.4.2 fake.test timed out")
    async with FakeSMTPServer(script) as server, SmtpTransport(make_account(server.port)) as t:
        await t.submit(SUB)
        await t.submit(SUB)
    assert server.connections == 2
    assert len(server.messages) == 2
    verbs = [c.split(" ", 1)[0].upper() for c in server.commands]
    first_rset = verbs.index("RSET")
    assert verbs[first_rset + 1] == "EHLO", "a new connection follows the refused RSET"
    assert verbs[:first_rset].count("MAIL") == 1


async def test_basic_login_warns(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    from smtp365.errors import BasicAuthWarning

    async with FakeSMTPServer(Script(tls_context=server_context())) as server:
        account = make_account(server.port, auth="login", password="pw", token=None)
        with pytest.warns(BasicAuthWarning, match="being retired"):
            async with SmtpTransport(account) as t:
                await t.submit(SUB)
    assert any(c.startswith("AUTH LOGIN") for c in server.commands)


def _stage_for(line: str) -> str:
    code = line[:3]
    if code in ("535", "504"):
        return "auth"
    if code in ("530", "503") or any(e in line for e in ("5.7.60", "5.7.64", "5.7.68", "5.7.1 ")):
        return "mail"
    return "data"


@pytest.mark.parametrize(("line", "key", "temporary", "action"), CASES, ids=lambda v: str(v)[:24])
async def test_catalogue_reply_becomes_the_right_exception(
    server_context: Callable[..., ssl.SSLContext],
    make_account: MakeAccount,
    line: str,
    key: str,
    temporary: bool,
    action: object,
) -> None:
    stage = _stage_for(line)
    script = Script(tls_context=server_context(), **{f"{stage}_reply": line})
    if line.startswith("503"):  # a session out of step: never the message's fault
        async with FakeSMTPServer(script) as server:
            with pytest.raises(ProtocolError) as desync:
                async with SmtpTransport(make_account(server.port)) as t:
                    await t.submit(SUB)
        assert desync.value.temporary and "out of sequence" in str(desync.value)
        assert replies.by_key(key).fix in str(desync.value)
        return
    async with FakeSMTPServer(script) as server:
        with pytest.raises(SubmissionRejected) as info:
            async with SmtpTransport(make_account(server.port)) as t:
                await t.submit(SUB)
    err = info.value
    assert err.stage == stage
    assert err.entry is not None and err.entry.key == key
    assert err.temporary is temporary
    assert err.code == int(line[:3])
    assert err.entry.fix in str(err) and err.entry.meaning in str(err)
    assert isinstance(err, AuthenticationRejected) is (stage == "auth")
    if stage == "auth":
        assert not any(c.startswith("MAIL") for c in server.commands)


async def test_no_credentials_in_clear_to_a_remote_host(make_account: MakeAccount) -> None:
    account = make_account(25, host="mail.example.org", tls="none", auth="login", password="pw")
    with pytest.raises(TLSError, match="refusing to send credentials") as info:
        async with SmtpTransport(account) as t:
            await t.submit(SUB)
    assert not info.value.temporary


async def test_plain_auth_allowed_only_to_localhost(make_account: MakeAccount) -> None:
    async with FakeSMTPServer(Script()) as server:
        account = make_account(server.port, host="127.0.0.1", tls="none")
        async with SmtpTransport(account) as t:
            assert (await t.submit(SUB)).reply.code == 250


async def test_a_sender_refused_at_rcpt_by_any_server_is_the_send_as_problem(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    # Postfix (smtpd_delay_reject) answers the sender restriction at RCPT
    line = "553 5.7.1 <alice@contoso.test>: Sender address rejected: not owned by user bob"
    script = Script(tls_context=server_context(), rcpt_replies={"bob@example.net": line})
    async with FakeSMTPServer(script) as server:
        with pytest.raises(SubmissionRejected) as info:
            async with SmtpTransport(make_account(server.port)) as t:
                await t.submit(SUB)
    err = info.value
    assert err.stage == "rcpt" and err.entry is not None and err.entry.key == "sender-rejected"
    assert "send as" in str(err) and not err.temporary
