"""Delivery status notifications (Postfix's ``bounce``): telling a sender their mail failed.

When the worker fails a message for good, its ``on_failed`` hook (a :class:`Bouncer`) builds
an RFC 3464 report to the envelope sender, which the worker queues in the same transaction
as the failure (:class:`~smtp365.relay.queue.Bounce`): a crash cannot record the failure
and lose the report. The report is a ``multipart/report; report-type=delivery-status``
(RFC 6522) with three parts: a text explanation, the ``message/delivery-status`` (one block
per failed recipient) and the original header section as ``text/rfc822-headers`` (never the
body, at most :data:`HEADERS_CAP` bytes; left out when the content is gone).

Rules:

* A message with a null sender (``MAIL FROM:<>``) is itself a bounce and is never bounced
  (RFC 5321 §4.5.5): no loops. The report is queued with a null sender for the same
  reason; Exchange Online sends only as the signed-in mailbox, so the worker gives it the
  postmaster account's mailbox as envelope sender when it goes out.
* ``Status`` is ``4.4.7`` when the message expired in the queue (whatever its last error
  was), else the first ``5.x.x`` code in the reason, else its first ``4.x.x`` code made
  ``5.x.x`` (same subject and detail: the failure is permanent anyway), else ``5.0.0``.
  ``Diagnostic-Code`` carries the upstream reply when the reason contains one.
* Every value that came from outside (sender, recipients, reason, Message-ID, host
  name) is stripped of control characters before it goes into a header line, so a
  crafted reason or address cannot add header lines. Non-ASCII addresses use the ``utf-8``
  address type (RFC 6533) in the report, in its ASCII form.
* A reason that names recipients (``<addr>: 550 5.1.10 ...; <addr2>: ...``) gives each
  recipient its own ``Status`` and ``Diagnostic-Code``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import quopri
import re
import secrets
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import format_datetime
from pathlib import Path

from smtp365 import replies
from smtp365.errors import QueueError
from smtp365.models import Envelope, Reply, shown, undecodable
from smtp365.relay.queue import Bounce, Queue, QueuedMessage, State

__all__ = ["HEADERS_CAP", "Bouncer", "build_dsn", "diagnostic_of", "new_message_id", "status_of"]

log = logging.getLogger("smtp365.relay.dsn")

HEADERS_CAP = 64 * 1024
"""The most of the original header section a report carries, in bytes."""

SUBJECT = "Undelivered Mail Returned to Sender"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\d|\.\d)")
_REPLY = re.compile(r"(?<![\w.])[45]\d\d[ -](?=\S)")
_MSG_ID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+>")  # printable ASCII, no < > inside
_REFUSED = re.compile(r"\(refused: (.*)\)\s*$", re.S)
_LINE_END = re.compile(rb"\r\n|\r|\n")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_FOLD_AT = 78
_WORD_MAX = 900  # keeps every line under RFC 5322's 998 octets


# -- values ------------------------------------------------------------------


def _clean(text: str) -> str:
    """One line: control characters (CR, LF, NUL, ...) become spaces, runs of space one,
    bytes that were not UTF-8 ``\\xNN``."""
    return " ".join(_CONTROL.sub(" ", shown(text)).split())


def _ascii(text: str) -> str:
    return _clean(text).encode("ascii", "backslashreplace").decode("ascii")


def _host(name: str) -> str:
    """A host name as ASCII (IDNA when it can be), for ``dns;`` fields and Message-IDs."""
    name = _clean(name).strip(".")
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        name = name.encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^A-Za-z0-9.-]", "", name) or "localhost"


def _address(addr: str) -> str:
    """An address for the report: ``rfc822; a@b`` or, when not ASCII, ``utf-8; <xtext>``
    (RFC 6533 utf-8-addr-xtext: ``\\x{HEX}`` for non-ASCII, space, ``+``, ``=`` and ``\\``)."""
    addr = _clean(addr)
    if addr.isascii():
        return f"rfc822; {addr}"
    out = []
    for ch in addr:
        if ch.isascii() and ch not in " +=\\":
            out.append(ch)
        else:
            out.append(f"\\x{{{ord(ch):02X}}}")
    return "utf-8; " + "".join(out)


def _date(when: float) -> str:
    return format_datetime(dt.datetime.fromtimestamp(when, dt.UTC))


def new_message_id(reporting_mta: str, now: float | None = None) -> str:
    """A fresh ``<...@reporting_mta>`` for a report."""
    stamp = int(time.time() if now is None else now)
    return f"<{stamp}.{secrets.token_hex(8)}@{_host(reporting_mta)}>"


def status_of(reason: str, *, expired: bool = False) -> str:
    """The RFC 3463 status of a permanent failure explained by ``reason``."""
    if expired:
        return "4.4.7"
    codes = _ENHANCED.findall(reason)
    for cls, subject, detail in codes:
        if cls == "5":
            return f"5.{int(subject)}.{int(detail)}"
    for cls, subject, detail in codes:
        if cls == "4":
            return f"5.{int(subject)}.{int(detail)}"
    return "5.0.0"


def diagnostic_of(reason: str) -> str | None:
    """The upstream SMTP reply in ``reason`` (from its 3-digit code on), or ``None``."""
    m = _REPLY.search(reason)
    return _clean(reason[m.start() :]) if m else None


def _expired(reason: str) -> bool:
    return reason.strip().lower().startswith("expired")


def _per_recipient(reason: str, failed: Sequence[str]) -> dict[str, str]:
    """Each recipient's own part of a reason like ``... <a>: 550 ...; <b>: 550 ...``."""
    marks: list[tuple[int, int, str]] = []
    for addr in failed:
        token = f"<{addr}>: "
        at = reason.find(token)
        if at >= 0:
            marks.append((at, at + len(token), addr))
    marks.sort()
    parts: dict[str, str] = {}
    for k, (_, start, addr) in enumerate(marks):
        stop = marks[k + 1][0] if k + 1 < len(marks) else len(reason)
        parts[addr] = reason[start:stop].rstrip().removesuffix(";").rstrip()
    return parts


