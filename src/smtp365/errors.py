"""The whole smtp365 exception tree.

Every error a caller can see is a :class:`Smtp365Error`. Each carries:

* ``what``/``str(err)``: what happened, in one sentence;
* ``fix``: what to do about it (may be empty when there is nothing to do);
* ``temporary``: whether trying again later can succeed. The relay decides
  defer-or-bounce from this flag alone.

Third-party exceptions (aiosmtplib, ssl, socket, msal, httpx) never cross the
border of the module that uses the library: they are mapped into this tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smtp365.replies import CatalogueEntry


class Smtp365Error(Exception):
    """Root of every error smtp365 raises on purpose."""

    temporary: bool = False

    def __init__(self, what: str, *, fix: str = "", temporary: bool | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix
        if temporary is not None:
            self.temporary = temporary

    def __str__(self) -> str:
        if self.fix:
            return f"{self.what}\n  fix: {self.fix}"
        return self.what


class ConfigError(Smtp365Error):
    """The configuration is missing, unreadable or inconsistent."""


class MessageError(Smtp365Error):
    """The message or envelope given to smtp365 is unusable (bad address, unreadable file...)."""


class AuthError(Smtp365Error):
    """No credentials could be obtained: token acquisition failed, consent missing, no secret."""


class TransportError(Smtp365Error):
    """The conversation with the server failed below the SMTP reply level.

    Temporary by default: a network problem usually goes away, and a relay
    must defer rather than bounce. ``possibly_delivered``: it failed after the
    whole message was sent (the final dot) and before the server's reply, so the
    server may have it and a retry may deliver it twice.
    """

    temporary = True
    possibly_delivered = False


class ConnectError(TransportError, ConnectionError):
    """The TCP connection could not be opened or was lost."""


class TransportTimeout(TransportError, TimeoutError):
    """The server did not answer in time."""


class TLSError(TransportError):
    """TLS could not be established safely (handshake, certificate, version)."""


class TLSModeMismatch(TLSError):
    """The account's TLS mode does not match the port: implicit TLS where the server speaks
    plain SMTP first ("SSL on 587"), or STARTTLS where it expects a TLS ClientHello (465).
    Permanent: nothing changes until the configuration does."""

    temporary = False


class StartTLSUnavailable(TLSError):
    """STARTTLS was not offered or not accepted: smtp365 never continues in plain text."""


class StartTLSInjection(TLSError):
    """Bytes followed the server's ``220`` to STARTTLS: a man in the middle is likely."""


class ProtocolError(TransportError):
    """The server said something that is not valid SMTP, or not what Exchange Online says."""


class SubmissionRejected(Smtp365Error):
    """The server answered with an SMTP error reply.

    ``code``/``enhanced``/``text`` are the reply as received; ``stage`` is the
    command it answered (``connect``, ``ehlo``, ``auth``, ``mail``, ``rcpt``,
    ``data``); ``entry`` is the catalogue entry that explains it, if any.
    ``temporary`` comes from the catalogue when the reply is known (so
    ``554 5.2.0 SubmissionQuotaExceeded`` is temporary despite its 5xx) and
    from the reply class otherwise.
    """

    def __init__(
        self,
        *,
        code: int,
        enhanced: str,
        text: str,
        stage: str,
        entry: CatalogueEntry | None = None,
        recipient: str | None = None,
    ) -> None:
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.stage = stage
        self.entry = entry
        self.recipient = recipient
        reply = f"{code} {enhanced} {text}".replace("  ", " ").strip()
        where = f" for <{recipient}>" if recipient else ""
        if entry is not None:
            what = f"the server refused {stage.upper()}{where}: {reply} -- {entry.meaning}"
            fix = entry.fix
            temporary = entry.temporary
        else:
            what = f"the server refused {stage.upper()}{where}: {reply}"
            fix = (
                "try again later"
                if 400 <= code < 500
                else "read the server's reply above; it is not in smtp365's catalogue"
            )
            temporary = 400 <= code < 500
        super().__init__(what, fix=fix, temporary=temporary)


class AuthenticationRejected(SubmissionRejected):
    """The server refused the credentials (``535``, ``530``, ``550 5.7.30``...)."""


class QueueError(Smtp365Error):
    """The relay's queue could not store or read a message."""


class QueueContentLost(QueueError):
    """A message waiting in the queue has lost its content (its spool file is missing)."""


class BasicAuthWarning(FutureWarning):
    """AUTH LOGIN (Basic authentication) is being retired by Microsoft; use XOAUTH2."""
