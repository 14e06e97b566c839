"""Plain data shared by every layer (and the only module the sandbox shares with the client)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b\s*")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: ``code``, the RFC 3463 enhanced code (or ``""``) and the rest of the text."""

    code: int
    enhanced: str
    text: str

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """Split ``"5.7.3 Authentication unsuccessful"`` into enhanced code and text.

        Multi-line replies arrive joined by newlines; the enhanced code of the
        first line is kept and repeated codes on the following lines dropped.
        """
        message = shown(message)  # bytes of the reply that were not UTF-8, as \xNN
        lines = [line.strip() for line in message.replace("\r", "").split("\n") if line.strip()]
        enhanced = ""
        texts: list[str] = []
        for line in lines:
            m = _ENHANCED.match(line)
            if m:
                enhanced = enhanced or m.group(0).strip()
                line = line[m.end() :]
            texts.append(line)
        return cls(code=code, enhanced=enhanced, text=" ".join(texts))

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)


@dataclass(frozen=True, slots=True)
class Envelope:
    """SMTP envelope: ``MAIL FROM`` and ``RCPT TO`` addresses (without angle brackets)."""

    sender: str
    recipients: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Submission:
    """One message ready for a transport: envelope plus the RFC 5322 bytes (CRLF line ends)."""

    envelope: Envelope
    content: bytes
    message_id: str = ""


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """What the upstream said after accepting a message."""

    reply: Reply
    message_id: str
    accepted: tuple[str, ...]
    refused: dict[str, Reply] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def upstream_id(self) -> str:
        """The server's own reference, e.g. ``[Hostname=...]`` or the queue id after ``OK``."""
        return self.reply.text


def undecodable(text: str) -> bool:
    """Whether ``text`` holds lone surrogates: bytes that were not UTF-8, kept by a
    ``surrogateescape`` decoding (aiosmtpd decodes command lines so). Such text cannot be
    encoded as UTF-8, so it can never go out on the wire, into a file or a report."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def shown(text: str) -> str:
    """``text`` fit to print, log or reply with: the bytes that were not UTF-8 written as
    ``\\xNN`` (any other lone surrogate as ``\\uNNNN``), everything else as it is."""
    if not undecodable(text):
        return text
    return "".join(
        f"\\x{ord(c) - 0xDC00:02x}"
        if 0xDC80 <= ord(c) <= 0xDCFF
        else f"\\u{ord(c):04x}"
        if 0xD800 <= ord(c) <= 0xDFFF
        else c
        for c in text
    )
