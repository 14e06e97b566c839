"""Typed configuration of the sandbox, loadable from an optional TOML file.

Example (every key is optional)::

    tenant_id = "5f0a3c1e-2b7d-4e9a-8c6f-1d2e3f4a5b6c"
    smtp_auth_enabled = true          # Set-TransportConfig -SmtpClientAuthenticationDisabled
    send_as_check = "data"            # or "mail"

    [limits]
    messages_per_minute = 30

    [[mailboxes]]
    address = "alice@contoso.test"
    send_as = ["noreply@contoso.test"]

    [faults.mail]
    reply = "451 4.7.500 Access denied, please try again later"
    probability = 0.2

    # The identity platform (Microsoft Entra ID look-alike) and its app registrations
    identity_port = 0                 # 0: any free port
    access_token_lifetime = 3600      # seconds
    refresh_token_lifetime = 7776000  # 90 days
    device_code_interval = 5          # seconds between polls the client is told to keep

    [[apps]]
    app_id = "3c1a4f9e-0d2b-4e8f-9a6c-5b7d8e9f0a1b"
    display_name = "Scanner relay"
    certificates = ["certs/scanner.pem"]     # relative to this file
    app_permissions = ["SMTP.SendAsApp"]     # application permissions, admin-consented
    delegated_permissions = []

    [[apps]]
    app_id = "6f2e8d4c-1a3b-4c5d-8e9f-0a1b2c3d4e5f"
    public_client = true
    redirect_uris = ["http://localhost"]     # any port, as Entra ID allows for loopback
    delegated_permissions = ["SMTP.Send"]

Passwords and client secrets left empty are generated at first start and kept in
``state_dir/secrets.json`` (see :func:`resolve_secrets`); a confidential app whose
``certificates`` is left unset gets a generated certificate in the state directory.
Settings objects are mutable: the running sandbox reads them at every check, so a
test may flip ``settings.smtp_auth_enabled`` or a mailbox flag while it runs.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tomllib
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DEFAULT_APP_ID",
    "DEFAULT_PUBLIC_APP_ID",
    "DEFAULT_TENANT_ID",
    "FAULT_REPLIES",
    "AppSettings",
    "FaultRule",
    "FaultSettings",
    "LimitSettings",
    "MailboxSettings",
    "SandboxSettings",
    "Stage",
    "STAGES",
    "resolve_secrets",
    "stable_uuid",
]

Stage = Literal["greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data"]
STAGES: tuple[Stage, ...] = ("greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data")

DEFAULT_TENANT_ID = "5f0a3c1e-2b7d-4e9a-8c6f-1d2e3f4a5b6c"
DEFAULT_APP_ID = "9e5f94bc-e8a4-4e73-b8be-63364c29d753"
DEFAULT_PUBLIC_APP_ID = "4b8e2d1f-7c3a-4f6e-9d0b-2a5c8e1f3d7a"
DEFAULT_DOMAIN = "contoso.test"
DEFAULT_HOSTNAME = "SBX0P365CA0001.outlook.sandbox.test"
SECRETS_FILE = "secrets.json"

_REPLY = re.compile(r"^[2-5]\d\d[ -]")
_NAMESPACE = uuid.UUID("0f4b8b7e-6f0a-4d55-9a39-3b2a1c5e7d90")


def stable_uuid(*parts: str) -> str:
    """A deterministic UUID for sandbox object ids (users' ``oid``, service principals)."""
    return str(uuid.uuid5(_NAMESPACE, "/".join(p.lower() for p in parts)))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class MailboxSettings(_Model):
    """One Exchange Online mailbox (``Set-CASMailbox`` and permission switches)."""

    address: str
    display_name: str = ""
    password: str | None = None
    """``None``: generated at first start and persisted. Ignored for shared mailboxes."""
    shared: bool = False
    """A shared mailbox has no sign-in: AUTH LOGIN always fails, XOAUTH2 works through
    a user with ``full_access`` or an app in ``allowed_apps``."""
    smtp_auth_enabled: bool | None = None
    """``Set-CASMailbox -SmtpClientAuthenticationDisabled``; ``None`` follows the tenant."""
    basic_auth_enabled: bool = True
    """``False``: an authentication policy blocks Basic (AUTH LOGIN)."""
    conditional_access_block: bool = False
    """A Conditional Access policy blocks this user: legacy sign-ins (AUTH LOGIN) fail with
    ``535 5.7.139``, and the identity platform issues no token (AADSTS53003)."""
    mfa_required: bool = False
    """A Conditional Access policy requires MFA: interactive sign-ins (authorization code,
    device code) satisfy it; the password grant, and refresh tokens obtained without MFA,
    fail with AADSTS50076."""
    send_as: list[str] = Field(default_factory=list)
    """Other addresses this mailbox may send as (``Add-RecipientPermission``)."""
    full_access: list[str] = Field(default_factory=list)
    """Users whose delegated token may authenticate as this mailbox (``Add-MailboxPermission``)."""
    allowed_apps: list[str] | None = None
    """App ids whose app-only token may use this mailbox; ``None``: the sandbox's demo app."""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if value.count("@") != 1 or value.startswith("@") or value.endswith("@"):
            raise ValueError(f"not an email address: {value!r}")
        return value

    def may_send_as(self, address: str) -> bool:
        wanted = address.strip().lower()
        return wanted == self.address.lower() or wanted in {a.lower() for a in self.send_as}


class AppSettings(_Model):
    """An app registration with its Exchange service principal.

    Permission names are short (``SMTP.SendAsApp``, ``Mail.Send``) or qualified with the
    resource (``https://outlook.office365.com/Mail.Send``). Short ``SMTP.*``, ``IMAP.*``,
    ``POP.*``, ``EWS.*`` and ``full_access_as_app`` belong to Office 365 Exchange Online,
    every other short name to Microsoft Graph (as an unqualified scope does in Entra ID).
    """

    app_id: str
    display_name: str = "smtp365 sandbox app"
    client_secret: str | None = None
    """``None``: generated at first start and persisted (confidential apps only)."""
    object_id: str | None = None
    """Object id of the enterprise application (service principal); derived when ``None``."""
    public_client: bool = False
    """A public client (desktop/CLI, "Allow public client flows"): presents no credential."""
    redirect_uris: list[str] = Field(default_factory=list)
    """Registered redirect URIs; for ``http://localhost`` / ``http://127.0.0.1`` the port of
    the request is ignored, as Entra ID does for loopback addresses."""
    certificates: list[str] | None = None
    """PEM certificates whose keys may sign client assertions. ``None``: a confidential app
    gets a generated certificate (``client-cert.pem`` + ``client-key.pem`` for the first app)."""
    app_permissions: list[str] = Field(default_factory=lambda: ["SMTP.SendAsApp", "Mail.Send"])
    """Application permissions with admin consent (the ``roles`` of app-only tokens)."""
    delegated_permissions: list[str] = Field(default_factory=lambda: ["SMTP.Send", "Mail.Send"])
    """Delegated permissions consented for every user of the tenant (the ``scp`` claim)."""

    @field_validator("redirect_uris")
    @classmethod
    def _redirects(cls, value: list[str]) -> list[str]:
        for uri in value:
            if "://" not in uri or uri.startswith("://"):
                raise ValueError(f"redirect URI must be absolute: {uri!r}")
        return value

    @field_validator("app_permissions", "delegated_permissions")
    @classmethod
    def _permissions(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name.strip() or " " in name.strip():
                raise ValueError(f"not a permission name: {name!r}")
        return [name.strip() for name in value]


class LimitSettings(_Model):
    """Per-mailbox limits of Exchange Online (reference §5); windows are configurable."""

    messages_per_minute: int = 30
    rate_window_seconds: float = 60.0
    rate_limit_reply: str = "451 4.7.500 Access denied, please try again later"
    recipients_per_day: int = 10_000
    recipient_window_seconds: float = 86_400.0
    max_connections: int = 3
    max_message_size: int = 157_286_400
    max_recipients_per_message: int = 500

    @field_validator("rate_limit_reply")
    @classmethod
    def _reply(cls, value: str) -> str:
        if not _REPLY.match(value + " ") or not value.startswith(("4", "5")):
            raise ValueError("rate_limit_reply must start with a 4xx or 5xx code")
        return value


FAULT_REPLIES: dict[str, str] = {
    # Continuous error throttling for SMTP AUTH submissions (Microsoft Learn): after
    # repeated errors of one kind the mailbox may not submit for a while; the answer to
    # the submitted message (stage ``data``).
    "throttled-mailbox-full": "550 5.2.251 Sender throttled due to continuous mailbox full errors.",
    "throttled-send-as-denied": (
        "550 5.2.252 Sender throttled due to continuous send as denied errors."
    ),
    "throttled-invalid-license": (
        "550 5.2.253 Sender throttled due to continuous invalid license errors."
    ),
    "throttled-too-many-recipients": (
        "550 5.2.254 Sender throttled due to continuous too many recipients errors."
    ),
    "throttled-invalid-recipients": (
        "550 5.2.255 Sender throttled due to continuous invalid recipients errors."
    ),
    # Basic authentication removed for client submission (reference §4; stage ``auth``).
    "basic-auth-retired": "550 5.7.30 Basic authentication is not supported for Client Submission.",
}
"""Exchange Online replies the sandbox has no state to cause by itself, by name: a fault's
``reply`` may name one instead of spelling it out."""


class FaultRule(_Model):
    """A fault at one stage of the session.

    ``reply`` replaces the server's answer (a ``421`` closes the connection): the reply
    text, or the name of one of :data:`FAULT_REPLIES`, which stands for its text;
    ``drop`` closes the connection instead of answering (for ``data``: in the
    middle of the message, after the first line arrived); ``delay`` waits that
    many seconds before answering. ``late`` (``data`` and ``starttls`` only) moves
    the fault behind the stage's work: at ``data`` the message is stored first, and
    then the ``250`` is delayed, replaced or dropped (the client cannot tell that it
    was delivered); at ``starttls`` (with ``drop``) the ``220`` goes out first, and
    then, after the ``delay``, the connection is dropped where the TLS handshake would
    begin.
    ``probability`` draws from the seeded RNG; ``times`` limits how often the rule
    fires (``None``: forever).
    """

    reply: str | None = None
    drop: bool = False
    delay: float = 0.0
    late: bool = False
    probability: float = Field(default=1.0, ge=0.0, le=1.0)
    times: int | None = Field(default=None, ge=1)

    @field_validator("reply")
    @classmethod
    def _reply(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = FAULT_REPLIES.get(value, value)
        if not _REPLY.match(value + " "):
            raise ValueError(
                "fault reply must start with a three-digit code, e.g. '451 4.7.500 ...', "
                f"or be one of {', '.join(FAULT_REPLIES)}"
            )
        return value


class FaultSettings(_Model):
    """Initial fault rules (one per stage) and the RNG seed."""

    seed: int = 0
    greeting: FaultRule | None = None
    ehlo: FaultRule | None = None
    starttls: FaultRule | None = None
    auth: FaultRule | None = None
    mail: FaultRule | None = None
    rcpt: FaultRule | None = None
    data: FaultRule | None = None

    def rules(self) -> dict[Stage, FaultRule]:
        found: dict[Stage, FaultRule] = {}
        for stage in STAGES:
            rule = getattr(self, stage)
            if isinstance(rule, FaultRule):
                found[stage] = rule
        return found

    @model_validator(mode="after")
    def _late(self) -> FaultSettings:
        for stage, rule in self.rules().items():
            check_late(stage, rule)
        return self


LATE_STAGES: tuple[Stage, ...] = ("starttls", "data")


def check_late(stage: Stage, rule: FaultRule) -> None:
    """``late`` exists for the stages with work before (``data``: storing) or after
    (``starttls``: the handshake) their reply; at ``starttls`` it drops the connection."""
    if rule.late and stage not in LATE_STAGES:
        raise ValueError(f"late faults exist for {' and '.join(LATE_STAGES)} only, not {stage}")
    if rule.late and stage == "starttls" and not rule.drop:
        raise ValueError("a late starttls fault drops the connection: set drop = true")


def _default_mailboxes() -> list[MailboxSettings]:
    return [
        MailboxSettings(
            address=f"alice@{DEFAULT_DOMAIN}",
            display_name="Alice Example",
            send_as=[f"noreply@{DEFAULT_DOMAIN}"],
        ),
        MailboxSettings(address=f"bob@{DEFAULT_DOMAIN}", display_name="Bob Example"),
        MailboxSettings(
            address=f"noreply@{DEFAULT_DOMAIN}",
            display_name="No Reply (shared)",
            shared=True,
            full_access=[f"alice@{DEFAULT_DOMAIN}"],
        ),
    ]


def _default_apps() -> list[AppSettings]:
    return [
        AppSettings(app_id=DEFAULT_APP_ID, redirect_uris=["http://localhost"]),
        AppSettings(
            app_id=DEFAULT_PUBLIC_APP_ID,
            display_name="smtp365 sandbox public client",
            public_client=True,
            redirect_uris=["http://localhost"],
            app_permissions=[],
        ),
    ]


class SandboxSettings(_Model):
    """The whole sandbox: tenant switches, mailboxes, apps, limits and faults."""

    tenant_id: str = DEFAULT_TENANT_ID
    hostname: str = DEFAULT_HOSTNAME
    """Server name shown in the banner, EHLO and ``[Hostname=...]``."""
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 0
    smtp_auth_enabled: bool = True
    """Tenant-wide ``Set-TransportConfig -SmtpClientAuthenticationDisabled`` (inverted)."""
    security_defaults: bool = False
    """Security defaults on: legacy (Basic) sign-ins are refused for every user."""
    send_as_check: Literal["data", "mail"] = "data"
    token_issuer: str | None = None
    """``iss`` of minted tokens; ``None``: ``https://sandbox.smtp365.test/{tenant_id}/v2.0``."""
    token_audience: str = "https://outlook.office365.com"
    idle_timeout: float = 300.0
    identity_enabled: bool = True
    """Serve the identity platform (OIDC discovery, token, authorize, device code) over HTTPS."""
    identity_port: int = 0
    """Port of the identity platform on ``smtp_host``; 0: any free port."""
    access_token_lifetime: int = Field(default=3600, ge=1)
    """Seconds an access token from the identity platform lives (MSAL treats one with less
    than 300 seconds left as expired and refreshes it)."""
    refresh_token_lifetime: int = Field(default=90 * 86_400, ge=0)
    """Seconds a refresh token stays usable (Entra ID: 90 days of inactivity)."""
    authorization_code_lifetime: int = Field(default=600, ge=1)
    device_code_lifetime: int = Field(default=900, ge=1)
    device_code_interval: int = Field(default=5, ge=0)
    """Polling interval announced with a device code (MSAL waits this many seconds)."""
    mailboxes: list[MailboxSettings] = Field(default_factory=_default_mailboxes)
    apps: list[AppSettings] = Field(default_factory=_default_apps)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    faults: FaultSettings = Field(default_factory=FaultSettings)

    @classmethod
    def load(cls, path: Path | str | None = None) -> SandboxSettings:
        """Defaults, overlaid with the TOML file at ``path`` when given."""
        if path is None:
            return cls()
        with Path(path).open("rb") as fh:
            settings = cls.model_validate(tomllib.load(fh))
        base = Path(path).resolve().parent
        for app in settings.apps:
            if app.certificates is not None:
                app.certificates = [str(base / cert) for cert in app.certificates]
        return settings

    @property
    def issuer(self) -> str:
        return self.token_issuer or f"https://sandbox.smtp365.test/{self.tenant_id}/v2.0"

    @property
    def default_app_id(self) -> str:
        return self.apps[0].app_id if self.apps else DEFAULT_APP_ID

    def mailbox(self, address: str) -> MailboxSettings | None:
        wanted = address.strip().lower()
        for mbx in self.mailboxes:
            if mbx.address.lower() == wanted:
                return mbx
        return None

    def app(self, app_id: str) -> AppSettings | None:
        for app in self.apps:
            if app.app_id.lower() == app_id.lower():
                return app
        return None

    @property
    def domains(self) -> list[str]:
        """The tenant's verified domains: those of its mailboxes."""
        found: list[str] = []
        for mbx in self.mailboxes:
            domain = mbx.address.rsplit("@", 1)[1].lower()
            if domain not in found:
                found.append(domain)
        return found

    def smtp_auth_effective(self, mailbox: MailboxSettings) -> bool:
        """The mailbox switch wins over the tenant's, as in Exchange Online."""
        if mailbox.smtp_auth_enabled is not None:
            return mailbox.smtp_auth_enabled
        return self.smtp_auth_enabled

    def apps_for(self, mailbox: MailboxSettings) -> list[str]:
        if mailbox.allowed_apps is not None:
            return mailbox.allowed_apps
        return [self.default_app_id]


def resolve_secrets(settings: SandboxSettings, state_dir: Path) -> SandboxSettings:
    """Fill missing passwords and client secrets, generated once and kept in ``secrets.json``.

    Returns a copy; the file (mode 0600) is rewritten only when something was generated.
    """
    path = Path(state_dir) / SECRETS_FILE
    try:
        stored = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        stored = {}
    if not isinstance(stored, dict):
        stored = {}
    passwords: dict[str, str] = dict(stored.get("mailboxes", {}))
    app_secrets: dict[str, str] = dict(stored.get("apps", {}))
    changed = False

    resolved = settings.model_copy(deep=True)
    for mbx in resolved.mailboxes:
        if mbx.shared or mbx.password is not None:
            continue
        key = mbx.address.lower()
        if key not in passwords:
            passwords[key] = secrets.token_urlsafe(12)
            changed = True
        mbx.password = passwords[key]
    for app in resolved.apps:
        if app.object_id is None:
            app.object_id = stable_uuid(resolved.tenant_id, "sp", app.app_id)
        if app.client_secret is not None or app.public_client:
            continue
        key = app.app_id.lower()
        if key not in app_secrets:
            app_secrets[key] = secrets.token_urlsafe(24)
            changed = True
        app.client_secret = app_secrets[key]

    if changed:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        data = json.dumps({"mailboxes": passwords, "apps": app_secrets}, indent=2)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data + "\n")
        os.replace(tmp, path)
    return resolved