# -- lines -------------------------------------------------------------------


def _field(name: str, value: str) -> str:
    """``Name: value``, cleaned and folded at spaces (CRLF SP) near 78 characters."""
    words = _clean(value).split(" ")
    line = f"{name}:"
    lines: list[str] = []
    for word in words:
        while len(word) > _WORD_MAX:
            lines.append(line)
            line, word = " " + word[:_WORD_MAX], word[_WORD_MAX:]
        if len(line) + 1 + len(word) > _FOLD_AT and line.strip() != f"{name}:":
            lines.append(line)
            line = " " + word
        else:
            line = f"{line} {word}" if word else line
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _header_section(original: bytes) -> bytes:
    """The original header section (no body), CRLF line ends, at most :data:`HEADERS_CAP`
    bytes and cut only between whole fields."""
    if original.startswith((b"\r\n", b"\n")):
        return b""  # no header section at all
    m = _HEAD_END.search(original, 0, HEADERS_CAP * 2)
    head = original[: m.start()] if m else original[: HEADERS_CAP * 2]
    head = _LINE_END.sub(b"\r\n", head.replace(b"\x00", b"")).rstrip(b"\r\n")
    if len(head) <= HEADERS_CAP:
        return head + b"\r\n" if head else b""
    end = head.rfind(b"\r\n", 0, HEADERS_CAP - 1)  # head[:end] + CRLF fits the cap
    while end > 0 and head[end + 2 : end + 3] in (b" ", b"\t"):
        end = head.rfind(b"\r\n", 0, end)  # that field goes on past the cut: drop it whole
    return head[:end] + b"\r\n" if end > 0 else b""


def _text_part(text: str) -> tuple[bytes, bytes]:
    """(headers, body) of the human-readable part: 7bit ASCII, else UTF-8 quoted-printable."""
    if text.isascii():
        head = b"Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n"
        return head, text.replace("\n", "\r\n").encode("ascii")
    body = quopri.encodestring(text.encode("utf-8")).replace(b"\n", b"\r\n")
    head = (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n"
    )
    return head, body


@dataclass(frozen=True, slots=True)
class _Failure:
    recipient: str
    status: str
    diagnostic: str | None
    reason: str


