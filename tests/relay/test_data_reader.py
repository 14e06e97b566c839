"""The listener's DATA reader against a line-by-line reference, over random messages cut
into random pieces: the end of data, dot-stuffing and the checks must not depend on where the
socket happened to split the stream, and bytes after the end of data stay for the next
command."""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from smtp365.models import Envelope
from smtp365.relay.intake import ClientInfo, Draft
from smtp365.relay.listener import Limits, RelaySMTP

from .listener_helpers import relay_factory

LIMIT = 1000
NEXT = b"MAIL FROM:<next@corp.example>\r\n"


class Scripted(asyncio.StreamReader):
    """A reader that hands out the stream in the given pieces, one per read."""

    def __init__(self, pieces: list[bytes]) -> None:
        super().__init__()
        self.pieces = pieces

    async def read(self, n: int = -1) -> bytes:
        if not self._buffer and self.pieces:  # type: ignore[attr-defined]
            self.feed_data(self.pieces.pop(0))
        elif not self._buffer:  # type: ignore[attr-defined]
            self.feed_eof()
        return await super().read(n)

    def left(self) -> bytes:
        return bytes(self._buffer) + b"".join(self.pieces)  # type: ignore[attr-defined]


class Collect:
    def __init__(self) -> None:
        self.content = bytearray()

    def feed(self, data: bytes) -> None:
        self.content += data


@pytest.fixture
async def session(tmp_path: Path) -> AsyncIterator[RelaySMTP]:
    async with relay_factory(tmp_path) as make:
        relay = await make()
        smtp = RelaySMTP(relay.listener._shared)
        yield smtp
        if smtp._timeout_handle is not None:
            smtp._timeout_handle.cancel()


def reference(stream: bytes) -> tuple[bytes, str | None, bytes]:
    """Line by line, as RFC 5321 §4.5.2 reads it: (content, refusal kind, what follows)."""
    data = b"\r\n" + stream
    end = data.find(b"\r\n.\r\n")
    lines = data[2 : end + 2].split(b"\r\n")[:-1]
    rest = data[end + 5 :]
    content = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    for line in lines:
        if b"\x00" in line:
            return b"", "NUL", rest
    for line in lines:
        unstuffed = line[1:] if line.startswith(b".") else line
        if len(unstuffed) + 2 > LIMIT:
            return b"", "longer", rest
    if any(b"\r" in line or b"\n" in line for line in lines):
        return b"", "bare", rest
    return content, None, rest


def random_message(rng: random.Random, *, bad: str | None = None) -> bytes:
    lines: list[bytes] = []
    for _ in range(rng.randint(0, 60)):
        kind = rng.random()
        if kind < 0.15:
            line = b"." * rng.randint(1, 3) + b"x" * rng.randint(0, 3)
        elif kind < 0.25:
            line = b""
        elif kind < 0.3:
            line = b"y" * (LIMIT - 2)  # as long as allowed
        else:
            line = bytes(rng.choice(b"abc .\t:-") for _ in range(rng.randint(1, 80)))
        lines.append(line)
    if bad == "longer":
        lines.insert(rng.randint(0, len(lines)), b"z" * (LIMIT - 1))
    elif bad == "bare":
        lines.insert(rng.randint(0, len(lines)), b"smuggled\n.\r")
    elif bad == "NUL":
        lines.insert(rng.randint(0, len(lines)), b"a\x00b")
    stuffed = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return stuffed + b".\r\n" + NEXT


def cut(rng: random.Random, stream: bytes) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 25))))
    # and always a few one-byte pieces around the end of data
    tail = len(stream) - len(NEXT) - 5
    points = sorted(set(points) | {p for p in range(tail, tail + 6) if 0 < p < len(stream)})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


async def receive(smtp: RelaySMTP, pieces: list[bytes]) -> tuple[bytes, str | None, bytes]:
    reader = Scripted(pieces)
    smtp._reader = reader
    draft: Any = Collect()
    problem = await smtp._receive(draft)
    return bytes(draft.content), problem, reader.left()


@pytest.mark.parametrize("bad", [None, "longer", "bare", "NUL"])
async def test_any_split_reads_like_the_reference(session: RelaySMTP, bad: str | None) -> None:
    rng = random.Random(f"data-reader-{bad}")
    for _ in range(300):
        stream = random_message(rng, bad=bad)
        want_content, want_kind, want_rest = reference(stream)
        assert want_kind == bad and want_rest == NEXT
        content, problem, rest = await receive(session, cut(rng, stream))
        assert rest == NEXT  # the pipelined command is still there for the session
        if bad is None:
            assert problem is None and content == want_content
        else:
            assert problem is not None and want_kind in problem, problem


async def test_end_of_data_right_after_354(session: RelaySMTP) -> None:
    assert await receive(session, [b".\r\n" + NEXT]) == (b"", None, NEXT)


async def test_a_line_that_never_ends_is_refused_without_keeping_it(
    session: RelaySMTP,
) -> None:
    pieces = [b"Subject: x\r\n\r\n"] + [b"w" * 50_000] * 40 + [b"\r\n.\r\n"]
    reader = Scripted(pieces)
    session._reader = reader
    draft: Any = Collect()
    problem = await session._receive(draft)
    assert problem is not None and problem.startswith("500 5.5.0")
    assert bytes(draft.content) == b"Subject: x\r\n\r\n"


async def test_eof_in_the_middle_is_an_incomplete_read(session: RelaySMTP) -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await receive(session, [b"Subject: x\r\n", b"\r\nbody"])


class Watched:
    """The intake's real draft, with a count of what it was fed."""

    def __init__(self, draft: Draft) -> None:
        self.draft = draft
        self.received = 0

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        self.draft.feed(data)


async def test_oversized_message_is_refused_without_keeping_it(tmp_path: Path) -> None:
    size_limit = 2_000_000
    piece = 64 * 1024
    line = b"x" * 78 + b"\r\n"
    stream = b"Subject: big\r\n\r\n" + line * (5 * size_limit // len(line))  # 5x the limit
    pieces = [stream[i : i + piece] for i in range(0, len(stream), piece)]
    pieces += [b".\r\n" + NEXT]
    async with relay_factory(tmp_path) as make:
        relay = await make(limits=Limits(max_message_size=size_limit))
        smtp = RelaySMTP(relay.listener._shared)
        try:
            draft = relay.listener._shared.intake.begin(
                ClientInfo("127.0.0.1"), Envelope("a@corp.example", ("t@x.example",))
            )
            watched: Any = Watched(draft)
            reader = Scripted(pieces)
            smtp._reader = reader
            tracemalloc.start()
            try:
                problem = await smtp._receive(watched)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            draft.discard()
        finally:
            if smtp._timeout_handle is not None:
                smtp._timeout_handle.cancel()
    print(f"5 x {size_limit}: the draft got {watched.received}; peak memory {peak}")
    assert problem is not None and problem.startswith("552 5.3.4"), problem
    assert reader.left() == NEXT  # the rest was read and dropped, up to the end of data
    # The draft was fed while the message was acceptable, and no more ...
    assert size_limit - piece <= watched.received <= size_limit + piece
    # ... and nothing kept the rest: all that was allocated at once (reader, draft and its
    # spill buffer) is a few pieces, not the message.
    assert peak < 16 * piece, peak
