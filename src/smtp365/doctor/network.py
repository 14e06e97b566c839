"""The doctor's network checks: name, TCP, SMTP greeting, TLS mode, TLS handshake.

Plain asyncio streams and :mod:`ssl` (no aiosmtplib), so every failure is seen
exactly where it happens on the wire. Every wait is bounded by ``ctx.timeout``;
every connection is closed (after ``QUIT`` when an SMTP session is open).
Nothing but ``EHLO``, ``STARTTLS`` and ``QUIT`` is ever sent, and nothing at
all over a TLS session whose certificate was not verified.

Facts left for later checks (``ctx.facts``):

* ``addresses`` - the IP addresses the host name resolves to (strings, in order)
* ``address`` - the address that accepted the TCP connection (later checks use it)
* ``banner`` - the server's greeting, e.g. ``"220 ... Microsoft ESMTP MAIL Service ready"``
* ``starttls`` - whether the EHLO before TLS offered STARTTLS
* ``ehlo_plain`` / ``ehlo_tls`` - EHLO extensions before / after TLS:
  upper-case keyword -> parameters (``{"SIZE": "157286400", "STARTTLS": ""}``)
* ``tls_version`` - e.g. ``"TLSv1.3"``
* ``mechanisms`` - AUTH mechanisms advertised after TLS, upper-case (``["LOGIN", "XOAUTH2"]``)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import socket
import ssl
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from smtp365 import replies
from smtp365.config import AccountSettings, TLSMode
from smtp365.config.model import MICROSOFT_PROFILES, PROFILES
from smtp365.doctor.model import Check, CheckResult, DoctorContext, Status, result
from smtp365.models import Reply
from smtp365.transport.smtp import make_tls_context
from smtp365.transport.tlsmode import (
    IMPLICIT_ON_PLAIN_PORT,
    PLAIN_FIRST_ON_TLS_PORT,
    answered_in_plain_text,
    no_greeting_but_tls,
)

EXPIRY_WARN_DAYS = 21
_STAGGER = 0.25  # s between connection attempts to successive addresses (happy eyeballs)
_SHORT_WAIT = 5.0  # s to wait for a clear-text banner before trying TLS (tls.mode)
_SMTP_PORTS = (25, 587)
_OLD_TLS = ("TLSv1", "TLSv1.1", "SSLv3")
# X509_V_ERR_* codes (openssl/x509_vfy.h)
_V_EXPIRED = 10
_V_NOT_YET_VALID = 9
_V_NAME_MISMATCH = (62, 64)  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
_V_UNTRUSTED = (2, 18, 19, 20, 21, 27)  # unknown issuer, self-signed, untrusted chain


# -- small helpers -------------------------------------------------------------


def _where(a: AccountSettings) -> str:
    return f"{a.host}:{a.port}"


def _known_host(a: AccountSettings) -> str:
    return PROFILES[a.profile].host or "smtp.office365.com"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _probe_context() -> ssl.SSLContext:
    """A non-verifying, permissive client context: only to learn what the server speaks.

    Never used for anything but reading the peer's certificate and TLS version
    (or the banner and EHLO reply, which travel in clear text with STARTTLS anyway).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        # Deliberately old: to tell "this server only speaks TLS 1.0" from other failures.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    with contextlib.suppress(ssl.SSLError):
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@dataclass
class _Reply:
    code: int
    lines: list[str]

    def __str__(self) -> str:
        text = f"{self.code} {' / '.join(self.lines)}".strip()
        return text if len(text) <= 300 else text[:297] + "..."

    def catalogue(self) -> replies.CatalogueEntry | None:
        return replies.lookup(Reply.parse(self.code, "\n".join(self.lines)))


def _extensions(ehlo: _Reply) -> dict[str, str]:
    """EHLO reply -> {KEYWORD: parameters}; the first line is the server's greeting."""
    exts: dict[str, str] = {}
    for line in ehlo.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword.upper().startswith("AUTH="):  # old servers: "AUTH=LOGIN PLAIN"
            keyword, params = "AUTH", line.strip()[5:]
        keyword = keyword.upper()
        if keyword:
            exts[keyword] = " ".join(filter(None, (exts.get(keyword, ""), params.strip())))
    return exts


class _Failure(Exception):
    """The conversation went wrong. ``kind``: timeout, closed, tls-bytes, garbage,
    connect, reply, no-starttls, starttls-refused, injection."""

    def __init__(self, kind: str, what: str, *, reply: _Reply | None = None) -> None:
        super().__init__(what)
        self.kind = kind
        self.what = what
        self.reply = reply


