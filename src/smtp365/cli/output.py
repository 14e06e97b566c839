"""Terminal output helpers (rich lives in cli/ only)."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console

from smtp365.cli import exitcodes
from smtp365.errors import Smtp365Error, SubmissionRejected

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(exc: Smtp365Error, *, as_json: bool = False, code: int | None = None) -> NoReturn:
    """Explain ``exc`` on stderr (or as JSON on stdout) and exit with its sysexits code
    (``code`` overrides it, except that temporary failures always exit 75)."""
    if code is None or exc.temporary:
        code = exitcodes.for_error(exc)
    if as_json:
        payload: dict[str, Any] = {
            "ok": False,
            "error": type(exc).__name__,
            "what": exc.what,
            "fix": exc.fix,
            "temporary": exc.temporary,
            "exit_code": code,
        }
        if isinstance(exc, SubmissionRejected):
            payload["reply"] = {"code": exc.code, "enhanced": exc.enhanced, "text": exc.text}
            payload["stage"] = exc.stage
            payload["catalogue"] = exc.entry.key if exc.entry else None
        print(json.dumps(payload, indent=2))
    else:
        err.print(f"[bold red]smtp365: error:[/] {_escape(exc.what)}")
        if exc.fix:
            err.print(f"  [bold]fix:[/] {_escape(exc.fix)}")
        if exc.temporary:
            err.print("  (temporary: trying again later can succeed)")
    raise typer.Exit(code)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def die(message: str, *, fix: str = "", code: int = exitcodes.USAGE) -> NoReturn:
    err.print(f"[bold red]smtp365: error:[/] {_escape(message)}")
    if fix:
        err.print(f"  [bold]fix:[/] {_escape(fix)}")
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
