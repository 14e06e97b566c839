"""Terminal output helpers (rich lives in cli/ only).

Everything the commands print for people goes through :func:`say` (stdout) or :func:`tell`
(stderr); machine output goes through :func:`print_json`. What they print is data, never
markup: subjects, addresses, user names, paths, server replies and error texts are shown
as they are. A style is asked for with a ``(text, style)`` pair::

    say("account ", (name, "bold"), f" from {source}")

Every piece, styled or not, goes through :func:`clean` first: terminal control characters
(ESC, BEL, CR, DEL, C1) are written as ``\\xNN`` escapes and bytes that were not UTF-8 as
``\\xNN`` (:func:`smtp365.models.shown`), so nothing a user typed can colour, move or
rewrite the terminal, or fail the command because it cannot be encoded.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from smtp365.cli import exitcodes
from smtp365.errors import Smtp365Error, SubmissionRejected
from smtp365.models import shown

__all__ = ["Part", "clean", "die", "err", "fail", "out", "print_json", "say", "styled", "tell"]

# markup and emoji off: even a str printed straight to a console stays literal
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)

Part = str | tuple[str, str]
"""A piece of a line: text, or ``(text, style)`` (a Rich style such as ``"bold red"``)."""

_CONTROLS = [*range(0x00, 0x20), *range(0x7F, 0xA0)]
_NAMED = {0x09: "\t", 0x0A: "\\n", 0x0D: "\\r"}  # a tab stays a tab
_ONE_LINE: dict[int, str] = {c: _NAMED.get(c, f"\\x{c:02x}") for c in _CONTROLS}
_LINES: dict[int, str] = _ONE_LINE | {0x0A: "\n"}


def clean(value: object, *, multiline: bool = False) -> str:
    """``value`` as text fit for a terminal: control characters as visible escapes (a
    newline too, unless ``multiline``), lone surrogates as ``\\xNN``; all else unchanged."""
    text = shown(str(value))
    if text.isprintable():
        return text
    return text.translate(_LINES if multiline else _ONE_LINE)


def styled(*parts: Part, multiline: bool = False) -> Text:
    """One line (or, ``multiline``, several) of data, each piece cleaned, never parsed."""
    line = Text(end="")
    for part in parts:
        if isinstance(part, tuple):
            line.append(clean(part[0], multiline=multiline), style=part[1])
        else:
            line.append(clean(part, multiline=multiline))
    return line


def say(*parts: Part, multiline: bool = False, end: str = "\n") -> None:
    """Print ``parts`` as one line on stdout (see :func:`styled`)."""
    out.print(styled(*parts, multiline=multiline), end=end)


def tell(*parts: Part, multiline: bool = False, end: str = "\n") -> None:
    """Print ``parts`` as one line on stderr (see :func:`styled`)."""
    err.print(styled(*parts, multiline=multiline), end=end)


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
        print_json(payload)
    else:
        _explain(exc.what, exc.fix)
        if exc.temporary:
            tell("  (temporary: trying again later can succeed)")
    raise typer.Exit(code)


def die(message: str, *, fix: str = "", code: int = exitcodes.USAGE) -> NoReturn:
    _explain(message, fix)
    raise typer.Exit(code)


def _explain(what: str, fix: str) -> None:
    tell(("smtp365: error:", "bold red"), " ", what, multiline=True)
    if fix:
        tell("  ", ("fix:", "bold"), " ", fix, multiline=True)


def print_json(data: Any) -> None:
    """``data`` as one JSON document on stdout (ASCII: any text, even undecodable, fits)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