class _TLSFailed(Exception):
    """The TLS handshake failed; ``exc`` is what :mod:`ssl`/asyncio raised."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(str(exc))
        self.exc = exc


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc)
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError):
        return "no answer to the TLS handshake in time"
    if isinstance(exc, ConnectionResetError):
        return "the server reset the connection during the TLS handshake"
    if isinstance(exc, ConnectionError | EOFError) or (isinstance(exc, OSError) and not str(exc)):
        return "the server closed the connection during the TLS handshake"
    return str(exc) or type(exc).__name__


# -- TCP -----------------------------------------------------------------------


@dataclass
class _Attempt:
    ip: str
    error: BaseException | None = None
    ms: float | None = None
    started: float = 0.0
    tried: bool = False


def _kind(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    code = exc.errno if isinstance(exc, OSError) else None
    if isinstance(exc, TimeoutError) or code == errno.ETIMEDOUT:
        return "timeout"
    if isinstance(exc, ConnectionRefusedError) or code == errno.ECONNREFUSED:
        return "refused"
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return "unreachable"
    if code in (errno.EACCES, errno.EPERM):
        return "blocked"
    if code == errno.ECONNRESET:
        return "reset"
    return "error"


def _outcome(att: _Attempt) -> str:
    if not att.tried:
        return "not tried (out of time)"
    kind = _kind(att.error)
    if kind == "ok":
        return f"connected in {att.ms or 0:.0f} ms"
    if kind == "timeout":
        return "no answer"
    if kind == "error" and att.error is not None:
        return f"error: {att.error}"
    return kind


async def _connect_one(ip: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect_any(
    ips: list[str], port: int, timeout: float
) -> tuple[socket.socket | None, _Attempt | None, list[_Attempt]]:
    """Try the addresses in order, starting the next one every ``_STAGGER`` s or as soon as
    the previous one failed; the first to connect wins. One deadline for all."""
    loop = asyncio.get_running_loop()
    attempts = [_Attempt(ip) for ip in ips]
    queue = list(attempts)
    pending: dict[asyncio.Task[socket.socket], _Attempt] = {}
    winner: tuple[socket.socket, _Attempt] | None = None
    deadline = loop.time() + timeout
    next_start = loop.time()
    try:
        while winner is None:
            now = loop.time()
            if now >= deadline:
                break
            if queue and (not pending or now >= next_start):
                att = queue.pop(0)
                att.tried, att.started = True, now
                pending[asyncio.create_task(_connect_one(att.ip, port))] = att
                next_start = now + _STAGGER
            if not pending:
                break
            wait = deadline - now
            if queue:
                wait = min(wait, max(0.0, next_start - now))
            done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                att = pending.pop(task)
                att.ms = (loop.time() - att.started) * 1000
                exc = task.exception()
                if exc is not None:
                    att.error = exc
                elif winner is None:
                    winner = (task.result(), att)
                else:
                    task.result().close()
    finally:
        for task in pending:
            task.cancel()
        outcomes = await asyncio.gather(*pending, return_exceptions=True)
        for att, got in zip(pending.values(), outcomes, strict=True):
            if isinstance(got, socket.socket):
                got.close()
            att.error = TimeoutError()
    if winner is None:
        return None, None, attempts
    return winner[0], winner[1], attempts


async def _addresses(ctx: DoctorContext) -> list[str]:
    known = ctx.facts.get("address")
    if isinstance(known, str):
        return [known]
    a = ctx.account
    async with asyncio.timeout(ctx.timeout):
        infos = await asyncio.get_running_loop().getaddrinfo(
            a.host, a.port, type=socket.SOCK_STREAM
        )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def _open_socket(ctx: DoctorContext) -> socket.socket:
    a = ctx.account
    try:
        ips = await _addresses(ctx)
    except (OSError, TimeoutError) as exc:
        raise _Failure("connect", f"cannot resolve {a.host} again: {exc}") from None
    sock, _, attempts = await _connect_any(ips, a.port, ctx.timeout)
    if sock is None:
        got = "; ".join(f"{att.ip}: {_outcome(att)}" for att in attempts)
        raise _Failure("connect", f"cannot connect to {_where(a)} again ({got})")
    return sock


# -- an SMTP conversation over asyncio streams ----------------------------------


class _Conn:
    """One connection: reads SMTP replies with a deadline, detects TLS bytes, closes cleanly."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.buf = bytearray()
        self.session = False  # an SMTP session is open and in a state where QUIT makes sense
        self.broken = False  # a failed start_tls closed the transport behind the stream

    @classmethod
    async def open(cls, ctx: DoctorContext, tls: ssl.SSLContext | None = None) -> _Conn:
        """Connect to the address tcp.connect found; with ``tls``, handshake at once (implicit)."""
        sock = await _open_socket(ctx)
        try:
            async with asyncio.timeout(ctx.timeout):
                if tls is None:
                    reader, writer = await asyncio.open_connection(sock=sock)
                else:
                    reader, writer = await asyncio.open_connection(
                        sock=sock,
                        ssl=tls,
                        server_hostname=ctx.account.host,
                        ssl_handshake_timeout=ctx.timeout,
                    )
        except BaseException as exc:
            sock.close()
            if tls is not None and isinstance(exc, OSError | EOFError):
                raise _TLSFailed(exc) from None
            raise
        return cls(reader, writer, ctx.timeout)

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        obj = self.writer.get_extra_info("ssl_object")
        return obj if isinstance(obj, ssl.SSLObject) else None

    async def _line(self, timeout: float) -> bytes:
        while True:
            if len(self.buf) >= 2 and self.buf[0] in (0x15, 0x16) and self.buf[1] == 0x03:
                raise _Failure("tls-bytes", "the server sent TLS records instead of SMTP text")
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[: end + 1])
                del self.buf[: end + 1]
                return line
            if len(self.buf) > 4096:
                raise _Failure("garbage", f"the server sent {bytes(self.buf[:40])!r}...")
            try:
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(4096)
            except TimeoutError:
                raise _Failure("timeout", f"no answer within {timeout:g} s") from None
            except OSError as exc:
                raise _Failure("closed", f"the connection broke: {exc}") from None
            if not data:
                raise _Failure("closed", "the server closed the connection")
            self.buf += data

    async def reply(self, timeout: float | None = None) -> _Reply:
        lines: list[str] = []
        try:
            while True:
                raw = await self._line(self.timeout if timeout is None else timeout)
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
                    raise _Failure("garbage", f"the server sent {text[:80]!r}, not an SMTP reply")
                lines.append(text[4:])
                if text[3:4] != "-":
                    return _Reply(int(text[:3]), lines)
        except _Failure:
            self.session = False
            raise

    async def command(self, line: str) -> _Reply:
        self.writer.write(line.encode("ascii", "replace") + b"\r\n")
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except (OSError, TimeoutError) as exc:
            self.session = False
            raise _Failure("closed", f"cannot send {line.split()[0]}: {exc}") from None
        return await self.reply()

    async def start_tls(self, context: ssl.SSLContext, host: str) -> None:
        self.session = False
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.start_tls(
                    context, server_hostname=host, ssl_handshake_timeout=self.timeout
                )
        except (OSError, EOFError, TimeoutError) as exc:
            # loop.start_tls closed the transport, but the stream's protocol never hears
            # of it: wait_closed() would hang, so close() must not wait.
            self.broken = True
            raise _TLSFailed(exc) from None
        self.session = True

    def abort(self) -> None:
        """Close without sending anything (not even QUIT)."""
        self.session = False
        self.writer.transport.abort()

    async def close(self) -> None:
        """QUIT when a session is open, then close; never raises."""
        grace = min(self.timeout, 2.0)
        if self.session:
            self.session = False
            with contextlib.suppress(_Failure):
                self.writer.write(b"QUIT\r\n")
                await self.reply(timeout=grace)
        self.writer.close()
        if self.broken:
            self.writer.transport.abort()
            return
        try:
            async with asyncio.timeout(grace):
                await self.writer.wait_closed()
        except (OSError, TimeoutError):
            self.writer.transport.abort()


