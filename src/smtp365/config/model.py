"""The typed settings model: named sending accounts, each filled in by a profile."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from smtp365.config.relay import RelayConfig
from smtp365.errors import ConfigError


class Profile(StrEnum):
    """Ways to send through Microsoft 365 (exchange-online.md §1)."""

    OFFICE365 = "office365"
    OFFICE365_HVE = "office365-hve"
    DIRECT_SEND = "direct-send"
    RELAY_CONNECTOR = "relay-connector"
    CUSTOM = "custom"


class TLSMode(StrEnum):
    STARTTLS = "starttls"  # plain SMTP, upgraded with STARTTLS (mandatory)
    IMPLICIT = "implicit"  # TLS from the first byte (port 465 style); "ssl" is an alias
    NONE = "none"  # no TLS at all (only for local test servers; never for Microsoft 365)


class AuthMethod(StrEnum):
    XOAUTH2 = "xoauth2"
    LOGIN = "login"
    NONE = "none"


class Flow(StrEnum):
    """How an OAuth2 access token is obtained (auth = "xoauth2")."""

    STATIC = "static"  # a token given in token / token_env / token_file
    CLIENT_CREDENTIALS = "client-credentials"  # app-only: client secret or certificate
    DEVICE_CODE = "device-code"  # delegated: a user signs in on another device
    INTERACTIVE = "interactive"  # delegated: browser sign-in, code + PKCE on localhost


DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"


@dataclass(frozen=True, slots=True)
class ProfileDefaults:
    host: str | None
    port: int
    tls: TLSMode
    auth: AuthMethod
    summary: str


PROFILES: dict[Profile, ProfileDefaults] = {
    Profile.OFFICE365: ProfileDefaults(
        "smtp.office365.com",
        587,
        TLSMode.STARTTLS,
        AuthMethod.XOAUTH2,
        "SMTP AUTH client submission: smtp.office365.com:587, STARTTLS, mailbox credentials",
    ),
    Profile.OFFICE365_HVE: ProfileDefaults(
        "smtp.hve.mx.microsoft",
        587,
        TLSMode.STARTTLS,
        AuthMethod.XOAUTH2,
        "High Volume Email: smtp.hve.mx.microsoft:587, STARTTLS, internal recipients only",
    ),
    Profile.DIRECT_SEND: ProfileDefaults(
        None,
        25,
        TLSMode.STARTTLS,
        AuthMethod.NONE,
        "Direct Send: the tenant MX host on port 25, no authentication, internal recipients only",
    ),
    Profile.RELAY_CONNECTOR: ProfileDefaults(
        None,
        25,
        TLSMode.STARTTLS,
        AuthMethod.NONE,
        "SMTP relay through an inbound connector matched by your static IP or certificate",
    ),
    Profile.CUSTOM: ProfileDefaults(
        None, 587, TLSMode.STARTTLS, AuthMethod.XOAUTH2, "any SMTP server; set every key yourself"
    ),
}

MICROSOFT_PROFILES = (Profile.OFFICE365, Profile.OFFICE365_HVE)

TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")


class Account(BaseModel):
    """One named sending account as written in ``smtp365.toml`` (every key optional)."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False, populate_by_name=True)

    profile: Profile = Profile.OFFICE365
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: TLSMode | None = None
    tls_min_version: str = "1.2"
    ca_file: Path | None = None
    username: str | None = None
    from_address: str | None = None
    auth: AuthMethod | None = None
    password: SecretStr | None = None
    password_env: str | None = None
    password_file: Path | None = None
    token: SecretStr | None = None
    token_env: str | None = None
    token_file: Path | None = None
    timeout: float = Field(default=60.0, gt=0)
    ehlo_name: str | None = None
    # OAuth2 through MSAL
    flow: Flow | None = None
    tenant: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    client_secret_env: str | None = None
    client_secret_file: Path | None = None
    certificate_file: Path | None = None
    private_key_file: Path | None = None
    authority_host: str = DEFAULT_AUTHORITY_HOST
    token_cache: Path | None = None
    cache_key_env: str | None = None
    cache_key_file: Path | None = None
    refresh_window: float = Field(default=300.0, ge=0)

    @field_validator("tls", mode="before")
    @classmethod
    def _ssl_alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            if value in ("ssl", "tls", "implicit-tls", "smtps"):
                return TLSMode.IMPLICIT
        return value

    @field_validator("profile", "auth", "flow", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("tls_min_version", mode="before")
    @classmethod
    def _tls_version(cls, value: Any) -> Any:
        text = str(value).strip().lower().removeprefix("tlsv").removeprefix("tls")
        if text not in TLS_VERSIONS:
            raise ValueError(f"must be one of {', '.join(TLS_VERSIONS)} (got {value!r})")
        return text


class Settings(BaseModel):
    """The whole configuration file."""

    model_config = ConfigDict(extra="forbid")

    default_account: str = "default"
    accounts: dict[str, Account] = Field(default_factory=dict)
    relay: RelayConfig = Field(default_factory=RelayConfig)
    source: str = Field(default="(defaults)", exclude=True)
    # where per-account state (token caches) lives; set by the loader from XDG_STATE_HOME
    state_home: Path = Field(default=Path("~/.local/state/smtp365"), exclude=True)
    # account name -> secret keys ("password", "token") written inline in the file
    inline_secrets: dict[str, list[str]] = Field(default_factory=dict, exclude=True)

    def account(self, name: str | None = None) -> AccountSettings:
        """The resolved settings of account ``name`` (the default account when ``None``)."""
        wanted = name or self.default_account
        if wanted not in self.accounts:
            if name is None and not self.accounts:
                return resolve("default", Account(), self.source, self.state_home)
            known = ", ".join(sorted(self.accounts)) or "none"
            raise ConfigError(
                f"no account named {wanted!r} in {self.source} (accounts: {known})",
                fix=f"add an [accounts.{wanted}] table, or pick one of: {known}",
            )
        return resolve(wanted, self.accounts[wanted], self.source, self.state_home)


@dataclass(frozen=True, slots=True)
class AccountSettings:
    """An account with its profile's defaults applied: what transports and checks consume.

    Secrets are not read here; :meth:`password_value` / :meth:`token_value`
    read them when needed, so a missing secret only matters to whoever uses it.
    """

    name: str
    profile: Profile
    host: str
    port: int
    tls: TLSMode
    tls_min_version: str
    ca_file: Path | None
    username: str | None
    from_address: str | None
    auth: AuthMethod
    timeout: float
    ehlo_name: str | None
    raw: Account
    source: str
    flow: Flow
    tenant: str | None
    client_id: str | None
    authority_host: str
    token_cache: Path
    refresh_window: float

    @property
    def sender(self) -> str | None:
        """The address mail is sent from by default: ``from_address``, else the mailbox."""
        return self.from_address or self.username

    def password_value(self) -> str:
        return _secret(self, "password")

    def token_value(self) -> str:
        return _secret(self, "token")

    def client_secret_value(self) -> str:
        return _secret(self, "client_secret")

    def cache_key_value(self) -> str | None:
        """The token cache encryption key, or ``None`` when the cache is not encrypted."""
        if not (self.raw.cache_key_env or self.raw.cache_key_file):
            return None
        return _secret(self, "cache_key")

    @property
    def authority(self) -> str:
        return f"{self.authority_host.rstrip('/')}/{self.tenant or 'organizations'}"

    def has_secret(self, kind: str) -> bool:
        raw = self.raw
        return any(getattr(raw, attr) is not None for attr in (kind, f"{kind}_env", f"{kind}_file"))


def _flow(account: Account) -> Flow:
    if account.flow is not None:
        return account.flow
    if any(getattr(account, k) is not None for k in ("token", "token_env", "token_file")):
        return Flow.STATIC
    if account.certificate_file is not None or any(
        getattr(account, k) is not None
        for k in ("client_secret", "client_secret_env", "client_secret_file")
    ):
        return Flow.CLIENT_CREDENTIALS
    if account.client_id:
        return Flow.DEVICE_CODE
    return Flow.STATIC


def resolve(
    name: str,
    account: Account,
    source: str,
    state_home: Path = Path("~/.local/state/smtp365"),
) -> AccountSettings:
    defaults = PROFILES[account.profile]
    host = account.host or defaults.host
    if not host:
        raise ConfigError(
            f"account {name!r} (profile {account.profile.value}) has no host",
            fix=(
                "set host to your tenant's MX host, e.g. host = "
                '"contoso-com.mail.protection.outlook.com" (see: Resolve-DnsName -Type MX '
                "<your domain>)"
                if account.profile in (Profile.DIRECT_SEND, Profile.RELAY_CONNECTOR)
                else 'set host = "smtp.example.com"'
            ),
        )
    return AccountSettings(
        name=name,
        profile=account.profile,
        host=host,
        port=account.port or defaults.port,
        tls=account.tls or defaults.tls,
        tls_min_version=account.tls_min_version,
        ca_file=account.ca_file,
        username=account.username,
        from_address=account.from_address,
        auth=account.auth or defaults.auth,
        timeout=account.timeout,
        ehlo_name=account.ehlo_name,
        raw=account,
        source=source,
        flow=_flow(account),
        tenant=account.tenant,
        client_id=account.client_id,
        authority_host=account.authority_host,
        token_cache=(account.token_cache or state_home / "tokens" / f"{name}.json").expanduser(),
        refresh_window=account.refresh_window,
    )


def _secret(account: AccountSettings, kind: str) -> str:
    raw = account.raw
    inline: SecretStr | None = getattr(raw, kind, None)  # cache_key has no inline form
    env_name: str | None = getattr(raw, f"{kind}_env")
    file_path: Path | None = getattr(raw, f"{kind}_file")
    if inline is not None:
        return inline.get_secret_value()
    if env_name:
        value = os.environ.get(env_name)
        if not value:
            raise ConfigError(
                f"account {account.name!r}: {kind}_env names ${env_name}, which is not set",
                fix=f"export {env_name}=... before running smtp365",
            )
        return value
    if file_path:
        try:
            value = file_path.expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"account {account.name!r}: cannot read {kind}_file {file_path}: "
                f"{exc.strerror or exc}",
                fix=f"check that {file_path} exists and is readable by this user",
            ) from None
        if not value:
            raise ConfigError(
                f"account {account.name!r}: {kind}_file {file_path} is empty",
                fix=f"write the {kind} into {file_path} (one line), or point {kind}_file elsewhere",
            )
        return value
    if kind == "client_secret":
        raise ConfigError(
            f"account {account.name!r} uses the client-credentials flow but has no client secret",
            fix="set client_secret_env or client_secret_file, or certificate_file + "
            "private_key_file for certificate credentials",
        )
    raise ConfigError(
        f"account {account.name!r} uses auth = {account.auth.value!r} but has no {kind}",
        fix=f"set {kind}_env (an environment variable) or {kind}_file (a file readable only by "
        f"you), or SMTP365_{kind.upper()}",
    )


def file_is_private(path: Path) -> bool:
    """True when ``path`` is not readable by group or others."""
    try:
        mode = path.expanduser().stat().st_mode
    except OSError:
        return True
    return not mode & (stat.S_IRGRP | stat.S_IROTH)