def _advice(failures: Sequence[_Failure]) -> list[str]:
    """Why (when the reply catalogue knows the reply) and what to do."""
    first = failures[0]
    if first.status == "4.4.7":
        return [
            "What to do: the relay kept trying until the message expired. Send it again "
            "later; if this repeats, ask the relay's administrator."
        ]
    if first.diagnostic:
        code = int(first.diagnostic[:3])
        entry = replies.lookup(Reply.parse(code, first.diagnostic[4:]))
        if entry is not None:
            return [f"Why: {entry.meaning}.", f"What to do: {entry.fix}."]
    if first.status.startswith("5.1."):
        return ["What to do: check the recipient address for mistakes, then send again."]
    return [
        "What to do: correct the cause above (or ask the relay's administrator), "
        "then send the message again."
    ]


def _explanation(
    msg: QueuedMessage, reason: str, failures: Sequence[_Failure], reporting_mta: str
) -> str:
    wrap = textwrap.TextWrapper(width=76, break_on_hyphens=False)
    indented = textwrap.TextWrapper(
        width=76, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False
    )
    lines = [
        f"This is the mail system at {_host(reporting_mta)}.",
        "",
        *wrap.wrap(
            "Your message could not be delivered to the recipient(s) below. "
            "This is a permanent error: the relay will not try again."
        ),
        "",
    ]
    for failure in failures:
        lines.append(f"  <{_clean(failure.recipient)}>")
        why = _clean(failure.diagnostic or failure.reason)
        lines += indented.wrap(why) or [""]
    lines += [
        "",
        *wrap.wrap(f"Reason: {_clean(reason)}"),
        f"Queue ID: {_clean(msg.id)}",
        f"Received: {_date(msg.received_at)}",
    ]
    if _MSG_ID.fullmatch(_clean(msg.message_id)):
        lines.append(f"Message-ID: {_clean(msg.message_id)}")
    lines.append("")
    for advice in _advice(failures):
        lines += wrap.wrap(advice)
    return "\n".join(lines) + "\n"


def build_dsn(
    msg: QueuedMessage,
    reason: str,
    failed: Sequence[str],
    original: bytes | None,
    *,
    reporting_mta: str,
    from_address: str,
    now: float,
    message_id: str | None = None,
) -> bytes:
    """The complete report (RFC 5322, CRLF line ends) telling ``msg.sender`` that the
    ``failed`` recipients did not get ``msg``. ``original`` is its content (only the header
    section is used) or ``None`` when the content is gone."""
    expired = _expired(reason)
    own = _per_recipient(reason, failed)
    failures: list[_Failure] = []
    for rcpt in dict.fromkeys(failed):
        why = own.get(rcpt, reason)
        failures.append(_Failure(rcpt, status_of(why, expired=expired), diagnostic_of(why), why))
    if not failures:
        raise ValueError("a delivery status notification needs a failed recipient")
    mid = message_id if message_id is not None else new_message_id(reporting_mta, now)

    text_head, text_body = _text_part(_explanation(msg, reason, failures, reporting_mta))

    status_lines = [
        _field("Reporting-MTA", f"dns; {_host(reporting_mta)}"),
        _field("Arrival-Date", _date(msg.received_at)),
    ]
    for f in failures:
        status_lines.append("\r\n")
        status_lines.append(_field("Final-Recipient", _address(f.recipient)))
        status_lines.append(_field("Action", "failed"))
        status_lines.append(_field("Status", f.status))
        if f.diagnostic:
            status_lines.append(_field("Diagnostic-Code", f"smtp; {_ascii(f.diagnostic)}"))
        status_lines.append(_field("Last-Attempt-Date", _date(now)))
    status = "".join(status_lines).encode("ascii")

    headers = _header_section(original) if original is not None else b""
    eight_bit = not headers.isascii()

    boundary = f"=_dsn_{secrets.token_hex(16)}"
    while boundary.encode() in headers:  # pragma: no cover - 128 random bits
        boundary = f"=_dsn_{secrets.token_hex(16)}"
    sep = f"--{boundary}\r\n".encode()

    top = [
        _field("From", f"Mail Delivery System <{_clean(from_address)}>"),
        _field("To", f"<{_clean(msg.sender)}>"),
        _field("Subject", SUBJECT),
        _field("Date", _date(now)),
        _field("Message-ID", _clean(mid)),
    ]
    original_id = _clean(msg.message_id)
    if _MSG_ID.fullmatch(original_id):
        top += [_field("In-Reply-To", original_id), _field("References", original_id)]
    top += [
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        f' boundary="{boundary}"\r\n',
    ]
    if eight_bit:
        top.append("Content-Transfer-Encoding: 8bit\r\n")

    out = bytearray("".join(top).encode("utf-8"))
    out += b"\r\nThis is a MIME-encapsulated message.\r\n\r\n"
    out += sep + b"Content-Description: Notification\r\n" + text_head + b"\r\n" + text_body
    out += b"\r\n" + sep
    out += b"Content-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n"
    out += b"\r\n" + status
    if headers:
        out += b"\r\n" + sep
        out += b"Content-Description: Undelivered Message Headers\r\n"
        out += b"Content-Type: text/rfc822-headers\r\n"
        out += b"Content-Transfer-Encoding: " + (b"8bit" if eight_bit else b"7bit") + b"\r\n"
        out += b"\r\n" + headers
    out += f"\r\n--{boundary}--\r\n".encode()
    return bytes(out)


