"""``smtp365 config check|show``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from smtp365.cli import exitcodes
from smtp365.cli.output import Part, fail, print_json, say
from smtp365.cli.send import AccountOpt, ConfigOpt, HostOpt, PortOpt, UserOpt, flag_overrides
from smtp365.config import Level, check, load
from smtp365.errors import ConfigError

app = typer.Typer(help="Validate and show the configuration.", no_args_is_help=True)

_MARK: dict[Level, Part] = {Level.ERROR: ("ERROR", "bold red"), Level.WARNING: ("WARN ", "yellow")}


@app.command("check")
def check_cmd(
    config: ConfigOpt = None,
    account: AccountOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    username: UserOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Find the usual Office 365 mistakes in an account and explain each (exit 78 on errors)."""
    try:
        settings = load(config, account=account, overrides=flag_overrides(host, port, username))
    except ConfigError as exc:
        fail(exc, as_json=as_json)
    name = account or settings.default_account
    findings = check(settings, account)
    errors = [f for f in findings if f.level is Level.ERROR]
    if as_json:
        print_json(
            {
                "source": settings.source,
                "account": name,
                "ok": not errors,
                "findings": [f.as_dict() for f in findings],
            }
        )
    else:
        say("account ", (name, "bold"), f" from {settings.source}")
        if not findings:
            say(("OK", "green"), "  no problems found")
        for f in findings:
            say(_MARK[f.level], f" {f.what}  ", (f"({f.code})", "dim"))
            say(f"       why: {f.why}")
            say(f"       fix: {f.fix}")
    raise typer.Exit(exitcodes.CONFIG if errors else exitcodes.OK)


@app.command("show")
def show_cmd(
    config: ConfigOpt = None,
    account: AccountOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    username: UserOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the resolved account (profile defaults applied; secrets censored)."""
    try:
        settings = load(config, account=account, overrides=flag_overrides(host, port, username))
        acc = settings.account(account)
    except ConfigError as exc:
        fail(exc, as_json=as_json)
    data: dict[str, Any] = {
        "account": acc.name,
        "source": acc.source,
        "profile": acc.profile.value,
        "host": acc.host,
        "port": acc.port,
        "tls": acc.tls.value,
        "tls_min_version": acc.tls_min_version,
        "ca_file": str(acc.ca_file) if acc.ca_file else None,
        "username": acc.username,
        "from_address": acc.sender,
        "auth": acc.auth.value,
        "password": "***" if acc.has_secret("password") else None,
        "token": "***" if acc.has_secret("token") else None,
        "timeout": acc.timeout,
        "flow": acc.flow.value,
        "tenant": acc.tenant,
        "client_id": acc.client_id,
        "client_secret": "***" if acc.has_secret("client_secret") else None,
        "certificate_file": str(acc.raw.certificate_file) if acc.raw.certificate_file else None,
        "authority_host": acc.authority_host,
        "token_cache": str(acc.token_cache),
        "cache_encrypted": bool(acc.raw.cache_key_env or acc.raw.cache_key_file),
        "refresh_window": acc.refresh_window,
    }
    if as_json:
        print_json(data)
    else:
        for key, value in data.items():
            say(f"{key:16} {value if value is not None else '-'}")
