"""The relay's log: one line per event, as text or as JSON lines.

Text: ``2026-11-28T07:12:03.114Z INFO  intake: accepted 01J... from [10.0.0.7] ...``.
JSON: ``{"time": "...", "level": "info", "component": "intake", "message": "..."}``.
A helper process that receives mail (``processes`` > 1) marks its lines: ``intake#1:``.
Every line carries the client's ``[IP]`` where a client is involved (fail2ban can match
failed AUTH lines), never a password, token or message content.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

from smtp365.models import shown

__all__ = ["JsonFormatter", "TextFormatter", "current", "setup"]


def _stamp(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}


def printable(line: str) -> str:
    """One log line as it may reach a terminal or a log file: what a client sent that was
    not UTF-8, and any control character (CR, ESC ...: a forged line, a terminal escape), as
    ``\\xNN``."""
    line = shown(line)
    return line if line.isprintable() else line.translate(_CONTROLS)


def _component(name: str) -> str:
    return name.removeprefix("smtp365.").removeprefix("relay.") or "relay"


class TextFormatter(logging.Formatter):
    def __init__(self, process: int = 0) -> None:
        super().__init__()
        self.suffix = f"#{process}" if process else ""

    def format(self, record: logging.LogRecord) -> str:
        component = _component(record.name) + self.suffix
        line = f"{_stamp(record.created)} {record.levelname:<7} {component}: "
        line += record.getMessage().replace("\n", " ")
        if record.exc_info:
            line += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return printable(line)


class JsonFormatter(logging.Formatter):
    def __init__(self, process: int = 0) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": _stamp(record.created),
            "level": record.levelname.lower(),
            "component": _component(record.name),
            "message": shown(record.getMessage()),
        }
        if self.process:
            doc["process"] = self.process
        if record.exc_info:
            doc["exception"] = shown(self.formatException(record.exc_info))
        return json.dumps(doc, ensure_ascii=False)


def setup(
    fmt: str = "text",
    *,
    stream: TextIO | None = None,
    level: int = logging.INFO,
    process: int = 0,
) -> None:
    """Send smtp365's log to ``stream`` (stderr) in ``fmt`` ("text" or "json").

    ``process``: the number of a helper process (:mod:`smtp365.relay.procs`), shown after
    the component (``intake#1:``) or as ``"process": 1``; 0 for the main process."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(process) if fmt == "json" else TextFormatter(process))
    root = logging.getLogger("smtp365")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def current() -> tuple[str, int]:
    """The format and level :func:`setup` was last called with (for child processes)."""
    root = logging.getLogger("smtp365")
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return ("json" if json_lines else "text"), root.getEffectiveLevel()
