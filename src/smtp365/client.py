"""The library's front door: :class:`Mailer` (async), :func:`send`, and their sync wrappers.

>>> import smtp365
>>> smtp365.send_sync(to="someone@example.com", subject="Hi", text="Hello")  # doctest: +SKIP

Messages are an :class:`email.message.EmailMessage` or plain fields. From,
Message-ID and Date are set when missing; Bcc recipients are delivered but the
Bcc header is never transmitted.
"""

from __future__ import annotations

import asyncio
import copy
import mimetypes
from collections.abc import Iterable, Sequence
from email import policy
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid
from pathlib import Path
from types import TracebackType
from typing import Any

from smtp365.auth import TokenProvider
from smtp365.config import AccountSettings, Settings, load
from smtp365.errors import MessageError
from smtp365.models import DeliveryOutcome, Envelope, Submission
from smtp365.transport import SmtpTransport, Transport, check_address

Addresses = str | Sequence[str] | None
Attachment = str | Path | tuple[str, bytes] | tuple[str, bytes, str]


def _as_list(value: Addresses) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [a.strip() for a in value.split(",") if a.strip()]
    return [a for a in value if a]


def _set_header(msg: EmailMessage, name: str, value: str) -> None:
    try:
        msg[name] = value
    except (ValueError, TypeError) as exc:
        raise MessageError(
            f"the {name} header {value!r} is not valid: {exc}",
            fix="header values are single lines without CR or LF",
        ) from None


def _attach(msg: EmailMessage, item: Attachment) -> None:
    if isinstance(item, str | Path):
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MessageError(
                f"cannot read attachment {path}: {exc.strerror or exc}",
                fix="check the path and that the file is readable",
            ) from None
        name = path.name
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
    else:
        name, data = item[0], item[1]
        given: str | None = item[2] if len(item) == 3 else None
        ctype = given or mimetypes.guess_type(name)[0] or "application/octet-stream"
    maintype, _, subtype = ctype.partition("/")
    msg.add_attachment(data, maintype=maintype, subtype=subtype or "octet-stream", filename=name)


