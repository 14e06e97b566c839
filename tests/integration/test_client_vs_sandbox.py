"""The library against the sandbox: Exchange Online's behaviours become the right errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from smtp365 import Mailer, SubmissionRejected, SyncMailer
from smtp365.auth import StaticTokenProvider
from smtp365.config import Account, AccountSettings
from smtp365.config.model import resolve
from smtp365.errors import AuthenticationRejected, AuthError, BasicAuthWarning
from smtp365.models import Envelope, Submission
from smtp365.sandbox import Sandbox, SandboxSettings
from smtp365.sandbox.settings import LimitSettings, MailboxSettings
from smtp365.transport.smtp import SmtpTransport

ALICE = "alice@contoso.test"
BOB = "bob@contoso.test"


def _settings(**kw: Any) -> SandboxSettings:
    return SandboxSettings(**kw)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(tmp_path / "sbx") as sb:
        yield sb


def account_for(sb: Sandbox, mailbox: str = ALICE, **overrides: Any) -> AccountSettings:
    fields: dict[str, Any] = {
        "profile": "custom",
        "host": "localhost",
        "port": sb.smtp_port,
        "ca_file": sb.ca_file,
        "username": mailbox,
        "auth": "xoauth2",
        "timeout": 10,
    }
    if overrides.get("auth", "xoauth2") == "xoauth2" and "token" not in overrides:
        fields["token"] = sb.issue_token(mailbox)
    fields.update(overrides)
    return resolve("sandbox", Account.model_validate(fields), "(test)")


def password_of(sb: Sandbox, mailbox: str) -> str:
    mbx = sb.settings.mailbox(mailbox)
    assert mbx is not None and mbx.password
    return mbx.password


async def test_xoauth2_send_is_captured(sandbox: Sandbox) -> None:
    async with Mailer(account_for(sandbox)) as m:
        outcome = await m.send(to="someone@example.net", subject="hello", text="body")
    assert outcome.reply.code == 250 and outcome.reply.enhanced == "2.0.0"
    [stored] = sandbox.store.list()
    assert stored.subject == "hello"
    assert stored.rcpt_tos == ["someone@example.net"]
    assert stored.message_id == outcome.message_id


async def test_one_connection_for_many_messages(sandbox: Sandbox) -> None:
    async with Mailer(account_for(sandbox)) as m:
        for i in range(5):
            await m.send(to="someone@example.net", subject=f"n{i}", text="x")
        assert m.transport.connections_opened == 1  # type: ignore[attr-defined]
    assert len(sandbox.store.list()) == 5


async def test_basic_login_works_with_warning(sandbox: Sandbox) -> None:
    acc = account_for(sandbox, auth="login", password=password_of(sandbox, ALICE))
    with pytest.warns(BasicAuthWarning):
        async with Mailer(acc) as m:
            await m.send(to="x@example.net", text="x")
    assert sandbox.store.list()[0].mechanism == "LOGIN"


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda s: setattr(s, "smtp_auth_enabled", False), "smtp-auth-disabled-tenant"),
        (
            lambda s: setattr(s.mailbox(ALICE), "smtp_auth_enabled", False),
            "smtp-auth-disabled-mailbox",
        ),
        (lambda s: setattr(s.mailbox(ALICE), "basic_auth_enabled", False), "basic-auth-disabled"),
    ],
)
async def test_login_policy_rejections(
    tmp_path: Path, mutate: Callable[[SandboxSettings], None], key: str
) -> None:
    settings = SandboxSettings()
    mutate(settings)
    async with Sandbox(tmp_path / "sbx", settings) as sb:
        acc = account_for(sb, auth="login", password=password_of(sb, ALICE))
        with pytest.warns(BasicAuthWarning), pytest.raises(AuthenticationRejected) as info:
            async with Mailer(acc) as m:
                await m.send(to="x@example.net", text="x")
    assert info.value.code == 535 and info.value.enhanced == "5.7.139"
    assert info.value.entry is not None and info.value.entry.key == key
    assert not info.value.temporary


async def test_wrong_password(sandbox: Sandbox) -> None:
    acc = account_for(sandbox, auth="login", password="wrong")
    with pytest.warns(BasicAuthWarning), pytest.raises(AuthenticationRejected) as info:
        async with Mailer(acc) as m:
            await m.send(to="x@example.net", text="x")
    assert info.value.entry is not None and info.value.entry.key == "bad-password"


BAD_TOKENS = pytest.mark.parametrize(
    ("token_kw", "message"),
    [
        ({"audience": "https://graph.microsoft.com"}, "is for Microsoft Graph"),
        ({"lifetime": -60}, "expired"),
        ({"scopes": ["Mail.Read"]}, "has no SMTP.Send"),
    ],
    ids=["graph-audience", "expired", "missing-scope"],
)


@BAD_TOKENS
async def test_bad_tokens_refused_before_auth(
    sandbox: Sandbox, token_kw: dict[str, Any], message: str
) -> None:
    acc = account_for(sandbox, token=sandbox.issue_token(ALICE, **token_kw))
    with pytest.raises(AuthError, match=message) as info:
        async with Mailer(acc) as m:
            await m.send(to="x@example.net", text="x")
    assert info.value.fix
    assert sandbox.stats.snapshot()["auth_failures"] == 0, "no AUTH was even attempted"


@BAD_TOKENS
async def test_server_refuses_bad_tokens_with_535_5_7_3(
    sandbox: Sandbox, token_kw: dict[str, Any], message: str
) -> None:
    token = sandbox.issue_token(ALICE, **token_kw)
    unchecked = StaticTokenProvider(token)  # no client-side claims check: the server decides
    with pytest.raises(AuthenticationRejected) as info:
        async with Mailer(account_for(sandbox, token=token), token_provider=unchecked) as m:
            await m.send(to="x@example.net", text="x")
    err = info.value
    assert (err.code, err.enhanced) == (535, "5.7.3")
    assert err.entry is not None and err.entry.key == "xoauth2-rejected"
    assert "New-ServicePrincipal" in err.fix


async def test_token_of_another_mailbox(sandbox: Sandbox) -> None:
    acc = account_for(sandbox, ALICE, token=sandbox.issue_token(BOB))
    with pytest.raises(AuthenticationRejected):
        async with Mailer(acc) as m:
            await m.send(to="x@example.net", text="x")


async def test_send_as_denied_after_data(sandbox: Sandbox) -> None:
    async with Mailer(account_for(sandbox, BOB)) as m:
        with pytest.raises(SubmissionRejected) as info:
            await m.send(sender="ceo@contoso.test", to="x@example.net", text="x")
    err = info.value
    assert err.stage == "data" and err.code == 554
    assert err.entry is not None and err.entry.key == "send-as-denied-data"
    assert "Add-RecipientPermission" in err.fix
    assert sandbox.store.list() == []


async def test_send_as_allowed(sandbox: Sandbox) -> None:
    async with Mailer(account_for(sandbox, ALICE)) as m:
        await m.send(sender="noreply@contoso.test", to="x@example.net", text="x")
    assert sandbox.store.list()[0].mail_from == "noreply@contoso.test"


async def test_send_as_denied_at_mail_from(tmp_path: Path) -> None:
    async with (
        Sandbox(tmp_path / "sbx", SandboxSettings(send_as_check="mail")) as sb,
        Mailer(account_for(sb, BOB)) as m,
    ):
        with pytest.raises(SubmissionRejected) as info:
            await m.send(sender="ceo@contoso.test", to="x@example.net", text="x")
    assert info.value.stage == "mail"
    assert info.value.entry is not None and info.value.entry.key == "send-as-denied-mail"


async def test_fourth_connection_gets_432(tmp_path: Path) -> None:
    async with Sandbox(tmp_path / "sbx") as sb:
        mailers = [Mailer(account_for(sb)) for _ in range(4)]
        try:
            for m in mailers[:3]:
                await m.send(to="x@example.net", text="x")
            with pytest.raises(SubmissionRejected) as info:
                await mailers[3].send(to="x@example.net", text="x")
        finally:
            await asyncio.gather(*(m.close() for m in mailers))
    err = info.value
    assert err.code == 432 and err.temporary
    assert err.entry is not None and err.entry.key == "concurrent-connections"


async def test_per_minute_limit(tmp_path: Path) -> None:
    limits = LimitSettings(messages_per_minute=3)
    async with (
        Sandbox(tmp_path / "sbx", SandboxSettings(limits=limits)) as sb,
        Mailer(account_for(sb)) as m,
    ):
        for _ in range(3):
            await m.send(to="x@example.net", text="x")
        with pytest.raises(SubmissionRejected) as info:
            await m.send(to="x@example.net", text="x")
    assert info.value.temporary


async def test_daily_recipient_quota_is_temporary(tmp_path: Path) -> None:
    limits = LimitSettings(recipients_per_day=3)
    async with (
        Sandbox(tmp_path / "sbx", SandboxSettings(limits=limits)) as sb,
        Mailer(account_for(sb)) as m,
    ):
        await m.send(to=["a@example.net", "b@example.net", "c@example.net"], text="x")
        with pytest.raises(SubmissionRejected) as info:
            await m.send(to="d@example.net", text="x")
    err = info.value
    assert err.code == 554 and err.temporary, "SubmissionQuotaExceeded is a 5xx to retry later"
    assert err.entry is not None and err.entry.key == "recipient-quota"


async def test_message_too_big(tmp_path: Path) -> None:
    limits = LimitSettings(max_message_size=2000)
    async with (
        Sandbox(tmp_path / "sbx", SandboxSettings(limits=limits)) as sb,
        Mailer(account_for(sb)) as m,
    ):
        with pytest.raises(SubmissionRejected) as info:
            await m.send(to="x@example.net", text="x" * 5000)
    assert info.value.code == 552 and not info.value.temporary


async def test_shared_mailbox_with_full_access_token(tmp_path: Path) -> None:
    settings = SandboxSettings(
        mailboxes=[
            MailboxSettings(address=ALICE),
            MailboxSettings(address="shared@contoso.test", shared=True, full_access=[ALICE]),
        ]
    )
    async with Sandbox(tmp_path / "sbx", settings) as sb:
        acc = account_for(sb, "shared@contoso.test", token=sb.issue_token(ALICE))
        async with Mailer(acc) as m:
            await m.send(to="x@example.net", text="x")
        assert sb.store.list()[0].mailbox == "shared@contoso.test"


def test_sync_mailer_against_threaded_sandbox(tmp_path: Path) -> None:
    with Sandbox(tmp_path / "sbx").run_in_thread() as sb:
        with SyncMailer(account_for(sb)) as m:
            m.send(to="x@example.net", subject="sync 1", text="x")
            m.send(to="x@example.net", subject="sync 2", text="x")
        assert [s.subject for s in sb.store.list()] == ["sync 1", "sync 2"]


@pytest.mark.parametrize(
    ("content", "arrives"),
    [
        # CRLF only: dot-stuffed and written in chunks by the transport itself
        (b".first line\r\n\r\n..two\r\n.\r\nend\r\n", None),
        (b"Subject: big\r\n\r\n" + b".x" + b"y" * 996 + b"\r\n" + b"z" * 998 * 3000, None),
        # bare LF and a missing final CRLF: aiosmtplib's own normalising path
        (b"Subject: lf\n\n.dot\nlast", b"Subject: lf\r\n\r\n.dot\r\nlast\r\n"),
    ],
    ids=["dots", "3mb", "bare-lf"],
)
async def test_content_arrives_byte_exact(
    sandbox: Sandbox, content: bytes, arrives: bytes | None
) -> None:
    if len(content) > 10_000:
        content = b"\r\n".join(content[i : i + 998] for i in range(0, len(content), 998))
        content += b"\r\n"
    sub = Submission(Envelope(ALICE, ("someone@example.net",)), content)
    async with SmtpTransport(account_for(sandbox)) as transport:
        await transport.submit(sub)
        await transport.submit(sub)  # the connection is still in step afterwards
    stored = [sandbox.store.content(m.id) for m in sandbox.store.list()]
    assert len(stored) == 2
    for data in stored:
        assert data.endswith(arrives or content)


async def test_a_non_ascii_recipient_goes_out_with_smtputf8(sandbox: Sandbox) -> None:
    """RFC 6531: an internationalised address is sent as UTF-8, with MAIL ... SMTPUTF8."""
    content = "Subject: grüße\r\n\r\nhallo\r\n".encode()
    sub = Submission(Envelope(ALICE, ("jörg@bücher.example",)), content)
    async with SmtpTransport(account_for(sandbox)) as transport:
        outcome = await transport.submit(sub)
    assert outcome.reply.code == 250
    [stored] = sandbox.store.list()
    assert stored.rcpt_tos == ["jörg@bücher.example"]
    assert stored.smtputf8
