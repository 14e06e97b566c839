"""Intake (Postfix's cleanup): from a received DATA to a durable queue entry.

The listener feeds the message line by line (already un-dot-stuffed, CRLF line ends) into a
:class:`Draft`. The draft keeps the header section in memory (bounded by
``header_limit``), then writes ``Received:`` (and ``Message-ID:`` when the message has none)
in front of it, and streams the rest: in memory up to ``spill_at`` bytes, then into a file in
the queue's ``incoming/`` directory, which the queue takes over without copying. So a 35 MB
message is never held in memory. :meth:`Draft.commit` returns only once
``queue.enqueue`` returned, i.e. once the message is durable.

Routing happens here too (Postfix's cleanup does its canonical rewriting at the same
point): a :data:`Router` picks the sending account for the client and envelope, and may ask
for a **sender rewrite**: the envelope sender and ``From:`` become the account's mailbox
(Exchange Online sends only as the mailbox, or with SendAs), the original ``From:`` is kept
in ``Reply-To:`` (unless the message has one) and any ``Sender:`` is dropped. A null
envelope sender (``<>``: a bounce or another automatic report) stays null, so that the
relay never bounces it; its headers are rewritten all the same, since Exchange Online
checks ``From:`` against the mailbox (``5.2.252 SendAsDenied``) whatever the envelope says.

The queue id is chosen before the message is written (``Queue.new_id``), so the
``Received:`` header names it (``id``) and leads back to ``smtp365 queue show``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import format_datetime
from pathlib import Path
from typing import BinaryIO

from smtp365.errors import MessageError
from smtp365.models import Envelope, shown, undecodable
from smtp365.relay.queue import Content, Queue

__all__ = ["ClientInfo", "Draft", "Intake", "Route", "Router", "rewrite_headers"]

log = logging.getLogger("smtp365.relay.intake")

_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)")
_BAD_ADDR = re.compile(r"[\x00-\x1f\x7f<>]")


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What the listener knows about the client, for ``Received:`` and the queue."""

    ip: str
    helo: str = ""
    tls: str = ""  # TLS version ("TLSv1.3") or "" for a plain session
    esmtp: bool = True
    user: str | None = None  # authenticated user name
    identity: str = ""  # the policy identity, e.g. "user scanner" / "network lan"
    network: str | None = None  # the allow-listed network's name, when not authenticated

    @property
    def protocol(self) -> str:
        """RFC 3848 ``with`` keyword."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.user else "")

    @property
    def queue_client(self) -> str:
        return self.user if self.user is not None else self.ip


@dataclass(frozen=True, slots=True)
class Route:
    """Where a message goes: its sending account, and the mailbox to send as (rewrite)."""

    account: str | None = None  # None: the scheduler routes it later
    rewrite_to: str | None = None  # send as this address; the original goes to Reply-To


Router = Callable[[ClientInfo, Envelope], Route]
"""Chooses the :class:`Route` of a message from the client and its envelope."""


def _fields(head: bytes) -> list[bytes]:
    """Header fields (each with its continuation lines and line ends)."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower() if b":" in field else b""


def _quote(text: str) -> str:
    return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'


def rewrite_headers(head: bytes, mailbox: str, original_sender: str) -> bytes:
    """The header section with ``From:`` set to ``mailbox``; the original ``From:`` (else
    the envelope sender) moves to ``Reply-To:`` unless one exists; ``Sender:`` dropped.

    ``head`` is the header section without the empty line that ends it."""
    fields = _fields(head)
    # A section that starts with a continuation line continues the field before it (the
    # Received: written in front): it must not continue the new From: (a sender smuggled in).
    orphan = fields.pop(0) if fields and fields[0][:1] in (b" ", b"\t") else b""
    names = [_name(f) for f in fields]
    old_from = next((f for f, n in zip(fields, names, strict=True) if n == b"from"), None)
    keep = [f for f, n in zip(fields, names, strict=True) if n not in (b"from", b"sender")]
    if old_from is not None:
        value = old_from.split(b":", 1)[1].strip()
        shown = re.sub(rb"\s+", b" ", value).decode("utf-8", "replace")
    else:
        value = f"<{original_sender}>".encode() if original_sender else b""
        shown = original_sender
    display = _clean_display(shown) or mailbox
    new = [f"From: {_quote(display)} <{mailbox}>\r\n".encode()]
    if b"reply-to" not in names and value:
        new.append(b"Reply-To: " + value + b"\r\n")
    return orphan + b"".join(new + keep)


