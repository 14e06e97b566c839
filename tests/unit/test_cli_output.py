"""The CLI's one way to print people's text: as data (cli/output.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import smtp365.cli
from smtp365.cli.output import clean, styled

CLI = Path(smtp365.cli.__file__).parent


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("[/] broken", "[/] broken"),
        ("[bold]cron[/] :thumbs_up:", "[bold]cron[/] :thumbs_up:"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("bell\x07 del\x7f csi\x9b2J", "bell\\x07 del\\x7f csi\\x9b2J"),
        ("one\r\ntwo", "one\\r\\ntwo"),
        ("tab\tstays", "tab\tstays"),
        ("x\udcff", "x\\xff"),  # a byte that was not UTF-8 (surrogateescape)
        ("lone \ud800", "lone \\ud800"),
        ("Grüße, 日本, \N{THUMBS UP SIGN}", "Grüße, 日本, \N{THUMBS UP SIGN}"),
    ],
)
def test_clean_makes_control_characters_and_undecodable_bytes_visible(raw: str, shown: str) -> None:
    assert clean(raw) == shown
    shown.encode("utf-8")  # always printable on a UTF-8 terminal
    assert clean(shown) == shown  # cleaning twice changes nothing


def test_clean_multiline_keeps_newlines_only() -> None:
    assert clean("a\nb\r\n\x1b", multiline=True) == "a\nb\\r\n\\x1b"
    assert clean(Path("/tmp/[x]\x1b")) == "/tmp/[x]\\x1b"
    assert clean(42) == "42"


def test_styled_never_parses_markup() -> None:
    line = styled("account ", ("[/] x\x1b", "bold"), " from [accounts.nope]")
    assert line.plain == "account [/] x\\x1b from [accounts.nope]"
    [span] = line.spans
    assert (span.start, span.end, str(span.style)) == (8, 17, "bold")


def _calls_and_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names]
            found += [f"import {n}" for n in names if n.split(".")[0] == "rich"]
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "print":
                found.append(f"line {node.lineno}: print()")
            if isinstance(func, ast.Attribute) and func.attr in ("print", "log"):
                found.append(f"line {node.lineno}: .{func.attr}()")
    return found


def test_commands_print_only_through_the_output_helpers() -> None:
    """Rich is used in cli/output.py alone; commands print with say/tell/print_json."""
    offenders = {
        path.name: found
        for path in sorted(CLI.glob("*.py"))
        if path.name != "output.py" and (found := _calls_and_imports(path))
    }
    assert offenders == {}
