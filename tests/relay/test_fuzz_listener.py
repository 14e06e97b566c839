"""The listener's protocol under arbitrary input (security.md §7): hypothesis drives one
session at a time over an in-memory transport with command sequences, DATA bodies full of
fake end-of-data sequences, AUTH blobs and raw bytes, cut into random segments; and hostile
sessions: SMTPUTF8 transactions, non-ASCII and invalid UTF-8 (bytes ``\\x80``-``\\xff``)
addresses, ESMTP parameters in Unicode digits or case-folding letters (``SIZE=²``,
``ſIZE=1``), header lines with 8-bit bytes and header sections far beyond the intake's
256 KiB (100,000 short lines, then ``From:``/``Sender:``).

Checked after every segment: no hang (the session gets back to waiting for input), bounded
buffers. Checked after every session: no crash, which is any log record with a traceback or
at ERROR and above (the relay's, aiosmtpd's, asyncio's), any ``451 4.3.0`` reply (the
session's answer to an exception) and any reply that is not UTF-8; at most one message
queued per DATA, a queued message for each ``250 ... queued as``, no queued message from a
sender other than the sessions' own (a transaction smuggled behind a fake end of data would
be queued from its own sender), never AUTH in plain text. Each session comes from its own
address, so the per-address AUTH limit never answers in place of the TLS check.

Every session is tried against two relays: one as configured by default, and one that
rewrites the sender (``rewrite_sender``: the envelope sender and ``From:`` become the
account's mailbox). There every queued message is read back from the queue: each
``From:``/``Sender:`` field of its header section must name the mailbox, never the
device's address, and there must be exactly one ``From:``.

The sessions written out (a clean one, a transaction smuggled behind each fake end of data,
AUTH with the right password in clear, and the hostile inputs the audit found; each with
the number of messages it must leave queued where that number is certain) are their own
test cases. The fuzzed sessions: ``FUZZ_EXAMPLES`` (100) fixed generated ones of each kind;
``make fuzz`` tries 3,000 from a random ``FUZZ_SEED`` (printed, to replay a failure).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from email.utils import getaddresses
from typing import Any

import hypothesis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtp365.models import Envelope
from smtp365.relay.intake import ClientInfo, Route
from smtp365.relay.listener import Limits, RelayListener, RelaySMTP
from smtp365.relay.queue import QueuedMessage
from smtp365.relay.queue.sqlite import SqliteQueue

from .listener_helpers import LOCALHOST, MakeRelay, Relay

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
SEED = os.environ.get("FUZZ_SEED")  # set: a random search from this seed; unset: fixed
FAKE_ENDS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b".\n", b"\r\n.\x00\r\n"]

LEGITIMATE = {"a@corp.example", ""}  # the senders the sessions give as their own
DEVICE_DOMAIN = "printer.local"  # every hostile sender's domain ends so
MAILBOX = "relay@contoso.test"  # the rewrite relay sends as this mailbox
ACK = b"250 2.0.0 Ok: queued as "
HEADER_LIMIT = 256 * 1024  # the intake's in-memory header section (Intake.header_limit)
CRASH_LOGGERS = ("smtp365", "mail.log", "asyncio")  # the relay, aiosmtpd, the event loop
RECEIVE = 16 * 1024  # the most one segment hands the session at once, as a socket read would


class MemoryTransport(asyncio.Transport):
    """What the session writes, and whether it closed; no socket."""

    def __init__(self, peer: str = "127.0.0.1") -> None:
        super().__init__()
        self.peer = peer
        self.out = bytearray()
        self.closed = False
        self._protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self.peer, 40000), "sockname": ("127.0.0.1", 25)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            protocol = self._protocol
            if protocol is not None:
                asyncio.get_running_loop().call_soon(protocol.connection_lost, None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self.closed

    def get_write_buffer_size(self) -> int:
        return 0


class CrashTrap(logging.Handler):
    """The records that report a crash: a traceback attached, or ERROR and above."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        records, self.records = self.records, []
        return records


def describe(record: logging.LogRecord) -> str:
    """A trapped record as text: logger, level, message and the traceback's last frames."""
    text = f"{record.name} {record.levelname}: {record.getMessage()}"
    if record.exc_info:
        lines = logging.Formatter().formatException(record.exc_info).splitlines()
        text += "\n" + "\n".join(lines[-12:])
    return text