def _clean_display(text: str) -> str:
    """A display name from a From value: its phrase, else the bare address."""
    text = re.sub(r"[\x00-\x1f\x7f]", "", text).strip()
    if "<" in text:
        phrase = text.split("<", 1)[0].strip().strip('"').strip()
        if phrase and not phrase.startswith("=?"):
            return phrase[:100]
        return text.split("<", 1)[1].split(">", 1)[0].strip()[:100]
    return text[:100]


def _clean(text: str) -> str:
    return re.sub(r"[^\x21-\x7e]", "?", text)[:255]


class Draft:
    """One message being received. Not reusable: commit or discard it."""

    def __init__(
        self,
        intake: Intake,
        client: ClientInfo,
        envelope: Envelope,
    ) -> None:
        self._intake = intake
        self.client = client
        self.route = intake.route(client, envelope)
        self.original_sender = envelope.sender
        rewrite = self.route.rewrite_to
        # <> is never rewritten (a bounce stays one); its headers are, as Exchange needs.
        self._rewrite_head = bool(
            rewrite and (not envelope.sender or rewrite.lower() != envelope.sender.lower())
        )
        if rewrite and self._rewrite_head and envelope.sender:
            envelope = Envelope(sender=rewrite, recipients=envelope.recipients)
        self.envelope = envelope
        self.queue_id = intake.queue.new_id()  # known now: the Received: header names it
        self.message_id = ""
        self._headers: bytearray | None = bytearray()  # None once the head is written
        self._mem = bytearray()
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self.size = 0
        self._done = False

    # ------------------------------------------------------------ writing

    def feed(self, data: bytes) -> None:
        """The next piece of content: one or more whole lines, each ending in CRLF."""
        if self._headers is not None:
            headers = self._headers
            seen = len(headers)
            headers += data
            # The empty line that ends the header section (it may straddle two pieces).
            end = 0 if headers.startswith(b"\r\n") else headers.find(b"\r\n\r\n", max(0, seen - 3))
            limit = self._intake.header_limit
            if (end if end >= 0 else len(headers)) > limit:
                # Every header field must pass the policy (the sender rewrite): a section
                # larger than the limit is refused, never forwarded partly unseen.
                self._headers = None
                raise MessageError(
                    f"Message header section exceeds fixed maximum size ({limit} octets)",
                    fix="send fewer or shorter header fields",
                )
            if end >= 0:
                self._flush_head()
            return
        self._write(data)

    def _flush_head(self) -> None:
        assert self._headers is not None
        headers = bytes(self._headers)
        self._headers = None
        end = -2 if headers.startswith(b"\r\n") else headers.find(b"\r\n\r\n")
        head = headers if end == -1 else headers[: end + 2]
        if self.route.rewrite_to and self._rewrite_head:
            rest = headers[len(head) :]
            head = rewrite_headers(head, self.route.rewrite_to, self.original_sender)
            headers = head + rest
        found = _MESSAGE_ID.search(head)
        prefix = self._intake.received(self.client, self.envelope, self.queue_id)
        if found is not None:
            self.message_id = found.group(1).strip().decode("ascii", "replace")
        else:
            self.message_id = f"<{uuid.uuid4().hex}@{self._intake.hostname}>"
            prefix += f"Message-ID: {self.message_id}\r\n".encode()
        self._write(prefix)
        self._write(headers)

    def _write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._mem += data
        if len(self._mem) > self._intake.spill_at:
            fd, name = tempfile.mkstemp(prefix="smtpd-", suffix=".tmp", dir=self._intake.spool)
            self._path = Path(name)
            self._file = os.fdopen(fd, "wb")
            self._file.write(self._mem)
            self._mem = bytearray()

    # ------------------------------------------------------------ ending

    async def commit(self) -> str:
        """Make the message durable; returns the queue id."""
        if self._done:
            raise MessageError("this message was already committed or discarded")
        if self._headers is not None:
            self._flush_head()
        content: Content
        if self._file is not None:
            assert self._path is not None
            self._file.close()
            self._file = None
            content = self._path
        else:
            content = bytes(self._mem)
        self._done = True
        try:
            queue_id = await self._intake.queue.enqueue(
                self.envelope,
                content,
                message_id=self.message_id,
                account=self.route.account,
                client=self.client.queue_client,
                queue_id=self.queue_id,
            )
        finally:
            self._mem = bytearray()
            if self._path is not None and self._path.exists():
                with contextlib.suppress(OSError):
                    self._path.unlink()  # the queue did not take it (error)
        log.info(
            "accepted %s from [%s] %s sender=<%s>%s recipients=%d size=%d account=%s msgid=%s",
            queue_id,
            self.client.ip,
            self.client.identity,
            self.envelope.sender,
            f" (was <{self.original_sender}>)"
            if self.envelope.sender != self.original_sender
            else "",
            len(self.envelope.recipients),
            self.size,
            self.route.account or "-",
            self.message_id,
        )
        if self._intake.on_enqueued is not None:
            self._intake.on_enqueued(queue_id)
        return queue_id

    def discard(self) -> None:
        self._done = True
        self._mem = bytearray()
        self._headers = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            self._path = None


