"""``smtp365 sandbox`` (run the Exchange Online look-alike, read its mail) and ``smtp365 demo``."""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from smtp365 import sandbox
from smtp365.auth.msal_provider import MsalTokenProvider, describe
from smtp365.cli.output import die, fail, out, print_json
from smtp365.client import Mailer
from smtp365.config import Account, AccountSettings
from smtp365.config.model import resolve
from smtp365.errors import Smtp365Error

app = typer.Typer(
    help="A local Exchange Online look-alike: SMTP submission, tokens, captured mail.",
    invoke_without_command=True,
)

StateDir = Annotated[
    Path,
    typer.Option("--state-dir", "-d", help="where the sandbox keeps its CA, keys and mail"),
]


def _info(state_dir: Path) -> dict[str, Any]:
    try:
        return sandbox.read_info(state_dir)
    except (OSError, ValueError, sandbox.SandboxError):
        die(
            f"no sandbox state in {state_dir}",
            fix=f"start one first: smtp365 sandbox --state-dir {state_dir}",
            code=66,
        )


@app.callback()
def run_sandbox(
    ctx: typer.Context,
    state_dir: StateDir = Path(".state/sandbox"),
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="sandbox settings (TOML)")
    ] = None,
    port: Annotated[int, typer.Option(help="SMTP port (0: any free port)")] = 0,
) -> None:
    """Run the sandbox on 127.0.0.1 until SIGTERM/Ctrl-C; DIR/sandbox.json says how to use it."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        settings = sandbox.SandboxSettings.load(config)
    except OSError as exc:
        die(f"cannot read {config}: {exc.strerror or exc}", code=66)
    except ValueError as exc:  # TOML syntax or an unknown/invalid key
        die(f"{config} is not valid sandbox settings: {exc}", fix="see docs/sandbox.md", code=78)
    if port:
        settings = settings.model_copy(update={"smtp_port": port})

    def ready(sb: sandbox.Sandbox) -> None:
        out.print(
            f"sandbox ready: SMTP on {sb.smtp_host}:{sb.smtp_port} (STARTTLS, CA {sb.ca_file})\n"
            f"  identity platform (for MSAL): {sb.authority}\n"
            f"  details: {sb.info_file}\n"
            f"  mailboxes: {', '.join(m.address for m in sb.settings.mailboxes)}\n"
            f'  use it:  eval "$(smtp365 sandbox env --state-dir {state_dir} '
            f'--mailbox {sb.settings.mailboxes[0].address})"\n'
            "  stop with Ctrl-C or SIGTERM"
        )

    try:
        sandbox.run(state_dir, settings, on_ready=ready)
    except OSError as exc:
        die(
            f"the sandbox cannot start: {exc.strerror or exc}",
            fix="choose another --port (0 picks a free one), or check the state directory",
            code=71,
        )


@app.command("messages")
def messages(
    state_dir: StateDir = Path(".state/sandbox"),
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the mail the sandbox accepted."""
    _info(state_dir)
    items = sandbox.list_messages(state_dir)
    if as_json:
        print_json(items)
        return
    if not items:
        out.print("no messages captured yet")
    for m in items:
        rcpts = ", ".join(m.get("rcpt_tos", []))
        out.print(
            f"{m.get('id')}  {m.get('received_at')}  {m.get('mail_from')} -> {rcpts}  "
            f"{m.get('subject')!r}  ({m.get('size')} bytes, {m.get('mechanism')})"
        )


@app.command("token")
def token(
    mailbox: Annotated[str, typer.Option("--mailbox", "-m", help="mailbox address")],
    state_dir: StateDir = Path(".state/sandbox"),
    app_only: Annotated[bool, typer.Option("--app", help="app-only token (roles)")] = False,
    lifetime: Annotated[int, typer.Option(help="seconds")] = 3600,
) -> None:
    """Print an access token for a sandbox mailbox (for scripts and CI)."""
    _info(state_dir)
    typer.echo(_mint(state_dir, mailbox, app_only=app_only, lifetime=lifetime))


def _mint(state_dir: Path, mailbox: str, **kwargs: Any) -> str:
    try:
        return sandbox.mint_token(state_dir, mailbox, **kwargs)
    except (sandbox.SandboxError, sandbox.TokenError) as exc:
        die(str(exc), fix="use one of the mailboxes listed in sandbox.json")


