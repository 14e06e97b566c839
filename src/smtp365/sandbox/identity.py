"""The identity platform: a Microsoft Entra ID look-alike that MSAL for Python talks to unmodified.

Served over HTTPS by :class:`~smtp365.sandbox.httpserver.HttpServer` (see ``Sandbox``), with
the endpoints of ``https://login.microsoftonline.com`` under ``https://localhost:PORT``:

- ``GET  /{tenant}/v2.0/.well-known/openid-configuration`` and ``/{tenant}/discovery/v2.0/keys``
- ``POST /{tenant}/oauth2/v2.0/token``: ``client_credentials`` (secret or certificate),
  ``authorization_code`` (PKCE), ``refresh_token``, device code, ``password``
- ``POST /{tenant}/oauth2/v2.0/devicecode`` and the ``/devicelogin`` page
- ``GET|POST /{tenant}/oauth2/v2.0/authorize``: a sign-in form, answered with a redirect
  (``query``, ``fragment``) or an auto-posting form (``form_post``)
- ``GET /common/userrealm/{user}``, ``GET /common/discovery/instance``,
  ``/{tenant}/oauth2/v2.0/logout``

``{tenant}`` is the tenant id, one of its domains (those of the mailboxes), ``organizations``
or ``common``. Access tokens come from the sandbox's :class:`TokenIssuer`, so the SMTP
server's XOAUTH2 check accepts them. Refresh tokens are opaque, encrypted with a key derived
from the persisted signing key: they survive a restart, and revocation works the way Entra
ID's does, by a per-user "tokens valid from" time.

Everything here runs under one lock: the HTTP handler (on the sandbox's event loop) and the
test API (``approve_device_code`` etc., from any thread).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, urlencode, urlsplit

from cryptography.fernet import Fernet, InvalidToken

from . import aadsts
from . import identity_pages as pages
from .aadsts import AadError
from .client_auth import LOOPBACK_NAMES, ClientAuthenticator
from .httpserver import Request, Response
from .scopes import GRAPH, Resource, Scopes, granted, parse_scopes, resource_for
from .settings import AppSettings, MailboxSettings, SandboxSettings, stable_uuid
from .state import IdentityStats
from .tokens import TokenIssuer

__all__ = ["IdentityError", "IdentityPlatform"]

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_NAMES = {
    "client_credentials": "client_credentials",
    "authorization_code": "authorization_code",
    "refresh_token": "refresh_token",
    "password": "password",
    DEVICE_CODE_GRANT: "device_code",
    "device_code": "device_code",
}
ID_TOKEN_LIFETIME = 3600
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ23456789"
_URI = re.compile(r"[\x21-\x7e]+")
_DIGITS = re.compile(r"[0-9]{1,10}")


class IdentityError(Exception):
    """A test-API call that cannot be done (unknown user code, unknown user...)."""


# ------------------------------------------------------------ pending grants


@dataclass(slots=True)
class _AuthCode:
    client_id: str
    redirect_uri: str
    scope: str
    user: str
    challenge: str | None
    method: str | None
    nonce: str | None
    mfa: bool
    auth_time: float
    expires_at: float
    redeemed: bool = False


@dataclass(slots=True)
class _DeviceCode:
    device_code: str
    user_code: str
    client_id: str
    scopes: Scopes
    expires_at: float
    status: str = "pending"
    """``pending``, ``approved``, ``declined``, ``failed`` or ``redeemed``."""
    user: str | None = None
    mfa: bool = False
    auth_time: float = 0.0
    failure: AadError | None = None
    polls: int = 0


@dataclass(frozen=True, slots=True)
class _RefreshGrant:
    client_id: str
    user: str
    scope: str
    issued_at: float
    expires_at: float
    mfa: bool
    auth_time: float


# ------------------------------------------------------------------ helpers


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _timestamp(when: float) -> str:
    """``2023-05-06 06:03:00Z``: Entra's ``timestamp`` field."""
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _pkce_ok(verifier: str, challenge: str, method: str | None) -> bool:
    if method == "S256":
        expected = _b64u(hashlib.sha256(verifier.encode("ascii", "replace")).digest())
    else:
        expected = verifier
    return hmac.compare_digest(expected.encode(), challenge.encode())


def _redirect_allowed(app: AppSettings, uri: str) -> bool:
    """Exact match, or a loopback ``http`` URI whose port is ignored (as in Entra ID).

    Ignored, but it must be a port: the URI goes into a ``Location`` header as it is, so it
    must be a URI (printable ASCII, no spaces) and ``http://localhost:1 x/`` is none.
    """
    if "#" in uri or not _URI.fullmatch(uri):
        return False
    if uri in app.redirect_uris:
        return True
    try:
        given = urlsplit(uri)
        given_host = given.hostname
        _ = given.port  # ValueError unless it is a port number
    except ValueError:
        return False
    for registered in app.redirect_uris:
        try:
            reg = urlsplit(registered)
        except ValueError:
            continue
        if (
            reg.scheme == "http"
            and given.scheme == "http"
            and reg.hostname in LOOPBACK_NAMES
            and reg.hostname == given_host
            and (reg.path or "/") == (given.path or "/")
            and reg.query == given.query
        ):
            return True
    return False