@contextlib.contextmanager
def trapping() -> Iterator[CrashTrap]:
    """A :class:`CrashTrap` on the relay's, aiosmtpd's and asyncio's loggers; the relay's
    records from INFO up (one with a traceback at INFO is a crash too)."""
    trap = CrashTrap()
    saved = []
    for name in CRASH_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.addHandler(trap)
        if name == "smtp365" or logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.INFO if name == "smtp365" else logging.WARNING)
    try:
        yield trap
    finally:
        for logger, level in saved:
            logger.removeHandler(trap)
            logger.setLevel(level)


def no_crash(records: list[logging.LogRecord]) -> None:
    """Fail on trapped records. The exception a record carries becomes the cause of the
    failure, so that hypothesis tells crashes at different places apart (and shrinks each)."""
    if not records:
        return
    text = "\n\n".join(describe(r) for r in records)
    cause = next((r.exc_info[1] for r in records if r.exc_info and r.exc_info[1]), None)
    raise AssertionError(f"the relay crashed:\n{text}") from cause


@pytest.fixture
def crash_trap() -> Iterator[CrashTrap]:
    with trapping() as trap:
        yield trap


def _b64(text: bytes) -> bytes:
    return base64.b64encode(text)


command = st.one_of(
    st.sampled_from(
        [
            b"EHLO fuzz.example\r\n",
            b"HELO fuzz\r\n",
            b"MAIL FROM:<>\r\n",
            b"RCPT TO:<t%foreign.example@relay.test>\r\n",
            b"RCPT TO:<@relay.test:t@foreign.example>\r\n",
            b"DATA\r\n",
            b"RSET\r\n",
            b"NOOP\r\n",
            b"STARTTLS\r\n",
            b"AUTH PLAIN " + _b64(b"\0app\0wrong") + b"\r\n",
            b"AUTH PLAIN " + _b64(b"\0app\0right-password") + b"\r\n",
            b"AUTH LOGIN\r\n",
            b"*\r\n",
            b"VRFY x\r\n",
            b"QUIT\r\n",
        ]
    ),
    st.binary(max_size=200).map(lambda b: b + b"\r\n"),
    st.binary(min_size=600, max_size=2000),  # an over-long line
)
body = st.builds(
    lambda text, end: b"Subject: fuzz\r\n\r\n" + text + end + b"\r\n.\r\n",
    st.one_of(
        st.from_regex(rb"\A(?:[ -~]{0,70}\r\n){0,6}\Z"),  # clean lines, dots and all
        st.from_regex(rb"\A(?:\.{0,2}[ -~]{0,10}\r\n){0,6}\Z"),
        st.binary(max_size=300),
    ),
    st.sampled_from([*FAKE_ENDS, b"", b"", b""]),
)
transaction = st.builds(
    lambda mail, rcpts, data: [mail, *rcpts, b"DATA\r\n", data],
    st.sampled_from(
        [b"MAIL FROM:<a@corp.example>\r\n", b"MAIL FROM:<a@corp.example> SIZE=100\r\n"]
    ),
    st.lists(st.just(b"RCPT TO:<t@foreign.example>\r\n"), min_size=1, max_size=3),
    body,
)


def _cut(pieces: st.SearchStrategy[list[bytes]]) -> st.SearchStrategy[list[bytes]]:
    """Each piece sent as its own segment, cut into smaller ones or glued to the previous
    one (pipelining) now and then."""
    return st.lists(st.tuples(st.integers(0, 9), st.integers(1, 300))).flatmap(
        lambda shapes: pieces.map(lambda ps: _segments(ps, shapes))
    )


# A session: EHLO, then transactions and stray commands.
pieces = st.builds(
    lambda head, items: [head, *(p for item in items for p in item)],
    st.sampled_from([b"EHLO fuzz.example\r\n"] * 3 + [b"HELO fuzz\r\n", b""]),
    st.lists(st.one_of(transaction, command.map(lambda c: [c])), max_size=8),
)
session = _cut(pieces)

