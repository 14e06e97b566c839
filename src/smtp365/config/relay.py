"""The ``[relay]`` section of ``smtp365.toml``: listeners, who may relay, routes, budgets.

Only data lives here; :mod:`smtp365.relay.service` turns it into running parts. Every key
has a default, so ``smtp365 relay`` starts with no ``[relay]`` table at all: one plain
listener on 127.0.0.1:2525 for this host only, everything sent through the default account.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["BudgetConfig", "ListenerSettings", "NetworkSettings", "RelayConfig", "RouteSettings"]

_STRICT = ConfigDict(extra="forbid")


class ListenerSettings(BaseModel):
    """One ``[[relay.listeners]]`` entry: an address, a port and a TLS mode."""

    model_config = _STRICT

    host: str = "127.0.0.1"
    port: int = Field(default=2525, ge=0, le=65535)
    mode: Literal["plain", "starttls", "tls"] = "plain"
    # PEM files; when a TLS mode has none, a self-signed pair is made on first start
    cert_file: Path | None = None
    key_file: Path | None = None
    max_message_size: int = Field(default=36_700_160, ge=1024)  # 35 MiB, Exchange's own limit
    max_recipients: int = Field(default=1000, ge=1)
    bare_newline: Literal["reject", "normalize"] = "reject"
    session_timeout: float = Field(default=300.0, gt=0)
    auth_attempts: int = Field(default=3, ge=1)  # per connection, then 421
    auth_failures_per_minute: int = Field(default=10, ge=1, le=32)  # per client address, then 421
    max_connections_per_client: int = Field(default=50, ge=1)  # at once, per address
    # [[relay.networks]] (by name, or CIDR when unnamed) whose hosts may AUTH on this listener
    # before TLS: legacy devices that can do AUTH but not STARTTLS. The password crosses the
    # network in clear.
    plain_auth_networks: list[str] = Field(default_factory=list)

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            if value in ("ssl", "implicit", "smtps"):
                return "tls"
        return value


class NetworkSettings(BaseModel):
    """``[[relay.networks]]``: hosts that may relay without AUTH (a CIDR allowlist)."""

    model_config = _STRICT

    cidr: str
    name: str = ""
    senders: list[str] = Field(default_factory=lambda: ["*"])

    @field_validator("cidr")
    @classmethod
    def _cidr(cls, value: str) -> str:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP network (e.g. 192.168.10.0/24)") from None
        return value


class RouteSettings(BaseModel):
    """``[[relay.routes]]``: which account sends what, optionally as the account's mailbox.

    A route matches on the envelope sender (``user@domain``, ``*@domain`` or ``*``) and/or
    the client (a relay user name, or a network's name); the first match wins.
    """

    model_config = _STRICT

    sender: str | None = None
    client: str | None = None
    account: str
    # Send as the account's mailbox; the original sender is kept in Reply-To.
    rewrite_sender: bool = False

    @model_validator(mode="after")
    def _matches_something(self) -> RouteSettings:
        if self.sender is None and self.client is None:
            raise ValueError("a route needs sender and/or client to match on")
        return self


class BudgetConfig(BaseModel):
    """Per-mailbox budgets: Exchange Online's limits (exchange-online.md §5)."""

    model_config = _STRICT

    messages_per_minute: int = Field(default=30, ge=1)
    minute: float = Field(default=60.0, gt=0)  # the window of messages_per_minute, seconds
    recipients_per_day: int = Field(default=10_000, ge=1)
    day: float = Field(default=86_400.0, gt=0)  # the window of recipients_per_day, seconds
    connections: int = Field(default=3, ge=1)
    max_recipients_per_message: int = Field(default=500, ge=1)


class RelayConfig(BaseModel):
    """The ``[relay]`` table."""

    model_config = _STRICT

    # queue, spool, users, generated certificate (default: $XDG_STATE_HOME/smtp365/relay)
    state_dir: Path | None = None
    hostname: str | None = None  # the name in the greeting and Received: (default: FQDN)
    account: str | None = None  # the sending account when no route matches (default account)
    postmaster: str | None = None  # the account that sends bounces (default: `account`)
    users_file: Path | None = None  # default: <state_dir>/users.json
    max_queue_lifetime: float = Field(default=5 * 86_400.0, gt=0)  # then a message fails
    retry_base: float = Field(default=60.0, gt=0)  # first retry after about this long
    retry_max: float = Field(default=3600.0, gt=0)  # never wait longer between attempts
    delivery_log_days: float = Field(default=7.0, ge=0)  # keep delivered/failed entries
    max_inflight: int = Field(default=16, ge=1)  # deliveries at once, all accounts
    grace: float = Field(default=30.0, ge=0)  # SIGTERM: finish sessions/deliveries this long
    log_format: Literal["text", "json"] = "text"
    # processes accepting connections (the main one included); 0: one per CPU core
    processes: int = Field(default=0, ge=0, le=64)
    # uvloop where installed (less CPU per message); "asyncio": the standard loop
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    listeners: list[ListenerSettings] = Field(default_factory=lambda: [ListenerSettings()])
    networks: list[NetworkSettings] = Field(
        default_factory=lambda: [
            NetworkSettings(cidr="127.0.0.0/8", name="localhost"),
            NetworkSettings(cidr="::1/128", name="localhost"),
        ]
    )
    routes: list[RouteSettings] = Field(default_factory=list)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)

    @model_validator(mode="after")
    def _ports(self) -> RelayConfig:
        seen: set[tuple[str, int]] = set()
        for listener in self.listeners:
            key = (listener.host, listener.port)
            if listener.port and key in seen:
                raise ValueError(f"two listeners on {listener.host}:{listener.port}")
            seen.add(key)
        if self.retry_max < self.retry_base:
            raise ValueError("retry_max must not be shorter than retry_base")
        names = {n.name or n.cidr for n in self.networks}
        for listener in self.listeners:
            unknown = [name for name in listener.plain_auth_networks if name not in names]
            if unknown:
                raise ValueError(
                    f"listener {listener.host}:{listener.port}: plain_auth_networks names "
                    f"{', '.join(map(repr, unknown))}, which no [[relay.networks]] entry is"
                    f" (known: {', '.join(sorted(names)) or 'none'}); plain AUTH is only for"
                    " allow-listed networks: add the network or fix the name"
                )
        return self

    def resolved_state_dir(self, state_home: Path) -> Path:
        return (self.state_dir or state_home / "relay").expanduser()