def build_message(
    *,
    sender: str | None = None,
    to: Addresses = None,
    cc: Addresses = None,
    bcc: Addresses = None,
    reply_to: Addresses = None,
    subject: str = "",
    text: str | None = None,
    html: str | None = None,
    attachments: Iterable[Attachment] = (),
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    """An :class:`EmailMessage` from plain fields (text and/or HTML, attachments)."""
    msg = EmailMessage()
    if sender:
        _set_header(msg, "From", sender)
    for name, value in (("To", to), ("Cc", cc), ("Bcc", bcc), ("Reply-To", reply_to)):
        addrs = _as_list(value)
        if addrs:
            _set_header(msg, name, ", ".join(addrs))
    _set_header(msg, "Subject", subject)
    for name, value in (headers or {}).items():
        _set_header(msg, name, value)
    if text is None and html is None:
        text = ""
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    elif html is not None:
        msg.set_content(html, subtype="html")
    for item in attachments:
        _attach(msg, item)
    return msg


def prepare(
    message: EmailMessage,
    account: AccountSettings,
    *,
    envelope_from: str | None = None,
    recipients: Sequence[str] | None = None,
) -> Submission:
    """Fill From / Message-ID / Date, derive the envelope, serialise with CRLF line ends.

    ``recipients`` (as with ``sendmail`` given addresses) replaces the
    To/Cc/Bcc-derived list. The caller's message is not modified.
    """
    msg = copy.deepcopy(message)
    if msg["From"] is None:
        if not account.sender:
            raise MessageError(
                "the message has no From and the account has no username or from_address",
                fix="set from_address/username in the account, or a From header",
            )
        _set_header(msg, "From", account.sender)
    from_addrs = [a for _, a in getaddresses([str(msg["From"])]) if a]
    if msg["Message-ID"] is None:
        domain = (from_addrs[0].rpartition("@")[2] if from_addrs else "") or "smtp365.local"
        _set_header(msg, "Message-ID", make_msgid(domain=domain))
    if msg["Date"] is None:
        _set_header(msg, "Date", formatdate(localtime=True))

    if recipients is None:
        fields = [str(v) for name in ("To", "Cc", "Bcc") for v in (msg.get_all(name) or [])]
        recipients = [a for _, a in getaddresses(fields) if a]
    rcpts = tuple(dict.fromkeys(check_address(r, what="recipient") for r in recipients))
    if not rcpts:
        raise MessageError("the message has no recipients", fix="add To, Cc or Bcc recipients")
    sender = envelope_from or (from_addrs[0] if from_addrs else account.sender) or ""
    check_address(sender, what="envelope sender")
    del msg["Bcc"]

    utf8 = not (sender.isascii() and all(r.isascii() for r in rcpts))
    try:
        content = msg.as_bytes(policy=policy.SMTPUTF8 if utf8 else policy.SMTP)
    except (ValueError, TypeError, UnicodeError) as exc:
        raise MessageError(f"the message cannot be serialised: {exc}") from None
    return Submission(
        envelope=Envelope(sender=sender, recipients=rcpts),
        content=content,
        message_id=str(msg["Message-ID"]),
    )


class Mailer:
    """Sends messages through one account over one reused connection.

    ``account`` is an :class:`AccountSettings`, an account name from the
    configuration, or ``None`` for the default account.
    """

    def __init__(
        self,
        account: AccountSettings | str | None = None,
        *,
        settings: Settings | None = None,
        transport: Transport | None = None,
        token_provider: TokenProvider | None = None,
    ) -> None:
        if not isinstance(account, AccountSettings):
            account = (settings or load(account=account)).account(account)
        self.account = account
        self.transport: Transport = transport or SmtpTransport(
            account, token_provider=token_provider
        )

    def __repr__(self) -> str:
        return f"Mailer({self.transport!r})"

    async def __aenter__(self) -> Mailer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(
        self,
        message: EmailMessage | None = None,
        *,
        envelope_from: str | None = None,
        recipients: Sequence[str] | None = None,
        **fields: Any,
    ) -> DeliveryOutcome:
        """Send ``message``, or one built from ``fields`` (see :func:`build_message`)."""
        if message is None:
            fields.setdefault("sender", self.account.sender)
            message = build_message(**fields)
        elif fields:
            raise TypeError("give either an EmailMessage or message fields, not both")
        submission = prepare(
            message, self.account, envelope_from=envelope_from, recipients=recipients
        )
        return await self.transport.submit(submission)

    async def close(self) -> None:
        await self.transport.close()


async def send(
    message: EmailMessage | None = None,
    *,
    account: AccountSettings | str | None = None,
    settings: Settings | None = None,
    token_provider: TokenProvider | None = None,
    **fields: Any,
) -> DeliveryOutcome:
    """Send one message in one call (a new connection, closed afterwards)."""
    async with Mailer(account, settings=settings, token_provider=token_provider) as mailer:
        return await mailer.send(message, **fields)


def send_sync(message: EmailMessage | None = None, **kwargs: Any) -> DeliveryOutcome:
    """:func:`send` for code without an event loop."""
    return asyncio.run(send(message, **kwargs))


class SyncMailer:
    """:class:`Mailer` for code without an event loop; keeps its connection between sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._runner = asyncio.Runner()
        self._mailer = Mailer(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Sync{self._mailer!r}"

    def __enter__(self) -> SyncMailer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def account(self) -> AccountSettings:
        return self._mailer.account

    def send(self, message: EmailMessage | None = None, **kwargs: Any) -> DeliveryOutcome:
        return self._runner.run(self._mailer.send(message, **kwargs))

    def close(self) -> None:
        try:
            self._runner.run(self._mailer.close())
        finally:
            self._runner.close()
