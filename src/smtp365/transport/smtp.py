"""SMTP submission to Exchange Online on aiosmtplib: STARTTLS mandatory, XOAUTH2 or LOGIN.

This is the only module that imports aiosmtplib; its exceptions (and ``ssl``'s)
are mapped into :mod:`smtp365.errors` here and never leave.

Defences (security.md §3, client side):

* STARTTLS is mandatory: not advertised, a reply other than ``220``, or bytes
  buffered after the ``220`` (a STARTTLS injection) stop the session before
  any credentials or mail are sent. There is no plain-text fallback.
* Certificate chain and host name are verified; TLS 1.2 is the floor. A certificate that
  fails verification is a permanent error: retrying meets the same certificate.
* The TLS mode must match the port. Implicit TLS answered in plain text, or a port that
  does not greet in clear text within :data:`GREETING_WAIT` but completes a TLS handshake
  (implicit TLS, 465) when STARTTLS is configured, is :class:`TLSModeMismatch` at once,
  not a timeout.
* EHLO is sent again after TLS and only those capabilities are trusted.
* CR, LF and NUL in addresses are refused before anything is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import ssl
import time
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectTimeoutError,
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from smtp365 import replies
from smtp365.auth import StaticTokenProvider, TokenProvider, provider_for
from smtp365.config import AccountSettings, AuthMethod, TLSMode
from smtp365.errors import (
    AuthenticationRejected,
    BasicAuthWarning,
    ConfigError,
    ConnectError,
    MessageError,
    ProtocolError,
    StartTLSInjection,
    StartTLSUnavailable,
    SubmissionRejected,
    TLSError,
    TLSModeMismatch,
    TransportError,
    TransportTimeout,
)
from smtp365.models import DeliveryOutcome, Reply, Submission, shown, undecodable
from smtp365.transport.tlsmode import (
    IMPLICIT_ON_PLAIN_PORT,
    PLAIN_FIRST_ON_TLS_PORT,
    TLSModeMistake,
    answered_in_plain_text,
    no_greeting_but_tls,
)

log = logging.getLogger("smtp365.transport.smtp")

_TLS_FLOOR = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_V_NOT_YET_VALID, _V_EXPIRED = 9, 10  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED


def check_address(address: str, *, what: str = "address") -> str:
    """Refuse control characters (CR, LF, NUL, tab ...) and angle brackets in an envelope
    address (command injection; it goes out between < and >)."""
    if any(c in address for c in "<>") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
        raise MessageError(
            f"the {what} {address!r} contains CR, LF, NUL, another control character or angle"
            " brackets",
            fix="remove them: an envelope address is a single line",
        )
    if not address.strip():
        raise MessageError(f"the {what} is empty", fix="give a full address, e.g. a@example.com")
    if undecodable(address):
        raise MessageError(
            f"the {what} {shown(address)} is not valid UTF-8: it cannot be sent",
            fix="an envelope address is ASCII or, with SMTPUTF8, UTF-8 (RFC 6531); correct "
            "the address where the message was written",
        )
    return address


def make_tls_context(account: AccountSettings) -> ssl.SSLContext:
    """A verifying client context: system CAs (+ ``ca_file``), host name check, TLS >= 1.2."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if account.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(account.ca_file.expanduser()))
        except (OSError, ssl.SSLError) as exc:
            raise TLSError(
                f"cannot load ca_file {account.ca_file}: {exc}",
                fix="point ca_file at a readable PEM file with the CA certificate",
                temporary=False,
            ) from None
    # Below 1.2 is never allowed (Exchange refuses it too); config check explains why.
    ctx.minimum_version = _TLS_FLOOR.get(account.tls_min_version, ssl.TLSVersion.TLSv1_2)
    return ctx


async def _envelope_command(
    smtp: aiosmtplib.SMTP, verb: bytes, address: str, options: list[str], *, utf8: bool
) -> aiosmtplib.SMTPResponse:
    """``MAIL FROM:<address>`` or ``RCPT TO:<address>``, raising aiosmtplib's refusal.

    ``smtp.mail``/``smtp.rcpt`` re-parse every address with ``email.utils`` and encode it as
    ASCII, so an internationalised address (RFC 6531) could not be sent at all; the address
    was checked by :func:`check_address`, so it goes out as it is, in UTF-8 under SMTPUTF8.
    """
    path = b"<" + address.encode("utf-8" if utf8 else "ascii") + b">"
    prefix = b"FROM:" if verb == b"MAIL" else b"TO:"
    args = [option.encode("ascii") for option in options]
    response = await smtp.execute_command(verb, prefix + path, *args)
    if verb == b"MAIL" and response.code != 250:
        raise aiosmtplib.SMTPSenderRefused(response.code, response.message, address)
    if verb == b"RCPT" and response.code not in (250, 251):
        raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, address)
    return response


