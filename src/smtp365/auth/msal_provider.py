"""OAuth2 through MSAL (the only module that imports msal and requests).

Flows: client credentials (secret or certificate, app-only), device code and
interactive authorization code + PKCE (delegated), refresh through the cache.
Tokens are refreshed ``refresh_window`` seconds before they expire, checked
(claims) before use, and MSAL's errors are mapped through the AADSTS catalogue.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import http.server
import logging
import ssl
import threading
import time
import urllib.parse
import urllib.request
import warnings
import webbrowser
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msal
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smtp365.auth import AccessToken, aadsts, claims
from smtp365.auth.cache import CacheFile
from smtp365.auth.claims import Target
from smtp365.config import AccountSettings, Flow
from smtp365.errors import AuthError, ConfigError

log = logging.getLogger("smtp365.auth.msal")

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}

SCOPES: dict[tuple[Target, bool], list[str]] = {
    # (target, app_only) -> scopes; MSAL adds openid/profile/offline_access itself
    ("smtp", True): ["https://outlook.office365.com/.default"],
    ("smtp", False): ["https://outlook.office.com/SMTP.Send"],
    ("graph", True): ["https://graph.microsoft.com/.default"],
    ("graph", False): ["https://graph.microsoft.com/Mail.Send"],
}


def is_local_authority(authority_host: str) -> bool:
    """True for an authority on this machine: the smtp365 sandbox, never Microsoft."""
    host = urllib.parse.urlsplit(authority_host).hostname or ""
    return host in _LOCAL_HOSTS


def _ca_bundle(account: AccountSettings) -> str | bool:
    """``verify=`` for requests: the system bundle, plus ``ca_file`` when configured."""
    if account.ca_file is None:
        return True
    extra = account.ca_file.expanduser().read_bytes()
    if is_local_authority(account.authority_host):
        return str(account.ca_file.expanduser())
    import certifi

    combined = Path(certifi.where()).read_bytes() + b"\n" + extra
    digest = hashlib.sha256(combined).hexdigest()[:16]
    path = account.token_cache.parent / f"ca-bundle-{digest}.pem"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_bytes(combined)
    return str(path)


def _certificate_credential(account: AccountSettings) -> dict[str, str]:
    raw = account.raw
    assert raw.certificate_file is not None
    try:
        cert_pem = raw.certificate_file.expanduser().read_bytes()
        key_pem = (raw.private_key_file or raw.certificate_file).expanduser().read_bytes()
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"account {account.name!r}: cannot load the client certificate/key: {exc}",
            fix="certificate_file must hold the PEM certificate and private_key_file its "
            "unencrypted PEM private key (or both in certificate_file)",
        ) from None
    der = cert.public_bytes(serialization.Encoding.DER)
    key_text = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "private_key": key_text,
        "thumbprint": hashlib.sha1(der, usedforsecurity=False).hexdigest(),
        "public_certificate": cert.public_bytes(serialization.Encoding.PEM).decode(),
    }


def _linked(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps: requests wraps urllib3's MaxRetryError, which
    wraps urllib3's errors (in ``args`` or ``reason``), which wrap the one from :mod:`ssl` or
    the socket (as ``__cause__`` / ``__context__``)."""
    todo: list[BaseException] = [exc]
    seen: list[BaseException] = []
    while todo:
        cur = todo.pop()
        if any(cur is s for s in seen):
            continue
        seen.append(cur)
        yield cur
        reason = getattr(cur, "reason", None)
        linked = [*cur.args, reason, cur.__cause__, cur.__context__]
        todo.extend(e for e in linked if isinstance(e, BaseException))