# ---------------------------------------------------------------- hostile input
# Bytes \x80-\xff (rarely valid UTF-8), non-ASCII text in UTF-8 (any code point but the
# surrogates, which UTF-8 cannot carry), and ASCII atoms; never CR, LF or NUL (a message
# with those is refused before it gets anywhere interesting).
bad_bytes = st.binary(min_size=1, max_size=3).map(lambda b: bytes(0x80 | x for x in b))
utf8 = st.text(st.characters(min_codepoint=0x80, codec="utf-8"), min_size=1, max_size=4).map(
    str.encode
)
atom = st.from_regex(rb"\A[a-z0-9]{1,6}\Z")
local_part = st.lists(
    st.one_of(atom, atom, utf8, bad_bytes, st.sampled_from([b".", b"+", b'"', b"\\", b"%"])),
    min_size=1,
    max_size=4,
).map(b"".join)
local_part = st.one_of(local_part, local_part.map(lambda lp: b'"' + lp + b'"'))
label = st.one_of(atom, utf8, bad_bytes, st.builds(bytes.__add__, atom, bad_bytes))


def _domain(tail: bytes) -> st.SearchStrategy[bytes]:
    return st.lists(label, max_size=2).map(lambda labels: b".".join([*labels, tail]))


# Every hostile sender's domain ends in printer.local (what the LEGITIMATE check knows).
device_address = st.one_of(
    st.builds(lambda lp, d: lp + b"@" + d, local_part, _domain(DEVICE_DOMAIN.encode())),
    st.sampled_from(
        [
            b"a@printer.local",
            b"x\xff@printer.local",
            b"\xc3\xa9@printer.local",
            b"scan@b\xc3\xbccher.printer.local",
            b"scan@\xff.printer.local",
        ]
    ),
)
recipient_address = st.one_of(
    st.builds(lambda lp, d: lp + b"@" + d, local_part, _domain(b"example.net")),
    st.builds(lambda lp, d: lp + b"@" + d, atom, st.sampled_from([b"ex\xffample.net", b"\xff"])),
    st.sampled_from(
        [
            b"ok@example.net",
            b"b\xff@example.net",
            b"\xff\xfe@example.net",
            b"\xc3\xbc@example.net",
            b"ok@b\xc3\xbccher.example",
            b"ok@xn--bcher-kva.example",
            b"ok@[127.0.0.1]",
            b"ok@example.net.",
        ]
    ),
)
# ESMTP parameters: Unicode digits and letters that upper-case to ASCII (ſ -> S, ı -> I).
unicode_digits = st.text(st.characters(categories=("Nd", "No", "Nl")), min_size=1, max_size=5)
mail_parameter = st.one_of(
    st.sampled_from(
        [
            s.encode()
            for s in [
                "SMTPUTF8",
                "smtputf8",
                "BODY=8BITMIME",
                "BODY=7BIT",
                "SIZE=100",
                "SIZE=²",
                "SIZE=①",
                "SIZE=٣",
                "SIZE=１２",
                "BODY=８BITMIME",
                "BODY=8bıtmime",
                "ſIZE=10",
                "ſMTPUTF8",
                "SIZE=",
                "SIZE==1",
                "=",
                "SIZE=99999999999999999999999",
            ]
        ]
        + [b"SMTPUTF8=\xff", b"SIZE=\xff", b"\xff=1", b"BODY=\xff"]
    ),
    st.builds(
        lambda key, value: key + b"=" + value,
        st.sampled_from([b"SIZE", b"size", "ſIZE".encode(), b"BODY", b"SMTPUTF8"]),
        st.one_of(unicode_digits.map(str.encode), utf8, bad_bytes),
    ),
)
# Senders the listener takes (ASCII, or UTF-8 under SMTPUTF8).
valid_device = st.one_of(atom, utf8, st.builds(bytes.__add__, atom, utf8)).map(
    lambda lp: lp + b"@" + DEVICE_DOMAIN.encode()
)
valid_sender = st.one_of(st.just(b"a@printer.local"), valid_device)


def _mail(path: bytes, smtputf8: bool, params: list[bytes]) -> bytes:
    flags = [b"SMTPUTF8"] if smtputf8 else []
    return b"MAIL FROM:<" + path + b">" + b"".join(b" " + p for p in flags + params) + b"\r\n"


rcpt_command = recipient_address.map(lambda a: b"RCPT TO:<" + a + b">\r\n")