async def _ehlo_name(ctx: DoctorContext) -> str:
    """The name the client sends in EHLO: ``ehlo_name``, else the FQDN (as aiosmtplib does)."""
    if ctx.account.ehlo_name:
        return ctx.account.ehlo_name
    try:
        async with asyncio.timeout(min(ctx.timeout, 5.0)):
            name = await asyncio.to_thread(socket.getfqdn)
    except TimeoutError:
        name = ""
    return name or "localhost"


async def _hello(conn: _Conn, ctx: DoctorContext) -> tuple[_Reply, dict[str, str]]:
    """Read the banner and say EHLO; _Failure("reply") on a refusal."""
    banner = await conn.reply()
    if banner.code != 220:
        raise _Failure("reply", f"the server greeted with {banner} instead of 220", reply=banner)
    conn.session = True
    ehlo = await conn.command(f"EHLO {await _ehlo_name(ctx)}")
    if ehlo.code != 250:
        raise _Failure("reply", f"EHLO was refused: {ehlo}", reply=ehlo)
    return banner, _extensions(ehlo)


async def _tls_session(ctx: DoctorContext, context: ssl.SSLContext, *, greet: bool) -> _Conn:
    """A connection in TLS as the account would open it (implicit, or banner/EHLO/STARTTLS).

    Raises _TLSFailed for the handshake, _Failure for SMTP trouble on the way there.
    With ``greet`` (implicit TLS), also reads the banner inside TLS.
    """
    a = ctx.account
    if a.tls is TLSMode.IMPLICIT:
        conn = await _Conn.open(ctx, tls=context)
        if greet:
            try:
                banner = await conn.reply()
                if banner.code != 220:
                    raise _Failure("reply", f"the server greeted with {banner}", reply=banner)
                conn.session = True
            except BaseException:
                await conn.close()
                raise
        return conn
    conn = await _Conn.open(ctx)
    try:
        _, exts = await _hello(conn, ctx)
        if "STARTTLS" not in exts:
            raise _Failure("no-starttls", f"{_where(a)} does not offer STARTTLS")
        reply = await conn.command("STARTTLS")
        if reply.code != 220:
            raise _Failure("starttls-refused", f"STARTTLS was refused: {reply}", reply=reply)
        if conn.buf:
            conn.session = False
            raise _Failure(
                "injection",
                f"the server sent {bytes(conn.buf[:40])!r} after its 220 reply to STARTTLS "
                "(a STARTTLS command injection)",
            )
        await conn.start_tls(context, a.host)
    except BaseException:
        await conn.close()
        raise
    return conn