def _certificate_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure inside a requests exception, if that is what it
    is."""
    return next((e for e in _linked(exc) if isinstance(e, ssl.SSLCertVerificationError)), None)


def _refused(exc: BaseException) -> bool:
    """Somewhere in the chain of ``exc``, a refused TCP connection."""
    return any(
        isinstance(e, ConnectionRefusedError) or f"[Errno {errno.ECONNREFUSED}]" in str(e)
        for e in _linked(exc)
    )


def _unreachable(
    exc: requests.RequestException, account: AccountSettings, *, detail: str, fix: str
) -> AuthError:
    """No answer from the identity platform (``detail`` and ``fix`` say it). Temporary,
    unless its certificate failed verification: then every retry meets the same certificate
    until the settings change."""
    where = account.authority_host
    cert = _certificate_failure(exc)
    if cert is None and _refused(exc):
        local = is_local_authority(where)
        return AuthError(
            f"cannot reach the identity platform at {account.authority}: connection refused "
            "(nothing listens there)",
            fix="start the sandbox, or point authority_host at the port it listens on now "
            "(`smtp365 sandbox env --oauth` prints it)"
            if local
            else "check authority_host (Microsoft: https://login.microsoftonline.com) and that "
            "a proxy or firewall lets HTTPS through",
            temporary=True,
        )
    if cert is None:
        return AuthError(
            f"cannot reach the identity platform at {account.authority}: {detail}",
            fix=fix,
            temporary=True,
        )
    reason = cert.verify_message or str(cert)
    if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
        fix = (
            f"the certificate is not valid for {where}: check authority_host (Microsoft: "
            "https://login.microsoftonline.com); if it is right, something may be "
            "intercepting TLS"
        )
    else:
        fix = (
            "if the identity platform uses a private CA (the smtp365 sandbox, a test "
            "authority), set ca_file to that CA's PEM file; if you did not expect one "
            "(login.microsoftonline.com uses public CAs), a proxy, antivirus or an attacker "
            "may be intercepting TLS: do not send"
        )
    return AuthError(
        f"cannot get a token: the TLS certificate of the identity platform at {where} was "
        f"rejected: {reason}",
        fix=fix,
        temporary=False,
    )


def _auth_error(result: dict[str, Any], account: AccountSettings) -> AuthError:
    what, fix, temporary, relogin = aadsts.explain(result)
    if relogin and "--account" not in fix and account.flow is not Flow.CLIENT_CREDENTIALS:
        fix = fix.replace("`smtp365 auth login`", f"`smtp365 auth login --account {account.name}`")
    return AuthError(what, fix=fix, temporary=temporary)


class MsalTokenProvider:
    """A :class:`~smtp365.auth.TokenProvider` backed by MSAL and a persistent cache."""

    def __init__(
        self,
        account: AccountSettings,
        *,
        target: Target = "smtp",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not account.client_id:
            raise ConfigError(
                f"account {account.name!r} uses flow {account.flow.value!r} but has no client_id",
                fix="set client_id to the app registration's Application (client) ID",
            )
        self.account = account
        self.target: Target = target
        self.app_only = account.flow is Flow.CLIENT_CREDENTIALS
        self.scopes = SCOPES[(target, self.app_only)]
        self._clock = clock
        self._cache_file = CacheFile(account.token_cache, account.cache_key_value())
        self._cache = msal.SerializableTokenCache()
        self._app: msal.ClientApplication | None = None
        self._current: AccessToken | None = None
        self._lock = threading.Lock()
        self.network_requests = 0  # token requests answered by the identity platform

    def __repr__(self) -> str:
        a = self.account
        return f"MsalTokenProvider({a.name!r}, flow={a.flow.value}, target={self.target})"

    # -- MSAL plumbing ------------------------------------------------------

    def _make_app(self) -> msal.ClientApplication:
        a = self.account
        session = requests.Session()
        # trust_env=False so REQUESTS_CA_BUNDLE cannot override verify= (reference §9); the
        # proxy settings it would also drop are put back explicitly, except for a local
        # authority (the sandbox), which is never reached through a proxy.
        session.trust_env = False
        if not is_local_authority(a.authority_host):
            session.proxies.update(urllib.request.getproxies())
        try:
            session.verify = _ca_bundle(a)
        except OSError as exc:
            raise ConfigError(f"cannot read ca_file {a.ca_file}: {exc.strerror or exc}") from None
        common: dict[str, Any] = {
            "authority": a.authority,
            "token_cache": self._cache,
            "http_client": session,
        }
        if is_local_authority(a.authority_host):
            # The sandbox is not a Microsoft cloud: no instance discovery there. Real
            # authorities keep MSAL's defaults (discovery and validation on).
            common["instance_discovery"] = False
        try:
            if self.app_only:
                credential: str | dict[str, str]
                if a.raw.certificate_file is not None:
                    credential = _certificate_credential(a)
                else:
                    credential = a.client_secret_value()
                return msal.ConfidentialClientApplication(
                    a.client_id, client_credential=credential, **common
                )
            return msal.PublicClientApplication(a.client_id, **common)
        except ValueError as exc:  # MSAL reports authority/OIDC problems as ValueError
            raise AuthError(
                f"cannot use the authority {a.authority}: {exc}",
                fix="check tenant and authority_host",
            ) from None
        except requests.RequestException as exc:
            raise _unreachable(
                exc,
                a,
                detail=str(exc),
                fix="check the network (and ca_file for a private authority)",
            ) from None

    def _with_cache(self, operation: Callable[[msal.ClientApplication], Any]) -> Any:
        """Run ``operation`` with the cache loaded from disk and saved back, under its lock."""
        with self._lock, self._cache_file.locked():
            text = self._cache_file.read()
            if text:
                self._cache.deserialize(text)
            if self._app is None:
                self._app = self._make_app()
            try:
                return operation(self._app)
            except requests.RequestException as exc:
                raise _unreachable(
                    exc,
                    self.account,
                    detail=type(exc).__name__,
                    fix="check the network; trying again later can succeed",
                ) from None
            finally:
                if self._cache.has_state_changed:
                    self._cache_file.write(self._cache.serialize())
                    self._cache.has_state_changed = False

    def _accounts(self, app: msal.ClientApplication) -> list[dict[str, Any]]:
        accounts: list[dict[str, Any]] = app.get_accounts()
        wanted = self.account.username
        mine = [a for a in accounts if wanted and a.get("username", "").lower() == wanted.lower()]
        return mine or accounts

    def _to_token(self, result: dict[str, Any] | None) -> AccessToken:
        if not result:
            raise AuthError(
                f"account {self.account.name!r} is not signed in",
                fix=f"run `smtp365 auth login --account {self.account.name}`",
            )
        if "access_token" not in result:
            raise _auth_error(result, self.account)
        source = str(result.get("token_source", "identity_provider"))
        if source != "cache":
            self.network_requests += 1
        token = str(result["access_token"])
        expires_at = self._clock() + float(result.get("expires_in", 3600))
        payload = claims.decode(token)
        if payload and isinstance(payload.get("exp"), int | float):
            expires_at = float(payload["exp"])
        return AccessToken(token=token, expires_at=expires_at, source=source)

    def _acquire(self, force: bool) -> AccessToken:
        window = self.account.refresh_window

        def op(app: msal.ClientApplication) -> AccessToken:
            if self.app_only:
                assert isinstance(app, msal.ConfidentialClientApplication)
                if force:
                    app.remove_tokens_for_client()
                token = self._to_token(app.acquire_token_for_client(self.scopes))
                if token.expires_within(window, now=self._clock()):
                    app.remove_tokens_for_client()  # MSAL's own 5-minute rule was not enough
                    token = self._to_token(app.acquire_token_for_client(self.scopes))
                return token
            accounts = self._accounts(app)
            if not accounts:
                return self._to_token(None)
            result = app.acquire_token_silent_with_error(
                self.scopes, account=accounts[0], force_refresh=force
            )
            token = self._to_token(result)
            if not force and token.expires_within(window, now=self._clock()):
                token = self._to_token(
                    app.acquire_token_silent_with_error(
                        self.scopes, account=accounts[0], force_refresh=True
                    )
                )
            return token

        return self._checked(self._with_cache(op))

    def _checked(self, token: AccessToken) -> AccessToken:
        claims.require(token.token, self.target, mailbox=self.account.username)
        return token

    # -- TokenProvider ------------------------------------------------------

    def get_token_sync(self, *, force_refresh: bool = False) -> AccessToken:
        current = self._current
        window = self.account.refresh_window
        if (
            not force_refresh
            and current is not None
            and not current.expires_within(window, now=self._clock())
        ):
            return current
        self._current = self._acquire(force_refresh or current is not None)
        log.debug(
            "token for %s (%s) from %s, expires in %.0f s",
            self.account.name,
            self.target,
            self._current.source,
            self._current.expires_at - self._clock(),
        )
        return self._current

    async def get_token(self, *, force_refresh: bool = False) -> AccessToken:
        current = self._current
        if (
            not force_refresh
            and current is not None
            and not current.expires_within(self.account.refresh_window, now=self._clock())
        ):
            return current
        return await asyncio.to_thread(self.get_token_sync, force_refresh=force_refresh)

    # -- sign-in ------------------------------------------------------------

    def login_device_code(self, show: Callable[[str], None]) -> AccessToken:
        """Device code flow: ``show`` gets the URL-and-code message; blocks until done."""
        if self.app_only:
            return self.get_token_sync(force_refresh=True)

        def start(app: msal.ClientApplication) -> dict[str, Any]:
            assert isinstance(app, msal.PublicClientApplication)
            flow: dict[str, Any] = app.initiate_device_flow(scopes=self.scopes)
            return flow

        flow = self._with_cache(start)
        if "user_code" not in flow:
            raise _auth_error(flow, self.account)
        show(
            str(
                flow.get("message") or f"open {flow['verification_uri']}, enter {flow['user_code']}"
            )
        )

        def finish(app: msal.ClientApplication) -> AccessToken:
            assert isinstance(app, msal.PublicClientApplication)
            return self._to_token(app.acquire_token_by_device_flow(flow))

        token = self._checked(self._with_cache(finish))
        self._current = token
        return token

    def login_interactive(
        self, open_url: Callable[[str], None] | None = None, *, timeout: float = 300
    ) -> AccessToken:
        """Authorization code + PKCE with a one-shot receiver on http://localhost:PORT."""
        if self.app_only:
            return self.get_token_sync(force_refresh=True)
        received: dict[str, str] = {}
        done = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                query = urllib.parse.urlsplit(self.path).query
                received.update(dict(urllib.parse.parse_qsl(query)))
                ok = "code" in received
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.end_headers()
                text = "Signed in. You can close this window." if ok else "Sign-in failed."
                self.wfile.write(f"<html><body><p>smtp365: {text}</p></body></html>".encode())
                done.set()

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:

            def start(app: msal.ClientApplication) -> dict[str, Any]:
                assert isinstance(app, msal.PublicClientApplication)
                with warnings.catch_warnings():
                    # MSAL suggests response_mode=form_post; a query-mode code on a
                    # loopback redirect is what RFC 8252 describes for native apps, and
                    # PKCE binds the code to this process.
                    warnings.filterwarnings(
                        "ignore", message="response_mode=", category=UserWarning
                    )
                    flow: dict[str, Any] = app.initiate_auth_code_flow(
                        self.scopes,
                        redirect_uri=f"http://localhost:{port}",
                        login_hint=self.account.username,
                    )
                return flow

            flow = self._with_cache(start)
            if "auth_uri" not in flow:
                raise _auth_error(flow, self.account)
            (open_url or _open_in_browser)(str(flow["auth_uri"]))
            if not done.wait(timeout):
                raise AuthError(
                    f"no sign-in arrived on http://localhost:{port} within {timeout:g} s",
                    fix="finish the sign-in in the browser, or use the device code flow "
                    "(`smtp365 auth login` without --browser)",
                )
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
        if "error" in received:
            raise _auth_error(received, self.account)

        def finish(app: msal.ClientApplication) -> AccessToken:
            assert isinstance(app, msal.PublicClientApplication)
            return self._to_token(app.acquire_token_by_auth_code_flow(flow, received))

        token = self._checked(self._with_cache(finish))
        self._current = token
        return token

    def logout(self) -> bool:
        """Forget every token of this account (the cache file is deleted)."""
        with self._lock, self._cache_file.locked():
            self._current = None
            self._app = None
            self._cache = msal.SerializableTokenCache()
            return self._cache_file.delete()

    def cached(self) -> tuple[AccessToken | None, list[str]]:
        """What the cache holds, without a request to the identity platform: this target's
        unexpired access token with the latest expiry (``None``: none), and the users signed
        in (delegated flows; they have a refresh token)."""
        kinds = msal.TokenCache.CredentialType
        with self._lock, self._cache_file.locked():
            text = self._cache_file.read()
            if text:
                self._cache.deserialize(text)
            query = {"client_id": self.account.client_id}
            entries = list(self._cache.search(kinds.ACCESS_TOKEN, target=self.scopes, query=query))
            users = [str(a.get("username", "")) for a in self._cache.search(kinds.ACCOUNT)]
        best = max(entries, key=lambda e: int(e.get("expires_on", 0)), default=None)
        token = None
        if best is not None and best.get("secret"):
            token = AccessToken(
                token=str(best["secret"]), expires_at=float(best["expires_on"]), source="cache"
            )
        return token, [] if self.app_only else users

    def signed_in_users(self) -> list[str]:
        def op(app: msal.ClientApplication) -> list[str]:
            return [str(a.get("username", "")) for a in app.get_accounts()]

        return list(self._with_cache(op))


def _open_in_browser(url: str) -> None:
    print(f"Open this address to sign in:\n  {url}", flush=True)
    webbrowser.open(url)


def describe(token: AccessToken, target: Target, mailbox: str | None) -> dict[str, Any]:
    """A JSON-ready summary of a token for ``auth status`` (never the token itself)."""
    payload = claims.decode(token.token)
    if payload is None:
        return {"jwt": False, "source": token.source}
    report = claims.check(payload, target, mailbox=mailbox)
    return {
        "jwt": True,
        "source": token.source,
        **report.summary(),
        "expires_in": None if report.expires_at is None else int(report.expires_at - time.time()),
        "ok": report.ok,
        "problems": [{"what": w, "fix": f} for w, f in report.problems],
        "warnings": report.warnings,
    }


__all__ = ["SCOPES", "MsalTokenProvider", "describe", "is_local_authority"]
