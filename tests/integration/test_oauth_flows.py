"""Every OAuth2 flow with real MSAL against the sandbox's identity platform over HTTPS, then mail.

The test plays the user where a flow needs one: it approves device codes and fills in the
sign-in form the way a browser would.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
import socket
import ssl
import stat
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from smtp365 import Mailer
from smtp365.auth.msal_provider import MsalTokenProvider
from smtp365.config import Account, AccountSettings
from smtp365.config.model import resolve
from smtp365.errors import AuthError
from smtp365.sandbox import Sandbox, SandboxSettings
from smtp365.sandbox.settings import (
    DEFAULT_APP_ID,
    DEFAULT_PUBLIC_APP_ID,
    AppSettings,
    LimitSettings,
)

ALICE = "alice@contoso.test"


@pytest.fixture
async def sb(tmp_path: Path) -> AsyncIterator[Sandbox]:
    settings = SandboxSettings(device_code_interval=0)
    async with Sandbox(tmp_path / "sbx", settings) as sandbox:
        yield sandbox


def app_info(sb: Sandbox, app_id: str) -> dict[str, Any]:
    return next(a for a in sb.info()["apps"] if a["app_id"] == app_id)


def oauth_account(sb: Sandbox, tmp_path: Path, **kw: Any) -> AccountSettings:
    fields: dict[str, Any] = {
        "profile": "custom",
        "host": "localhost",
        "port": sb.smtp_port,
        "ca_file": sb.ca_file,
        "username": ALICE,
        "auth": "xoauth2",
        "authority_host": f"https://localhost:{sb.identity_port}",
        "tenant": sb.settings.tenant_id,
        "token_cache": tmp_path / "cache" / "acct.json",
        "timeout": 10,
    }
    fields.update(kw)
    return resolve("oauth", Account.model_validate(fields), "(test)")


def secret_account(sb: Sandbox, tmp_path: Path, **kw: Any) -> AccountSettings:
    app = app_info(sb, DEFAULT_APP_ID)
    return oauth_account(
        sb, tmp_path, client_id=DEFAULT_APP_ID, client_secret=app["client_secret"], **kw
    )


def public_account(sb: Sandbox, tmp_path: Path, **kw: Any) -> AccountSettings:
    return oauth_account(sb, tmp_path, client_id=DEFAULT_PUBLIC_APP_ID, **kw)


async def send_one(account: AccountSettings, provider: MsalTokenProvider | None = None) -> None:
    async with Mailer(account, token_provider=provider) as m:
        await m.send(to="someone@example.net", subject="oauth", text="x")


def approve_when_shown(sb: Sandbox, user: str = ALICE) -> Any:
    def show(message: str) -> None:
        code = re.search(r"code ([A-Z0-9-]+)", message)
        assert code, message
        sb.identity.approve_device_code(code.group(1), user)

    return show


class Browser:
    """Plays the user in the interactive flow: sign-in form, then the redirect to localhost."""

    def __init__(self, sb: Sandbox, password: str, user: str = ALICE) -> None:
        self.ctx = ssl.create_default_context(cafile=str(sb.ca_file))
        self.user, self.password = user, password
        self.redirected_to = ""

    def __call__(self, url: str) -> None:
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=self.ctx), _NoRedirect()
        )
        page = opener.open(url, timeout=10).read().decode()
        hidden = re.findall(r'type="hidden" name="([^"]+)" value="([^"]*)"', page)
        fields = {html.unescape(k): html.unescape(v) for k, v in hidden}
        fields.update({"login": self.user, "passwd": self.password})
        action = re.search(r'<form[^>]*action="([^"]+)"', page)
        target = urllib.parse.urljoin(url, html.unescape(action.group(1)) if action else url)
        body = urllib.parse.urlencode(fields).encode()
        try:
            opener.open(target, data=body, timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code == 302, exc.read()
            self.redirected_to = exc.headers["Location"]
        assert self.redirected_to.startswith("http://localhost:"), self.redirected_to
        urllib.request.urlopen(self.redirected_to, timeout=10).read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# --- app-only ---------------------------------------------------------------------------


async def test_client_credentials_secret_then_mail(sb: Sandbox, tmp_path: Path) -> None:
    account = secret_account(sb, tmp_path)
    await send_one(account)
    [stored] = sb.store.list()
    assert stored.mechanism == "XOAUTH2" and stored.mailbox == ALICE
    assert stored.app_id == DEFAULT_APP_ID
    cache = account.token_cache
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600


async def test_client_credentials_certificate_then_mail(sb: Sandbox, tmp_path: Path) -> None:
    app = app_info(sb, DEFAULT_APP_ID)
    account = oauth_account(
        sb,
        tmp_path,
        client_id=DEFAULT_APP_ID,
        certificate_file=app["certificate_file"],
        private_key_file=app["private_key_file"],
    )
    await send_one(account)
    assert sb.identity.stats.tokens_issued["client_credentials"] == 1
    assert len(sb.store.list()) == 1


async def test_n_sends_cost_one_token_request(sb: Sandbox, tmp_path: Path) -> None:
    account = secret_account(sb, tmp_path)
    provider = MsalTokenProvider(account)
    for _ in range(8):  # a new connection (and AUTH) each time
        await send_one(account, provider)
    assert sb.stats.snapshot()["auth_successes"] == 8
    assert sb.identity.stats.token_requests_total == 1
    # A second process (a new provider on the same cache) also needs no request.
    await send_one(account, MsalTokenProvider(account))
    assert sb.identity.stats.token_requests_total == 1


async def test_short_lived_tokens_refresh_ahead_without_failed_auth(tmp_path: Path) -> None:
    limits = LimitSettings(messages_per_minute=10_000)
    settings = SandboxSettings(access_token_lifetime=5, limits=limits)
    async with Sandbox(tmp_path / "sbx", settings) as sb:
        account = secret_account(sb, tmp_path, refresh_window=2)
        provider = MsalTokenProvider(account)
        deadline = time.monotonic() + 9
        sends = 0
        while time.monotonic() < deadline:  # a relay reconnecting all the time for 9 s
            await send_one(account, provider)
            sends += 1
            await asyncio.sleep(0.2)
        snap = sb.stats.snapshot()
        assert snap["auth_failures"] == 0
        assert snap["auth_successes"] == sends
        requests = sb.identity.stats.token_requests_total
        assert 3 <= requests <= 6, requests  # one per ~3 s of usable lifetime, not per send
        assert sends > 2 * requests


# --- delegated ---------------------------------------------------------------------------


async def test_device_code_flow_then_mail(sb: Sandbox, tmp_path: Path) -> None:
    account = public_account(sb, tmp_path)
    provider = MsalTokenProvider(account)
    token = await asyncio.to_thread(provider.login_device_code, approve_when_shown(sb))
    assert token.source == "identity_provider"
    await send_one(account, provider)
    assert sb.store.list()[0].mechanism == "XOAUTH2"
    # A new process reads the refresh token from the cache: no sign-in needed.
    await send_one(account)
    assert sb.identity.stats.tokens_issued["device_code"] == 1


async def test_interactive_code_pkce_then_mail(sb: Sandbox, tmp_path: Path) -> None:
    account = public_account(sb, tmp_path, flow="interactive")
    provider = MsalTokenProvider(account)
    browser = Browser(sb, sb.password(ALICE))
    await asyncio.to_thread(provider.login_interactive, browser)
    assert "code=" in browser.redirected_to
    await send_one(account, provider)
    assert sb.identity.stats.tokens_issued["authorization_code"] == 1


async def test_refresh_token_used_when_access_token_is_due(tmp_path: Path) -> None:
    settings = SandboxSettings(access_token_lifetime=4, device_code_interval=0)
    async with Sandbox(tmp_path / "sbx", settings) as sb:
        account = public_account(sb, tmp_path, refresh_window=2)
        provider = MsalTokenProvider(account)
        await asyncio.to_thread(provider.login_device_code, approve_when_shown(sb))
        first = await provider.get_token()
        assert await provider.get_token() is first  # still fresh: no request
        await asyncio.sleep(2.5)  # now within the refresh window
        second = await provider.get_token()
        assert second.token != first.token
        assert sb.identity.stats.tokens_issued["refresh_token"] >= 1
        await send_one(account, provider)


async def test_not_signed_in(sb: Sandbox, tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="not signed in") as info:
        await send_one(public_account(sb, tmp_path))
    assert "smtp365 auth login --account oauth" in info.value.fix


# --- failures ------------------------------------------------------------------------------


async def test_bad_secret(sb: Sandbox, tmp_path: Path) -> None:
    account = oauth_account(sb, tmp_path, client_id=DEFAULT_APP_ID, client_secret="wrong")
    with pytest.raises(AuthError, match="AADSTS7000215") as info:
        await send_one(account)
    assert "Value" in info.value.fix and not info.value.temporary


async def test_unknown_app(sb: Sandbox, tmp_path: Path) -> None:
    account = oauth_account(
        sb, tmp_path, client_id="00000000-1111-2222-3333-444444444444", client_secret="x"
    )
    with pytest.raises(AuthError, match="AADSTS700016"):
        await send_one(account)


async def test_missing_role(tmp_path: Path) -> None:
    app = AppSettings(app_id="aaaaaaaa-0000-0000-0000-000000000001", app_permissions=["Mail.Send"])
    async with Sandbox(tmp_path / "sbx", SandboxSettings(apps=[app])) as sb:
        account = oauth_account(
            sb,
            tmp_path,
            client_id=app.app_id,
            client_secret=app_info(sb, app.app_id)["client_secret"],
        )
        with pytest.raises(AuthError) as info:
            await send_one(account)
    err = info.value
    assert "SMTP.SendAsApp" in str(err)
    assert "admin consent" in err.fix


async def test_wrong_audience_graph_token_for_smtp(sb: Sandbox, tmp_path: Path) -> None:
    account = secret_account(sb, tmp_path)
    graph = MsalTokenProvider(account, target="graph")
    token = await graph.get_token()
    assert token.token  # a valid Graph token...
    smtp_account = secret_account(sb, tmp_path, token=token.token, flow="static")
    with pytest.raises(AuthError, match="is for Microsoft Graph"):  # ...refused for SMTP
        await send_one(smtp_account)
    assert sb.stats.snapshot()["auth_failures"] == 0


async def test_revoked_refresh_token(tmp_path: Path) -> None:
    settings = SandboxSettings(access_token_lifetime=3, device_code_interval=0)
    async with Sandbox(tmp_path / "sbx", settings) as sb:
        account = public_account(sb, tmp_path, refresh_window=2)
        provider = MsalTokenProvider(account)
        await asyncio.to_thread(provider.login_device_code, approve_when_shown(sb))
        sb.identity.revoke_refresh_tokens(ALICE)
        await asyncio.sleep(1.2)  # the access token is now inside the refresh window
        with pytest.raises(AuthError) as info:
            await provider.get_token()
    assert re.search(r"AADSTS(50173|70008)", info.value.what)
    assert "smtp365 auth login --account oauth" in info.value.fix


async def test_no_secret_or_token_in_debug_logs(
    sb: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    account = secret_account(sb, tmp_path)
    provider = MsalTokenProvider(account)
    await send_one(account, provider)
    public = public_account(sb, tmp_path / "p")
    pprov = MsalTokenProvider(public)
    await asyncio.to_thread(pprov.login_device_code, approve_when_shown(sb))
    await send_one(public, pprov)
    secrets = [
        app_info(sb, DEFAULT_APP_ID)["client_secret"],
        (await provider.get_token()).token,
        (await pprov.get_token()).token,
        sb.password(ALICE),
    ]
    secrets += re.findall(r'"secret": "([^"]+)"', public.token_cache.read_text())
    assert len(secrets) >= 5
    text = caplog.text
    assert "token" in text.lower(), "debug logging was captured"
    for secret in secrets:
        assert secret not in text
        assert secret[:24] not in text
    for obj in (provider, pprov, account, public):
        for secret in secrets:
            assert secret not in repr(obj)


def test_threads_share_the_cache_lock(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Sandbox(tmp_path / "sbx") as sb:
            account = secret_account(sb, tmp_path)
            providers = [MsalTokenProvider(account) for _ in range(4)]
            tokens = await asyncio.gather(*(asyncio.to_thread(p.get_token_sync) for p in providers))
            assert len({t.token for t in tokens}) >= 1
            assert sb.identity.stats.token_requests_total <= 4

    asyncio.run(scenario())
    _ = threading  # threads come from asyncio.to_thread


async def test_encrypted_cache_through_config(
    sb: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SBX_CACHE_KEY", "correct horse battery staple")
    account = secret_account(sb, tmp_path, cache_key_env="SBX_CACHE_KEY")
    await send_one(account)
    raw = account.token_cache.read_bytes()
    assert raw.startswith(b"smtp365-fernet-v1\n") and b"access_token" not in raw.lower()
    assert b"AccessToken" not in raw
    await send_one(account, MsalTokenProvider(account))  # a new process can read it back
    assert sb.identity.stats.token_requests_total == 1
    monkeypatch.setenv("SBX_CACHE_KEY", "another key")
    with pytest.raises(AuthError, match="cannot be decrypted"):
        await send_one(account, MsalTokenProvider(account))


async def test_an_untrusted_identity_platform_certificate_is_permanent(
    sb: Sandbox, tmp_path: Path
) -> None:
    """The sandbox's authority uses a private CA: without ca_file no retry can get a token."""
    provider = MsalTokenProvider(secret_account(sb, tmp_path, ca_file=None))
    with pytest.raises(AuthError) as info:
        await provider.get_token()
    err = info.value
    assert not err.temporary, "a retry meets the same certificate"
    assert f"https://localhost:{sb.identity_port}" in err.what and "certificate" in err.what
    assert "set ca_file" in err.fix


async def test_an_identity_platform_that_refuses_connections_gets_a_fix(
    sb: Sandbox, tmp_path: Path
) -> None:
    with socket.socket() as closed:  # a port nothing listens on (bound, never listening)
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        account = secret_account(sb, tmp_path, authority_host=f"https://localhost:{port}")
        with pytest.raises(AuthError) as info:
            await MsalTokenProvider(account).get_token()
    err = info.value
    assert err.temporary and "connection refused" in err.what
    assert "sandbox env --oauth" in err.fix
