"""``smtp365 auth login|status|token|logout``: OAuth2 through MSAL."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from smtp365.auth.msal_provider import MsalTokenProvider, describe
from smtp365.cli import exitcodes
from smtp365.cli.output import die, fail, print_json, say, tell
from smtp365.cli.send import AccountOpt, ConfigOpt
from smtp365.config import AccountSettings, AuthMethod, Flow, load
from smtp365.config.loader import has_display
from smtp365.errors import Smtp365Error

app = typer.Typer(help="OAuth2 sign-in and tokens (MSAL).", no_args_is_help=True)

GraphOpt = Annotated[bool, typer.Option("--graph", help="a Microsoft Graph token, not SMTP")]


def _provider(config: Any, account: str | None, graph: bool = False) -> MsalTokenProvider:
    try:
        acc = load(config, account=account).account(account)
    except Smtp365Error as exc:
        fail(exc)
    _require_msal(acc)
    try:
        return MsalTokenProvider(acc, target="graph" if graph else "smtp")
    except Smtp365Error as exc:
        fail(exc)


def _require_msal(acc: AccountSettings) -> None:
    if acc.auth is not AuthMethod.XOAUTH2:
        die(
            f"account {acc.name!r} uses auth = {acc.auth.value!r}, not OAuth2",
            fix='set auth = "xoauth2" and client_id (docs/authentication.md)',
            code=exitcodes.CONFIG,
        )
    if acc.flow is Flow.STATIC:
        die(
            f"account {acc.name!r} uses a fixed token (token / token_env / token_file)",
            fix="set client_id (and tenant) so smtp365 can sign in through MSAL",
            code=exitcodes.CONFIG,
        )


def _summary(provider: MsalTokenProvider, token_info: dict[str, Any]) -> dict[str, Any]:
    a = provider.account
    return {
        "account": a.name,
        "flow": a.flow.value,
        "target": provider.target,
        "authority": a.authority,
        "client_id": a.client_id,
        "mailbox": a.username,
        "token_cache": str(a.token_cache),
        "token": token_info,
    }


def _print_summary(data: dict[str, Any]) -> None:
    tok = data["token"]
    say(f"account      {data['account']} ({data['flow']}, {data['target']})")
    say(f"authority    {data['authority']}  client_id {data['client_id']}")
    say(f"token cache  {data['token_cache']}")
    if not tok.get("jwt"):
        say("token        opaque (not a JWT): claims cannot be checked")
        return
    kind = "roles" if tok["app_only"] else "scp"
    say(f"token        for {tok['user'] or 'the app'}, aud {tok['audience']}")
    say(f"             {kind}: {', '.join(tok['permissions']) or '-'}")
    say(f"             expires in {tok['expires_in']} s (source: {tok['source']})")
    if tok["ok"]:
        say("claims check ", ("OK", "green"))
    for p in tok["problems"]:
        say("claims check ", ("FAIL", "bold red"), f" {p['what']}")
        say(f"             fix: {p['fix']}")
    for w in tok["warnings"]:
        say(("warning", "yellow"), f"      {w}")


@app.command("login")
def login(
    config: ConfigOpt = None,
    account: AccountOpt = None,
    browser: Annotated[
        bool, typer.Option("--browser", help="sign in in a browser (code + PKCE)")
    ] = False,
    device_code: Annotated[
        bool, typer.Option("--device-code", help="sign in on another device with a code")
    ] = False,
    graph: GraphOpt = False,
) -> None:
    """Sign in (delegated flows) or fetch a first app-only token (client credentials)."""
    provider = _provider(config, account, graph)
    acc = provider.account
    try:
        if acc.flow is Flow.CLIENT_CREDENTIALS:
            token = provider.get_token_sync(force_refresh=True)
        elif browser or (not device_code and (acc.flow is Flow.INTERACTIVE or has_display())):
            token = provider.login_interactive()
        else:
            token = provider.login_device_code(lambda message: tell(message, multiline=True))
    except Smtp365Error as exc:
        fail(exc)
    say(("signed in", "green"))
    _print_summary(_summary(provider, describe(token, provider.target, acc.username)))


@app.command("status")
def status(
    config: ConfigOpt = None,
    account: AccountOpt = None,
    graph: GraphOpt = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Who is signed in, and the cached token's audience, permissions, expiry and claims
    check. Never asks the identity platform for a token (`auth token` does)."""
    provider = _provider(config, account, graph)
    try:
        token, users = provider.cached()
    except Smtp365Error as exc:
        fail(exc, as_json=as_json)
    if token is None:
        _no_cached_token(provider, users, as_json=as_json)
        return
    info = describe(token, provider.target, provider.account.username)
    data = _summary(provider, info)
    if as_json:
        print_json(data)
    else:
        _print_summary(data)
    if info.get("problems"):
        raise typer.Exit(exitcodes.NOPERM)


def _no_cached_token(provider: MsalTokenProvider, users: list[str], *, as_json: bool) -> None:
    """``auth status`` without a cached access token: signed in (a refresh token), an app
    that gets its token when it sends, or not signed in at all (exit NOPERM)."""
    a = provider.account
    signed_in = provider.app_only or bool(users)
    if as_json:
        print_json({**_summary(provider, {}), "signed_in": signed_in, "users": users})
    else:
        say(f"account      {a.name} ({a.flow.value}, {provider.target})")
        say(f"token cache  {a.token_cache}")
        if users:
            say(f"signed in    {', '.join(users)}; no access token cached: the next send gets one")
        elif provider.app_only:
            say("token        none cached: the app gets one when it sends")
    if provider.app_only or users:
        if not as_json:
            say(f"             (`smtp365 auth token --account {a.name}` gets one now)")
        return
    if not as_json:
        tell(("not signed in", "bold red"), f": run `smtp365 auth login --account {a.name}`")
    raise typer.Exit(exitcodes.NOPERM)


@app.command("token")
def token(
    config: ConfigOpt = None,
    account: AccountOpt = None,
    graph: GraphOpt = False,
) -> None:
    """Print a valid access token on stdout (for scripts). Treat it like a password."""
    provider = _provider(config, account, graph)
    try:
        tok = provider.get_token_sync()
    except Smtp365Error as exc:
        fail(exc)
    tell(
        ("warning:", "yellow"),
        " this is a bearer token: anyone holding it can send as "
        f"{provider.account.username or 'the app'} until it expires; do not log or share it",
    )
    typer.echo(tok.token)


@app.command("logout")
def logout(config: ConfigOpt = None, account: AccountOpt = None) -> None:
    """Forget this account's tokens (deletes its token cache)."""
    provider = _provider(config, account)
    removed = provider.logout()
    say(f"removed {provider.account.token_cache}" if removed else "no tokens were cached")
