"""What the SMTP transport concludes when the configuration cannot work, over real sockets.

A TLS mode that does not match the port, a certificate this machine does not trust and a
refused password are the account's settings at fault: the error names the mistake (in the
doctor's words), is permanent (retrying changes nothing), and comes at once rather than
after the account's timeout. The accounts here have a 60 s timeout on purpose: a transport
that waited for it would run into the test's own timeout.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import pytest

from smtp365.config import AccountSettings
from smtp365.errors import AuthenticationRejected, TLSError
from smtp365.models import Envelope, Submission
from smtp365.transport import SmtpTransport
from tests.fakesmtp import FakeSMTPServer, ImplicitTLSServer, Script

MakeAccount = Callable[..., AccountSettings]
SUB = Submission(Envelope("alice@contoso.test", ("bob@example.net",)), b"Subject: t\r\n\r\nhi\r\n")
LONG = 60  # s: the account's timeout, never reached


async def _submit(account: AccountSettings) -> None:
    async with SmtpTransport(account) as t:
        await t.submit(SUB)


def _nothing_said(commands: list[str]) -> None:
    verbs = [c.split(" ", 1)[0].upper() for c in commands]
    assert not {"AUTH", "MAIL", "RCPT"} & set(verbs)
    assert not any("test-token" in c for c in commands)


# -- the TLS mode does not match the port ----------------------------------------------------


async def test_implicit_tls_on_a_port_that_speaks_plain_smtp_first(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    """ "SSL on 587": named as such, permanent, with the doctor's fix (not "needs TLS 1.2")."""
    async with FakeSMTPServer(Script(tls_context=server_context())) as server:
        with pytest.raises(TLSError) as info:
            await _submit(make_account(server.port, tls="implicit", timeout=LONG))
    err = info.value
    assert not err.temporary, "retrying with the same settings cannot succeed"
    assert f"localhost:{server.port} speaks plain SMTP first" in err.what
    assert "set to implicit TLS/SSL but the server expects STARTTLS on this port" in err.what
    assert '"SSL on 587" is a misconfiguration' in err.what
    assert err.fix == (
        "set tls = starttls (Microsoft 365: smtp.office365.com, port 587, tls = starttls)"
    )
    assert "TLS 1.2" not in str(err)
    _nothing_said(server.commands)


@pytest.mark.parametrize("gives_up_after", [LONG * 2, 1], ids=["waits", "gives-up-first"])
async def test_starttls_on_a_port_that_expects_a_tls_client_hello(
    server_context: Callable[..., ssl.SSLContext],
    make_account: MakeAccount,
    gives_up_after: float,
) -> None:
    """Port 465 style: the server waits for a ClientHello (or gives up and closes before any
    greeting). Named at once (not after the 60 s timeout), permanent, never a firewall."""
    async with ImplicitTLSServer(server_context(), handshake_timeout=gives_up_after) as server:
        with pytest.raises(TLSError) as info:
            await _submit(make_account(server.port, timeout=LONG))
    err = info.value
    assert not err.temporary
    assert f"tls = starttls but localhost:{server.port} speaks implicit TLS" in err.what
    assert "a TLS handshake succeeded (TLSv1." in err.what
    assert "Microsoft 365 does not serve implicit TLS on 465" in err.what
    assert err.fix == (
        "for Microsoft 365: port = 587 and tls = starttls; for another server that only "
        "offers implicit TLS: tls = implicit"
    )
    assert "firewall" not in str(err)
    assert server.commands == []  # nothing was said inside the probe's unverified TLS


async def test_the_verdicts_are_the_doctors(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount
) -> None:
    """One wording for both layers: the doctor's tls.mode says what the transport raises."""
    from smtp365.doctor.model import DoctorContext, Status
    from smtp365.doctor.network import TlsMode

    async with FakeSMTPServer(Script(tls_context=server_context())) as server:
        account = make_account(server.port, tls="implicit", timeout=LONG)
        with pytest.raises(TLSError) as info:
            await _submit(account)
        check = await TlsMode().run(DoctorContext(account=account, timeout=5))
    assert check.status is Status.FAIL
    assert info.value.fix == check.fix and check.why is not None and check.why in info.value.what


async def test_a_slow_greeting_is_still_plain_smtp(
    server_context: Callable[..., ssl.SSLContext],
    make_account: MakeAccount,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A greeting later than the short wait is not taken for implicit TLS: the probe sees
    plain text, and the session goes on over the first connection."""
    from smtp365.transport import smtp as smtp_transport

    monkeypatch.setattr(smtp_transport, "GREETING_WAIT", 0.0)
    script = Script(tls_context=server_context(), greet_after_connections=2)
    async with FakeSMTPServer(script) as server:
        await _submit(make_account(server.port, timeout=LONG))
        assert len(server.messages) == 1
    assert server.connections == 2  # the session, and the probe that saw plain text
    assert len([c for c in server.commands if c.startswith("EHLO")]) == 2  # one session


# -- certificates this machine does not trust -------------------------------------------------


@pytest.mark.parametrize("problem", ["untrusted-chain", "wrong-host-name"])
async def test_an_untrusted_certificate_is_permanent(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount, problem: str
) -> None:
    names = ("mail.other.test",) if problem == "wrong-host-name" else ()
    overrides = {"ca_file": None} if problem == "untrusted-chain" else {}
    async with FakeSMTPServer(Script(tls_context=server_context(*names))) as server:
        with pytest.raises(TLSError) as info:
            await _submit(make_account(server.port, timeout=LONG, **overrides))
    err = info.value
    assert not err.temporary, "a retry meets the same certificate"
    assert "certificate" in err.what
    if problem == "untrusted-chain":
        assert "ca_file" in err.fix
    else:
        assert "not valid for 'localhost'" in err.fix
    _nothing_said(server.commands)


# -- 535 5.7.3 is explained for the mechanism that was used ---------------------------------


@pytest.mark.parametrize("auth", ["login", "xoauth2"])
async def test_535_5_7_3_follows_the_mechanism(
    server_context: Callable[..., ssl.SSLContext], make_account: MakeAccount, auth: str
) -> None:
    from smtp365.errors import BasicAuthWarning

    script = Script(
        tls_context=server_context(),
        auth_reply="535 5.7.3 Authentication unsuccessful [SY5P282CA0097.PROD.OUTLOOK.COM]",
    )
    extra = {"password": "pw", "token": None} if auth == "login" else {}
    async with FakeSMTPServer(script) as server:
        with pytest.raises(AuthenticationRejected) as info:
            if auth == "login":
                with pytest.warns(BasicAuthWarning):
                    await _submit(make_account(server.port, auth=auth, **extra))
            else:
                await _submit(make_account(server.port, auth=auth))
    err = info.value
    assert (err.code, err.enhanced, err.stage) == (535, "5.7.3", "auth")
    assert err.entry is not None and not err.temporary
    if auth == "login":
        assert err.entry.key == "password-rejected"
        assert "password" in err.what and "Basic authentication" in err.what
        assert "app password" in err.fix and "SmtpClientAuthenticationDisabled" in err.fix
        assert "token" not in str(err) and "New-ServicePrincipal" not in str(err)
    else:
        assert err.entry.key == "xoauth2-rejected"
        assert "token" in err.what and "New-ServicePrincipal" in err.fix
        assert "password" not in str(err)