@app.command("env")
def env(
    mailbox: Annotated[str, typer.Option("--mailbox", "-m", help="mailbox address")],
    state_dir: StateDir = Path(".state/sandbox"),
    oauth: Annotated[
        bool,
        typer.Option("--oauth", help="sign in through MSAL as the sandbox app, not a fixed token"),
    ] = False,
) -> None:
    """Print `export SMTP365_*=...` lines that point smtp365 at the running sandbox."""
    info = _info(state_dir)
    values = {
        "SMTP365_PROFILE": "custom",
        "SMTP365_HOST": "localhost",
        "SMTP365_PORT": str(info["smtp"]["port"]),
        "SMTP365_CA_FILE": info["ca_file"],
        "SMTP365_USERNAME": mailbox,
        "SMTP365_AUTH": "xoauth2",
    }
    identity = info.get("identity")
    if oauth and identity:
        app = next(a for a in info["apps"] if not a["public_client"])
        values |= {
            "SMTP365_FLOW": "client-credentials",
            "SMTP365_TENANT": identity["tenant_id"],
            "SMTP365_CLIENT_ID": app["app_id"],
            "SMTP365_CLIENT_SECRET": app["client_secret"],
            "SMTP365_AUTHORITY_HOST": f"https://localhost:{identity['port']}",
        }
    elif oauth:
        die("this sandbox runs without its identity platform (identity_enabled = false)")
    else:
        values["SMTP365_TOKEN"] = _mint(state_dir, mailbox)
    for key, value in values.items():
        typer.echo(f"export {key}={shlex.quote(value)}")


def demo(
    state_dir: StateDir = Path(".state/demo"),
    to: Annotated[str, typer.Option(help="recipient")] = "someone@example.net",
) -> None:
    """Start the sandbox, send a message through STARTTLS + XOAUTH2, show what arrived."""
    try:
        asyncio.run(_demo(state_dir, to))
    except Smtp365Error as exc:
        fail(exc)


def _app_account(sb: sandbox.Sandbox, mailbox: str, state_dir: Path) -> AccountSettings:
    """An account that signs in as the sandbox's confidential app through MSAL."""
    app = next(a for a in sb.info()["apps"] if not a["public_client"])
    return resolve(
        "sandbox",
        Account.model_validate(
            {
                "profile": "custom",
                "host": "localhost",
                "port": sb.smtp_port,
                "ca_file": sb.ca_file,
                "username": mailbox,
                "auth": "xoauth2",
                "tenant": sb.settings.tenant_id,
                "client_id": app["app_id"],
                "client_secret": app["client_secret"],
                "authority_host": f"https://localhost:{sb.identity_port}",
                "token_cache": state_dir / "demo-token-cache.json",
            }
        ),
        "(demo)",
    )


async def _demo(state_dir: Path, to: str) -> None:
    async with sandbox.Sandbox(state_dir) as sb:
        mailbox = sb.settings.mailboxes[0].address
        out.print(
            f"[bold]1.[/] sandbox up: SMTP on 127.0.0.1:{sb.smtp_port} (STARTTLS), identity "
            f"platform {sb.authority}, CA {sb.ca_file}"
        )
        account = _app_account(sb, mailbox, state_dir)
        provider = MsalTokenProvider(account)
        token = await provider.get_token(force_refresh=True)
        info = describe(token, "smtp", mailbox)
        out.print(
            f"[bold]2.[/] MSAL client-credentials token for app {account.client_id}: "
            f"aud {info['audience']}, roles {', '.join(info['permissions'])}, "
            f"expires in {info['expires_in']} s, claims check "
            + ("[green]OK[/]" if info["ok"] else "[red]FAILED[/]")
        )
        async with Mailer(account, token_provider=provider) as mailer:
            outcome = await mailer.send(
                to=to,
                subject="Hello from smtp365",
                text="This message went through STARTTLS (TLS 1.2+) and AUTH XOAUTH2.\n",
            )
            tls = getattr(mailer.transport, "tls_version", None)
        out.print(f"[bold]3.[/] sent {outcome.message_id} over {tls}: [green]{outcome.reply}[/]")
        captured = sb.store.list()
        out.print(f"[bold]4.[/] the sandbox captured {len(captured)} message(s); the last one:")
        last = captured[-1].to_dict()
        for key in (
            "id",
            "mailbox",
            "mechanism",
            "mail_from",
            "rcpt_tos",
            "message_id",
            "subject",
            "tls_version",
            "size",
            "path",
        ):
            out.print(f"     {key:12} {last[key]}")
        out.print("[bold]5.[/] the message as stored:")
        for line in captured[-1].read_bytes().decode("utf-8", "replace").splitlines():
            out.print(f"     | {line}", markup=False)
        out.print(f"see them all: smtp365 sandbox messages --state-dir {state_dir}")
