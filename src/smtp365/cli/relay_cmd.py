"""``smtp365 relay`` (run the store-and-forward relay) and ``smtp365 relay passwd|users``."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Annotated

import typer

from smtp365.cli import exitcodes
from smtp365.cli.output import die, fail, print_json, say
from smtp365.cli.send import ConfigOpt
from smtp365.config import Settings, load
from smtp365.errors import Smtp365Error
from smtp365.relay import logs, loop
from smtp365.relay.service import RelayService, settle_gc
from smtp365.relay.users import UserDB

app = typer.Typer(
    help="A store-and-forward SMTP relay for devices and apps that cannot do OAuth2 or "
    "STARTTLS: they send to it, it sends through Exchange Online.",
    invoke_without_command=True,
)

StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        "-d",
        help="queue, users and certificate (default: [relay] state_dir, else "
        "$XDG_STATE_HOME/smtp365/relay)",
    ),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load(config)
    except Smtp365Error as exc:
        fail(exc)


def state_dir_of(settings: Settings, state_dir: Path | None) -> Path:
    return (state_dir or settings.relay.resolved_state_dir(settings.state_home)).expanduser()


@app.callback()
def relay(
    ctx: typer.Context,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    json_logs: Annotated[
        bool, typer.Option("--json-logs", help="log JSON lines instead of text")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Run the relay in the foreground until SIGTERM or Ctrl-C (then finish and exit)."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings(config)
    fmt = "json" if json_logs else settings.relay.log_format
    logs.setup(fmt, level=10 if verbose else 20)
    try:
        service = RelayService(settings, state_dir=state_dir)
        loop.run(service.run(on_ready=lambda _: settle_gc()), settings.relay.event_loop)
    except Smtp365Error as exc:
        fail(exc)
    except OSError as exc:
        die(
            f"the relay cannot start: {exc.strerror or exc}",
            fix="another process may hold the port (ss -ltnp), ports below 1024 need "
            "CAP_NET_BIND_SERVICE, or the state directory is not writable",
            code=exitcodes.UNAVAILABLE,
        )


def _users(config: Path | None, state_dir: Path | None) -> UserDB:
    settings = _settings(config)
    path = settings.relay.users_file or state_dir_of(settings, state_dir) / "users.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return UserDB(path)
    except Smtp365Error as exc:
        fail(exc)
    except OSError as exc:
        die(f"cannot use {path}: {exc.strerror or exc}", code=exitcodes.NOINPUT)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            die(
                "no terminal to ask for the password",
                fix="pipe it in with --password-stdin",
            )
        password = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != password:
            die("the passwords differ", fix="run the command again")
    if len(password) < 8:
        die("the password is too short", fix="use at least 8 characters (better: 16 random ones)")
    return password


@app.command("passwd")
def passwd(
    user: Annotated[str, typer.Argument(help="the user name devices sign in with (AUTH)")],
    sender: Annotated[
        list[str] | None,
        typer.Option(
            "--sender",
            "-s",
            help="an envelope sender this user may use: address, *@domain, * or <> "
            "(repeat; default: keep the current ones, or none for a new user)",
        ),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin")
    ] = False,
    delete: Annotated[bool, typer.Option("--delete", help="remove the user")] = False,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Create a relay user or set its password (stored as an argon2 hash)."""
    db = _users(config, state_dir)
    try:
        if delete:
            if not db.remove(user):
                die(
                    f"no relay user {user!r}",
                    fix="see them with: smtp365 relay users",
                    code=exitcodes.DATAERR,
                )
            say(f"removed relay user {user} from {db.path}")
            return
        current = db.get(user)
        senders = sender if sender else (current.senders if current else ())
        db.add(user, _read_password(password_stdin), senders)
    except Smtp365Error as exc:
        fail(exc)
    action = "password changed for" if current else "created relay user"
    shown = ", ".join(senders) if senders else "none: add --sender ADDRESS to let it send"
    say(f"{action} {user} in {db.path} (may send as: {shown})")


@app.command("users")
def users(
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the relay users and the senders each may use."""
    db = _users(config, state_dir)
    rows = [{"user": n, "senders": list(u.senders)} for n in db.names() if (u := db.get(n))]
    if as_json:
        print_json(rows)
        return
    if not rows:
        say(f"no relay users in {db.path}; add one: smtp365 relay passwd USER -s ADDRESS")
    for row in rows:
        say(f"{row['user']}: {', '.join(row['senders']) or '(no senders)'}")