# Header fields naming the device (a From: rewrite must catch every one), and others with
# 8-bit and invalid UTF-8 bytes.
header_text = st.lists(st.one_of(atom, utf8, bad_bytes, st.just(b" ")), max_size=5).map(b"".join)
named = st.one_of(
    device_address,
    st.builds(lambda t, a: t + b" <" + a + b">", header_text, device_address),
    st.builds(lambda t, a: b'"' + t + b'" <' + a + b">", header_text, device_address),
    st.builds(lambda a: b"Device\r\n <" + a + b">", device_address),  # folded
    st.builds(lambda a, b: a + b", " + b, device_address, device_address),
)
header_line = st.one_of(
    st.builds(
        bytes.__add__,
        st.sampled_from([b"From: ", b"from:", b"FROM : ", b"Sender: ", b"sender:", b"From:\t"]),
        named,
    ),
    st.builds(
        bytes.__add__,
        st.sampled_from([b"Subject: ", b"X-Note: ", b"Reply-To: ", b"To: ", b"X-\xff: "]),
        header_text,
    ),
    st.sampled_from(
        [
            b"From: =?utf-8?b?w6k=?= <a@printer.local>",
            b"From:\r\n a@printer.local",
            b"Sender: Device\r\n <a@printer.local>",
            b"From: undisclosed:;",
            b"From:",
            b" continuation at the start",
            b"no colon here",
            b": empty name",
        ]
    ),
)
PAD = b"X-Pad: y\r\n"  # 10 octets
header_section = st.builds(
    lambda pad, lines, blank, text: (
        PAD * pad
        + b"".join(line + b"\r\n" for line in lines)
        + (b"\r\n" + text + b"\r\n" if blank else b"")
    ),
    # Mostly none; now and then just short of the intake's limit, just past it, or far
    # beyond it (these examples are big: few of them).
    st.sampled_from(
        [0] * 30 + [HEADER_LIMIT // len(PAD) - 3, HEADER_LIMIT // len(PAD) + 3, 100_000]
    ),
    st.lists(header_line, max_size=6),
    st.booleans(),
    header_text,
)
valid_rcpt = st.one_of(
    st.just(b"ok@example.net"), st.builds(lambda lp: lp + b"@example.net", utf8)
).map(lambda a: b"RCPT TO:<" + a + b">\r\n")
smtputf8 = st.sampled_from([True, True, False])
plain_message = st.just(b"From: a@printer.local\r\nSubject: s\r\n\r\nbody\r\n")


def _data(mail: bytes, rcpts: list[bytes], head: bytes, end: bytes = b"") -> list[bytes]:
    return [mail, *rcpts, b"DATA\r\n", head + end + b".\r\n"]


def _focused(kind: str) -> st.SearchStrategy[list[bytes]]:
    """A transaction with one hostile part (``kind``), the rest as the listener takes it."""
    sender = device_address if kind == "sender" else valid_sender
    params: st.SearchStrategy[list[bytes]] = st.just([])
    if kind == "parameter":
        params = st.lists(mail_parameter, min_size=1, max_size=2)
    rcpts = valid_rcpt.map(lambda r: [r])
    if kind == "recipient":  # with a good one before or after it
        rcpts = st.builds(
            lambda good, bad, first: [bad, good] if first else [good, bad],
            valid_rcpt,
            rcpt_command,
            st.booleans(),
        )
    head = header_section if kind == "header" else plain_message
    return st.builds(_data, st.builds(_mail, sender, smtputf8, params), rcpts, head)


# Mostly one hostile part per transaction; now and then any mix, fake ends of data and all.
hostile_transaction = st.one_of(
    st.sampled_from(["sender", "parameter", "recipient", "header", "header"]).flatmap(_focused),
    st.builds(
        _data,
        st.builds(
            _mail,
            st.one_of(valid_sender, device_address, st.just(b"")),
            smtputf8,
            st.lists(mail_parameter, max_size=2),
        ),
        st.lists(st.one_of(rcpt_command, valid_rcpt), min_size=1, max_size=3),
        header_section,
        st.sampled_from([b"", b"x\r\n", FAKE_ENDS[0] + b"\r\n", FAKE_ENDS[-1] + b"\r\n"]),
    ),
)
hostile_command = st.sampled_from(
    [
        b"RSET\r\n",
        b"NOOP \xff\r\n",
        b"VRFY <\xff@example.net>\r\n",
        b"EHLO \xff\xfe\r\n",
        b"HELO b\xc3\xbccher\r\n",
        b"AUTH PLAIN \xff\r\n",
        "AUTH ſLAIN\r\n".encode(),
        b"MAIL FROM:<\xff>\r\n",
        b"RCPT TO:<\xff>\r\n",
        b"\xff\xfe\r\n",
        b"DATA \xff\r\n",
    ]
)
hostile_pieces = st.builds(
    lambda head, items: [head, *(p for item in items for p in item)],
    st.sampled_from([b"EHLO fuzz.example\r\n"] * 4 + [b"EHLO \xc3\xa9.example\r\n"]),
    st.lists(
        st.one_of(hostile_transaction, hostile_transaction, hostile_command.map(lambda c: [c])),
        min_size=1,
        max_size=3,
    ),
)
hostile_session = _cut(hostile_pieces)


# ---------------------------------------------------------------- written out

CLEAN = [
    b"EHLO fuzz.example\r\n",
    b"MAIL FROM:<a@corp.example>\r\n",
    b"RCPT TO:<t@foreign.example>\r\n",
    b"DATA\r\n",
    b"Subject: one\r\n\r\n..dot\r\n.\r\n",
]


def _smuggled(fake_end: bytes) -> list[bytes]:
    """A second message smuggled after a fake end of data, then a real second transaction
    pipelined behind the end of the first: one message queued, never the smuggled one."""
    return [
        b"EHLO fuzz.example\r\n",
        b"MAIL FROM:<a@corp.example>\r\n",
        b"RCPT TO:<t@foreign.example>\r\n",
        b"DATA\r\n",
        b"Subject: a\r\n\r\nx" + fake_end + b"MAIL FROM:<evil@x.example>\r\n"
        b"RCPT TO:<v@x.example>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\n"
        b"MAIL FROM:<a@corp.example>\r\n",
        b"RCPT TO:<t@foreign.example>\r\n",
        b"DATA\r\n",
        b"Subject: two\r\n\r\nok\r\n.\r\n",
    ]


def _transaction(
    mail: bytes, *rcpts: bytes, data: bytes = b"Subject: s\r\n\r\nbody\r\n"
) -> list[bytes]:
    return [
        b"EHLO fuzz.example\r\n",
        b"MAIL FROM:" + mail + b"\r\n",
        *(b"RCPT TO:" + rcpt + b"\r\n" for rcpt in rcpts),
        b"DATA\r\n",
        data + b".\r\n",
    ]


def _big_header(*fields: bytes, lines: int = 100_000) -> bytes:
    """``lines`` short header lines (far more than the intake's 256 KiB), then ``fields``."""
    return PAD * lines + b"".join(f + b"\r\n" for f in fields) + b"\r\nbody\r\n"


# AUTH with the right password on a listener without TLS: refused (538), never 235.
AUTH_IN_CLEAR = [
    b"EHLO fuzz.example\r\n",
    b"AUTH PLAIN " + _b64(b"\0app\0right-password") + b"\r\n",
]
# The sessions written out: a name, the segments, and the number of messages the session
# must leave queued (None: more than one outcome is right).
WRITTEN_OUT: list[tuple[str, list[bytes], int | None]] = [
    ("clean", CLEAN, 1),
    *((f"smuggled-{fake_end!r}", _smuggled(fake_end), 1) for fake_end in FAKE_ENDS),
    ("auth-in-clear", AUTH_IN_CLEAR, 0),
    # SMTPUTF8 with a recipient that is not UTF-8: refused at RCPT, or queued and refused at
    # delivery; ok@example.net gets the message either way.
    (
        "smtputf8-rcpt-invalid-utf8",
        _transaction(b"<a@printer.local> SMTPUTF8", b"<ok@example.net>", b"<b\xff@example.net>"),
        1,
    ),
    # A sender that is not UTF-8, a message without From: (the rewrite builds Reply-To from
    # the envelope sender).
    (
        "smtputf8-mail-invalid-utf8",
        _transaction(b"<x\xff@printer.local> SMTPUTF8", b"<ok@example.net>"),
        None,
    ),
    (
        "smtputf8-mail-invalid-utf8-with-from",
        _transaction(
            b"<x\xff@printer.local> SMTPUTF8",
            b"<ok@example.net>",
            data=b"From: Scanner <x\xff@printer.local>\r\nSubject: s\r\n\r\nbody\r\n",
        ),
        None,
    ),
    # Without SMTPUTF8 the address is refused: its refusal must still be a valid reply.
    (
        "rcpt-undecodable-no-smtputf8",
        _transaction(b"<a@printer.local>", b"<\xff\xfe@example.net>"),
        0,
    ),
    (
        "rcpt-invalid-domain-no-smtputf8",
        _transaction(b"<a@printer.local>", b"<ok@ex\xffample.net>"),
        0,
    ),
    (
        "mail-undecodable-no-smtputf8",
        _transaction(b"<\xff\xfe@printer.local>", b"<ok@example.net>"),
        0,
    ),
    # SIZE must be ASCII digits (RFC 1870): isdigit() is true for these, int() fails on two.
    (
        "size-superscript-two",
        _transaction("<a@printer.local> SIZE=²".encode(), b"<ok@example.net>"),
        0,
    ),
    ("size-circled-one", _transaction("<a@printer.local> SIZE=①".encode(), b"<ok@example.net>"), 0),
    (
        "size-arabic-indic-three",
        _transaction("<a@printer.local> SIZE=٣".encode(), b"<ok@example.net>"),
        None,
    ),
    ("size-long-s-key", _transaction("<a@printer.local> ſIZE=²".encode(), b"<ok@example.net>"), 0),
    (
        "body-fullwidth-8bitmime",
        _transaction("<a@printer.local> BODY=８BITMIME".encode(), b"<ok@example.net>"),
        0,
    ),
    ("size-invalid-utf8", _transaction(b"<a@printer.local> SIZE=\xff", b"<ok@example.net>"), 0),
    # Header lines with 8-bit and invalid UTF-8 bytes.
    (
        "header-8bit",
        _transaction(
            b"<a@printer.local> SMTPUTF8",
            b"<ok@example.net>",
            data=b"From: \xff\xfe <a@printer.local>\r\nSender: b\x80@printer.local\r\n"
            b"Subject: caf\xc3\xa9 \xe9\r\nX-\xff: \xc3\r\n\r\n\xff\xfe body\r\n",
        ),
        1,
    ),
    # A header section that starts with a continuation line (and has a Reply-To: of its
    # own): put right after the rewritten From:, the line would continue it (found by the
    # fuzz), adding the device's address to it.
    (
        "continuation-line-first",
        _transaction(
            b"<a@printer.local>",
            b"<ok@example.net>",
            data=b" , a@printer.local\r\nReply-To: help@printer.local\r\n\r\nbody\r\n",
        ),
        None,
    ),
    # From:/Sender: after 100,000 header lines: beyond the header section kept in memory.
    (
        "from-after-100k-header-lines",
        _transaction(
            b"<a@printer.local>",
            b"<ok@example.net>",
            data=_big_header(b"From: Scanner <a@printer.local>"),
        ),
        None,
    ),
    (
        "sender-after-100k-header-lines",
        _transaction(
            b"<a@printer.local>",
            b"<ok@example.net>",
            data=_big_header(b"Sender: a@printer.local", b"From: b@printer.local"),
        ),
        None,
    ),
    # ... and just past the limit, folded across it.
    (
        "folded-from-at-the-header-limit",
        _transaction(
            b"<a@printer.local>",
            b"<ok@example.net>",
            data=_big_header(
                b"From: Scanner\r\n <a@printer.local>", lines=HEADER_LIMIT // len(PAD)
            ),
        ),
        None,
    ),
]


def _segments(pieces: list[bytes], shapes: list[tuple[int, int]]) -> list[bytes]:
    segments: list[bytes] = []
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        glue, cut = shapes[i % len(shapes)] if shapes else (1, len(piece))
        if glue == 0 and segments:  # pipelined behind the previous piece
            segments[-1] += piece
        elif cut < len(piece) and glue == 1:  # split where the socket happens to split it
            segments += [piece[:cut], piece[cut:]]
        else:
            segments.append(piece)
    return segments


# ---------------------------------------------------------------- driving a session


async def _settled(smtp: RelaySMTP, transport: MemoryTransport) -> None:
    """Until the session waits for input again (or has ended): a hang fails the test."""
    async with asyncio.timeout(10):
        while True:
            await asyncio.sleep(0)
            handler = smtp._handler_coroutine
            if transport.closed or handler is None or handler.done():
                return
            if smtp._reader._waiter is not None:  # type: ignore[attr-defined]
                return
            await asyncio.sleep(0.001)  # the queue commits on its writer thread


async def drive(listener: RelayListener, segments: list[bytes], peer: str) -> bytes:
    """One session of ``listener`` from ``peer`` over a :class:`MemoryTransport`: what the
    relay answered."""
    transport = MemoryTransport(peer)
    smtp = RelaySMTP(listener._shared)
    transport.set_protocol(smtp)
    smtp.connection_made(transport)
    await _settled(smtp, transport)
    for segment in segments:
        # A socket hands over what it has, at most RECEIVE octets at a time.
        for at in range(0, len(segment), RECEIVE):
            if transport.closed:
                break
            smtp.data_received(segment[at : at + RECEIVE])
            await _settled(smtp, transport)
            buffered = len(smtp._reader._buffer)  # type: ignore[attr-defined]
            assert buffered <= 4 * 65536 + 2000, buffered
    transport.close()
    await asyncio.sleep(0)
    if smtp._handler_coroutine is not None:
        async with asyncio.timeout(10):
            await asyncio.gather(smtp._handler_coroutine, return_exceptions=True)
    return bytes(transport.out)


def queued_ids(out: bytes) -> list[str]:
    """The queue ids of the relay's ``250 ... queued as ID`` replies."""
    return [r.rsplit(b" ", 1)[1].decode() for r in out.split(b"\r\n") if r.startswith(ACK)]


async def _total(queue: SqliteQueue) -> int:
    return sum((await queue.stats()).counts.values())


async def _session(
    relay: Relay, segments: list[bytes], peer: str
) -> tuple[bytes, int, list[tuple[QueuedMessage, bytes]]]:
    """A session; how many messages it left queued; those it acknowledged, with content."""
    before = await _total(relay.queue)
    out = await drive(relay.listener, segments, peer)
    queued = await _total(relay.queue) - before
    acked = []
    for queue_id in queued_ids(out):
        msg = await relay.queue.get(queue_id)
        assert msg is not None, f"{queue_id} acknowledged, not in the queue"
        acked.append((msg, await relay.queue.read(queue_id)))
    return out, queued, acked


# ---------------------------------------------------------------- the oracles


def header_fields(content: bytes) -> list[bytes]:
    """The fields of the header section (up to the first empty line), unfolded."""
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[: end + 2]
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields


def not_rewritten(content: bytes, mailbox: str) -> list[str]:
    """What is wrong with the sender rewrite of a queued message: each ``From:``/``Sender:``
    field that names an address other than ``mailbox``, and a count of ``From:`` fields
    other than one."""
    problems: list[str] = []
    froms = 0
    for field in header_fields(content):
        name, colon, value = field.partition(b":")
        kind = name.strip().lower()
        if not colon or kind not in (b"from", b"sender"):
            continue
        froms += kind == b"from"
        addresses = [a for _, a in getaddresses([value.decode("utf-8", "replace")])]
        if not addresses or any(a.lower() != mailbox.lower() for a in addresses):
            problems.append(f"not rewritten: {field[:200]!r}")
    if froms != 1:
        problems.append(f"{froms} From: fields")
    return problems


def crash_replies(out: bytes) -> list[str]:
    """Replies that report a crash (``451 4.3.0``: the answer to an exception) or are not
    UTF-8 (bytes the relay echoed without making them printable)."""
    problems = [f"crash reply {r!r}" for r in out.split(b"\r\n") if r.startswith(b"451 4.3.0")]
    try:
        out.decode("utf-8")
    except UnicodeDecodeError as exc:
        near = out[max(0, exc.start - 60) : exc.end + 20]
        problems.append(f"a reply that is not UTF-8: ...{near!r}...")
    return problems


def _legitimate(sender: str, rewrite: bool) -> bool:
    if rewrite:
        return sender in ("", MAILBOX)
    return sender in LEGITIMATE or sender.endswith(DEVICE_DOMAIN)


def _rewrite_router(client: ClientInfo, envelope: Envelope) -> Route:
    return Route(None, rewrite_to=MAILBOX)


async def _relay(make_relay: MakeRelay, rewrite: bool) -> Relay:
    relay = await make_relay(networks=(LOCALHOST,), limits=Limits(auth_delay=0.0))
    relay.users.add("app", "right-password", ["*"])
    if rewrite:
        relay.listener._shared.intake.router = _rewrite_router
    return relay


Check = Callable[[list[bytes]], None]


def _checker(
    relay: Relay,
    loop: asyncio.AbstractEventLoop,
    trap: CrashTrap,
    seen: Counter[str],
    *,
    rewrite: bool,
    expected: dict[tuple[bytes, ...], int | None],
) -> Check:
    """The check of one session, to run outside the loop (hypothesis is synchronous)."""
    peers = itertools.count(1)

    def check(segments: list[bytes]) -> None:
        n = next(peers)
        peer = f"127.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        trap.take()
        future = asyncio.run_coroutine_threadsafe(_session(relay, segments, peer), loop)
        out, queued, messages = future.result(timeout=60)
        no_crash(trap.take())
        problems = crash_replies(out)
        assert not problems, "\n".join(problems)
        replies = out.split(b"\r\n")
        data_starts = sum(1 for r in replies if r.startswith(b"354 "))
        acks = len(messages)
        assert queued == acks <= data_starts, (queued, acks, data_starts)
        senders = [m.sender for m, _ in messages]
        assert all(_legitimate(s, rewrite) for s in senders), senders
        want = expected.get(tuple(segments))
        assert want is None or queued == want, (queued, want)
        assert not any(r.startswith(b"235") for r in replies)  # never AUTH in plain text
        if rewrite:
            for msg, content in messages:
                wrong = not_rewritten(content, MAILBOX)
                assert not wrong, (msg.id, wrong)
        seen["sessions"] += 1
        seen["with a message queued"] += acks > 0
        seen["messages queued"] += acks
        seen["closed by the relay"] += b"\r\n421 " in b"\r\n" + out
        seen["refused as smuggling or bare CR/LF"] += b"550 5.6.0" in out
        seen["SMTPUTF8 accepted"] += b"SMTPUTF8\r\n" in b"".join(segments) and b"250 2.1.0" in out

    return check


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    derandomize=SEED is None,
    database=None,
    # The explain phase traces every line the failing sessions run: minutes, not seconds.
    phases=[p for p in hypothesis.Phase if p is not hypothesis.Phase.explain],
)
"""The budget and conventions of a fuzz run (``FUZZ_EXAMPLES``, ``FUZZ_SEED``)."""


