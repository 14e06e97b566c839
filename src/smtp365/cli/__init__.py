"""The ``smtp365`` command line (typer + rich live here and nowhere else)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from smtp365 import __version__
from smtp365.cli import (
    auth_cmd,
    config_cmd,
    doctor_cmd,
    exitcodes,
    queue_cmd,
    relay_cmd,
    sandbox_cmd,
)
from smtp365.cli.output import clean
from smtp365.cli.send import send, sendmail, sendmail_main

app = typer.Typer(
    name="smtp365",
    help="Send mail through Microsoft 365 / Exchange Online, and learn why when it fails.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("send")(send)
app.command(
    "sendmail",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)(sendmail)
app.add_typer(config_cmd.app, name="config")
app.add_typer(auth_cmd.app, name="auth")
app.add_typer(doctor_cmd.app, name="doctor")
app.add_typer(sandbox_cmd.app, name="sandbox")
app.add_typer(relay_cmd.app, name="relay")
app.add_typer(queue_cmd.app, name="queue")
app.command("demo")(sandbox_cmd.demo)


@app.command("version")
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main(argv: list[str] | None = None) -> int:
    """Entry point. Invoked as ``sendmail`` (a symlink), it speaks the sendmail interface."""
    args = sys.argv[1:] if argv is None else argv
    if argv is None and Path(sys.argv[0]).name == "sendmail":
        return sendmail_main(args)
    try:
        app(args=args, prog_name="smtp365")
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # last resort: one clear line, never a traceback for users
        sys.stderr.write(
            f"smtp365: internal error: {clean(f'{type(exc).__name__}: {exc}')}\n"
            "  this is a bug in smtp365; please report it with the command you ran\n"
        )
        return exitcodes.SOFTWARE
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        # click reports usage errors as 2; sysexits says EX_USAGE.
        return exitcodes.USAGE if code == 2 else code
    return exitcodes.OK


def run() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
