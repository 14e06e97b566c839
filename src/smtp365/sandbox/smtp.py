"""SMTP AUTH client submission as Exchange Online speaks it (reference §2, §3, §5).

Built on ``aiosmtpd.smtp.SMTP``: every command whose reply differs from
Exchange's is overridden, so aiosmtpd provides the connection handling, line
reading and TLS plumbing only. Every reply below is literal text from
shared/reference/exchange-online.md or, where the reference has none, a
plausible Exchange-style text (marked "sandbox choice").

Exchange ends many replies with a diagnostic tail naming the answering server, and
clients parse it, so the sandbox sends it through one helper, :meth:`ExchangeSMTP._tail`,
in the two forms Exchange Online uses: the SMTP front end's refusals end in
``[<host> <UTC time> <session id>]`` (the session id is the one in the banner), the
answers to a submitted message (and the concurrency refusal) in ``[Hostname=<host>]``.
The ``250`` after the data quotes the message's own ``Message-ID``, as Exchange does.

Three aiosmtpd internals are relied upon (pinned by ``aiosmtpd>=1.4.6``):
``_smtp_methods`` (the command table, wrapped here for faults and the TLS 1.0/1.1
refusal), ``_handle_client`` (wrapped for greeting faults) and the texts of the replies
its command loop sends itself (unknown command, line too long), which :meth:`push` words
as Exchange does.

Bad input gets a 5xx syntax reply, never the ``451`` of an unexpected exception: numbers
are ASCII digits only, an address or parameter that is not UTF-8 (aiosmtpd keeps such
bytes as lone surrogates) is refused before anything can echo or store it.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto as sslproto
import binascii
import collections
import datetime as dt
import email.policy
import logging
import re
import secrets
import ssl
from base64 import b64decode
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.utils import format_datetime, getaddresses
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, TLSSetupException

from .faults import Faults, FiredFault
from .settings import MailboxSettings, SandboxSettings, Stage
from .state import Stats, Usage
from .store import MessageStore
from .tokens import TokenError, TokenIssuer

__all__ = ["ExchangeSMTP", "ServerContext"]

log = logging.getLogger("smtp365.sandbox.smtp")

LEGACY_TLS = frozenset({"TLSv1", "TLSv1.1", "SSLv3"})
_STAGE_OF: dict[str, Stage] = {
    "EHLO": "ehlo",
    "HELO": "ehlo",
    "STARTTLS": "starttls",
    "AUTH": "auth",
    "MAIL": "mail",
    "RCPT": "rcpt",
}
_DOMAIN = re.compile(r"^(\[[0-9A-Za-z:.]+\]|[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?)$")
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_NEED_TLS = frozenset({"AUTH", "MAIL", "RCPT", "DATA", "BDAT"})
_NUMBER = re.compile(r"[0-9]+")  # ASCII digits: str.isdigit() also takes "²" and "٣"
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # esmtp-keyword, RFC 5321 §4.1.2
# aiosmtpd's own replies from its command loop, in Exchange's form: enhanced status codes
# are advertised, so every reply carries one. An unknown command is quoted back as Exchange
# does (seen in client logs: "500 5.3.3 Unrecognized command 'unknown' [<host> ...]" for
# a line of binary bytes); aiosmtpd hands over the command word only, upper-cased, and
# nothing of a line it could not read (empty, or a verb that is not ASCII): 'unknown'.
_NOT_RECOGNIZED = re.compile(r'500 Error: command "(.*)" not recognized', re.DOTALL)
_BAD_SYNTAX = "500 Error: bad syntax"
_LINE_TOO_LONG = {"500 Command line too long": "500 5.5.2 Line too long"}  # sandbox choice
_QUOTABLE = re.compile(r"[ -~]+")  # printable ASCII: what a reply can quote as it came
_QUOTED_COMMAND_LIMIT = 64
# The longest Message-ID the 250 after the data quotes: the reply stays one line well
# inside RFC 5321's 512 octets. Longer ones, and ones that are not printable ASCII, are
# replaced by a generated id (Exchange would quote them; sandbox choice).
_MESSAGE_ID_LIMIT = 200


@dataclass
class ServerContext:
    """Everything the per-connection protocol objects share."""

    settings: SandboxSettings
    issuer: TokenIssuer
    store: MessageStore
    faults: Faults
    stats: Stats
    usage: Usage
    tls_context: ssl.SSLContext
    protocols: set[ExchangeSMTP] = field(default_factory=set)


@dataclass
class _Txn:
    """One mail transaction (MAIL FROM .. end of data)."""

    mail_from: str
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str = ""
    envid: str = ""
    rcpts: list[str] = field(default_factory=list)
    notify: dict[str, str] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    chunked_size: int = 0
    chunked_too_big: bool = False
    data_fault: FiredFault | None = None


class _NoHooks:
    """aiosmtpd wants a handler object; all behaviour lives in :class:`ExchangeSMTP`."""


class ExchangeSMTP(SMTP):
    """One client connection."""

    # The StreamReader limit: long enough for an XOAUTH2 initial response.
    line_length_limit = 65536

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._mailbox: MailboxSettings | None = None
        self._mechanism = ""
        self._app_id = ""
        self._tls_version = ""
        self._legacy_tls = False
        self._txn: _Txn | None = None
        self._late_starttls: FiredFault | None = None
        self._counted = False
        self._closed_once = False
        settings = ctx.settings
        self._session_id = secrets.token_hex(8).upper()
        when = format_datetime(dt.datetime.now(dt.UTC))
        super().__init__(
            _NoHooks(),
            data_size_limit=None,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=settings.hostname,
            ident=f"Microsoft ESMTP MAIL Service ready at {when} [{self._session_id}]",
            tls_context=ctx.tls_context,
            timeout=settings.idle_timeout,
            loop=asyncio.get_running_loop(),
        )
        # Per instance (aiosmtpd's is a class-level dict); AUTH lines carry whole tokens.
        self.command_size_limits = collections.defaultdict(
            lambda: 512, {"AUTH": 65536, "MAIL": 2048, "RCPT": 2048}
        )
        table: dict[str, Callable[[str | None], Awaitable[None]]] = self._smtp_methods
        self._smtp_methods = {name: self._guard(name, meth) for name, meth in table.items()}

    # ------------------------------------------------------------------ helpers

    @property
    def _host(self) -> str:
        return self._ctx.settings.hostname

    @property
    def _tls_active(self) -> bool:
        return self._tls_protocol is not None

    def _tail(self, reply: str, *, submission: bool = False) -> str:
        """``reply`` with Exchange's diagnostic tail: ``[<host> <UTC time> <session id>]``
        after a refusal of the SMTP front end (``535 5.7.139 ... [SN4PR0601CA0002.namprd06.
        prod.outlook.com 2025-07-21T10:26:08.277Z 08DDC79214586544]`` in client logs), or
        with ``submission`` ``[Hostname=<host>]``, the form of the answers to a submitted
        message (``250 2.0.0 OK <id> [Hostname=...]``, reference §2)."""
        if submission:
            return f"{reply} [Hostname={self._host}]"
        now = dt.datetime.now(dt.UTC)
        when = f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z"
        return f"{reply} [{self._host} {when} {self._session_id}]"

    def _exchange_form(self, reply: str) -> str:
        """A reply of aiosmtpd's command loop as Exchange words it; the sandbox's own unchanged."""
        if reply == _BAD_SYNTAX:
            return self._unrecognized("")
        found = _NOT_RECOGNIZED.fullmatch(reply)
        if found is not None:
            return self._unrecognized(found.group(1))
        return _LINE_TOO_LONG.get(reply, reply)

    def _unrecognized(self, command: str) -> str:
        """``500 5.3.3 Unrecognized command '<command>'``: printable ASCII quoted (cut at
        :data:`_QUOTED_COMMAND_LIMIT` characters), anything else as ``'unknown'``."""
        if not _QUOTABLE.fullmatch(command):
            command = "unknown"
        elif len(command) > _QUOTED_COMMAND_LIMIT:
            command = command[:_QUOTED_COMMAND_LIMIT] + "..."
        return self._tail(f"500 5.3.3 Unrecognized command '{command}'")

    def _guard(
        self, name: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def run(arg: str | None) -> None:
            if self._legacy_tls:
                self._ctx.stats.legacy_tls_refused += 1
                await self.push(
                    self._tail(
                        "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update "
                        "your client to support TLS 1.2. Visit https://aka.ms/smtp_auth_tls."
                    )
                )
                self._close()
                return
            if name in _NEED_TLS and not self._tls_active:
                self._ctx.stats.commands_in_clear += 1
            stage = _STAGE_OF.get(name)
            if stage is not None and await self._apply_fault(stage):
                return
            await method(arg)

        return run

    def _fault(self, stage: Stage) -> FiredFault | None:
        fired = self._ctx.faults.pick(stage)
        if fired is not None:
            self._ctx.stats.faults_injected += 1
            log.info("fault at %s: %s", stage, fired)
        return fired

    async def _apply_fault(self, stage: Stage) -> bool:
        """Apply a fault at a command stage; ``True`` when the command must not run."""
        fired = self._fault(stage)
        if fired is None:
            return False
        if fired.late:  # starttls: after the 220 (smtp_STARTTLS)
            self._late_starttls = fired
            return False
        if fired.delay > 0:
            await asyncio.sleep(fired.delay)
        if fired.drop:
            self.abort()
            return True
        if fired.reply:
            await self._reply_maybe_close(fired.reply)
            return True
        return False

    async def _reply_maybe_close(self, reply: str) -> None:
        await self.push(reply)
        if reply.startswith("421"):
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection without a reply (no TLS close_notify either)."""
        raw = self._original_transport or self.transport
        if isinstance(raw, asyncio.WriteTransport):
            raw.abort()
        elif raw is not None:
            raw.close()

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            await super().push(self._exchange_form(status))
        else:
            await super().push(status)

    async def push_lines(self, code: int, lines: list[str]) -> None:
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            await self.push(f"{code}{sep}{line}")

    def _peer_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return "unknown"

    def _auth_failed(self, reason: str) -> None:
        self._ctx.stats.auth_failures += 1
        self._ctx.stats.auth_failure_reasons[reason] += 1
        log.info("%s AUTH failed: %s", self._peer_ip(), reason)

    def _throttled(self, kind: str) -> None:
        stats = self._ctx.stats
        stats.throttle_replies += 1
        if kind == "rate":
            stats.rate_limited += 1
        elif kind == "concurrency":
            stats.concurrency_limited += 1
        else:
            stats.quota_exceeded += 1

    # ------------------------------------------------- aiosmtpd overrides (life cycle)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._counted:
            self._counted = True
            self._ctx.protocols.add(self)
            self._ctx.stats.connections += 1
            self._ctx.stats.active_connections += 1

    def connection_lost(self, error: Exception | None) -> None:
        if not self._closed_once:
            self._closed_once = True
            self._ctx.protocols.discard(self)
            self._ctx.stats.active_connections -= 1
            if self._mailbox is not None:
                self._ctx.usage.release(self._mailbox.address)
        super().connection_lost(error)
        # StreamReaderProtocol keeps the error in a future nobody awaits: mark it retrieved.
        closed = getattr(self, "_closed", None)
        if isinstance(closed, asyncio.Future) and closed.done() and not closed.cancelled():
            closed.exception()

    async def _handle_client(self) -> None:
        fired = self._fault("greeting")
        if fired is not None:
            if fired.delay > 0:
                await asyncio.sleep(fired.delay)
            if fired.drop:
                self.abort()
                return
            if fired.reply:
                await self.push(fired.reply)
                self._close()
                return
        await super()._handle_client()

    def _set_post_data_state(self) -> None:
        self.envelope = self._create_envelope()
        self._txn = None

    def _set_rset_state(self) -> None:
        self._set_post_data_state()

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        assert self.session is not None
        if not self.session.host_name:
            await self.push(self._tail("503 5.5.2 Send hello first"))
            return True
        return False

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            log.info("%s TLS handshake failed: %r", self._peer_ip(), error.__cause__)
        else:
            log.exception("%s session error", self._peer_ip())
        return "451 4.7.0 Temporary server error. Please try again later"

    # ------------------------------------------------------------- commands

    async def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname or not _DOMAIN.match(hostname):
            await self.push(self._tail("501 5.5.4 Invalid domain name"))
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = False
        self.session.host_name = hostname
        await self.push(f"250 {self._host} Hello [{self._peer_ip()}]")

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname or not _DOMAIN.match(hostname):
            await self.push(self._tail("501 5.5.4 Invalid domain name"))
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        await self.push_lines(
            250,
            [
                f"{self._host} Hello [{self._peer_ip()}]",
                f"SIZE {self._ctx.settings.limits.max_message_size}",
                "PIPELINING",
                "DSN",
                "ENHANCEDSTATUSCODES",
                "AUTH LOGIN XOAUTH2" if self._tls_active else "STARTTLS",
                "8BITMIME",
                "BINARYMIME",
                "CHUNKING",
                "SMTPUTF8",
            ],
        )

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push("250 2.0.0 OK")

    async def smtp_RSET(self, arg: str | None) -> None:
        self._set_rset_state()
        await self.push("250 2.0.0 Resetting")

    async def smtp_QUIT(self, arg: str | None) -> None:
        await self.push("221 2.0.0 Service closing transmission channel")
        self._close()

    async def smtp_VRFY(self, arg: str | None) -> None:
        await self.push("252 2.1.5 Cannot VRFY user")

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push("502 5.3.3 Command not implemented")

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.push_lines(
            214,
            [
                "This server supports the following commands:",
                "HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH BDAT",
            ],
        )

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.push(self._tail("501 5.5.4 Invalid arguments"))
            return
        if await self.check_helo_needed():
            return
        if self._tls_active:
            await self.push("503 5.5.1 Bad sequence of commands")  # sandbox choice
            return
        await self.push("220 2.0.0 SMTP server ready")
        late, self._late_starttls = self._late_starttls, None
        if late is not None:  # drop where the client begins the TLS handshake
            if late.delay > 0:
                await asyncio.sleep(late.delay)
            self.abort()
            return
        # The same steps as aiosmtpd's own STARTTLS, which answers with a different text.
        waiter = self.loop.create_future()
        assert self.tls_context is not None
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True
        )
        self._original_transport = self.transport
        assert self._original_transport is not None
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:
            raise TLSSetupException() from error
        ssl_object: Any = self.transport.get_extra_info("ssl_object") if self.transport else None
        self._tls_version = str(ssl_object.version()) if ssl_object is not None else ""
        self._ctx.stats.tls_sessions += 1
        if self._tls_version in LEGACY_TLS:
            self._legacy_tls = True

    # ---------------------------------------------------------------- AUTH

    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None
        unrecognized = self._tail("504 5.7.4 Unrecognized authentication type")
        if not self._tls_active or not self.session.extended_smtp:
            await self.push(unrecognized)
            return
        if self._mailbox is not None:
            await self.push("503 5.5.1 Already authenticated")  # sandbox choice
            return
        if not arg:
            await self.push(self._tail("501 5.5.4 Invalid arguments"))
            return
        parts = arg.split()
        if len(parts) > 2:
            await self.push(self._tail("501 5.5.4 Invalid arguments"))
            return
        mechanism = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mechanism == "LOGIN":
            await self._auth_login(initial)
        elif mechanism == "XOAUTH2":
            await self._auth_xoauth2(initial)
        else:
            await self.push(unrecognized)

    async def _sasl_read(self, challenge: str) -> bytes | None:
        """Send ``334 <challenge>``, read and decode the answer; ``None`` after an error reply
        (or when the client went away)."""
        await self.push(f"334 {challenge}")
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as exc:  # longer than line_length_limit (64 KiB)
            if await self._skip_line(exc.consumed):
                # RFC 4954's text for it; the reference has none (sandbox choice)
                await self.push("500 5.5.6 Authentication Exchange line is too long")
            return None
        return await self._sasl_decode(line.strip())

    async def _skip_line(self, consumed: int) -> bool:
        """Discard the rest of an overlong line; ``False`` if the connection ends first."""
        await self._reader.read(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return True
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)
            except asyncio.IncompleteReadError:
                return False

    async def _sasl_decode(self, blob: bytes | str) -> bytes | None:
        raw = blob.encode("ascii", "replace") if isinstance(blob, str) else blob
        if raw == b"*":
            await self.push("501 5.0.0 Authentication Aborted")
            return None
        try:
            return b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot Decode response")
            return None

    async def _auth_login(self, initial: str | None) -> None:
        if initial is not None:
            user_raw = await self._sasl_decode(initial)
        else:
            user_raw = await self._sasl_read("VXNlcm5hbWU6")  # "Username:"
        if user_raw is None:
            return
        password_raw = await self._sasl_read("UGFzc3dvcmQ6")  # "Password:"
        if password_raw is None:
            return
        user = user_raw.decode("utf-8", "replace").strip()
        password = password_raw.decode("utf-8", "replace")
        settings = self._ctx.settings
        mbx = settings.mailbox(user)
        incorrect = self._tail(
            "535 5.7.139 Authentication unsuccessful, the user credentials were incorrect."
        )
        # Order: who is this; pre-auth policies (never reveal the password check); the
        # password; then the SMTP AUTH switches that need the identified mailbox.
        if mbx is None or mbx.shared or mbx.password is None:
            self._auth_failed("unknown_user")
            await self.push(incorrect)
            return
        if settings.security_defaults:
            self._auth_failed("security_defaults")
            await self.push(
                self._tail(
                    "535 5.7.139 Authentication unsuccessful, user is locked by your "
                    "organization's security defaults policy. Contact your administrator."
                )
            )
            return
        if not mbx.basic_auth_enabled:
            self._auth_failed("basic_disabled")
            await self.push(
                self._tail(
                    "535 5.7.139 Authentication unsuccessful, basic authentication is disabled."
                )
            )
            return
        if mbx.conditional_access_block:
            self._auth_failed("conditional_access")
            await self.push(
                self._tail(
                    "535 5.7.139 Authentication unsuccessful, the request did not meet the "
                    "criteria to be authenticated successfully. Contact your administrator."
                )
            )
            return
        if not secrets.compare_digest(password.encode(), mbx.password.encode()):
            self._auth_failed("bad_password")
            await self.push(incorrect)
            return
        if not await self._smtp_auth_allowed(mbx):
            return
        await self._auth_succeeded(mbx, "LOGIN", "")

    async def _auth_xoauth2(self, initial: str | None) -> None:
        if initial is not None:
            raw = await self._sasl_decode(initial)
        else:
            raw = await self._sasl_read("")
        if raw is None:
            return
        failed = self._tail("535 5.7.3 Authentication unsuccessful")
        user, token = _parse_xoauth2(raw)
        if user is None or token is None:
            self._auth_failed("xoauth2_malformed")
            await self.push(failed)
            return
        try:
            claims = self._ctx.issuer.verify(token)
        except TokenError as exc:
            self._auth_failed(f"token_{exc.reason}")
            await self.push(failed)
            return
        settings = self._ctx.settings
        mbx = settings.mailbox(user)
        if mbx is None:
            self._auth_failed("unknown_mailbox")
            await self.push(failed)
            return
        app_id = str(claims.get("appid") or claims.get("azp") or "")
        if TokenIssuer.is_app_only(claims):
            allowed = {a.lower() for a in settings.apps_for(mbx)}
            if app_id.lower() not in allowed:
                self._auth_failed("app_not_granted")
                await self.push(failed)
                return
        else:
            upn = str(claims.get("upn") or claims.get("preferred_username") or "").lower()
            if upn != mbx.address.lower() and upn not in {a.lower() for a in mbx.full_access}:
                self._auth_failed("wrong_mailbox")
                await self.push(failed)
                return
        if not await self._smtp_auth_allowed(mbx):
            return
        await self._auth_succeeded(mbx, "XOAUTH2", app_id)

    async def _smtp_auth_allowed(self, mbx: MailboxSettings) -> bool:
        settings = self._ctx.settings
        if settings.smtp_auth_effective(mbx):
            return True
        if mbx.smtp_auth_enabled is False:
            self._auth_failed("smtp_auth_disabled_mailbox")
            await self.push(
                self._tail(
                    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
                    "disabled for the Mailbox. Visit https://aka.ms/smtp_auth_disabled for more "
                    "information."
                )
            )
        else:
            self._auth_failed("smtp_auth_disabled_tenant")
            await self.push(
                self._tail(
                    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
                    "disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more "
                    "information."
                )
            )
        return False

    async def _auth_succeeded(self, mbx: MailboxSettings, mechanism: str, app_id: str) -> None:
        limit = self._ctx.settings.limits.max_connections
        if not self._ctx.usage.acquire(mbx.address, limit):
            self._throttled("concurrency")
            await self.push(
                self._tail(
                    "432 4.3.2 Concurrent connections limit exceeded. Visit "
                    "https://aka.ms/concurrent_sending for more information.",
                    submission=True,
                )
            )
            return
        assert self.session is not None
        self._mailbox = mbx
        self._mechanism = mechanism
        self._app_id = app_id
        self.session.authenticated = True
        self._ctx.stats.auth_successes += 1
        await self.push("235 2.7.0 Authentication successful")

    # ------------------------------------------------------- MAIL / RCPT

    async def _transaction_preamble(self) -> bool:
        """HELO and AUTH checks shared by MAIL, RCPT, DATA; ``True`` if a reply was sent."""
        if await self.check_helo_needed():
            return True
        if self._mailbox is None:
            await self.push(self._tail("530 5.7.57 Client not authenticated to send mail"))
            return True
        return False

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._transaction_preamble():
            return
        assert self._mailbox is not None
        if self._txn is not None:
            await self.push("503 5.5.1 Sender already specified")
            return
        rest = self._strip_command_keyword("FROM:", arg or "")
        if rest is None:
            await self.push(self._tail("501 5.5.4 Invalid arguments"))
            return
        address, params_text = self._parse_path(rest)
        if address is None:
            await self.push("501 5.1.7 Invalid address")
            return
        params = _params(params_text)
        if params is None:
            await self.push(self._tail("501 5.5.4 Invalid arguments"))
            return
        txn = _Txn(mail_from=address)
        limits = self._ctx.settings.limits
        for key, value in params:
            if key == "SIZE":
                if not _NUMBER.fullmatch(value):
                    await self.push(self._tail("501 5.5.4 Invalid arguments"))
                    return
                if int(value) > limits.max_message_size:
                    await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
                    return
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME", "BINARYMIME"):
                txn.body = value.upper()
            elif key == "SMTPUTF8" and not value:
                txn.smtputf8 = True
            elif key == "RET" and value.upper() in ("FULL", "HDRS"):
                txn.ret = value.upper()
            elif key == "ENVID" and value:
                txn.envid = value
            elif key == "AUTH":
                pass
            else:
                await self.push(f"555 5.5.4 Unsupported parameter: {key}")  # sandbox choice
                return
        mbx = self._mailbox
        if self._ctx.settings.send_as_check == "mail" and address and not mbx.may_send_as(address):
            self._ctx.stats.send_as_denied += 1
            await self.push(
                "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
            )
            return
        if not self._ctx.usage.rate_ok(
            mbx.address, limits.messages_per_minute, limits.rate_window_seconds
        ):
            self._throttled("rate")
            await self._reply_maybe_close(limits.rate_limit_reply)
            return
        self._txn = txn
        await self.push("250 2.1.0 Sender OK")

    def _parse_path(self, text: str) -> tuple[str | None, str]:
        """(address, parameters) of a MAIL or RCPT argument; address ``None`` when there is
        none, or when it is not UTF-8 (aiosmtpd keeps such bytes as lone surrogates)."""
        text = text.strip()
        if text.startswith("<>"):
            return "", text[2:]
        try:
            address, rest = self._getaddr(text)
        except Exception:  # the stdlib's RFC 5322 parser fails on some truncated input
            return None, ""  # ("<" → IndexError, "a.@[\t" → UnboundLocalError)
        if not address or not _utf8(address):
            return None, ""
        return str(address), str(rest or "")

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._transaction_preamble():
            return
        txn = self._txn
        if txn is None:
            await self.push("503 5.5.2 Need mail command")
            return
        rest = self._strip_command_keyword("TO:", arg or "")
        if rest is None:
            await self.push(self._tail("501 5.5.4 Invalid arguments"))
            return
        address, params_text = self._parse_path(rest)
        if not address:
            await self.push("501 5.1.3 Invalid address")
            return
        params = _params(params_text)
        if params is None:
            await self.push(self._tail("501 5.5.4 Invalid arguments"))
            return
        notify = orcpt = ""
        for key, value in params:
            if key == "NOTIFY" and _valid_notify(value):
                notify = value.upper()
            elif key == "ORCPT" and value:
                orcpt = value
            else:
                await self.push(f"555 5.5.4 Unsupported parameter: {key}")  # sandbox choice
                return
        if len(txn.rcpts) >= self._ctx.settings.limits.max_recipients_per_message:
            await self.push("452 4.5.3 Too many recipients")
            return
        txn.rcpts.append(address)
        if notify:
            txn.notify[address] = notify
        if orcpt:
            txn.orcpt[address] = orcpt
        await self.push("250 2.1.5 Recipient OK")

    # ------------------------------------------------------- DATA / BDAT

    async def _data_preamble(self) -> _Txn | None:
        if await self._transaction_preamble():
            return None
        txn = self._txn
        if txn is None:
            await self.push("503 5.5.2 Need mail command")
            return None
        if not txn.rcpts:
            await self.push("503 5.5.2 Need rcpt command")
            return None
        return txn

    async def smtp_DATA(self, arg: str | None) -> None:
        txn = await self._data_preamble()
        if txn is None:
            return
        if arg:
            await self.push(self._tail("501 5.5.4 Invalid arguments"))
            return
        if txn.body == "BINARYMIME" or txn.chunks:
            await self.push("503 5.5.1 Bad sequence of commands")  # RFC 3030: BDAT required
            return
        txn.data_fault = self._fault("data")
        await self.push("354 Start mail input; end with <CRLF>.<CRLF>")
        limit = self._ctx.settings.limits.max_message_size
        lines: list[bytes] = []
        fragments: list[bytes] = []
        size = 0
        too_big = False
        complete = False
        while self.transport is not None:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                line = await self._reader.read(exc.consumed)
            except asyncio.IncompleteReadError:
                return
            if txn.data_fault is not None and txn.data_fault.drop and not txn.data_fault.late:
                self.abort()
                return
            if not fragments and line == b".\r\n":
                complete = True
                break
            fragments.append(line)
            size += len(line)
            if size > limit:
                too_big = True
                lines.clear()
            if line.endswith(b"\r\n"):
                whole = b"".join(fragments)
                fragments.clear()
                if not too_big:
                    lines.append(whole[1:] if whole.startswith(b".") else whole)
        if not complete:  # the connection went away before the final dot
            return
        if too_big:
            self._set_post_data_state()
            await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        await self._finish(txn, b"".join(lines), chunking=False)

    async def smtp_BDAT(self, arg: str | None) -> None:
        parts = (arg or "").split()
        if not parts or not _NUMBER.fullmatch(parts[0]) or len(parts) > 2:
            await self.push(self._tail("501 5.5.4 Invalid arguments"))
            return
        if len(parts) == 2 and parts[1].upper() != "LAST":
            await self.push(self._tail("501 5.5.4 Invalid arguments"))
            return
        size = int(parts[0])
        last = len(parts) == 2
        txn = self._txn
        allowance = self._ctx.settings.limits.max_message_size
        if txn is not None:
            allowance -= txn.chunked_size
        # The chunk follows the command in any case: read it before replying, and
        # never keep more of it than could be accepted.
        try:
            if size > max(allowance, 0):
                await self._discard(size)
                chunk = b""
            else:
                chunk = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError:
            return
        txn = await self._data_preamble()
        if txn is None:
            return
        if not txn.chunks and txn.data_fault is None:
            txn.data_fault = self._fault("data")
            if txn.data_fault is not None and txn.data_fault.drop and not txn.data_fault.late:
                self.abort()
                return
        txn.chunked_size += size
        if txn.chunked_size > self._ctx.settings.limits.max_message_size:
            txn.chunked_too_big = True
            txn.chunks.clear()
        if txn.chunked_too_big:
            self._set_post_data_state()
            await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        txn.chunks.append(chunk)
        if not last:
            await self.push(f"250 2.6.0 CHUNK received OK, {size} octets")  # sandbox choice
            return
        await self._finish(txn, b"".join(txn.chunks), chunking=True)

    async def _discard(self, size: int) -> None:
        while size > 0:
            block = await self._reader.readexactly(min(size, 65536))
            size -= len(block)

    async def _finish(self, txn: _Txn, content: bytes, *, chunking: bool) -> None:
        """End of data: faults, SendAs, quota, store, final reply."""
        self._set_post_data_state()
        fault = txn.data_fault
        if fault is not None and not fault.late:
            if fault.delay > 0:
                await asyncio.sleep(fault.delay)
            if fault.reply:
                self._ctx.stats.messages_rejected += 1
                await self._reply_maybe_close(fault.reply)
                return
        mbx = self._mailbox
        assert mbx is not None
        settings = self._ctx.settings
        limits = settings.limits
        headers = _headers(content)
        senders = [a for _, a in getaddresses(headers.get_all("From", []))] if headers else []
        if settings.send_as_check == "data" and txn.mail_from:
            senders.insert(0, txn.mail_from)
        denied = next((a for a in senders if a and not mbx.may_send_as(a)), None)
        if denied is not None:
            self._ctx.stats.send_as_denied += 1
            self._ctx.stats.messages_rejected += 1
            await self.push(
                self._tail(
                    f"554 5.2.252 SendAsDenied; {mbx.address} not allowed to send as {denied}; "
                    "STOREDRV.Submission.Exception:SendAsDeniedException."
                    "MapiExceptionSendAsDenied; Failed to process message due to a permanent "
                    "exception with message [BeginDiagnosticData]Cannot submit message. "
                    "0.35250:0A006680, 1.36674:0A000000, 1.61250:00000000[EndDiagnosticData]",
                    submission=True,
                )
            )
            return
        if not self._ctx.usage.recipients_ok(
            mbx.address, len(txn.rcpts), limits.recipients_per_day, limits.recipient_window_seconds
        ):
            self._throttled("quota")
            self._ctx.stats.messages_rejected += 1
            await self.push(
                self._tail(
                    "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; "
                    "Failed to process message due to a permanent exception with message "
                    "[BeginDiagnosticData]Cannot submit message.[EndDiagnosticData]",
                    submission=True,
                )
            )
            return
        # Exchange quotes the message's own Message-ID; one it cannot quote or none: its own.
        smtp_id = _message_id(headers) or f"<{secrets.token_hex(16).upper()}@{self._host}>"
        dsn: dict[str, Any] = {}
        if txn.ret:
            dsn["ret"] = txn.ret
        if txn.envid:
            dsn["envid"] = txn.envid
        if txn.notify:
            dsn["notify"] = dict(txn.notify)
        if txn.orcpt:
            dsn["orcpt"] = dict(txn.orcpt)
        self._ctx.store.add(
            content,
            mailbox=mbx.address,
            mechanism=self._mechanism,
            mail_from=txn.mail_from,
            rcpt_tos=txn.rcpts,
            message_id=_header_text(headers, "Message-ID"),
            subject=_header_text(headers, "Subject"),
            tls_version=self._tls_version,
            smtp_id=smtp_id,
            app_id=self._app_id,
            body=txn.body,
            smtputf8=txn.smtputf8,
            chunking=chunking,
            dsn=dsn,
        )
        self._ctx.usage.record(mbx.address, len(txn.rcpts))
        self._ctx.stats.messages_accepted += 1
        self._ctx.stats.recipients_accepted += len(txn.rcpts)
        if fault is not None and fault.late:  # stored; the client may never learn it
            if fault.delay > 0:
                await asyncio.sleep(fault.delay)
            if fault.drop:
                self.abort()
                return
            if fault.reply:
                await self._reply_maybe_close(fault.reply)
                return
        await self.push(self._tail(f"250 2.0.0 OK {smtp_id}", submission=True))