async def _fuzz(
    relay: Relay, trap: CrashTrap, strategy: st.SearchStrategy[list[bytes]], *, rewrite: bool
) -> Counter[str]:
    seen: Counter[str] = Counter()
    check = _checker(relay, asyncio.get_running_loop(), trap, seen, rewrite=rewrite, expected={})
    run = FUZZ_SETTINGS(given(strategy)(check))
    if SEED is not None:
        run = hypothesis.seed(int(SEED))(run)
    # hypothesis is synchronous: it runs in a thread, each session on this loop.
    await asyncio.to_thread(run)
    print(dict(seen))
    return seen


REWRITE = pytest.mark.parametrize("rewrite", [False, True], ids=["plain", "rewrite"])


@pytest.mark.parametrize(
    ("segments", "queued"),
    [pytest.param(segments, n, id=name) for name, segments, n in WRITTEN_OUT],
)
@REWRITE
async def test_written_out_sessions(
    make_relay: MakeRelay,
    crash_trap: CrashTrap,
    segments: list[bytes],
    queued: int | None,
    rewrite: bool,
) -> None:
    relay = await _relay(make_relay, rewrite)
    seen: Counter[str] = Counter()
    check = _checker(
        relay,
        asyncio.get_running_loop(),
        crash_trap,
        seen,
        rewrite=rewrite,
        expected={tuple(segments): queued},
    )
    await asyncio.to_thread(check, segments)
    assert seen["sessions"] == 1


@REWRITE
async def test_arbitrary_sessions_keep_the_invariants(
    make_relay: MakeRelay, crash_trap: CrashTrap, rewrite: bool
) -> None:
    relay = await _relay(make_relay, rewrite)
    seen = await _fuzz(relay, crash_trap, session, rewrite=rewrite)
    assert seen["with a message queued"] > 0


@REWRITE
async def test_hostile_sessions_keep_the_invariants(
    make_relay: MakeRelay, crash_trap: CrashTrap, rewrite: bool
) -> None:
    relay = await _relay(make_relay, rewrite)
    seen = await _fuzz(relay, crash_trap, hostile_session, rewrite=rewrite)
    assert seen["with a message queued"] > 0
    assert seen["SMTPUTF8 accepted"] > 0