DATA_CHUNK = 256 * 1024
# A connection idle for longer than this is checked with RSET before it carries the next
# message (as Postfix checks a cached one): a server or a NAT box that dropped it silently
# is found out, and the message goes over a new connection, before anything is sent.
IDLE_CHECK = 10.0


class _Unanswered(Exception):
    """The whole message was sent, but its reply never came: the server may have it."""

    def __init__(self, cause: SMTPException | OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


async def _data(smtp: aiosmtplib.SMTP, content: bytes) -> aiosmtplib.SMTPResponse:
    """``DATA`` and the content, without the copies ``smtp.data`` makes.

    aiosmtplib rewrites every line ending with a regular expression, then dot-stuffs with
    another, then appends the end of data and hands the result to the transport in one
    piece: about six times the message in memory at once (a 35 MB message: 200 MB). The
    relay's messages already end every line with CRLF, so here they are only dot-stuffed
    (one ``bytes.replace``, no copy when no line starts with a dot) and written in chunks,
    each after the transport has room. Content with bare CR or LF goes the library's way.
    Uses the 5.x protocol's flow control and reply flag (ADR 0001 pins aiosmtplib < 6).

    A connection lost (or a reply timed out) after the final dot raises :class:`_Unanswered`;
    on the library's way that is any loss after ``DATA``, as it cannot tell where it was.
    """
    crlf = content.count(b"\r\n")
    plain = content.endswith(b"\r\n") and content.count(b"\n") == crlf == content.count(b"\r")
    protocol: Any = smtp.protocol
    if not plain or protocol is None:
        try:
            return await smtp.data(content)
        except SMTPResponseException:
            raise
        except (SMTPException, OSError) as exc:
            raise _Unanswered(exc) from exc
    start = await smtp.execute_command(b"DATA")
    if start.code != 354:
        raise aiosmtplib.SMTPDataError(start.code, start.message)
    stuffed = memoryview(content.replace(b"\r\n.", b"\r\n.."))
    protocol._response_pending = True  # an early reply must not be taken for noise
    if content.startswith(b"."):
        protocol.write(b".")
    for at in range(0, len(stuffed), DATA_CHUNK):
        protocol.write(stuffed[at : at + DATA_CHUNK])
        await asyncio.wait_for(protocol._drain_helper(), smtp.timeout)
    protocol.write(b".\r\n")
    try:
        response: aiosmtplib.SMTPResponse = await protocol.read_response(timeout=smtp.timeout)
    except (SMTPException, OSError) as exc:
        raise _Unanswered(exc) from exc
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


def _desync(code: int) -> bool:
    """A reply to MAIL, RCPT or DATA that only a session out of step earns: ``503`` (bad
    sequence of commands) or a positive reply where a refusal or 250 belongs."""
    return code == 503 or code < 400 and code not in (250, 251, 354)


def _rejected(
    stage: str,
    code: int,
    message: str,
    *,
    recipient: str | None = None,
    auth: bool = False,
    mechanism: str | None = None,
) -> SubmissionRejected:
    """``mechanism``: for a reply to AUTH, the mechanism used (its catalogue entry depends on
    it: ``535 5.7.3`` is a refused token after XOAUTH2, a refused password after LOGIN)."""
    reply = Reply.parse(code, message)
    cls = AuthenticationRejected if auth else SubmissionRejected
    return cls(
        code=reply.code,
        enhanced=reply.enhanced,
        text=reply.text,
        stage=stage,
        entry=replies.lookup(reply, mechanism=mechanism),
        recipient=recipient,
    )


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    return next((e for e in _chain(exc) if isinstance(e, ssl.SSLError)), None)


def _refused(exc: BaseException) -> bool:
    return any(
        isinstance(e, ConnectionRefusedError)
        or (isinstance(e, OSError) and e.errno == errno.ECONNREFUSED)
        or f"[Errno {errno.ECONNREFUSED}]" in str(e)
        for e in _chain(exc)
    )


def _closed_before_greeting(exc: BaseException) -> bool:
    """The server closed (or reset) the connection before it greeted."""
    return not _refused(exc) and any(
        isinstance(e, SMTPServerDisconnected | ConnectionResetError) for e in _chain(exc)
    )


GREETING_WAIT = 5.0
"""Seconds a connection without implicit TLS waits for the server's clear-text greeting
(at most half the account's timeout) before it asks, over a second connection, whether the
port speaks TLS from the first byte (implicit TLS, port 465): such a server waits for the
client's ClientHello and never greets. The session goes on waiting for its greeting (up to
the account's timeout) unless that TLS handshake succeeds."""


async def _tls_first(account: AccountSettings) -> str | None:
    """The TLS version, if ``host:port`` completes a TLS handshake as soon as it is connected
    (implicit TLS); ``None`` if it answers in plain text, not at all, or fails otherwise.

    Only to learn what the port speaks: the certificate is not verified, so nothing at all
    is sent inside that TLS session, which is aborted at once.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(account.timeout):
            _, writer = await asyncio.open_connection(
                account.host,
                account.port,
                ssl=context,
                server_hostname=account.host,
                ssl_handshake_timeout=account.timeout,
            )
    except (OSError, EOFError, TimeoutError, ValueError):
        return None
    ssl_object = writer.get_extra_info("ssl_object")
    writer.transport.abort()
    version = ssl_object.version() if isinstance(ssl_object, ssl.SSLObject) else None
    return version or "TLS"


class _StaleConnection(ConnectError):
    """The server closed the connection before MAIL FROM was answered: nothing was sent."""


class _OutOfStep(ProtocolError):
    """MAIL FROM was answered out of sequence (``503``): nothing was sent."""


class SmtpTransport:
    """One SMTP connection to one account, reused for many messages.

    ``async with SmtpTransport(account) as t: await t.submit(sub)``. The
    connection opens lazily on the first :meth:`submit` and is reopened when
    the server has closed it between messages.
    """

    def __init__(
        self,
        account: AccountSettings,
        *,
        token_provider: TokenProvider | None = None,
        password: str | None = None,
    ) -> None:
        self.account = account
        self._token_provider = token_provider
        self._password = password
        self._smtp: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()
        self._last_used = 0.0  # time.monotonic() when the connection last answered
        self._open = False  # inside a mail transaction the server has not closed yet
        self.connections_opened = 0
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None

    def __repr__(self) -> str:
        a = self.account
        return f"SmtpTransport({a.name!r}, {a.host}:{a.port}, tls={a.tls.value}, user={a.username})"

    async def __aenter__(self) -> SmtpTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    # -- connection ---------------------------------------------------------

    async def connect(self) -> None:
        """Open the connection: greeting, EHLO, STARTTLS, EHLO, AUTH."""
        async with self._lock:
            await self._connect()

    async def _connect(self) -> None:
        if self.connected:
            return
        a = self.account
        if a.tls is TLSMode.NONE and a.auth is not AuthMethod.NONE and not _is_loopback(a.host):
            raise TLSError(
                f"refusing to send credentials to {a.host}:{a.port} without TLS",
                fix='set tls = "starttls" (or "implicit"); tls = "none" with authentication is '
                "only allowed for a server on this machine (localhost)",
                temporary=False,
            )
        ctx = make_tls_context(a) if a.tls is not TLSMode.NONE else None
        smtp = aiosmtplib.SMTP(
            hostname=a.host,
            port=a.port,
            timeout=a.timeout,
            use_tls=a.tls is TLSMode.IMPLICIT,
            start_tls=False,
            tls_context=ctx,
            local_hostname=a.ehlo_name,
        )
        self._smtp = smtp
        try:
            await self._open_session(smtp)
            await self._guard("ehlo", smtp.ehlo())
            if a.tls is TLSMode.STARTTLS:
                assert ctx is not None
                await self._starttls(smtp, ctx)
                await self._guard("ehlo", smtp.ehlo())
            self._record_tls(smtp)
            await self._authenticate(smtp)
        except BaseException:
            smtp.close()
            self._smtp = None
            raise
        self.connections_opened += 1
        self._last_used = time.monotonic()
        log.debug(
            "connected to %s:%s (%s, %s) as %s",
            a.host,
            a.port,
            self.tls_version,
            a.auth.value,
            a.username,
        )

    async def _open_session(self, smtp: aiosmtplib.SMTP) -> None:
        """TCP (and, for implicit TLS, the handshake), then the server's greeting.

        Without implicit TLS, a port that gives no clear-text greeting within
        :data:`GREETING_WAIT` (or closes before greeting) is asked whether it speaks TLS from
        the first byte; if it does, the settings cannot work, and waiting for the timeout
        would only end in the wrong explanation (a firewall).
        """
        a = self.account
        if a.tls is TLSMode.IMPLICIT:
            await self._guard("connect", smtp.connect())
            return
        wait = min(GREETING_WAIT, a.timeout / 2)
        connecting = asyncio.ensure_future(smtp.connect())
        probing: asyncio.Future[str | None] | None = None
        try:
            await asyncio.wait({connecting}, timeout=wait)
            if not connecting.done():
                probing = asyncio.ensure_future(_tls_first(a))
                await asyncio.wait({connecting, probing}, return_when=asyncio.FIRST_COMPLETED)
                if not connecting.done() and (version := probing.result()) is not None:
                    raise self._mode_mismatch(
                        PLAIN_FIRST_ON_TLS_PORT, no_greeting_but_tls(version, wait=wait)
                    )
                await asyncio.wait({connecting})  # plain text after all (a slow greeting)
            try:
                connecting.result()
            except (SMTPException, OSError) as exc:
                if probing is None and _closed_before_greeting(exc):
                    version = await _tls_first(a)
                    if version is not None:
                        raise self._mode_mismatch(
                            PLAIN_FIRST_ON_TLS_PORT, no_greeting_but_tls(version, wait=None)
                        ) from None
                raise self._map(exc, "connect") from None
        finally:
            pending = [t for t in (connecting, probing) if t is not None]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _mode_mismatch(self, mistake: TLSModeMistake, seen: str) -> TLSModeMismatch:
        a = self.account
        what = mistake.what(mode=a.tls.value, where=f"{a.host}:{a.port}", seen=seen)
        return TLSModeMismatch(f"{what} -- {mistake.why}", fix=mistake.fix)

    def _record_tls(self, smtp: aiosmtplib.SMTP) -> None:
        ssl_obj = smtp.get_transport_info("ssl_object")
        if isinstance(ssl_obj, ssl.SSLObject | ssl.SSLSocket):
            self.tls_version = ssl_obj.version()
            cipher = ssl_obj.cipher()
            self.tls_cipher = cipher[0] if cipher else None

    async def _starttls(self, smtp: aiosmtplib.SMTP, ctx: ssl.SSLContext) -> None:
        a = self.account
        if not smtp.supports_extension("starttls"):
            raise StartTLSUnavailable(
                f"{a.host}:{a.port} does not offer STARTTLS; smtp365 will not send credentials "
                "or mail in plain text",
                fix="check that the host and port are right (Exchange Online: "
                "smtp.office365.com:587); a missing STARTTLS can also mean something on the "
                "network strips it (a firewall's SMTP inspection, or an attack)",
            )
        protocol = smtp.protocol
        assert protocol is not None
        original: Callable[..., Awaitable[Any]] = protocol.read_response

        async def guarded(timeout: float | None = None) -> Any:
            response = await original(timeout=timeout)
            # aiosmtplib silently discards bytes buffered after the 220; a
            # compliant server sends nothing there, so anything is an injection.
            if response.code == 220 and getattr(protocol, "_buffer", b""):
                raise StartTLSInjection(
                    f"{a.host}:{a.port} sent data after its 220 reply to STARTTLS "
                    "(a STARTTLS command injection, CVE-2011-0411 class)",
                    fix="something between you and the server is tampering with SMTP; "
                    "do not send through this network path",
                )
            return response

        protocol.read_response = guarded  # type: ignore[method-assign]
        try:
            await smtp.starttls(tls_context=ctx, server_hostname=a.host)
        except SMTPResponseException as exc:
            raise StartTLSUnavailable(
                f"{a.host}:{a.port} refused STARTTLS: {exc.code} {exc.message}",
                fix="check the host and port; smtp365 never continues without TLS",
            ) from None
        except (SMTPException, OSError) as exc:
            if isinstance(exc, SMTPServerDisconnected) and _ssl_cause(exc) is None:
                raise TLSError(
                    f"TLS failed with {a.host}:{a.port}: the server closed the connection during "
                    "the TLS handshake",
                    fix="usually a TLS version or cipher mismatch: smtp365 requires TLS 1.2 or "
                    "newer (as Exchange Online does); an older server cannot be used",
                ) from None
            raise self._map(exc, "starttls") from None
        finally:
            if protocol.__dict__.get("read_response") is guarded:
                del protocol.read_response

    async def _authenticate(self, smtp: aiosmtplib.SMTP) -> None:
        a = self.account
        if a.auth is AuthMethod.NONE:
            return
        if not a.username:
            raise ConfigError(
                f"account {a.name!r} has auth = {a.auth.value!r} but no username",
                fix='set username = "mailbox@yourdomain.com"',
            )
        user = check_address(a.username, what="username")
        if not smtp.supports_extension("auth"):
            raise ProtocolError(
                f"{a.host}:{a.port} does not offer AUTH"
                + (" even after STARTTLS" if a.tls is TLSMode.STARTTLS else ""),
                fix="SMTP AUTH may be disabled for the tenant or this is not a submission "
                "port; check host and port",
                temporary=False,
            )
        if a.auth is AuthMethod.XOAUTH2:
            if self._token_provider is None:
                self._token_provider = provider_for(a, target="smtp")
            provider = self._token_provider
            token = await provider.get_token()
            try:
                await self._guard("auth", smtp.auth_xoauth2(user, token.token))
            except AuthenticationRejected as exc:
                if exc.code != 535 or isinstance(provider, StaticTokenProvider):
                    raise
                # The token may have been revoked server-side: one fresh token, one retry.
                log.info("XOAUTH2 refused for %s; retrying once with a fresh token", user)
                token = await provider.get_token(force_refresh=True)
                await self._guard("auth", smtp.auth_xoauth2(user, token.token))
        else:
            warnings.warn(
                "AUTH LOGIN (Basic authentication) is being retired by Microsoft; "
                'switch to auth = "xoauth2"',
                BasicAuthWarning,
                stacklevel=2,
            )
            log.warning("account %s uses Basic authentication (AUTH LOGIN)", a.name)
            password = self._password if self._password is not None else a.password_value()
            await self._guard("auth", smtp.auth_login(user, password))

    async def _guard(self, stage: str, coro: Awaitable[Any]) -> Any:
        try:
            return await coro
        except (SMTPException, OSError) as exc:
            raise self._map(exc, stage) from None

    def _map(self, exc: BaseException, stage: str) -> Exception:
        a = self.account
        where = f"{a.host}:{a.port}"
        if isinstance(exc, SMTPResponseException):
            return _rejected(
                stage,
                exc.code,
                exc.message,
                auth=isinstance(exc, SMTPAuthenticationError),
                mechanism=a.auth.value if stage == "auth" else None,
            )
        cause = _ssl_cause(exc)
        if isinstance(cause, ssl.SSLCertVerificationError):
            return self._untrusted(cause, stage)
        if (
            cause is not None
            and stage == "connect"
            and a.tls is TLSMode.IMPLICIT
            and answered_in_plain_text(cause)
        ):
            seen = f"the TLS handshake was answered in plain text: {cause.reason}"
            return self._mode_mismatch(IMPLICIT_ON_PLAIN_PORT, seen)
        if cause is not None:
            return TLSError(
                f"TLS failed with {where} during {stage}: {cause.reason or cause}",
                fix="Exchange Online needs TLS 1.2+; if the server is older, it cannot be used",
            )
        if isinstance(exc, SMTPConnectTimeoutError | SMTPTimeoutError | TimeoutError):
            return TransportTimeout(
                f"{where} did not answer within {a.timeout:g} s during {stage}",
                fix="a firewall may drop outbound traffic to this port; try another network, "
                "or raise timeout",
            )
        if isinstance(exc, SMTPServerDisconnected):
            return ConnectError(
                f"{where} closed the connection during {stage}",
                fix="try again; if it persists, run `smtp365 doctor`",
            )
        if _refused(exc):
            return ConnectError(
                f"connection to {where} refused",
                fix="check host and port (Exchange Online: smtp.office365.com:587)",
            )
        return ConnectError(
            f"cannot talk to {where} during {stage}: {exc}",
            fix="check the host name, port and network; `smtp365 doctor` tells more",
        )

    def _untrusted(self, cause: ssl.SSLCertVerificationError, stage: str) -> TLSError:
        """The certificate failed verification: permanent, as a retry meets the same
        certificate until the configuration (or the server) changes."""
        a = self.account
        reason = cause.verify_message or str(cause)
        if "hostname" in reason.lower() or "ip address mismatch" in reason.lower():
            fix = (
                f"the certificate is not valid for {a.host!r}: connect with the name on the "
                "certificate (Exchange Online: smtp.office365.com), not an IP or alias"
            )
        elif cause.verify_code == _V_EXPIRED:
            fix = (
                "the server's certificate has expired: its administrator must renew it; if "
                "this should be Exchange Online, check that you reach the real "
                "smtp.office365.com (a proxy may present its own stale certificate)"
            )
        elif cause.verify_code == _V_NOT_YET_VALID:
            fix = "the certificate is not valid yet: check this machine's clock (date, NTP)"
        else:
            fix = (
                "the server's certificate chain is not trusted: if it is a private CA, "
                "set ca_file to its PEM; if you did not expect that, someone may be "
                "intercepting TLS"
            )
        return TLSError(
            f"TLS certificate of {a.host}:{a.port} rejected during {stage}: {reason}",
            fix=fix,
            temporary=False,
        )

    # -- submission ---------------------------------------------------------

    async def submit(self, submission: Submission) -> DeliveryOutcome:
        """Send one message; raises only smtp365 errors.

        Whatever ends a transaction early (a refusal, a lost connection, an exception of any
        kind, a cancellation), the connection carries no other message until the
        transaction is over: ``RSET`` answered with 250, or the connection is closed."""
        env = submission.envelope
        check_address(env.sender, what="envelope sender") if env.sender else None
        for rcpt in env.recipients:
            check_address(rcpt, what="recipient")
        if not env.recipients:
            raise MessageError("the message has no recipients", fix="add --to, --cc or --bcc")
        async with self._lock:
            if self.connected and time.monotonic() - self._last_used > IDLE_CHECK:
                await self._rset()  # drops the connection if it no longer answers
            reused = self.connected
            await self._connect()
            try:
                return await self._transaction(submission)
            except (_StaleConnection, _OutOfStep):
                if not reused:
                    raise
                # The server closed an idle connection (or answered out of sequence) before
                # MAIL FROM was accepted: nothing was sent, so one fresh attempt is safe.
                log.debug("reused connection was unusable before MAIL FROM; reconnecting")
                self._drop()
                await self._connect()
                return await self._transaction(submission)
            finally:
                self._last_used = time.monotonic()
                if self._open:  # ended inside a transaction: never reused in that state
                    self._drop()

    def _out_of_sequence(
        self, stage: str, code: int, message: str, cls: type[ProtocolError] = ProtocolError
    ) -> ProtocolError:
        """A reply that belongs to a broken session, not to this message (``503 5.5.1 Sender
        already specified``, a 2xx/3xx where a refusal or 250 belongs): the connection is
        dropped, and the message is not to blame (temporary)."""
        self._drop()
        a = self.account
        reply = Reply.parse(code, message)
        entry = replies.lookup(reply)
        explained = f"{entry.meaning}; {entry.fix}. " if entry is not None else ""
        return cls(
            f"{a.host}:{a.port} answered {stage.upper()} out of sequence: {reply}",
            fix=f"{explained}The session was out of step with the server, not a fault of the "
            "message: it goes again over a new connection (if this repeats, run "
            "`smtp365 doctor`)",
            temporary=True,
        )

    async def _transaction(self, submission: Submission) -> DeliveryOutcome:
        smtp = self._smtp
        assert smtp is not None
        env = submission.envelope
        started = time.perf_counter()
        options: list[str] = [f"SIZE={len(submission.content)}"]
        needs_utf8 = not (env.sender.isascii() and all(r.isascii() for r in env.recipients))
        if needs_utf8:
            if not smtp.supports_extension("smtputf8"):
                raise MessageError(
                    "an address is not ASCII and the server does not support SMTPUTF8",
                    fix="use ASCII addresses",
                )
            options.append("SMTPUTF8")
        if not submission.content.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        self._open = True  # from MAIL FROM on, until DATA's 250 or RSET's
        try:
            await _envelope_command(smtp, b"MAIL", env.sender, options, utf8=needs_utf8)
        except SMTPResponseException as exc:
            if _desync(exc.code):
                raise self._out_of_sequence("mail", exc.code, exc.message, _OutOfStep) from None
            await self._rset()
            raise _rejected("mail", exc.code, exc.message) from None
        except (SMTPException, OSError) as exc:
            self._drop()
            if isinstance(exc, SMTPServerDisconnected):
                raise _StaleConnection(
                    f"{self.account.host}:{self.account.port} closed the connection before "
                    "MAIL FROM was answered",
                    fix="try again; if it persists, run `smtp365 doctor`",
                ) from None
            raise self._map(exc, "mail") from None

        accepted: list[str] = []
        refused: dict[str, Reply] = {}
        for rcpt in env.recipients:
            try:
                await _envelope_command(smtp, b"RCPT", rcpt, [], utf8=needs_utf8)
                accepted.append(rcpt)
            except SMTPResponseException as exc:
                if _desync(exc.code):
                    raise self._out_of_sequence("rcpt", exc.code, exc.message) from None
                refused[rcpt] = Reply.parse(exc.code, exc.message)
            except (SMTPException, OSError) as exc:
                self._drop()
                raise self._map(exc, "rcpt") from None
        if not accepted:
            await self._rset()
            first, reply = next(iter(refused.items()))
            raise _rejected("rcpt", reply.code, f"{reply.enhanced} {reply.text}", recipient=first)

        try:
            response = await _data(smtp, submission.content)
        except SMTPResponseException as exc:
            if _desync(exc.code):
                raise self._out_of_sequence("data", exc.code, exc.message) from None
            if exc.code == 421:
                self._drop()
            else:
                await self._rset()
            raise _rejected("data", exc.code, exc.message) from None
        except _Unanswered as lost:
            # After the final dot: the server may have the message. Callers that
            # retry accept a possible duplicate (the error says so).
            self._drop()
            error = self._map(lost.cause, "data")
            if isinstance(error, TransportError):
                error.possibly_delivered = True
            raise error from None
        except (SMTPException, OSError) as exc:
            # Before the final dot: the server cannot have accepted the message.
            self._drop()
            raise self._map(exc, "data") from None
        self._open = False
        reply = Reply.parse(response.code, response.message)
        return DeliveryOutcome(
            reply=reply,
            message_id=submission.message_id,
            accepted=tuple(accepted),
            refused=refused,
            elapsed=time.perf_counter() - started,
        )

    async def probe(self, sender: str, recipient: str) -> tuple[Reply, Reply]:
        """``MAIL FROM`` + ``RCPT TO``, then ``RSET``: nothing is sent. Rejections raise
        :class:`SubmissionRejected` with their catalogue entry (as :meth:`submit` does).

        A 250 here does not prove SendAs: Exchange Online checks it after the data.
        """
        check_address(sender, what="envelope sender")
        check_address(recipient, what="recipient")
        async with self._lock:
            await self._connect()
            try:
                return await self._probe(sender, recipient)
            finally:
                if self._open:
                    self._drop()

    async def _probe(self, sender: str, recipient: str) -> tuple[Reply, Reply]:
        smtp = self._smtp
        assert smtp is not None
        self._open = True
        try:
            mail = await smtp.mail(sender)
        except SMTPResponseException as exc:
            await self._rset()
            raise _rejected("mail", exc.code, exc.message) from None
        except (SMTPException, OSError) as exc:
            self._drop()
            raise self._map(exc, "mail") from None
        try:
            rcpt = await smtp.rcpt(recipient)
        except SMTPResponseException as exc:
            await self._rset()
            raise _rejected("rcpt", exc.code, exc.message, recipient=recipient) from None
        except (SMTPException, OSError) as exc:
            self._drop()
            raise self._map(exc, "rcpt") from None
        await self._rset()
        return Reply.parse(mail.code, mail.message), Reply.parse(rcpt.code, rcpt.message)

    async def _rset(self) -> None:
        smtp = self._smtp
        if smtp is None or not smtp.is_connected:
            return
        try:
            await smtp.rset()  # raises for anything but 250
        except (SMTPException, OSError, TimeoutError):
            self._drop()
        else:
            self._open = False

    def _drop(self) -> None:
        self._open = False
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None

    async def close(self) -> None:
        """QUIT and close; never raises."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        if smtp.is_connected:
            with contextlib.suppress(SMTPException, OSError, TimeoutError):
                await asyncio.wait_for(smtp.quit(), timeout=min(5.0, self.account.timeout))
        smtp.close()


__all__ = ["SmtpTransport", "TransportError", "check_address", "make_tls_context"]