def _parse_xoauth2(raw: bytes) -> tuple[str | None, str | None]:
    """``user=<addr>\\x01auth=Bearer <token>\\x01\\x01`` → (user, token)."""
    user: str | None = None
    token: str | None = None
    for part in raw.decode("utf-8", "replace").split("\x01"):
        key, _, value = part.partition("=")
        if key == "user":
            user = value.strip() or None
        elif key == "auth":
            scheme, _, cred = value.partition(" ")
            if scheme.lower() == "bearer" and cred.strip():
                token = cred.strip()
    return user, token


def _utf8(text: str) -> bool:
    """Whether ``text`` came from UTF-8: aiosmtpd decodes arguments with surrogateescape, so
    other bytes stay in them as lone surrogates, which no reply or file can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _params(text: str) -> list[tuple[str, str]] | None:
    """The ``KEYWORD[=value]`` parameters of MAIL or RCPT, keywords upper-cased; ``None``
    when one is no parameter: its keyword not an esmtp-keyword, or its value not UTF-8."""
    found: list[tuple[str, str]] = []
    for item in text.split():
        key, _, value = item.partition("=")
        if not _KEYWORD.fullmatch(key) or not _utf8(value):
            return None
        found.append((key.upper(), value))
    return found


def _valid_notify(value: str) -> bool:
    items = value.upper().split(",")
    if items == ["NEVER"]:
        return True
    return bool(items) and all(i in _NOTIFY for i in items)


def _headers(content: bytes) -> Any:
    try:
        return BytesHeaderParser(policy=email.policy.default).parsebytes(content)
    except Exception:  # a message the parser cannot read still gets stored
        return None


def _message_id(headers: Any) -> str:
    """The first ``Message-ID`` header as it was sent (unfolded), for the ``250`` after the
    data: with or without angle brackets, whatever it holds; ``""`` when there is none, or
    when it is no one-line ASCII text of at most :data:`_MESSAGE_ID_LIMIT` characters (not
    UTF-8, non-ASCII, control characters, too long)."""
    if headers is None:
        return ""
    for name, value in headers.raw_items():
        if name.lower() == "message-id":
            text = " ".join(str(value).split())
            if len(text) <= _MESSAGE_ID_LIMIT and _QUOTABLE.fullmatch(text):
                return text
            return ""
    return ""


def _header_text(headers: Any, name: str) -> str:
    if headers is None:
        return ""
    try:
        value = headers.get(name)
    except Exception:
        return ""
    return "" if value is None else str(value).strip()