class Intake:
    """Shared by every session of a listener."""

    def __init__(
        self,
        queue: Queue,
        *,
        hostname: str,
        spool: str | os.PathLike[str] | None = None,
        spill_at: int = 64 * 1024,
        header_limit: int = 256 * 1024,
        default_account: str | None = None,
        router: Router | None = None,
        on_enqueued: Callable[[str], None] | None = None,
    ) -> None:
        self.queue = queue
        self.hostname = hostname
        if spool is None:
            incoming = getattr(queue, "incoming_dir", None)
            spool = incoming if isinstance(incoming, Path) else None
        self.spool = Path(spool) if spool is not None else Path(tempfile.gettempdir())
        self.spill_at = spill_at
        self.header_limit = header_limit
        self.default_account = default_account
        self.router = router
        self.on_enqueued = on_enqueued

    @property
    def storage_dir(self) -> Path:
        """Where the disk space check looks."""
        root = getattr(self.queue, "root", None)
        return root if isinstance(root, Path) else self.spool

    def route(self, client: ClientInfo, envelope: Envelope) -> Route:
        """The sending account (and rewrite) chosen at intake."""
        if self.router is not None:
            return self.router(client, envelope)
        return Route(self.default_account)

    def validate(self, envelope: Envelope) -> None:
        if not envelope.recipients:
            raise MessageError("a message needs at least one recipient")
        for addr in (envelope.sender, *envelope.recipients):
            if _BAD_ADDR.search(addr):
                raise MessageError(f"invalid characters in envelope address {addr!r}")
            if undecodable(addr):
                raise MessageError(f"envelope address {shown(addr)} is not valid UTF-8")
        for rcpt in envelope.recipients:
            if "@" not in rcpt:
                raise MessageError(f"recipient {rcpt!r} is not a fully qualified address")

    def begin(self, client: ClientInfo, envelope: Envelope) -> Draft:
        self.validate(envelope)
        return Draft(self, client, envelope)

    def received(self, client: ClientInfo, envelope: Envelope, queue_id: str) -> bytes:
        helo = _clean(client.helo) or "unknown"
        ip = client.ip if ":" not in client.ip else f"IPv6:{client.ip}"
        lines = [f"Received: from {helo} ([{ip}])"]
        lines.append(f"\tby {self.hostname} (smtp365 relay) with {client.protocol}")
        if client.tls:
            lines[-1] += f" (version={_clean(client.tls)})"
        lines.append(f"\tid {queue_id}")
        if len(envelope.recipients) == 1:
            lines[-1] += f" for <{_clean(envelope.recipients[0])}>"
        text = "\r\n".join(lines)
        return f"{text};\r\n\t{_now_rfc5322()}\r\n".encode()


_DATE: tuple[int, str] = (0, "")


def _now_rfc5322() -> str:
    """The current time for a ``Received:`` header, formatted once per second."""
    global _DATE
    second = int(time.time())
    if _DATE[0] != second:
        _DATE = (second, format_datetime(dt.datetime.fromtimestamp(second, dt.UTC)))
    return _DATE[1]