# -- the hook ----------------------------------------------------------------


def _read_head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(HEADERS_CAP * 2 + 4)


class Bouncer:
    """The worker's ``on_failed`` hook: the report to the sender of a failed message, for
    the worker to queue with the failure."""

    def __init__(
        self,
        queue: Queue,
        *,
        account: str | None,
        from_address: str,
        reporting_mta: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.account = account
        self.from_address = from_address
        self.reporting_mta = reporting_mta
        self.clock = clock

    async def __call__(
        self, msg: QueuedMessage, reason: str, failed: tuple[str, ...]
    ) -> Bounce | None:
        return await self.build(msg, reason, failed)

    async def build(self, msg: QueuedMessage, reason: str, failed: Sequence[str]) -> Bounce | None:
        """The report on ``failed`` recipients of ``msg``; ``None`` when none is due."""
        if msg.sender == "":
            log.info("no bounce for %s: null sender", msg.id)
            return None
        if not failed:
            log.info("no bounce for %s: no failed recipient", msg.id)
            return None
        if (
            _CONTROL.search(msg.sender)
            or any(c in msg.sender for c in " <>")
            or undecodable(msg.sender)
        ):
            log.warning("no bounce for %s: unusable sender %r", msg.id, msg.sender)
            return None
        reason = await self._detailed(msg, reason)
        original = await self._original(msg)
        now = self.clock()
        mid = new_message_id(self.reporting_mta, now)
        content = build_dsn(
            msg,
            reason,
            failed,
            original,
            reporting_mta=self.reporting_mta,
            from_address=self.from_address,
            now=now,
            message_id=mid,
        )
        return Bounce(
            queue_id=self.queue.new_id(),
            envelope=Envelope(sender="", recipients=(msg.sender,)),
            content=content,
            message_id=mid,
            account=self.account,
            client="bounce",
        )

    async def _detailed(self, msg: QueuedMessage, reason: str) -> str:
        """A reason without a reply (``recipient refused`` after a partial delivery) gets the
        per-recipient replies the queue logged with the delivery."""
        if diagnostic_of(reason) is not None:
            return reason
        try:
            entry = await self.queue.get(msg.id)
        except QueueError:
            return reason
        if entry is None or entry.state is not State.DELIVERED:
            return reason
        m = _REFUSED.search(entry.last_reason)
        return f"{reason}: {m.group(1)}" if m else reason

    async def _original(self, msg: QueuedMessage) -> bytes | None:
        """The start of the content (enough for the header section), or ``None`` if gone."""
        if msg.content_path is not None:
            try:
                return await asyncio.to_thread(_read_head, msg.content_path)
            except OSError:
                pass  # delivered or purged meanwhile, or unreadable: ask the queue
        try:
            return await self.queue.read(msg.id)
        except QueueError:
            return None
