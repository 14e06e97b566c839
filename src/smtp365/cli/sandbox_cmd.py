"""``smtp365 sandbox`` (run the Exchange Online look-alike, read its mail) and ``smtp365 demo``."""

from __future__ import annotations

import asyncio
import email.policy
import shlex
import smtplib
import sys
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Annotated, Any

import typer

from smtp365 import sandbox
from smtp365.cli import exitcodes
from smtp365.cli.output import die, fail, print_json, say
from smtp365.config import Settings
from smtp365.errors import Smtp365Error
from smtp365.relay import logs
from smtp365.relay.queue import State
from smtp365.relay.service import RelayService

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
        say(f"sandbox ready: SMTP on {sb.smtp_host}:{sb.smtp_port} (STARTTLS, CA {sb.ca_file})")
        say(f"  identity platform (for MSAL): {sb.authority}")
        say(f"  details: {sb.info_file}")
        say(f"  mailboxes: {', '.join(m.address for m in sb.settings.mailboxes)}")
        say(
            f'  use it:  eval "$(smtp365 sandbox env --state-dir {state_dir} '
            f'--mailbox {sb.settings.mailboxes[0].address})"'
        )
        say("  stop with Ctrl-C or SIGTERM")

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
        say("no messages captured yet")
    for m in items:
        rcpts = ", ".join(m.get("rcpt_tos", []))
        say(
            f"{m.get('id')}  {m.get('received_at')}  {m.get('mail_from')} -> {rcpts}  "
            f"'{m.get('subject')}'  ({m.get('size')} bytes, {m.get('mechanism')})"
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
    if not info.get("running"):  # read_info checks that its process is alive
        when = info.get("stopped_at") or "it was killed"
        die(
            f"the sandbox in {state_dir} is not running (stopped: {when}); its ports are gone",
            fix=f"start it: smtp365 sandbox --state-dir {state_dir}",
            code=exitcodes.UNAVAILABLE,
        )
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
    """Start the sandbox and the relay in front of it, send a message through the relay like a
    legacy device would (plain SMTP, no auth), show where it went."""
    logs.setup("text", stream=sys.stdout)
    try:
        asyncio.run(_demo(state_dir, to))
    except Smtp365Error as exc:
        fail(exc)


def _app_account(sb: sandbox.Sandbox, mailbox: str, state_dir: Path) -> dict[str, Any]:
    """An account that signs in as the sandbox's confidential app through MSAL."""
    app = next(a for a in sb.info()["apps"] if not a["public_client"])
    return {
        "profile": "custom",
        "host": "localhost",
        "port": sb.smtp_port,
        "ca_file": str(sb.ca_file),
        "username": mailbox,
        "auth": "xoauth2",
        "tenant": sb.settings.tenant_id,
        "client_id": app["app_id"],
        "client_secret": app["client_secret"],
        "authority_host": f"https://localhost:{sb.identity_port}",
        "token_cache": str(state_dir / "demo-token-cache.json"),
    }


def _device_send(port: int, sender: str, to: str) -> str:
    """What a scanner does: plain SMTP, HELO, no TLS, no AUTH."""
    msg = EmailMessage()
    msg["From"] = f"Scanner <{sender}>"
    msg["To"] = to
    msg["Subject"] = "Scan from the 3rd floor printer"
    msg["Message-ID"] = make_msgid(domain="printer.local")
    msg.set_content("Your scan is attached (in a real device).\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as device:
        device.helo("printer.local")
        device.sendmail(sender, [to], msg.as_bytes(policy=email.policy.SMTP))
    return str(msg["Message-ID"])


async def _demo(state_dir: Path, to: str) -> None:
    async with sandbox.Sandbox(state_dir) as sb:
        mailbox = sb.settings.mailboxes[0].address
        say(
            ("1.", "bold"),
            " sandbox up (the Exchange Online look-alike): SMTP on "
            f"127.0.0.1:{sb.smtp_port} (STARTTLS), identity platform {sb.authority}",
        )
        settings = Settings.model_validate(
            {
                "default_account": "sandbox",
                "accounts": {"sandbox": _app_account(sb, mailbox, state_dir)},
                "relay": {
                    "state_dir": str(state_dir / "relay"),
                    "hostname": "relay.demo",
                    "processes": 1,  # one message: no helper processes needed
                    "listeners": [{"host": "127.0.0.1", "port": 0, "mode": "plain"}],
                    "networks": [{"cidr": "127.0.0.0/8", "name": "lan"}],
                    "routes": [
                        {"sender": "*@printer.local", "account": "sandbox", "rewrite_sender": True}
                    ],
                },
            }
        )
        async with RelayService(settings) as relay:
            port = relay.listeners[0].port
            say(
                ("2.", "bold"),
                f" relay up: plain SMTP on 127.0.0.1:{port} for 127.0.0.0/8, sending "
                f"as {mailbox} (MSAL client credentials, STARTTLS + XOAUTH2)",
            )
            say(("3.", "bold"), f" a legacy device sends scanner@printer.local -> {to}")
            message_id = await asyncio.to_thread(_device_send, port, "scanner@printer.local", to)
            queue = relay.queue
            assert queue is not None
            delivered = None
            for _ in range(1500):  # up to 30 s
                found = [m for m in await queue.list(State.DELIVERED) if m.message_id == message_id]
                failed = [m for m in await queue.list(State.FAILED) if m.message_id == message_id]
                if found or failed:
                    delivered = (found or failed)[0]
                    break
                await asyncio.sleep(0.02)
            if delivered is None:
                raise Smtp365Error("the relay did not deliver the demo message within 30 s")
            say(
                ("4.", "bold"),
                f" queue {delivered.id}: {delivered.state.value} after "
                f"{delivered.attempts} attempt(s); upstream said: ",
                (delivered.last_reason or "", "green"),
            )
        captured = [m for m in sb.store.list() if m.message_id == message_id]
        if not captured:
            raise Smtp365Error("the sandbox has no copy of the demo message")
        last = captured[-1].to_dict()
        say(("5.", "bold"), " the sandbox captured it:")
        for key in (
            "mailbox",
            "mechanism",
            "mail_from",
            "rcpt_tos",
            "subject",
            "tls_version",
            "path",
        ):
            say(f"     {key:12} {last[key]}")
        say(("6.", "bold"), " as stored (From rewritten to the mailbox, the device in Reply-To):")
        for line in captured[-1].read_bytes().decode("utf-8", "replace").splitlines():
            say(f"     | {line}")
        say(f"see them all: smtp365 sandbox messages --state-dir {state_dir}")
        say(
            "the relay's queue and delivery log: smtp365 queue list --all "
            f"--state-dir {state_dir / 'relay'}"
        )