def _failure_result(check: Check, f: _Failure, ctx: DoctorContext) -> CheckResult:
    """A generic FAIL for an SMTP-level problem (with the catalogue entry when one matches)."""
    a = ctx.account
    entry = f.reply.catalogue() if f.reply is not None else None
    if entry is not None:
        return result(
            check,
            Status.FAIL,
            f"{_where(a)}: {f.what}",
            why=entry.meaning,
            fix=entry.fix,
            catalogue=entry.key,
        )
    fix = {
        "connect": "the server stopped accepting connections; run the doctor again",
        "closed": "the server or something on the path cut the session; try again, or from "
        "another network",
        "garbage": f"check host and port: this does not look like an SMTP server "
        f"(Exchange Online: {_known_host(a)}:587)",
        "reply": "read the server's reply; check host, port and ehlo_name",
    }.get(f.kind, "check host, port and tls")
    return result(check, Status.FAIL, f"{_where(a)}: {f.what}", fix=fix)


# -- certificates ----------------------------------------------------------------


def _cert_info(der: bytes | None) -> dict[str, Any]:
    if not der:
        return {}
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    cns = [str(v.value) for v in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    not_after = cert.not_valid_after_utc
    days = (not_after - datetime.now(UTC)).total_seconds() / 86400
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "self_signed": cert.subject == cert.issuer,
        "sans": names,
        "names": names or cns,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": not_after.isoformat(),
        "days_left": round(days, 1),
    }


def _tls_info(obj: ssl.SSLObject | None) -> dict[str, Any]:
    if obj is None:
        return {}
    cipher = obj.cipher()
    info: dict[str, Any] = {"version": obj.version(), "cipher": cipher[0] if cipher else None}
    info.update(_cert_info(obj.getpeercert(binary_form=True)))
    return info


def _describe_cert(info: dict[str, Any]) -> str:
    if "subject" not in info:
        return ""
    names = ", ".join(info["names"]) or "no names"
    return (
        f"certificate for {names} (subject {info['subject']}), issued by {info['issuer']}, "
        f"valid until {info['not_after'][:10]}"
    )


# -- the checks --------------------------------------------------------------------


class DnsResolve:
    id = "dns.resolve"
    title = "The host name resolves"
    requires: tuple[str, ...] = ()

    async def run(self, ctx: DoctorContext) -> CheckResult:
        a = ctx.account
        fix = f"check the host name (Exchange Online: {_known_host(a)})"
        try:
            async with asyncio.timeout(ctx.timeout):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    a.host, a.port, type=socket.SOCK_STREAM
                )
        except TimeoutError:
            return result(
                self,
                Status.FAIL,
                f"no answer from the DNS resolver for {a.host} within {ctx.timeout:g} s",
                why="the configured DNS server does not answer (or answers very slowly)",
                fix="check the DNS servers of this machine (/etc/resolv.conf) and the network",
            )
        except socket.gaierror as exc:
            detail, why = _explain_gaierror(exc, a.host)
            return result(self, Status.FAIL, detail, why=why, fix=fix, data={"error": str(exc)})
        except OSError as exc:
            return result(self, Status.FAIL, f"cannot resolve {a.host}: {exc}", fix=fix)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            return result(self, Status.FAIL, f"{a.host} resolves to no address", fix=fix)
        ctx.facts["addresses"] = addresses
        detail = f"{a.host} resolves to {', '.join(addresses)}"
        if _is_ip(a.host) and a.profile in MICROSOFT_PROFILES:
            return result(
                self,
                Status.WARN,
                f"{detail}: host is an IP address",
                why="Exchange Online's certificate names the host, not its addresses, and the "
                "addresses change",
                fix=f"use the name: host = {_known_host(a)!r}",
                data={"addresses": addresses},
            )
        return result(self, Status.PASS, detail, data={"addresses": addresses})


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _has_route() -> bool:
    """Whether this machine has a route to the internet at all (a UDP connect sends nothing)."""
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 53))
                return True
        except OSError:
            continue
    return False


