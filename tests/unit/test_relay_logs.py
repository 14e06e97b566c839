"""The relay's log lines carry what clients sent as data: one line per event, whatever the
client wrote (CR, LF, ESC, bytes that were not UTF-8)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from smtp365.relay import logs

HOSTILE = "x\r\nFAKE 2026-01-01T00:00:00.000Z WARNING listener: AUTH failed from [10.0.0.9]"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    logging.getLogger("smtp365").handlers.clear()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_client_text_cannot_forge_a_line_or_reach_the_terminal(
    stream: io.StringIO, fmt: str
) -> None:
    logs.setup(fmt, stream=stream)
    log = logging.getLogger("smtp365.relay.listener")
    log.warning("[%s] HELO %s", "127.0.0.1", HOSTILE + "\x1b[2J" + "b\udcff")
    text = stream.getvalue()
    assert text.count("\n") == 1  # one event, one line
    assert "\x1b" not in text and "\r" not in text
    line = text.rstrip("\n")
    message = json.loads(line)["message"] if fmt == "json" else line
    assert "b\\xff" in message
    if fmt == "text":
        assert "\\x1b[2J" in line and "\\x0d" in line