def _basic_auth(request: Request) -> tuple[str | None, str | None]:
    """``client_secret_basic``: (client id, secret); (``None``, ``None``) when the header is
    absent or holds no ``id:secret`` — the request then names no credential at all."""
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None, None
    try:  # header values are latin-1 text: anything outside base64's alphabet is refused
        decoded = base64.b64decode(header[6:].strip().encode("ascii"), validate=True)
        text = decoded.decode("utf-8")
    except ValueError:  # UnicodeError, binascii.Error
        return None, None
    user, sep, password = text.partition(":")
    if not sep:
        return None, None
    return unquote_plus(user), unquote_plus(password)


# ----------------------------------------------------------------- platform


class IdentityPlatform:
    """State and endpoints of the identity platform; :meth:`handle` is the HTTP handler.

    ``now`` (wall-clock seconds) drives token lifetimes, code expiry and revocation, so a
    test can expire a device code or a refresh token without waiting.
    """

    def __init__(
        self,
        settings: SandboxSettings,
        issuer: TokenIssuer,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.issuer = issuer
        self.stats = IdentityStats()
        self.port = 0
        self._now = now
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._codes: dict[str, _AuthCode] = {}
        self._device_codes: dict[str, _DeviceCode] = {}
        self._valid_from: dict[str, float] = {}
        key = issuer.derive_secret("smtp365 sandbox refresh token")
        self._fernet = Fernet(base64.urlsafe_b64encode(key))
        self.clients = ClientAuthenticator(settings, now=now, port=lambda: self.port)

    # ----------------------------------------------------------- addresses

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def authority(self) -> str:
        """What MSAL takes as ``authority``: ``https://localhost:PORT/{tenant id}``."""
        return f"{self.base_url}/{self.settings.tenant_id}"

    @property
    def openid_configuration_url(self) -> str:
        return f"{self.authority}/v2.0/.well-known/openid-configuration"

    @property
    def token_endpoint(self) -> str:
        return f"{self.authority}/oauth2/v2.0/token"

    @property
    def devicelogin_url(self) -> str:
        return f"{self.base_url}/devicelogin"

    # ------------------------------------------------------------ test API

    def approve_device_code(self, user_code: str, username: str) -> str | None:
        """Act as ``username`` entering ``user_code`` on the device login page (no password).

        Returns ``None`` when approved, else the AADSTS text the user would see (a blocked
        user or a missing consent; the client's next poll gets the same error).
        """
        with self._changed:
            entry = self._pending_device_code(user_code)
            mbx = self.settings.mailbox(username)
            if mbx is None or mbx.shared:
                raise IdentityError(f"{username} is not a user of the sandbox who can sign in")
            try:
                self._approve(entry, mbx)
            except AadError as exc:
                return exc.description
            finally:
                self._changed.notify_all()
            return None

    def decline_device_code(self, user_code: str) -> None:
        """Act as the user pressing Cancel on the device login page."""
        with self._changed:
            self._pending_device_code(user_code).status = "declined"
            self._changed.notify_all()

    def device_code_status(self, user_code: str) -> str:
        with self._lock:
            entry = self._device_code_by_user_code(user_code)
            if entry is None:
                raise IdentityError(f"no device code {user_code!r}")
            return entry.status

    def wait_for_device_poll(self, user_code: str, polls: int = 1, timeout: float = 10.0) -> bool:
        """Block until the client polled for ``user_code`` at least ``polls`` times."""

        def seen() -> bool:
            entry = self._device_code_by_user_code(user_code)
            return entry is not None and entry.polls >= polls

        with self._changed:
            return self._changed.wait_for(seen, timeout)

    def revoke_refresh_tokens(self, username: str) -> None:
        """``Revoke-MgUserSignInSession``: refresh tokens issued until now stop working."""
        with self._lock:
            self._valid_from[username.strip().lower()] = self._now()

    # ------------------------------------------------------------------ HTTP

    def handle(self, request: Request) -> Response:
        with self._changed:
            self.stats.http_requests += 1
            try:
                return self._route(request)
            finally:
                self._changed.notify_all()

    def _route(self, request: Request) -> Response:
        segments = [s for s in request.path.split("/") if s]
        if not segments:
            return Response.html(self._index_page())
        if segments == ["devicelogin"]:
            return self._devicelogin(request)
        if segments == ["error"]:
            return self._error_lookup(request)
        if segments[:2] == ["common", "userrealm"] and len(segments) == 3:
            return self._userrealm(request, segments[2])
        if segments == ["common", "discovery", "instance"]:
            return self._instance_discovery(request)
        tenant, rest = segments[0], "/".join(segments[1:])
        routes: dict[str, tuple[tuple[str, ...], Callable[[Request, str], Response]]] = {
            "v2.0/.well-known/openid-configuration": (("GET",), self._openid_configuration),
            "discovery/v2.0/keys": (("GET",), self._keys),
            "discovery/keys": (("GET",), self._keys),
            "oauth2/v2.0/token": (("POST",), self._token),
            "oauth2/v2.0/devicecode": (("POST",), self._devicecode),
            "oauth2/v2.0/authorize": (("GET", "POST"), self._authorize),
            "oauth2/v2.0/logout": (("GET", "POST"), self._logout),
        }
        route = routes.get(rest)
        if route is None:
            return Response.json({"error": "not_found", "error_description": "Not found."}, 404)
        methods, handler = route
        if request.method == "HEAD" and "GET" in methods:
            pass
        elif request.method not in methods:
            if methods == ("POST",):
                return self._json_error(
                    AadError(
                        900561,
                        "invalid_request",
                        "The endpoint only accepts POST, OPTIONS requests. Received a "
                        f"{request.method} request.",
                    ),
                    request,
                )
            return Response(405, b"", headers=[("Allow", ", ".join(methods))])
        try:
            tenant = self._resolve_tenant(tenant, rest)
        except AadError as exc:
            if rest.endswith("authorize"):
                return self._error_page(exc, request)
            return self._json_error(exc, request)
        return handler(request, tenant)

    def _resolve_tenant(self, tenant: str, rest: str) -> str:
        low = tenant.lower()
        if low in ("organizations", "common") or low == self.settings.tenant_id.lower():
            return low
        if low in self.settings.domains:
            return low
        error = "invalid_tenant" if rest.endswith("openid-configuration") else "invalid_request"
        raise aadsts.tenant_not_found(tenant, error=error)

    def _base(self, request: Request) -> str:
        """The address the client used, when it is a loopback name with our port."""
        host = request.headers.get("host", "")
        name, _, port = host.rpartition(":")
        if name.strip("[]").lower() in LOOPBACK_NAMES and port == str(self.port):
            return f"https://{host}"
        return self.base_url

    # --------------------------------------------------------------- errors

    def _count(self, exc: AadError) -> None:
        self.stats.errors[exc.label] += 1

    def _ids(self, request: Request) -> tuple[str, str, str]:
        trace_id = str(uuid.uuid4())
        correlation_id = request.headers.get("client-request-id") or str(uuid.uuid4())
        return trace_id, correlation_id, _timestamp(self._now())

    def _long_description(self, exc: AadError, request: Request) -> tuple[str, str, str, str]:
        trace_id, correlation_id, stamp = self._ids(request)
        text = (
            f"{exc.description}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}"
            f"\r\nTimestamp: {stamp}"
        )
        return text, trace_id, correlation_id, stamp

    def _json_error(self, exc: AadError, request: Request) -> Response:
        self._count(exc)
        text, trace_id, correlation_id, stamp = self._long_description(exc, request)
        body: dict[str, Any] = {
            "error": exc.error,
            "error_description": text,
            "error_codes": [exc.code],
            "timestamp": stamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"{self._base(request)}/error?code={exc.code}",
        }
        if exc.suberror:
            body["suberror"] = exc.suberror
        if exc.claims:
            body["claims"] = exc.claims
        return Response.json(body, exc.status)

    def _error_page(self, exc: AadError, request: Request) -> Response:
        self._count(exc)
        trace_id, correlation_id, stamp = self._ids(request)
        page = pages.error_page(
            exc.description, trace_id=trace_id, correlation_id=correlation_id, timestamp=stamp
        )
        return Response.html(page, 400)

    # ------------------------------------------------------------ discovery

    def _openid_configuration(self, request: Request, tenant: str) -> Response:
        self.stats.discovery_requests += 1
        base = f"{self._base(request)}/{tenant}"
        issuer = self.issuer.issuer
        if tenant in ("organizations", "common"):
            issuer = issuer.replace(self.settings.tenant_id, "{tenantid}")
        config = {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": issuer,
            "request_uri_parameter_supported": False,
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "grant_types_supported": [
                "authorization_code",
                "refresh_token",
                "client_credentials",
                DEVICE_CODE_GRANT,
                "password",
            ],
            "code_challenge_methods_supported": ["plain", "S256"],
            "claims_supported": [
                "sub",
                "iss",
                "aud",
                "exp",
                "iat",
                "auth_time",
                "nonce",
                "preferred_username",
                "name",
                "tid",
                "ver",
                "oid",
                "email",
            ],
            "tenant_region_scope": "EU",
            "cloud_instance_name": "sandbox.smtp365.test",
        }
        return Response.json(config)

    def _keys(self, request: Request, tenant: str) -> Response:
        keys = self.issuer.jwks()
        for key in keys["keys"]:
            key["issuer"] = self.issuer.issuer
        return Response.json(keys)

    def _userrealm(self, request: Request, username: str) -> Response:
        domain = username.rpartition("@")[2].lower()
        known = domain in self.settings.domains
        return Response.json(
            {
                "ver": "1.0",
                "account_type": "Managed" if known else "Unknown",
                "domain_name": domain,
                "cloud_instance_name": "microsoftonline.com",
                "cloud_audience_urn": "urn:federation:MicrosoftOnline",
            }
        )

    def _instance_discovery(self, request: Request) -> Response:
        endpoint = request.query.get("authorization_endpoint", "")
        try:
            path = urlsplit(endpoint).path
        except ValueError:  # e.g. "https://[/": no instance at all
            return self._json_error(aadsts.invalid_instance(), request)
        segments = [s for s in path.split("/") if s]
        tenant = segments[0] if segments else self.settings.tenant_id
        base = self._base(request)
        host = base.removeprefix("https://")
        config = f"{base}/{tenant}/v2.0/.well-known/openid-configuration"
        return Response.json(
            {
                "tenant_discovery_endpoint": config,
                "api-version": "1.1",
                "metadata": [
                    {"preferred_network": host, "preferred_cache": host, "aliases": [host]}
                ],
            }
        )

    def _logout(self, request: Request, tenant: str) -> Response:
        params = request.query if request.method != "POST" else request.form()
        target = params.get("post_logout_redirect_uri")
        if target and any(_redirect_allowed(app, target) for app in self.settings.apps):
            return Response.redirect(target)
        return Response.html(pages.signed_out_page())

    def _error_lookup(self, request: Request) -> Response:
        code = request.query.get("code", "")
        text = f"AADSTS{code}" if _DIGITS.fullmatch(code) else "unknown error code"
        return Response.html(
            pages.error_page(
                f"{text}: see https://login.microsoftonline.com/error?code={code}",
                trace_id="-",
                correlation_id="-",
                timestamp=_timestamp(self._now()),
            )
        )

    def _index_page(self) -> str:
        return pages.index_page(self.authority, self.settings.tenant_id)

    # ---------------------------------------------------------------- token

    def _token(self, request: Request, tenant: str) -> Response:
        form = request.form()
        grant = form.get("grant_type", "")
        kind = GRANT_NAMES.get(grant, grant or "(none)")
        self.stats.token_requests[kind] += 1
        try:
            if not grant:
                raise aadsts.missing_parameter("grant_type")
            basic_id, basic_secret = _basic_auth(request)
            client_id = form.get("client_id") or basic_id
            if not client_id:
                raise aadsts.missing_parameter("client_id")
            app = self.settings.app(client_id)
            if app is None:
                raise aadsts.app_not_found(client_id, self.settings.tenant_id)
            flows: dict[str, Callable[[AppSettings, dict[str, str], Request, str], dict[str, Any]]]
            flows = {
                "client_credentials": self._client_credentials,
                "authorization_code": self._authorization_code,
                "refresh_token": self._refresh_token,
                "device_code": self._device_code_grant,
                "password": self._password,
            }
            flow = flows.get(kind)
            if flow is None:
                raise aadsts.unsupported_grant_type(grant)
            self.clients.authenticate(app, form, basic_secret, tenant, kind)
            body = flow(app, form, request, tenant)
        except AadError as exc:
            return self._json_error(exc, request)
        self.stats.tokens_issued[kind] += 1
        return Response.json(body)

    # ---------------------------------------------------------------- grants

    def _client_credentials(
        self, app: AppSettings, form: dict[str, str], request: Request, tenant: str
    ) -> dict[str, Any]:
        if tenant in ("organizations", "common"):
            raise aadsts.no_tenant_information()
        scope = " ".join(form.get("scope", "").split())
        if not scope:
            raise aadsts.scope_missing()
        if " " in scope or not scope.endswith("/.default"):
            raise aadsts.client_credentials_scope(scope)
        identifier = scope.removesuffix("/.default").rstrip("/")
        resource = resource_for(identifier)
        if resource is None:
            raise aadsts.resource_not_found(identifier, self.settings.tenant_id)
        lifetime = self.settings.access_token_lifetime
        token = self.issuer.issue(
            None,
            app_only=True,
            app_id=app.app_id,
            lifetime=lifetime,
            audience=identifier,
            scopes=granted(app.app_permissions, resource),
            now=self._now(),
            extra_claims={"app_displayname": app.display_name},
        )
        return {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": token,
        }

    def _authorization_code(
        self, app: AppSettings, form: dict[str, str], request: Request, tenant: str
    ) -> dict[str, Any]:
        code = form.get("code")
        if not code:
            raise aadsts.missing_parameter("code")
        entry = self._codes.get(code)
        if entry is None or entry.client_id.lower() != app.app_id.lower():
            raise aadsts.malformed_request()
        if entry.redeemed:
            raise aadsts.code_redeemed()
        if self._now() >= entry.expires_at:
            raise aadsts.grant_expired()
        redirect_uri = form.get("redirect_uri", "")
        if redirect_uri != entry.redirect_uri:
            raise aadsts.redirect_uri_changed(redirect_uri, entry.redirect_uri)
        if entry.challenge is not None:
            verifier = form.get("code_verifier", "")
            if not verifier or not _pkce_ok(verifier, entry.challenge, entry.method):
                raise aadsts.pkce_mismatch()
        entry.redeemed = True
        scopes = parse_scopes(form.get("scope") or entry.scope, self.settings.tenant_id)
        mbx = self._user(entry.user)
        self._policy(mbx, mfa_done=entry.mfa, resource=scopes.single_resource())
        return self._delegated(
            app, mbx, scopes, form, mfa=entry.mfa, auth_time=entry.auth_time, nonce=entry.nonce
        )

    def _refresh_token(
        self, app: AppSettings, form: dict[str, str], request: Request, tenant: str
    ) -> dict[str, Any]:
        token = form.get("refresh_token")
        if not token:
            raise aadsts.missing_parameter("refresh_token")
        grant = self._read_refresh_token(token)
        if grant is None or grant.client_id.lower() != app.app_id.lower():
            raise aadsts.malformed_request()
        now = self._now()
        if now >= grant.expires_at:
            raise aadsts.grant_expired()
        valid_from = self._valid_from.get(grant.user.lower())
        if valid_from is not None and grant.issued_at <= valid_from:
            raise aadsts.grant_revoked(aadsts.iso7(grant.issued_at), aadsts.iso7(valid_from))
        mbx = self._user(grant.user)
        scopes = parse_scopes(form.get("scope") or grant.scope, self.settings.tenant_id)
        self._policy(mbx, mfa_done=grant.mfa, resource=scopes.single_resource())
        return self._delegated(
            app, mbx, scopes, form, mfa=grant.mfa, auth_time=grant.auth_time, refresh=True
        )

    def _device_code_grant(
        self, app: AppSettings, form: dict[str, str], request: Request, tenant: str
    ) -> dict[str, Any]:
        code = form.get("device_code") or form.get("code")
        if not code:
            raise aadsts.missing_parameter("device_code")
        entry = self._device_codes.get(code)
        if entry is None or entry.client_id.lower() != app.app_id.lower():
            raise aadsts.malformed_request()
        entry.polls += 1
        self.stats.device_code_polls += 1
        if entry.status == "redeemed":
            raise aadsts.code_redeemed()
        if entry.status in ("pending", "approved") and self._now() >= entry.expires_at:
            raise aadsts.device_code_expired()
        if entry.status == "pending":
            raise aadsts.authorization_pending()
        if entry.status == "declined":
            raise aadsts.authorization_declined()
        if entry.status == "failed":
            assert entry.failure is not None
            failure = entry.failure
            raise AadError(
                failure.code,
                failure.error,
                failure.text,
                status=failure.status,
                suberror=failure.suberror,
                claims=failure.claims,
            )
        assert entry.user is not None
        mbx = self._user(entry.user)
        self._policy(mbx, mfa_done=entry.mfa, resource=entry.scopes.single_resource())
        entry.status = "redeemed"
        return self._delegated(
            app, mbx, entry.scopes, form, mfa=entry.mfa, auth_time=entry.auth_time
        )

    def _password(
        self, app: AppSettings, form: dict[str, str], request: Request, tenant: str
    ) -> dict[str, Any]:
        username = form.get("username")
        if not username:
            raise aadsts.missing_parameter("username")
        password = form.get("password")
        if password is None:
            raise aadsts.missing_parameter("password")
        scopes = parse_scopes(form.get("scope"), self.settings.tenant_id)
        resource = scopes.single_resource()
        mbx = self._user(username)
        if not mbx.password or not hmac.compare_digest(password.encode(), mbx.password.encode()):
            raise aadsts.invalid_password()
        self._policy(mbx, mfa_done=False, resource=resource)
        return self._delegated(app, mbx, scopes, form, mfa=False, auth_time=self._now())

    # ------------------------------------------------------ users & policy

    def _user(self, address: str) -> MailboxSettings:
        mbx = self.settings.mailbox(address)
        if mbx is None:
            raise aadsts.user_not_found(self.settings.tenant_id)
        if mbx.shared:
            raise aadsts.user_disabled()
        return mbx

    def _policy(self, mbx: MailboxSettings, *, mfa_done: bool, resource: Resource | None) -> None:
        if mbx.conditional_access_block:
            raise aadsts.blocked_by_conditional_access()
        if mbx.mfa_required and not mfa_done:
            raise aadsts.mfa_required((resource or GRAPH).app_id)

    def _check_consent(self, app: AppSettings, scopes: Scopes, *, error: str) -> None:
        for item in scopes.items:
            names = {n.lower() for n in granted(app.delegated_permissions, item.resource)}
            if (item.name == ".default" and not names) or (
                item.name != ".default" and item.name.lower() not in names
            ):
                raise aadsts.consent_required(app.app_id, app.display_name, error=error)

    # ---------------------------------------------------------- tokens

    def _delegated(
        self,
        app: AppSettings,
        mbx: MailboxSettings,
        scopes: Scopes,
        form: Mapping[str, str],
        *,
        mfa: bool,
        auth_time: float,
        nonce: str | None = None,
        refresh: bool = False,
    ) -> dict[str, Any]:
        resource = scopes.single_resource()
        self._check_consent(app, scopes, error="invalid_grant")
        now = self._now()
        lifetime = self.settings.access_token_lifetime
        if resource is None:
            audience = GRAPH.uri
            names = sorted(scopes.reserved & {"openid", "profile", "email"}) or ["openid"]
            scope_text = " ".join(names)
        else:
            first = next(item for item in scopes.items if item.resource is resource)
            audience = first.identifier or resource.uri
            names = granted(app.delegated_permissions, resource)
            prefix = f"{first.identifier}/" if first.identifier else ""
            scope_text = " ".join(f"{prefix}{name}" for name in names)
        access = self.issuer.issue(
            mbx.address,
            app_id=app.app_id,
            lifetime=lifetime,
            audience=audience,
            scopes=names,
            now=now,
            extra_claims={
                "name": mbx.display_name or mbx.address,
                "app_displayname": app.display_name,
                "amr": ["pwd", "mfa"] if mfa else ["pwd"],
            },
        )
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": scope_text,
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": access,
        }
        if refresh or "offline_access" in scopes.reserved:
            body["refresh_token"] = self._new_refresh_token(app, mbx, scopes, mfa, auth_time)
        if "openid" in scopes.reserved:
            body["id_token"] = self._id_token(
                app, mbx, nonce=nonce, auth_time=auth_time, email="email" in scopes.reserved
            )
        if form.get("client_info") == "1":
            body["client_info"] = self._client_info(mbx)
        return body

    def _oid(self, mbx: MailboxSettings) -> str:
        return stable_uuid(self.settings.tenant_id, "user", mbx.address)

    def _client_info(self, mbx: MailboxSettings) -> str:
        info = {"uid": self._oid(mbx), "utid": self.settings.tenant_id}
        return _b64u(json.dumps(info, separators=(",", ":")).encode())

    def _id_token(
        self,
        app: AppSettings,
        mbx: MailboxSettings,
        *,
        nonce: str | None,
        auth_time: float,
        email: bool,
    ) -> str:
        now = int(self._now())
        tid = self.settings.tenant_id
        pairwise = hashlib.sha256(f"{tid}/{app.app_id}/{mbx.address.lower()}".encode()).digest()
        claims: dict[str, Any] = {
            "aud": app.app_id,
            "iss": self.issuer.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + ID_TOKEN_LIFETIME,
            "auth_time": int(auth_time),
            "name": mbx.display_name or mbx.address,
            "oid": self._oid(mbx),
            "preferred_username": mbx.address,
            "sub": _b64u(pairwise),
            "tid": tid,
            "uti": secrets.token_urlsafe(16),
            "ver": "2.0",
        }
        if nonce:
            claims["nonce"] = nonce
        if email:
            claims["email"] = mbx.address
        return self.issuer.sign(claims)

    def _new_refresh_token(
        self,
        app: AppSettings,
        mbx: MailboxSettings,
        scopes: Scopes,
        mfa: bool,
        auth_time: float,
    ) -> str:
        now = self._now()
        payload = {
            "v": 1,
            "cid": app.app_id,
            "upn": mbx.address,
            "scp": scopes.text,
            "iat": now,
            "exp": now + self.settings.refresh_token_lifetime,
            "mfa": mfa,
            "at": auth_time,
            "n": secrets.token_urlsafe(8),
        }
        self.stats.refresh_tokens_issued += 1
        return "1." + self._fernet.encrypt(json.dumps(payload).encode()).decode()

    def _read_refresh_token(self, token: str) -> _RefreshGrant | None:
        if not token.startswith("1."):
            return None
        try:
            data = json.loads(self._fernet.decrypt(token[2:].encode()))
            return _RefreshGrant(
                client_id=str(data["cid"]),
                user=str(data["upn"]),
                scope=str(data["scp"]),
                issued_at=float(data["iat"]),
                expires_at=float(data["exp"]),
                mfa=bool(data["mfa"]),
                auth_time=float(data["at"]),
            )
        except (InvalidToken, ValueError, KeyError, TypeError):
            return None

    # ------------------------------------------------------------ device code

    def _devicecode(self, request: Request, tenant: str) -> Response:
        form = request.form()
        try:
            client_id = form.get("client_id")
            if not client_id:
                raise aadsts.missing_parameter("client_id")
            app = self.settings.app(client_id)
            if app is None:
                raise aadsts.app_not_found(client_id, self.settings.tenant_id)
            scopes = parse_scopes(form.get("scope"), self.settings.tenant_id)
            scopes.single_resource()
        except AadError as exc:
            return self._json_error(exc, request)
        now = self._now()
        self._device_codes = {  # forget codes that ended long ago
            k: v for k, v in self._device_codes.items() if v.expires_at + 3600 > now
        }
        user_code = self._new_user_code()
        device_code = secrets.token_urlsafe(48)
        lifetime = self.settings.device_code_lifetime
        self._device_codes[device_code] = _DeviceCode(
            device_code=device_code,
            user_code=user_code,
            client_id=app.app_id,
            scopes=scopes,
            expires_at=now + lifetime,
        )
        self.stats.device_codes_issued += 1
        uri = f"{self._base(request)}/devicelogin"
        return Response.json(
            {
                "user_code": user_code,
                "device_code": device_code,
                "verification_uri": uri,
                "expires_in": lifetime,
                "interval": self.settings.device_code_interval,
                "message": (
                    f"To sign in, use a web browser to open the page {uri} and enter the code "
                    f"{user_code} to authenticate."
                ),
            }
        )

    def _new_user_code(self) -> str:
        known = {entry.user_code for entry in self._device_codes.values()}
        while True:
            code = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(9))
            if code not in known:
                return code

    def _device_code_by_user_code(self, user_code: str) -> _DeviceCode | None:
        wanted = re.sub(r"[\s-]", "", user_code).upper()
        for entry in self._device_codes.values():
            if entry.user_code == wanted:
                return entry
        return None

    def _pending_device_code(self, user_code: str) -> _DeviceCode:
        entry = self._device_code_by_user_code(user_code)
        if entry is None:
            raise IdentityError(f"no device code {user_code!r}")
        if entry.status != "pending" or self._now() >= entry.expires_at:
            raise IdentityError(f"device code {user_code!r} is {entry.status}, not pending")
        return entry

    def _approve(self, entry: _DeviceCode, mbx: MailboxSettings) -> None:
        app = self.settings.app(entry.client_id)
        try:
            if app is None:
                raise aadsts.app_not_found(entry.client_id, self.settings.tenant_id)
            if mbx.conditional_access_block:
                raise aadsts.blocked_by_conditional_access()
            self._check_consent(app, entry.scopes, error="invalid_grant")
        except AadError as exc:
            entry.status = "failed"
            entry.failure = exc
            entry.user = mbx.address
            self._count(exc)
            raise
        entry.status = "approved"
        entry.user = mbx.address
        entry.mfa = mbx.mfa_required
        entry.auth_time = self._now()
        self.stats.sign_ins += 1

    def _devicelogin(self, request: Request) -> Response:
        action = "/devicelogin"
        if request.method in ("GET", "HEAD"):
            return Response.html(
                pages.device_code_page(action=action, code=request.query.get("otc", ""))
            )
        if request.method != "POST":
            return Response(405, b"", headers=[("Allow", "GET, POST")])
        form = request.form()
        otc, login = form.get("otc", "").strip(), form.get("login", "").strip()

        def again(message: str, exc: AadError | None = None) -> Response:
            if exc is not None:
                self._count(exc)
            page = pages.device_code_page(
                action=action,
                code=otc,
                login=login,
                message=message,
                code_text=exc.description if exc is not None else None,
            )
            return Response.html(page, 400 if exc is not None else 200)

        entry = self._device_code_by_user_code(otc) if otc else None
        if entry is None or entry.status != "pending":
            return again(
                "That code didn't work. Check the code and try again.",
                aadsts.bad_verification_code(),
            )
        if self._now() >= entry.expires_at:
            return again(
                "The code you entered has expired. Get a new code from the device you're trying "
                "to sign in to and try again.",
                aadsts.device_code_expired(),
            )
        app = self.settings.app(entry.client_id)
        app_name = app.display_name if app is not None else entry.client_id
        if form.get("action") == "cancel":
            entry.status = "declined"
            return Response.html(pages.device_code_done_page(app_name, declined=True))
        mbx, problem = self._check_credentials(login, form.get("passwd", ""))
        if problem is not None:
            return again(*problem)
        assert mbx is not None
        try:
            self._approve(entry, mbx)
        except AadError as exc:
            page = pages.device_code_page(
                action=action,
                code=otc,
                login=login,
                message="You cannot access this right now.",
                code_text=exc.description,
            )
            return Response.html(page, 400)
        return Response.html(pages.device_code_done_page(app_name))

    def _check_credentials(
        self, login: str, password: str
    ) -> tuple[MailboxSettings | None, tuple[str, AadError | None] | None]:
        """The user behind a sign-in form, or (message, error) to show on the form again."""
        if not login:
            return None, ("Enter a valid email address, phone number, or Skype name.", None)
        mbx = self.settings.mailbox(login)
        if mbx is None:
            return None, (
                "This username may be incorrect. Make sure you typed it correctly. Otherwise, "
                "contact your admin.",
                aadsts.user_not_found(self.settings.tenant_id),
            )
        if mbx.shared:
            return None, (
                "Your account has been disabled. Contact your admin.",
                aadsts.user_disabled(),
            )
        if not mbx.password or not hmac.compare_digest(password.encode(), mbx.password.encode()):
            return None, (
                "Your account or password is incorrect. If you don't remember your password, "
                "reset it now.",
                aadsts.invalid_password(),
            )
        return mbx, None

    # -------------------------------------------------------------- authorize

    def _authorize(self, request: Request, tenant: str) -> Response:
        params = request.form() if request.method == "POST" else dict(request.query)
        if request.method != "POST":
            self.stats.authorize_requests += 1
        try:
            app, redirect_uri = self._authorize_client(params)
        except AadError as exc:
            return self._error_page(exc, request)
        mode = params.get("response_mode") or "query"
        state = params.get("state")

        def back(fields: dict[str, str]) -> Response:
            if state is not None:
                fields["state"] = state
            if mode == "form_post":
                return Response.html(pages.form_post_page(redirect_uri, fields))
            if mode == "fragment":
                return Response.redirect(f"{redirect_uri}#{urlencode(fields)}")
            sep = "&" if "?" in redirect_uri else "?"
            return Response.redirect(f"{redirect_uri}{sep}{urlencode(fields)}")

        def fail(exc: AadError, error: str | None = None) -> Response:
            self._count(exc)
            text, *_ = self._long_description(exc, request)
            return back(
                {
                    "error": error or exc.error,
                    "error_description": text,
                    "error_uri": f"{self._base(request)}/error?code={exc.code}",
                }
            )

        try:
            response_type = params.get("response_type")
            if not response_type:
                raise aadsts.missing_parameter("response_type")
            if response_type != "code":
                raise aadsts.response_type_not_enabled(response_type)
            scopes = parse_scopes(params.get("scope"), self.settings.tenant_id)
            challenge = params.get("code_challenge")
            method = params.get("code_challenge_method") or ("plain" if challenge else None)
            if challenge is not None:
                if method not in ("S256", "plain"):
                    raise aadsts.pkce_method_invalid()
                if not 43 <= len(challenge) <= 128:
                    raise aadsts.pkce_challenge_size()
            if params.get("prompt") == "none":
                raise aadsts.silent_sign_in_without_session()
        except AadError as exc:
            return fail(exc)

        hidden = {k: v for k, v in params.items() if k not in ("login", "passwd")}
        path = f"/{tenant}/oauth2/v2.0/authorize"
        if request.method != "POST":
            page = pages.sign_in_page(
                action=path,
                hidden=hidden,
                app_name=app.display_name,
                login=params.get("login_hint", ""),
            )
            return Response.html(page)

        login = params.get("login", "").strip()
        mbx, problem = self._check_credentials(login, params.get("passwd", ""))
        if problem is not None:
            message, shown = problem
            if shown is not None:
                self._count(shown)
            page = pages.sign_in_page(
                action=path,
                hidden=hidden,
                app_name=app.display_name,
                login=login,
                message=message,
                code_text=shown.description if shown is not None else None,
            )
            return Response.html(page)
        assert mbx is not None
        try:
            if mbx.conditional_access_block:
                return fail(aadsts.blocked_by_conditional_access(), "access_denied")
            self._check_consent(app, scopes, error="consent_required")
        except AadError as exc:
            return fail(exc)
        now = self._now()
        code = secrets.token_urlsafe(64)
        self._codes = {k: v for k, v in self._codes.items() if v.expires_at > now}
        self._codes[code] = _AuthCode(
            client_id=app.app_id,
            redirect_uri=redirect_uri,
            scope=scopes.text,
            user=mbx.address,
            challenge=challenge,
            method=method,
            nonce=params.get("nonce"),
            mfa=mbx.mfa_required,
            auth_time=now,
            expires_at=now + self.settings.authorization_code_lifetime,
        )
        self.stats.sign_ins += 1
        return back({"code": code, "session_state": str(uuid.uuid4())})

    def _authorize_client(self, params: Mapping[str, str]) -> tuple[AppSettings, str]:
        client_id = params.get("client_id")
        if not client_id:
            raise aadsts.missing_parameter("client_id")
        app = self.settings.app(client_id)
        if app is None:
            raise aadsts.app_not_found(client_id, self.settings.tenant_id)
        redirect_uri = params.get("redirect_uri")
        if not redirect_uri:
            if not app.redirect_uris:
                raise aadsts.no_redirect_uri(app.app_id)
            return app, app.redirect_uris[0]
        if not _redirect_allowed(app, redirect_uri):
            raise aadsts.redirect_uri_mismatch(redirect_uri, app.app_id)
        return app, redirect_uri