def _explain_gaierror(exc: socket.gaierror, host: str) -> tuple[str, str]:
    code = exc.errno
    if code == socket.EAI_NONAME:
        return (
            f"{host}: name does not exist (NXDOMAIN)",
            "the DNS has no such name: a typo in host, or a name that is not published",
        )
    if code == getattr(socket, "EAI_NODATA", None):
        return (
            f"{host}: the name exists but has no address (no A/AAAA record)",
            "the name is published without an address: a typo, or the wrong record",
        )
    if code == socket.EAI_AGAIN:
        if not _has_route():
            return (
                f"{host}: cannot resolve, no network (this machine has no route to the internet)",
                "the network is down or not configured: no default route",
            )
        return (
            f"{host}: temporary failure in name resolution (the DNS server did not answer)",
            "the DNS server is unreachable or overloaded; try again, check the network and "
            "/etc/resolv.conf",
        )
    if code == socket.EAI_FAIL:
        return (
            f"{host}: the DNS server failed to answer (SERVFAIL)",
            "a permanent resolver failure: the domain's DNS is broken, or DNSSEC validation failed",
        )
    return f"{host}: cannot resolve: {exc.strerror or exc}", "the resolver returned an error"


class TcpConnect:
    id = "tcp.connect"
    title = "A TCP connection opens"
    requires: tuple[str, ...] = ("dns.resolve",)

    async def run(self, ctx: DoctorContext) -> CheckResult:
        a = ctx.account
        ips: list[str] = list(ctx.facts.get("addresses") or [])
        if not ips:
            try:
                ips = await _addresses(ctx)
            except (OSError, TimeoutError) as exc:
                return result(self, Status.FAIL, f"cannot resolve {a.host}: {exc}")
        sock, won, attempts = await _connect_any(ips, a.port, ctx.timeout)
        outcomes = {att.ip: _outcome(att) for att in attempts}
        if sock is not None and won is not None:
            sock.close()
            ctx.facts["address"] = won.ip
            ms = round(won.ms or 0.0, 1)
            failed = [
                f"{ip}: {o}"
                for ip, o in outcomes.items()
                if ip != won.ip and o != "not tried (out of time)"
            ]
            detail = f"connected to {won.ip} port {a.port} in {ms:.0f} ms"
            if failed:
                detail += f" (before that: {'; '.join(failed)})"
            return result(
                self,
                Status.PASS,
                detail,
                data={"address": won.ip, "connect_ms": ms, "attempts": outcomes},
            )
        kinds = {_kind(att.error) for att in attempts if att.tried}
        data = {"connect_ms": None, "attempts": outcomes}
        listed = "; ".join(f"{ip}: {o}" for ip, o in outcomes.items())
        where = _where(a)
        if "timeout" in kinds:
            smtp_port = a.port in _SMTP_PORTS
            return result(
                self,
                Status.FAIL,
                f"no answer from {where} within {ctx.timeout:g} s ({listed}): "
                "the connection attempts were silently dropped",
                why=(
                    f"packets to port {a.port} are dropped on the way: a firewall, or your "
                    f"ISP / hosting provider blocking outbound port {a.port}"
                    + (
                        " (many ISPs and cloud providers block outbound SMTP on 25 and often "
                        "587 to stop spam)"
                        if smtp_port
                        else ""
                    )
                ),
                fix=(
                    "test from another network (e.g. a phone hotspot): if it works there, ask "
                    f"the network's administrator or ISP to allow outbound TCP {a.port} to "
                    f"{a.host}"
                    + (
                        "; Exchange Online takes submission on 587 (25 also works)"
                        if smtp_port
                        else f"; Exchange Online listens on 587, not {a.port}"
                    )
                ),
                data=data,
            )
        if "blocked" in kinds:
            return result(
                self,
                Status.FAIL,
                f"this machine refuses to connect to {where} ({listed})",
                why="a local firewall (iptables/nftables, security software) forbids the "
                "connection before it leaves the machine",
                fix=f"allow outbound TCP {a.port} in the local firewall",
                data=data,
            )
        if "refused" in kinds:
            return result(
                self,
                Status.FAIL,
                f"connection to {where} refused ({listed}): the host answers but nothing "
                f"listens on port {a.port}",
                why="a wrong port, or a firewall rejecting the connection actively",
                fix=f"check the port (Exchange Online: {_known_host(a)}:587 with STARTTLS); if "
                "the port is right, a firewall on the path rejects it",
                data=data,
            )
        if "unreachable" in kinds:
            return result(
                self,
                Status.FAIL,
                f"{where} is unreachable ({listed}): no route to that host/network",
                why="this machine has no route there: network down, no default gateway, "
                "no IPv6 connectivity for an IPv6 address, or a VPN/routing problem",
                fix="check the network connection, the default route and any VPN",
                data=data,
            )
        return result(
            self,
            Status.FAIL,
            f"cannot connect to {where} ({listed})",
            fix="check the host, the port and the network",
            data=data,
        )


