"""``smtp365 config check``: the mistakes people make with Office 365 settings, explained."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from smtp365.config.model import (
    MICROSOFT_PROFILES,
    AccountSettings,
    AuthMethod,
    Flow,
    Profile,
    Settings,
    TLSMode,
    file_is_private,
)
from smtp365.errors import ConfigError


class Level(StrEnum):
    ERROR = "error"  # sending will fail
    WARNING = "warning"  # sending may fail or is unsafe
    OK = "ok"


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    code: str  # stable identifier, e.g. "username-not-upn"
    what: str
    why: str
    fix: str

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level"] = self.level.value
        return d


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _addr_domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def check(settings: Settings, account: str | None = None) -> list[Finding]:
    """Every problem found in ``account``; an empty list means nothing to report."""
    try:
        acc = settings.account(account)
    except ConfigError as exc:
        return [Finding(Level.ERROR, "account", exc.what, "the account cannot be used", exc.fix)]
    return list(_rules(acc, settings.inline_secrets.get(acc.name, ())))


def check_account(acc: AccountSettings, secrets_in_file: Any = ()) -> list[Finding]:
    """The findings for an already resolved account."""
    return list(_rules(acc, secrets_in_file))


def _rules(acc: AccountSettings, secrets_in_file: Any) -> Any:
    ms = acc.profile in MICROSOFT_PROFILES
    E, W = Level.ERROR, Level.WARNING

    if ms and (acc.tls is TLSMode.IMPLICIT or acc.port == 465):
        if acc.port == 587 and acc.tls is TLSMode.IMPLICIT:
            yield Finding(
                E,
                "ssl-on-587",
                'tls = "implicit" ("SSL") is set on port 587',
                "port 587 speaks plain SMTP first and upgrades with STARTTLS; a client that "
                "starts with a TLS handshake gets no answer it understands and times out",
                'set tls = "starttls" (the default) and keep port = 587',
            )
        else:
            yield Finding(
                E,
                "implicit-tls",
                f"implicit TLS / port {acc.port} is configured for {acc.host}",
                "Microsoft 365 does not serve implicit TLS (port 465) for SMTP AUTH client "
                "submission: only port 587 (or 25) with STARTTLS",
                'set port = 587 and tls = "starttls"; a device that can only do port 465 '
                "should send through `smtp365 relay`",
            )
    elif acc.tls is TLSMode.IMPLICIT and acc.port == 587:
        yield Finding(
            E,
            "ssl-on-587",
            'tls = "implicit" ("SSL") is set on port 587',
            "port 587 is the submission port: plain SMTP upgraded with STARTTLS",
            'set tls = "starttls", or port = 465 if the server really speaks implicit TLS',
        )

    if acc.tls is TLSMode.NONE and (ms or acc.auth is not AuthMethod.NONE):
        local = acc.host.lower() == "localhost" or acc.host.startswith("127.")
        yield Finding(
            W if local and not ms else E,
            "no-tls",
            'tls = "none"' + (" for Microsoft 365" if ms else " with authentication"),
            "credentials would cross the network in clear (smtp365 refuses that except to "
            "localhost); Exchange Online offers AUTH only after STARTTLS, so every send fails "
            "with 530 5.7.57",
            'set tls = "starttls"',
        )

    if acc.tls_min_version in ("1.0", "1.1"):
        yield Finding(
            E if ms else W,
            "tls-too-old",
            f"tls_min_version = {acc.tls_min_version!r}",
            "TLS 1.0 and 1.1 are broken and Exchange Online refuses them "
            "(421 4.7.66 TLS 1.0 and 1.1 are not supported)",
            'set tls_min_version = "1.2" (the default)',
        )

    if ms and _is_ip(acc.host):
        yield Finding(
            W,
            "host-is-ip",
            f"host is the IP address {acc.host}",
            "Microsoft's addresses change and the certificate names smtp.office365.com, so an "
            "IP fails certificate verification or stops working one day",
            'set host = "smtp.office365.com"',
        )

    if acc.auth is not AuthMethod.NONE:
        if not acc.username:
            yield Finding(
                E,
                "no-username",
                "no username is set",
                "SMTP AUTH signs in as a mailbox; without one nothing can be sent",
                'set username = "mailbox@yourdomain.com" (or SMTP365_USERNAME)',
            )
        elif "@" not in acc.username:
            yield Finding(
                E if ms else W,
                "username-not-upn",
                f"username {acc.username!r} is not a full address",
                "Exchange Online signs in with the mailbox's full address (its UPN), e.g. "
                "reports@contoso.com, not a short name or DOMAIN\\user",
                f'set username = "{acc.username.split(chr(92))[-1]}@<your domain>"',
            )

    if acc.auth is AuthMethod.LOGIN:
        if not acc.has_secret("password"):
            yield Finding(
                E,
                "no-password",
                'auth = "login" but no password is configured',
                "AUTH LOGIN needs the mailbox password",
                "set password_env or password_file (or SMTP365_PASSWORD)",
            )
        if ms:
            yield Finding(
                W,
                "basic-auth",
                'auth = "login" uses Basic authentication',
                "Microsoft is retiring Basic authentication for SMTP AUTH: it is disabled by "
                "default from the end of 2026 and will be removed (550 5.7.30); many tenants "
                "already block it (535 5.7.139)",
                'move to OAuth2: auth = "xoauth2" (docs/authentication.md)',
            )
    if acc.auth is AuthMethod.XOAUTH2:
        yield from _oauth_rules(acc)

    for kind in ("password", "token", "client_secret"):
        if kind in secrets_in_file:
            yield Finding(
                W,
                f"{kind.replace('_', '-')}-in-file",
                f"the {kind} is written in the config file {acc.source}",
                "a config file is easily copied, shared or committed",
                f"move it to {kind}_env or {kind}_file",
            )
        secret_file = getattr(acc.raw, f"{kind}_file")
        if secret_file is not None and not secret_file.expanduser().is_file():
            yield Finding(
                E,
                f"{kind.replace('_', '-')}-file-missing",
                f"{kind}_file {secret_file} does not exist",
                f"the {kind} cannot be read, so authentication will fail",
                f"create {secret_file} (mode 600) or point {kind}_file elsewhere",
            )
        elif secret_file is not None and not file_is_private(secret_file):
            yield Finding(
                W,
                f"{kind.replace('_', '-')}-file-readable",
                f"{kind}_file {secret_file} is readable by other users",
                "anyone on this machine could read the secret",
                f"chmod 600 {secret_file}",
            )

    if acc.ca_file is not None and not acc.ca_file.expanduser().is_file():
        yield Finding(
            E,
            "ca-file-missing",
            f"ca_file {acc.ca_file} does not exist",
            "the extra CA certificate cannot be loaded, so TLS cannot start",
            "point ca_file at a PEM file, or remove the key",
        )

    if acc.from_address and acc.username and acc.from_address.lower() != acc.username.lower():
        yield Finding(
            W,
            "from-not-mailbox",
            f"from_address {acc.from_address} differs from the mailbox {acc.username}",
            "Exchange Online sends as the signed-in mailbox; another From needs SendAs "
            "permission, else 550 5.7.60 or 554 5.2.252 SendAsDenied",
            f"grant it: Add-RecipientPermission -Identity {acc.from_address} "
            f"-Trustee {acc.username} -AccessRights SendAs; or send from {acc.username}",
        )

    if acc.profile is Profile.DIRECT_SEND:
        if acc.auth is not AuthMethod.NONE:
            yield Finding(
                W,
                "direct-send-auth",
                "Direct Send is configured with authentication",
                "Direct Send is anonymous delivery to your tenant's MX host",
                'set auth = "none", or use profile = "office365" for authenticated submission',
            )
        if not acc.host.lower().endswith(".mail.protection.outlook.com"):
            yield Finding(
                W,
                "direct-send-host",
                f"host {acc.host} is not a *.mail.protection.outlook.com MX host",
                "Direct Send goes to the tenant's MX endpoint, e.g. "
                "contoso-com.mail.protection.outlook.com",
                "set host to the MX record of your domain",
            )
        if acc.sender and acc.username and _addr_domain(acc.sender) != _addr_domain(acc.username):
            yield Finding(
                W,
                "direct-send-external",
                "Direct Send delivers only to your own tenant's recipients",
                "mail to external domains is refused (5.7.1 Unable to relay)",
                'use profile = "office365" or "relay-connector" for external recipients',
            )


def _oauth_rules(acc: AccountSettings) -> Any:
    E = Level.ERROR
    if acc.flow is Flow.STATIC:
        if not acc.has_secret("token"):
            yield Finding(
                E,
                "no-token",
                'auth = "xoauth2" but no access token source is configured',
                "XOAUTH2 needs an OAuth2 access token for https://outlook.office365.com",
                "set client_id (and tenant) to let smtp365 get tokens through MSAL "
                "(docs/authentication.md), or token_env / token_file (or SMTP365_TOKEN)",
            )
        return
    if not acc.client_id:
        yield Finding(
            E,
            "no-client-id",
            f"flow = {acc.flow.value!r} but no client_id is set",
            "MSAL signs in as an app registration, named by its Application (client) ID",
            "set client_id to the app registration's Application (client) ID",
        )
    if acc.flow is Flow.CLIENT_CREDENTIALS:
        if not acc.tenant or acc.tenant.lower() in ("common", "organizations", "consumers"):
            yield Finding(
                E,
                "no-tenant",
                "the client-credentials flow needs a specific tenant",
                "an app-only token is issued by one tenant: /common or /organizations cannot",
                "set tenant to your tenant id or domain (e.g. contoso.onmicrosoft.com)",
            )
        has_cert = acc.raw.certificate_file is not None
        if not has_cert and not acc.has_secret("client_secret"):
            yield Finding(
                E,
                "no-client-credential",
                "the client-credentials flow has neither a client secret nor a certificate",
                "the app must prove who it is",
                "set client_secret_env / client_secret_file, or certificate_file + "
                "private_key_file",
            )
        for key in ("certificate_file", "private_key_file"):
            path = getattr(acc.raw, key)
            if path is not None and not path.expanduser().is_file():
                yield Finding(
                    E,
                    f"{key.replace('_', '-')}-missing",
                    f"{key} {path} does not exist",
                    "the certificate credential cannot be loaded",
                    f"point {key} at a PEM file",
                )
