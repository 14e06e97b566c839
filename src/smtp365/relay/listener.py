"""The relay's SMTP listener (Postfix's smtpd): plain, STARTTLS or implicit TLS.

Built on ``aiosmtpd.smtp.SMTP`` for connection handling, command-line reading and the
STARTTLS plumbing; every command with a policy in it (EHLO/HELO, STARTTLS, AUTH, MAIL, RCPT,
DATA) is overridden. What it enforces (security.md §2-§5):

* **Relay control** through :class:`~smtp365.relay.policy.RelayPolicy`: authenticated local
  users or allow-listed networks only; routing forms refused; senders checked at MAIL.
* **AUTH** PLAIN/LOGIN against :class:`~smtp365.relay.users.UserDB`, offered and accepted
  only inside TLS (``538 5.7.11`` otherwise) unless the listener lets the client's
  allow-listed network do it (``plain_auth_networks``); after ``auth_attempts`` failures
  the next AUTH gets ``421`` and close.
  Each failure is answered after a delay that doubles with the address's failures in the
  last minute (0.5 s, 1 s, 2 s ... 30 s); at ``auth_failures_per_ip`` an address gets
  ``421`` at AUTH until the minute has passed. One log line per failure: ``AUTH failed
  from [IP]``. At most ``max_connections_per_client`` connections per address at once;
  ``unknown_command_limit`` unknown commands, then ``421``. Addresses are counted over all
  the relay's processes (:mod:`smtp365.relay.clients`).
* **SMTP smuggling**: DATA is read by this module, not aiosmtpd: only ``<CR><LF>.<CR><LF>``
  ends it, and any bare CR, bare LF or NUL rejects the message (``550 5.6.0``), or with
  ``bare_newline="normalize"`` bare CR/LF become CRLF. One transaction per DATA.
* **Synchronisation**: input before the greeting, or after EHLO/HELO in the same segment,
  gets ``554 5.5.0`` and close. Plaintext pipelined after STARTTLS is discarded and the
  session starts over after the handshake.
* **Limits**: SIZE advertised and enforced while streaming (nothing buffered beyond one line
  and the header section; bodies spill to the queue's ``incoming/``), 1,000-octet lines in
  DATA, 512-octet command lines, 1,000 recipients, hard error limit 20 then ``421``,
  ``452 4.3.1`` at MAIL when free disk is below 1.5 x the size limit.
* **Durability**: ``250`` at end of DATA only after ``queue.enqueue`` returned.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import errno
import functools
import logging
import re
import shutil
import socket
import ssl
from base64 import b64decode
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AnyStr, Literal

from aiosmtpd.smtp import SMTP, TLSSetupException

from smtp365.errors import ConfigError, MessageError, QueueError
from smtp365.models import Envelope, shown
from smtp365.relay.clients import ClientTable
from smtp365.relay.intake import ClientInfo, Draft, Intake
from smtp365.relay.policy import ClientIdentity, RelayPolicy, split_path
from smtp365.relay.queue import Queue
from smtp365.relay.users import UserDB

__all__ = [
    "Limits",
    "ListenerConfig",
    "RelayListener",
    "RelaySMTP",
    "bind",
    "server_tls_context",
]

log = logging.getLogger("smtp365.relay.listener")

Mode = Literal["plain", "starttls", "tls"]
_BARE = re.compile(rb"\r\n|\r|\n")
_DIGITS = re.compile(r"[0-9]{1,20}")  # ASCII digits only: str.isdigit() takes "²" and "①"
# Connections the kernel holds for us while the loop is busy: a burst of devices (or
# smtp-source's 50 sessions) must not see dropped SYNs and a 1 s retransmit each.
BACKLOG = 511
# While stopping, a session whose transaction has ended gets this long for its QUIT.
STOP_LINGER = 2.0
# A closed TLS connection waits for the client's close_notify (up to 30 s): one that never
# sends it is cut off after this long.
CLOSE_TIMEOUT = 2.0
SHUTDOWN_REPLY = b"421 4.3.2 Service shutting down, closing transmission channel\r\n"


@dataclass(frozen=True, slots=True)
class Limits:
    """security.md §5 (Postfix defaults)."""

    max_message_size: int = 10_240_000
    max_line_length: int = 1000  # octets including CRLF, in DATA
    max_command_line: int = 512
    max_recipients: int = 1000
    hard_error_limit: int = 20
    unknown_command_limit: int = 5
    auth_attempts: int = 3  # per connection
    auth_failures_per_ip: int = 10  # per minute, then 421 for that address
    auth_delay: float = 0.5  # the first failure's 535 waits this long, doubling per failure
    auth_delay_max: float = 30.0
    max_connections_per_client: int = 50
    session_timeout: float = 300.0


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    host: str = "127.0.0.1"
    port: int = 25
    mode: Mode = "plain"
    hostname: str = field(default_factory=socket.getfqdn)
    cert_file: Path | None = None
    key_file: Path | None = None
    limits: Limits = field(default_factory=Limits)
    bare_newline: Literal["reject", "normalize"] = "reject"
    greet_pause: float = 0.0  # wait this long for early talkers before the greeting
    # allow-listed networks (NetworkRule.label) whose hosts may AUTH here before TLS
    plain_auth_networks: frozenset[str] = frozenset()
    min_free_bytes: int | None = None  # default: 1.5 x max_message_size

    @property
    def free_space_needed(self) -> int:
        if self.min_free_bytes is not None:
            return self.min_free_bytes
        return int(1.5 * self.limits.max_message_size)


def server_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the listener certificate {cert_file} / key {key_file}: {exc}",
            fix="check the paths and that the key matches the certificate",
        ) from exc
    return ctx


@dataclass
class _Shared:
    config: ListenerConfig
    policy: RelayPolicy
    intake: Intake
    users: UserDB | None
    tls_context: ssl.SSLContext | None
    sessions: set[RelaySMTP] = field(default_factory=set)
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # set when no session is open
    stopping: bool = False  # the listener is stopping: no new transactions
    clients: ClientTable = field(default_factory=ClientTable)


class _NoHooks:
    """aiosmtpd wants a handler object; all behaviour lives in :class:`RelaySMTP`."""

    def __dir__(self) -> list[str]:
        return []  # no hooks, no AUTH methods: nothing for aiosmtpd to look up per session


class RelaySMTP(SMTP):
    """One client connection."""

    def __init__(self, shared: _Shared) -> None:
        self._shared = shared
        cfg = shared.config
        limits = cfg.limits
        # The StreamReader limit: a DATA line may carry a transparent dot.
        self.line_length_limit = max(limits.max_line_length, limits.max_command_line) + 2
        self._user: str | None = None
        self._user_senders: tuple[str, ...] = ()
        self._auth_failures = 0
        self._errors = 0
        self._utf8 = False
        self._greeted = False
        self._early = asyncio.Event()
        self._closing = False
        self._closed_once = False
        self._deadline = 0.0
        self._fired = False
        self._identity_cache: tuple[str | None, ClientIdentity | None] | None = None
        self._unknown = 0
        self._counted: str | None = None  # the address counted in the client table
        super().__init__(
            _NoHooks(),
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=cfg.hostname,
            ident="ESMTP smtp365 relay",
            tls_context=shared.tls_context if cfg.mode == "starttls" else None,
            timeout=limits.session_timeout,
            loop=asyncio.get_running_loop(),
        )
        self.command_size_limit = limits.max_command_line
        self.command_size_limits = collections.defaultdict(lambda: limits.max_command_line)
        # Once a session is being closed (421, synchronisation error), commands the client
        # already pipelined are not executed.
        table: dict[str, Callable[[str | None], Awaitable[None]]] = self._smtp_methods
        self._smtp_methods = {name: self._guard(name, meth) for name, meth in table.items()}
        self._in_command = False

    def __dir__(self) -> list[str]:
        # aiosmtpd builds its command and AUTH tables from dir(self) for every connection;
        # the full dir() of this class costs more than the rest of a session's setup.
        return _command_names(type(self))

    def _guard(
        self, name: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        async def run(arg: str | None) -> None:
            if self._closing:
                return
            if self._shared.stopping and name != "QUIT" and not self._in_transaction():
                self._shut_down()
                return
            self._in_command = True
            try:
                await method(arg)
            finally:
                self._in_command = False
            if self._shared.stopping and not self._in_transaction():
                # Its transaction is done: time for QUIT, not for another message.
                self._timeout_duration = STOP_LINGER
                self._reset_timeout()

        return run

    def _in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def idle(self) -> bool:
        """Waiting for a command, outside a mail transaction."""
        return not self._in_command and not self._in_transaction()

    def _shut_down(self, reply: bytes = SHUTDOWN_REPLY) -> None:
        """A last reply (``421``), written straight to the transport, and close: the relay
        is stopping, or the client is over a limit."""
        transport = self.transport
        if not self._closing and transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(reply)  # type: ignore[attr-defined]
        self._close()

    def _abort(self) -> None:
        """Drop the connection now, TLS shutdown or not."""
        self._closing = True
        transport = self._original_transport or self.transport
        if transport is not None:
            transport.abort()  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ helpers

    def _reset_timeout(self, duration: float | None = None) -> None:
        # Called for every line: move a deadline instead of replacing a timer each time
        # (aiosmtpd's version creates and cancels a TimerHandle per line).
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline or self._fired:
            if handle is not None:
                handle.cancel()
            self._fired = False
            self._timeout_handle = self.loop.call_at(deadline, self._check_timeout)

    def _check_timeout(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)
            return
        self._fired = True
        log.info("[%s] session timed out", self.client_ip)
        self._close()

    @property
    def client_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        if isinstance(peer, tuple) and peer:
            return str(peer[0])
        return "unknown"

    def tls_version(self) -> str:
        transport = self.transport
        if transport is None:
            return ""
        obj: Any = transport.get_extra_info("ssl_object")
        return str(obj.version()) if obj is not None else ""

    def _identity(self) -> ClientIdentity | None:
        # Asked at MAIL, RCPT and DATA; it changes only with the user (AUTH, STARTTLS).
        cached = self._identity_cache
        if cached is not None and cached[0] == self._user:
            return cached[1]
        identity = self._shared.policy.identity(self.client_ip, self._user, self._user_senders)
        self._identity_cache = (self._user, identity)
        return identity

    def _auth_permitted(self) -> bool:
        return bool(self.tls_version()) or self._shared.policy.plain_auth_allowed(
            self.client_ip, self._shared.config.plain_auth_networks
        )

    def _pending_input(self) -> bool:
        buffer: Any = getattr(self._reader, "_buffer", b"")
        return len(buffer) > 0

    def _discard_input(self) -> None:
        buffer: Any = getattr(self._reader, "_buffer", None)
        if buffer is not None:
            buffer.clear()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()
            self.loop.call_later(CLOSE_TIMEOUT, self._abort)

    async def push(self, status: AnyStr) -> None:
        out: str | bytes
        if isinstance(status, str):
            # A reply may quote what the client sent: bytes that were not UTF-8 go out as \xNN.
            out = text = shown(status)
        else:
            out, text = status, status.decode("utf-8", "replace")
        if self._closing or self.transport is None or self.transport.is_closing():
            return
        if text.startswith("220 ") and not self._greeted:
            self._greeted = True
        await super().push(out)
        if text.startswith('500 Error: command "'):  # aiosmtpd's reply to an unknown verb
            self._unknown += 1
            if self._unknown >= self._shared.config.limits.unknown_command_limit:
                log.warning("[%s] too many unknown commands; closing", self.client_ip)
                await super().push("421 4.7.0 Error: too many unknown commands")
                self._close()
                return
        if text[:1] in ("4", "5") and not text.startswith("421"):
            self._errors += 1
            if self._errors >= self._shared.config.limits.hard_error_limit:
                log.warning("[%s] too many errors; closing", self.client_ip)
                await super().push("421 4.7.0 Error: too many errors")
                self._close()

    async def _push_lines(self, code: int, lines: list[str]) -> None:
        """A multi-line reply in one write (one TCP segment): a client that reads one segment
        per command (nmap's smtp-open-relay does) stays in step, and it costs one syscall."""
        last = len(lines) - 1
        await self.push(
            "\r\n".join(f"{code}{' ' if i == last else '-'}{x}" for i, x in enumerate(lines))
        )

    # ------------------------------------------------------------- life cycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgrading = self.transport is not None and self._original_transport is not None
        super().connection_made(transport)
        if upgrading:
            # RFC 3207 §4.2: forget everything learnt before TLS (aiosmtpd made a new
            # session and cleared the plaintext buffer).
            self._user = None
            self._user_senders = ()
            self._utf8 = False
        else:
            self._shared.sessions.add(self)
            self._shared.drained.clear()
            ip = self.client_ip
            count = self._shared.clients.connect(ip)
            self._counted = ip
            limit = self._shared.config.limits.max_connections_per_client
            if self._shared.stopping:  # accepted (or its TLS handshake done) as stop began
                self._shut_down()
            elif count > limit:
                log.warning("[%s] refused: more than %d connections at once", ip, limit)
                self._shut_down(b"421 4.7.0 Error: too many connections from your address\r\n")

    def connection_lost(self, error: Exception | None) -> None:
        if not self._closed_once:
            self._closed_once = True
            self._shared.sessions.discard(self)
            if self._counted is not None:
                self._shared.clients.disconnect(self._counted)
            if not self._shared.sessions:
                self._shared.drained.set()
        upgraded = self.transport if self._tls_protocol is not None else None
        super().connection_lost(error)
        # A session is only ever freed by the cycle collector (aiosmtpd's bound-method
        # tables, the stream writer and the cancelled handler all point back at it), and
        # with settle_gc that runs a full collection only every few hundred sessions. What
        # STARTTLS hung on it must not wait for that: the SSLProtocol with its 256 KiB read
        # buffer, the OpenSSL connection (session.ssl holds the ssl_object) and the plain
        # transport under them go with the connection.
        self._tls_protocol = None
        self._original_transport = None
        if self.session is not None:
            self.session.ssl = None
        if upgraded is not None:
            # Closed already (by the SSLProtocol, or before aiosmtpd's own call after a
            # failed handshake): closing it again only drops its SSLProtocol, which the
            # stream reader and writer would otherwise keep through the transport.
            upgraded.close()
        closed = getattr(self, "_closed", None)
        if isinstance(closed, asyncio.Future) and closed.done() and not closed.cancelled():
            closed.exception()

    def data_received(self, data: bytes) -> None:
        if not self._greeted:
            self._early.set()
        super().data_received(data)

    async def _handle_client(self) -> None:
        pause = self._shared.config.greet_pause
        if pause > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._early.wait(), pause)
        if self._early.is_set() or self._pending_input():
            log.warning("[%s] talked before the greeting", self.client_ip)
            await self.push("554 5.5.0 SMTP protocol synchronization error")
            self._close()
            return
        await super()._handle_client()

    def _set_post_data_state(self) -> None:
        self.envelope = self._create_envelope()
        self._utf8 = False

    def _set_rset_state(self) -> None:
        self._set_post_data_state()

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        assert self.session is not None
        if not self.session.host_name:
            await self.push("503 5.5.1 Error: send HELO/EHLO first")
            return True
        return False

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            log.info("[%s] TLS handshake failed: %r", self.client_ip, error.__cause__)
        else:
            log.exception("[%s] session error", self.client_ip)
        return "451 4.3.0 Error: internal error, try again later"

    # ------------------------------------------------------------- greeting

    async def _hello(self, hostname: str | None, extended: bool) -> bool:
        if not hostname:
            await self.push(f"501 5.5.4 Syntax: {'EHLO' if extended else 'HELO'} hostname")
            return False
        if self._pending_input():
            log.warning("[%s] pipelined after %s", self.client_ip, "EHLO" if extended else "HELO")
            await self.push("554 5.5.0 SMTP protocol synchronization error")
            self._close()
            return False
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = extended
        self.session.host_name = hostname
        return True

    async def smtp_HELO(self, hostname: str | None) -> None:
        if await self._hello(hostname, extended=False):
            await self.push(f"250 {self.hostname}")

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not await self._hello(hostname, extended=True):
            return
        lines = [
            f"{self.hostname} Hello [{self.client_ip}]",
            f"SIZE {self._shared.config.limits.max_message_size}",
            "8BITMIME",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if self.tls_context is not None and not self.tls_version():
            lines.append("STARTTLS")
        if self._shared.users is not None and self._user is None and self._auth_permitted():
            lines.append("AUTH PLAIN LOGIN")
        await self._push_lines(250, lines)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self._set_rset_state()
        await self.push("250 2.0.0 Ok")

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push("250 2.0.0 Ok")

    async def smtp_VRFY(self, arg: str | None) -> None:
        await self.push("252 2.0.0 Cannot VRFY user")

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push("502 5.5.1 EXPN not available")

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self.tls_context is None or self.tls_version():
            await self.push("502 5.5.1 STARTTLS not available")
            return
        if await self.check_helo_needed():
            return
        if self._pending_input():
            log.warning("[%s] plaintext pipelined after STARTTLS: discarded", self.client_ip)
        self._discard_input()  # CVE-2011-0411: nothing sent before the handshake counts
        await super().smtp_STARTTLS(arg)

    # ---------------------------------------------------------------- AUTH

    async def _read_sasl(self, challenge: str) -> bytes | None:
        await self.push(f"334 {challenge}")
        try:
            line = await self._reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError:
            self._discard_input()
            await self.push("500 5.5.6 Authentication exchange line is too long")
            return None
        except asyncio.IncompleteReadError:
            self._close()
            return None
        return await self._decode_sasl(line.rstrip(b"\r\n"))

    async def _decode_sasl(self, blob: bytes) -> bytes | None:
        if blob == b"*":
            await self.push("501 5.7.0 Authentication aborted")
            return None
        try:
            return b64decode(blob, validate=True)
        except (binascii.Error, ValueError):
            await self.push("501 5.5.2 Cannot decode the authentication response")
            return None

    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        assert self.session is not None and self.envelope is not None
        users = self._shared.users
        if users is None:
            await self.push("502 5.5.1 AUTH not available")
            return
        if self._user is not None:
            await self.push("503 5.5.1 Error: already authenticated")
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: AUTH not allowed during a mail transaction")
            return
        limits = self._shared.config.limits
        if self._auth_failures >= limits.auth_attempts:
            log.warning("[%s] too many AUTH attempts; closing", self.client_ip)
            await self.push("421 4.7.0 Error: too many authentication attempts")
            self._close()
            return
        recent = self._shared.clients.auth_failures(self.client_ip)
        if recent >= limits.auth_failures_per_ip:
            log.warning(
                "AUTH refused for [%s]: %d failures in the last minute; closing",
                self.client_ip,
                recent,
            )
            await self.push("421 4.7.0 Error: too many failed authentications, try later")
            self._close()
            return
        if not self._auth_permitted():
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        parts = (arg or "").split()
        if not parts or len(parts) > 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = parts[0].upper()
        initial = parts[1].encode("ascii", "replace") if len(parts) == 2 else None
        user: str | None = None
        password = ""
        if mechanism == "PLAIN":
            raw = await (self._decode_sasl(initial) if initial else self._read_sasl(""))
            if raw is not None:
                fields = raw.split(b"\x00")
                if len(fields) == 3 and fields[0] in (b"", fields[1]):
                    user = fields[1].decode("utf-8", "replace")
                    password = fields[2].decode("utf-8", "replace")
                else:
                    user = ""
        elif mechanism == "LOGIN":
            name = await (
                self._decode_sasl(initial) if initial else self._read_sasl("VXNlcm5hbWU6")
            )
            if name is not None:
                secret = await self._read_sasl("UGFzc3dvcmQ6")
                if secret is not None:
                    user = name.decode("utf-8", "replace")
                    password = secret.decode("utf-8", "replace")
        else:
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        if user is None:  # aborted or undecodable: already answered, still an attempt
            self._fail_auth(mechanism, "")
            return
        ok = bool(user) and await asyncio.get_running_loop().run_in_executor(
            _auth_pool(), users.verify, user, password
        )
        if not ok:
            delay = self._fail_auth(mechanism, user)
            await asyncio.sleep(delay)  # a growing delay per address: guessing gets slow
            await self.push("535 5.7.8 Error: authentication failed")
            return
        entry = users.get(user)
        self._user = user
        self._user_senders = entry.senders if entry is not None else ()
        log.info("[%s] authenticated as %s", self.client_ip, user)
        await self.push("235 2.7.0 Authentication successful")

    def _fail_auth(self, mechanism: str, user: str) -> float:
        """Count a failed AUTH; returns how long to wait before answering it."""
        self._auth_failures += 1
        limits = self._shared.config.limits
        recent = self._shared.clients.add_auth_failure(self.client_ip)
        delay = float(min(limits.auth_delay_max, limits.auth_delay * 2 ** (recent - 1)))
        # One stable line per failure, for fail2ban (contrib/fail2ban).
        log.warning(
            "AUTH failed from [%s]: mechanism=%s user=%r failures_last_minute=%d delay=%gs",
            self.client_ip,
            mechanism,
            user,
            recent,
            delay,
        )
        return delay

    # ------------------------------------------------------------ MAIL / RCPT

    def _disk_low(self) -> bool:
        try:
            free = shutil.disk_usage(self._shared.intake.storage_dir).free
        except OSError:
            return True
        return free < self._shared.config.free_space_needed

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.session is not None and self.envelope is not None
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        rest = self._strip_command_keyword("FROM:", arg or "")
        split = split_path(rest) if rest is not None else None
        if split is None:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        path, params = split
        utf8 = False
        if params and not self.session.extended_smtp:
            await self.push("555 5.5.4 MAIL parameters need EHLO")
            return
        for param in params.split():
            key, _, value = param.partition("=")
            if not param.isascii():  # RFC 5321 §4.1.2: esmtp-keyword and value are ASCII
                await self.push("501 5.5.4 Syntax error in MAIL parameters (not ASCII)")
                return
            key = key.upper()
            if key == "SIZE":
                if not _DIGITS.fullmatch(value):
                    await self.push("501 5.5.4 Syntax error in parameter SIZE (digits only)")
                    return
                if int(value) > self._shared.config.limits.max_message_size:
                    await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
                    return
            elif key == "BODY" and value.upper() in ("7BIT", "8BITMIME"):
                pass
            elif key == "SMTPUTF8" and not value:
                utf8 = True
            else:
                await self.push(f"555 5.5.4 Unsupported MAIL parameter {key[:32]}")
                return
        if self._disk_low():
            log.warning("[%s] MAIL refused: free disk space is low", self.client_ip)
            await self.push("452 4.3.1 Insufficient system storage")
            return
        refusal = self._shared.policy.check_sender(self._identity(), path, utf8=utf8)
        if refusal is not None:
            log.info("[%s] MAIL FROM:<%s> refused: %s", self.client_ip, path, refusal)
            await self.push(refusal)
            return
        self.envelope.mail_from = path
        self.envelope.mail_options = params.split()
        self._utf8 = utf8
        await self.push("250 2.1.0 Ok")

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        rest = self._strip_command_keyword("TO:", arg or "")
        split = split_path(rest) if rest is not None else None
        if split is None:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        path, params = split
        if params:
            await self.push("555 5.5.4 RCPT parameters are not supported")
            return
        if len(self.envelope.rcpt_tos) >= self._shared.config.limits.max_recipients:
            await self.push("452 4.5.3 Error: too many recipients")
            return
        refusal = self._shared.policy.check_recipient(self._identity(), path, utf8=self._utf8)
        if refusal is not None:
            log.info("[%s] RCPT TO:<%s> refused: %s", self.client_ip, path, refusal)
            await self.push(refusal)
            return
        self.envelope.rcpt_tos.append(path)
        await self.push("250 2.1.5 Ok")

    # ---------------------------------------------------------------- DATA

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        identity = self._identity()
        client = ClientInfo(
            ip=self.client_ip,
            helo=str(self.session.host_name or ""),
            tls=self.tls_version(),
            esmtp=bool(self.session.extended_smtp),
            user=self._user,
            identity=str(identity) if identity is not None else "",
            network=identity.name if identity is not None and identity.kind == "network" else None,
        )
        envelope = Envelope(self.envelope.mail_from, tuple(self.envelope.rcpt_tos))
        try:
            draft = self._shared.intake.begin(client, envelope)
        except MessageError as exc:
            self._set_post_data_state()
            await self.push(f"554 5.5.0 Error: {exc.what}")
            return
        committed = False
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            problem = await self._receive(draft)
            self._set_post_data_state()  # exactly one transaction per DATA
            if problem is not None:
                log.info("[%s] message refused: %s", self.client_ip, problem)
                await self.push(problem)
                return
            try:
                queue_id = await draft.commit()
            except QueueError as exc:
                log.error("[%s] could not queue a message: %s", self.client_ip, exc.what)
                await self.push("451 4.3.0 Error: queue file write error")
                return
            except OSError as exc:
                await self.push(_write_error(self.client_ip, exc))
                return
            finally:
                committed = True
            await self.push(f"250 2.0.0 Ok: queued as {queue_id}")
        finally:
            if not committed:
                draft.discard()

    async def _receive(self, draft: Draft) -> str | None:
        """Read DATA up to ``<CR><LF>.<CR><LF>``, feeding ``draft`` while the message is
        acceptable; returns the refusal reply, or ``None``.

        Works on whatever the socket delivered (up to 64 KiB at a time) rather than line by
        line: the checks are searches and counts over the chunk's complete lines, and only
        the incomplete last line is carried into the next round. Bytes after the end of data
        (pipelined commands) go back to the reader."""
        limits = self._shared.config.limits
        normalize = self._shared.config.bare_newline == "normalize"
        reader = self._reader
        # `data` always starts at a line start, with the CRLF before that line in front of
        # it, so "<CR><LF>.<CR><LF>" is found at the very start of DATA too.
        pending = b"\r\n"
        size = 0
        problem: str | None = None
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                raise asyncio.IncompleteReadError(pending, None)
            self._reset_timeout()
            data = pending + chunk
            end = data.find(b"\r\n.\r\n")
            if end >= 0:
                lines, rest = data[: end + 2], data[end + 5 :]
                if rest:
                    buffer: Any = getattr(reader, "_buffer")  # noqa: B009
                    buffer[:0] = rest
            else:
                cut = data.rfind(b"\r\n")
                lines, pending = data[: cut + 2], data[cut:]
                if len(pending) - 2 > limits.max_line_length + 1:
                    problem = problem or (
                        f"500 5.5.0 Message line longer than {limits.max_line_length} characters"
                    )
                    pending = pending[-4:]  # enough to see the end of data arrive
            if problem is None and len(lines) > 2:
                content, problem = self._check(lines, normalize)
                size += len(content)
                if problem is None and size > limits.max_message_size:
                    problem = "552 5.3.4 Message size exceeds fixed maximum message size"
                if problem is None:
                    try:
                        draft.feed(content)
                    except OSError as exc:  # the disk filled up: read on to the end of data
                        problem = _write_error(self.client_ip, exc)
                    except MessageError as exc:  # the header section is too large
                        problem = f"552 5.3.4 {exc.what}"
            if end >= 0:
                return problem

    def _check(self, lines: bytes, normalize: bool) -> tuple[bytes, str | None]:
        """The content of complete lines (``lines`` starts with the CRLF before the first
        one) and the refusal reply they earn, or ``None``."""
        if b"\x00" in lines:
            return b"", "550 5.6.0 Message content contains NUL characters"
        content = lines.replace(b"\r\n.", b"\r\n")[2:]  # undo dot-stuffing
        limit = self._shared.config.limits.max_line_length
        if len(content) > limit - 2 and max(map(len, content.split(b"\r\n"))) + 2 > limit:
            return b"", f"500 5.5.0 Message line longer than {limit} characters"
        crlf = content.count(b"\r\n")
        if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
            if not normalize:
                return b"", (
                    "550 5.6.0 Message content contains bare CR or LF characters"
                    " (only CRLF line ends are accepted)"
                )
            content = _BARE.sub(b"\r\n", content)
        return content, None


def bind(host: str, port: int, *, backlog: int = BACKLOG) -> list[socket.socket]:
    """Listening sockets for ``host``:``port`` (every address it resolves to), to be served
    by several processes at once: each passes them to :meth:`RelayListener.start`. Port 0
    gets one port, shared by all the addresses."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _write_error(client_ip: str, exc: OSError) -> str:
    """The reply for a message that could not be written (the client keeps it and retries)."""
    log.error("[%s] could not write a message: %s", client_ip, exc.strerror or exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "452 4.3.1 Insufficient system storage"
    return "451 4.3.0 Error: queue file write error"


_COMMAND_NAMES: dict[str, list[str]] = {}


@functools.cache
def _auth_pool() -> ThreadPoolExecutor:
    """One thread checks passwords, for all sessions of this process: each argon2 check
    takes 64 MiB for a moment, so a burst of AUTH attempts queues here instead of taking
    memory (and CPU) in proportion to the number of connections."""
    return ThreadPoolExecutor(1, thread_name_prefix="smtp365-auth")


def _command_names(cls: type) -> list[str]:
    key = f"{cls.__module__}.{cls.__qualname__}"
    names = _COMMAND_NAMES.get(key)
    if names is None:
        names = [name for name in dir(cls) if name.startswith(("smtp_", "auth_"))]
        _COMMAND_NAMES[key] = names
    return names


class RelayListener:
    """One listening socket with its mode, policy and limits."""

    def __init__(
        self,
        config: ListenerConfig,
        *,
        queue: Queue,
        policy: RelayPolicy,
        users: UserDB | None = None,
        intake: Intake | None = None,
        tls_context: ssl.SSLContext | None = None,
        clients: ClientTable | None = None,
    ) -> None:
        """``clients``: the per-address counters, shared with the other processes serving
        the same socket (:meth:`ClientTable.shared`); by default this listener's own."""
        if config.limits.auth_failures_per_ip > ClientTable.RING:
            raise ConfigError(
                f"auth_failures_per_minute = {config.limits.auth_failures_per_ip} is more than"
                f" the {ClientTable.RING} failures per address the relay can track",
                fix=f"set it to {ClientTable.RING} or less",
            )
        if tls_context is None and config.mode != "plain":
            if config.cert_file is None or config.key_file is None:
                raise ConfigError(
                    f"a {config.mode} listener needs a certificate and a key",
                    fix="set cert_file and key_file for this listener",
                )
            tls_context = server_tls_context(config.cert_file, config.key_file)
        self.config = config
        self._shared = _Shared(
            config=config,
            policy=policy,
            intake=intake or Intake(queue, hostname=config.hostname),
            users=users,
            tls_context=tls_context,
            clients=clients or ClientTable(),
        )
        self._servers: list[asyncio.Server] = []

    @property
    def sessions(self) -> int:
        return len(self._shared.sessions)

    @property
    def port(self) -> int:
        for server in self._servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("the listener is not started")

    async def start(self, sockets: Sequence[socket.socket] = ()) -> None:
        """Listen on ``config.host``/``config.port``, or serve on ``sockets`` (bound and
        listening already, shared with other processes: see :func:`bind`)."""
        loop = asyncio.get_running_loop()
        tls = self._shared.tls_context if self.config.mode == "tls" else None

        def factory() -> RelaySMTP:
            return RelaySMTP(self._shared)

        if sockets:
            for sock in sockets:
                self._servers.append(await loop.create_server(factory, sock=sock, ssl=tls))
        else:
            self._servers.append(
                await loop.create_server(
                    factory, self.config.host, self.config.port, ssl=tls, backlog=BACKLOG
                )
            )
        log.debug("listening on %s:%d (%s)", self.config.host, self.port, self.config.mode)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting; idle sessions get ``421`` and are closed at once; sessions in a
        mail transaction get up to ``grace`` seconds to finish it (a message being received
        still gets its 250 once durable, then a QUIT gets 221 and anything else 421); then
        the rest are closed (a DATA still in progress then gets no 250, so its client keeps
        the message and tries again)."""
        if not self._servers:
            return
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        # Idle sessions are told at once; one in a transaction finishes it first (its
        # next command, QUIT aside, gets the 421).
        self._shared.stopping = True
        for session in list(self._shared.sessions):
            if session.idle():
                session._shut_down()
        if grace > 0 and self._shared.sessions:
            log.info("waiting up to %.0f s for %d open session(s)", grace, self.sessions)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shared.drained.wait(), grace)
        for session in list(self._shared.sessions):
            session._abort()
        for server in servers:
            await server.wait_closed()

    async def __aenter__(self) -> RelayListener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