class SmtpGreeting:
    id = "smtp.greeting"
    title = "The server greets and answers EHLO"
    requires: tuple[str, ...] = ("tcp.connect",)

    async def run(self, ctx: DoctorContext) -> CheckResult:
        a = ctx.account
        where = _where(a)
        implicit = a.tls is TLSMode.IMPLICIT
        try:
            # For implicit TLS the handshake comes first; its certificate is judged by
            # tls.handshake, so a permissive context here (only banner + EHLO are exchanged).
            conn = await _Conn.open(ctx, tls=_probe_context() if implicit else None)
        except _Failure as f:
            return _failure_result(self, f, ctx)
        except _TLSFailed as t:
            if answered_in_plain_text(t.exc):
                return result(
                    self,
                    Status.FAIL,
                    f"{where} answered the TLS handshake in plain text "
                    f"({_ssl_reason(t.exc)}): it does not speak implicit TLS",
                    why='tls = implicit ("SSL") but this port speaks plain SMTP first',
                    fix="set tls = starttls (see tls.mode)",
                )
            return result(
                self,
                Status.FAIL,
                f"TLS handshake with {where} failed before the greeting: {_ssl_reason(t.exc)}",
                fix="see tls.mode and tls.handshake",
            )
        try:
            try:
                banner, exts = await _hello(conn, ctx)
            except _Failure as f:
                if f.kind in ("timeout", "tls-bytes") and not implicit:
                    got = "TLS records" if f.kind == "tls-bytes" else "nothing"
                    return result(
                        self,
                        Status.FAIL,
                        f"{where} sent {got} instead of an SMTP greeting "
                        f"(waited {ctx.timeout:g} s)",
                        why="a port that stays silent waits for a TLS handshake: it expects "
                        "implicit TLS (465-style), not STARTTLS",
                        fix=f"for Microsoft 365 use {_known_host(a)}:587 with tls = starttls; "
                        "see tls.mode",
                    )
                return _failure_result(self, f, ctx)
            ctx.facts["banner"] = str(banner)
            data: dict[str, Any] = {"banner": str(banner), "extensions": exts}
            if not implicit:
                ctx.facts["ehlo_plain"] = exts
                ctx.facts["starttls"] = "STARTTLS" in exts
            if a.tls is TLSMode.STARTTLS and "STARTTLS" not in exts:
                return result(
                    self,
                    Status.FAIL,
                    f"STARTTLS not offered by {where}: wrong port, or something on the path "
                    f"strips it (EHLO offered: {', '.join(exts) or 'nothing'})",
                    why="smtp365 never sends credentials or mail without TLS",
                    fix=f"check host and port (Exchange Online: {_known_host(a)}:587); if they "
                    "are right, a firewall's SMTP inspection (or an attacker) removes STARTTLS",
                    data=data,
                )
            return result(
                self,
                Status.PASS,
                f"{banner}; EHLO offers {', '.join(exts) or 'no extensions'}",
                data=data,
            )
        finally:
            await conn.close()


class TlsMode:
    id = "tls.mode"
    title = "The TLS mode matches the port"
    requires: tuple[str, ...] = ("tcp.connect",)

    async def run(self, ctx: DoctorContext) -> CheckResult:
        if ctx.account.tls is TLSMode.IMPLICIT:
            return await self._implicit(ctx)
        return await self._plain_first(ctx)

    async def _plain_first(self, ctx: DoctorContext) -> CheckResult:
        """STARTTLS (or none): the port must greet in clear text."""
        a = ctx.account
        where = _where(a)
        wait = min(ctx.timeout, _SHORT_WAIT)
        try:
            conn = await _Conn.open(ctx)
        except _Failure as f:
            return _failure_result(self, f, ctx)
        try:
            try:
                banner = await conn.reply(timeout=wait)
                conn.session = banner.code == 220
                return result(
                    self,
                    Status.PASS,
                    f"{where} speaks plain SMTP first ({banner}), as tls = {a.tls.value} expects",
                    data={"observed": "plain"},
                )
            except _Failure as f:
                if f.kind not in ("timeout", "tls-bytes"):
                    return result(
                        self,
                        Status.WARN,
                        f"cannot tell the TLS mode of {where}: {f.what}",
                        fix="see smtp.greeting",
                    )
            # No clear-text greeting: does the port speak TLS from the first byte?
            try:
                await conn.start_tls(_probe_context(), a.host)
            except _TLSFailed as t:
                if answered_in_plain_text(t.exc):
                    return result(
                        self,
                        Status.PASS,
                        f"{where} speaks plain SMTP (its greeting came after more than {wait:g} s)",
                        data={"observed": "plain"},
                    )
                return result(
                    self,
                    Status.WARN,
                    f"cannot tell the TLS mode of {where}: no greeting within {wait:g} s, and "
                    f"no TLS either ({_ssl_reason(t.exc)})",
                    fix="see smtp.greeting: the server or something on the path stalls",
                )
            version = (conn.ssl_object.version() if conn.ssl_object else None) or "TLS"
            conn.abort()
            mistake = PLAIN_FIRST_ON_TLS_PORT
            return result(
                self,
                Status.FAIL,
                mistake.what(
                    mode=a.tls.value, where=where, seen=no_greeting_but_tls(version, wait=wait)
                ),
                why=mistake.why,
                fix=mistake.fix,
                data={"observed": "implicit"},
            )
        finally:
            await conn.close()

    async def _implicit(self, ctx: DoctorContext) -> CheckResult:
        """Implicit TLS: the port must answer a TLS handshake straight away."""
        a = ctx.account
        where = _where(a)
        try:
            conn = await _Conn.open(ctx, tls=_probe_context())
        except _Failure as f:
            return _failure_result(self, f, ctx)
        except _TLSFailed as t:
            tls_error = t.exc
        else:
            version = conn.ssl_object.version() if conn.ssl_object else "TLS"
            conn.abort()
            await conn.close()
            return result(
                self,
                Status.PASS,
                f"{where} speaks TLS from the first byte ({version}), as tls = implicit expects",
                data={"observed": "implicit"},
            )
        # The handshake failed: does the port greet in clear text instead?
        banner: _Reply | None = None
        with contextlib.suppress(_Failure):
            plain = await _Conn.open(ctx)
            try:
                banner = await plain.reply(timeout=min(ctx.timeout, _SHORT_WAIT))
                plain.session = banner.code == 220
            finally:
                await plain.close()
        if banner is not None or answered_in_plain_text(tls_error):
            seen = f"it greeted in clear text: {banner}" if banner else _ssl_reason(tls_error)
            mistake = IMPLICIT_ON_PLAIN_PORT
            return result(
                self,
                Status.FAIL,
                mistake.what(where=where, seen=seen),
                why=mistake.why,
                fix=mistake.fix,
                data={"observed": "plain"},
            )
        return result(
            self,
            Status.WARN,
            f"cannot tell the TLS mode of {where}: the TLS handshake failed "
            f"({_ssl_reason(tls_error)}) and no clear-text greeting came either",
            fix="see smtp.greeting and tls.handshake",
        )


class TlsHandshake:
    id = "tls.handshake"
    title = "TLS is established and the certificate is valid"
    requires: tuple[str, ...] = ("smtp.greeting",)

    async def run(self, ctx: DoctorContext) -> CheckResult:
        a = ctx.account
        if a.tls is TLSMode.NONE:
            return self._no_tls(ctx)
        try:
            conn = await _tls_session(ctx, make_tls_context(a), greet=True)
        except _TLSFailed as t:
            return await self._explain(ctx, t.exc)
        except _Failure as f:
            if f.kind == "injection":
                return result(
                    self,
                    Status.FAIL,
                    f"{_where(a)}: {f.what}",
                    why="bytes after the 220 reply would be read as if they came through TLS",
                    fix="something between you and the server is tampering with SMTP; do not "
                    "send through this network path",
                )
            return _failure_result(self, f, ctx)
        try:
            info = _tls_info(conn.ssl_object)
            ctx.facts["tls_version"] = info.get("version")
            try:
                ehlo = await conn.command(f"EHLO {await _ehlo_name(ctx)}")
            except _Failure as f:
                return _failure_result(self, f, ctx)
            if ehlo.code != 250:
                return _failure_result(
                    self,
                    _Failure("reply", f"EHLO inside TLS was refused: {ehlo}", reply=ehlo),
                    ctx,
                )
            exts = _extensions(ehlo)
            mechanisms = [m.upper() for m in exts.get("AUTH", "").split()]
            ctx.facts["ehlo_tls"] = exts
            ctx.facts["mechanisms"] = mechanisms
            data = {**info, "extensions": exts, "mechanisms": mechanisms}
            detail = f"{info.get('version')} ({info.get('cipher')}); {_describe_cert(info)}"
            days = info.get("days_left")
            if isinstance(days, float) and days < EXPIRY_WARN_DAYS:
                return result(
                    self,
                    Status.WARN,
                    f"the certificate expires in {_plural(round(days), 'day')} "
                    f"({info['not_after'][:10]}); {detail}",
                    why="once it expires, every client that verifies it (smtp365 does) fails",
                    fix="the server's administrator must renew the certificate (for Microsoft "
                    "365 this is Microsoft's: check you reach the real smtp.office365.com)",
                    data=data,
                )
            return result(self, Status.PASS, detail, data=data)
        finally:
            await conn.close()

    def _no_tls(self, ctx: DoctorContext) -> CheckResult:
        a = ctx.account
        plain = ctx.facts.get("ehlo_plain")
        if isinstance(plain, dict):
            ctx.facts["mechanisms"] = [m.upper() for m in str(plain.get("AUTH", "")).split()]
        status = Status.FAIL if a.profile in MICROSOFT_PROFILES else Status.WARN
        return result(
            self,
            status,
            "tls = none: no TLS at all, credentials and mail travel in clear text",
            why="acceptable only for a local test server; Microsoft 365 requires STARTTLS with "
            "TLS 1.2+",
            fix="set tls = starttls",
        )

    async def _explain(self, ctx: DoctorContext, exc: BaseException) -> CheckResult:
        """The verifying handshake failed: find out precisely why."""
        a = ctx.account
        where = _where(a)
        # A second, non-verifying handshake reads what the server presents. Nothing is
        # sent after it: the connection is aborted at once.
        probe: dict[str, Any] = {}
        probe_error = ""
        try:
            conn = await _tls_session(ctx, _probe_context(), greet=False)
        except _TLSFailed as t:
            probe_error = _ssl_reason(t.exc)
        except _Failure as f:
            probe_error = f.what
        else:
            probe = _tls_info(conn.ssl_object)
            conn.abort()
            await conn.close()
        data: dict[str, Any] = {"error": _ssl_reason(exc), **probe}
        cert = _describe_cert(probe)
        names = ", ".join(probe.get("names") or []) or "(unknown: could not read it)"
        if isinstance(exc, ssl.SSLCertVerificationError):
            code = exc.verify_code
            if code == _V_EXPIRED:
                days = -float(probe.get("days_left", 0.0))
                when = probe.get("not_after", "")[:10]
                return result(
                    self,
                    Status.FAIL,
                    f"the certificate of {where} expired"
                    + (f" on {when} ({_plural(round(days), 'day')} ago)" if when else "")
                    + (f"; {cert}" if cert else ""),
                    why="an expired certificate cannot be trusted; smtp365 refuses it",
                    fix="the server's administrator must renew it; if this should be Exchange "
                    "Online, check that you reach the real smtp.office365.com (a proxy or "
                    "interception device may present its own stale certificate)",
                    data=data,
                )
            if code == _V_NOT_YET_VALID:
                return result(
                    self,
                    Status.FAIL,
                    f"the certificate of {where} is not valid yet; {cert}",
                    fix="check this machine's clock (date, time zone, NTP)",
                    data=data,
                )
            if code in _V_NAME_MISMATCH:
                return result(
                    self,
                    Status.FAIL,
                    f"host name mismatch: the certificate of {where} is for {names}, "
                    f"not for {a.host!r}",
                    why="the certificate must name the host you connect to",
                    fix="set host to a name on the certificate (Exchange Online: "
                    f"{_known_host(a)}), not an IP or alias; if no name fits, something may be "
                    "intercepting the connection",
                    data=data,
                )
            if code in _V_UNTRUSTED:
                issuer = probe.get("issuer", "an unknown issuer")
                self_signed = " (self-signed)" if probe.get("self_signed") else ""
                return result(
                    self,
                    Status.FAIL,
                    f"untrusted certificate chain: the certificate of {where} is issued by "
                    f"{issuer}{self_signed}, which this machine does not trust "
                    f"({exc.verify_message})",
                    why="smtp365 only talks to servers whose certificate chains to a trusted CA",
                    fix="if the server uses a private CA, set ca_file to that CA's PEM file; if "
                    "you did not expect a private CA (Exchange Online uses public CAs), a proxy, "
                    "antivirus or an attacker may be intercepting TLS: do not send",
                    data=data,
                )
            return result(
                self,
                Status.FAIL,
                f"the certificate of {where} was rejected: {exc.verify_message}"
                + (f"; {cert}" if cert else ""),
                fix="check the certificate with the server's administrator",
                data=data,
            )
        version = probe.get("version")
        if version in _OLD_TLS:
            return result(
                self,
                Status.FAIL,
                f"{where} only speaks {version}: TLS 1.2 or newer is required "
                f"(handshake: {_ssl_reason(exc)})",
                why="TLS 1.0 and 1.1 are broken and retired; Exchange Online refuses them "
                "(421 4.7.66) and smtp365 requires TLS 1.2 too",
                fix="upgrade the server to TLS 1.2+; for an old device, relay through "
                "`smtp365 relay`",
                catalogue="tls-too-old",
                data=data,
            )
        if version and a.tls_min_version == "1.3" and version == "TLSv1.2":
            return result(
                self,
                Status.FAIL,
                f'{where} speaks at most TLSv1.2 but tls_min_version = "1.3"',
                fix='set tls_min_version = "1.2" (what Exchange Online requires)',
                data=data,
            )
        extra = f" (a permissive probe failed too: {probe_error})" if probe_error else ""
        return result(
            self,
            Status.FAIL,
            f"TLS handshake with {where} failed: {_ssl_reason(exc)}{extra}",
            why="usually a TLS version or cipher mismatch, or something on the path that "
            "breaks TLS",
            fix="smtp365 requires TLS 1.2+ with modern ciphers (as Exchange Online does); "
            "try from another network to rule out interception",
            data=data,
        )


def network_checks() -> list[Check]:
    """The network checks, in the order they must run."""
    return [DnsResolve(), TcpConnect(), SmtpGreeting(), TlsMode(), TlsHandshake()]


__all__ = [
    "DnsResolve",
    "SmtpGreeting",
    "TcpConnect",
    "TlsHandshake",
    "TlsMode",
    "network_checks",
]
