"""A small HTTP/1.1 server on asyncio streams with h11 as the parser (keep-alive, TLS).

It serves one synchronous handler: ``handler(Request) -> Response``. Handlers of the
sandbox are quick (no I/O), so running them on the event loop keeps the server simple.
Bodies are read completely (up to ``max_body`` bytes) before the handler runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import logging
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

__all__ = ["HttpServer", "Request", "Response"]

log = logging.getLogger("smtp365.sandbox.http")

_READ_SIZE = 65_536
# RFC 3986 path characters: unreserved, sub-delims, ":", "@", "/" and %-escapes.
_PATH = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/]|%[0-9A-Fa-f]{2})*")


@dataclass(slots=True)
class Request:
    """One request: ``path`` is percent-decoded, header names are lower-case."""

    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""
    client: str = ""

    def form(self) -> dict[str, str]:
        """``application/x-www-form-urlencoded`` body (first value of each field)."""
        ctype = self.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/x-www-form-urlencoded" or not self.body:
            return {}
        fields: dict[str, str] = {}
        text = self.body.decode("utf-8", "replace")
        for key, value in parse_qsl(text, keep_blank_values=True):
            fields.setdefault(key, value)
        return fields


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(
        cls,
        data: Mapping[str, Any],
        status: int = 200,
        headers: list[tuple[str, str]] | None = None,
    ) -> Response:
        body = json.dumps(data, separators=(",", ":")).encode()
        return cls(status, body, "application/json; charset=utf-8", headers or [])

    @classmethod
    def html(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), "text/html; charset=utf-8")

    @classmethod
    def redirect(cls, location: str) -> Response:
        return cls(302, b"", "text/html; charset=utf-8", [("Location", location)])


Handler = Callable[[Request], Response]


class HttpServer:
    """Serve ``handler`` on ``host:port`` (0: any free port), over TLS when ``ssl_context``."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        idle_timeout: float = 120.0,
        max_body: int = 1 << 20,
    ) -> None:
        self._handler = handler
        self._host = host
        self._requested_port = port
        self._ssl = ssl_context
        self._idle_timeout = idle_timeout
        self._max_body = max_body
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self._host, self._requested_port, ssl=self._ssl
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._connections.values()):
            writer.transport.abort()
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)
        await server.wait_closed()

    # ------------------------------------------------------------ connections

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                try:
                    request = await self._receive(conn, reader, writer, client)
                except _Refused as exc:
                    await self._send_protocol_error(conn, writer, exc.status, body=not exc.head)
                    return
                if request is None:
                    return
                try:
                    response = self._handler(request)
                except Exception:  # a bug in a handler must not kill the connection silently
                    log.exception("handler failed for %s %s", request.method, request.path)
                    response = Response.json(
                        {"error": "server_error", "error_description": "internal error"}, 500
                    )
                try:
                    await self._send(conn, writer, request, response)
                except (h11.LocalProtocolError, UnicodeError):  # a header h11 cannot send
                    log.exception("bad response to %s %s", request.method, request.path)
                    return
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (OSError, TimeoutError, EOFError, h11.LocalProtocolError):
            return  # peer vanished, idle timeout, or the server is stopping
        except Exception:  # logged here rather than as asyncio's "unhandled exception"
            log.exception("connection from %s failed", client or "?")
        finally:
            self._connections.pop(task, None)
            writer.close()  # flushes what was written (a Connection: close answer)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
            writer.transport.abort()

    async def _receive(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: str,
    ) -> Request | None:
        """The next request; ``None`` when the client closed. Raises :class:`_Refused`."""
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Refused(exc.error_status_hint, head) from None
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                data = await asyncio.wait_for(reader.read(_READ_SIZE), self._idle_timeout)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._max_body:
                    raise _Refused(413, head)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                request = _request(head, bytes(body), client)
                if request is None:
                    raise _Refused(400, head)
                return request
            else:  # ConnectionClosed or PAUSED
                return None

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        request: Request,
        response: Response,
    ) -> None:
        body = b"" if request.method == "HEAD" else response.body
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store, no-cache"),
            ("Pragma", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            ("Date", email.utils.formatdate(usegmt=True)),
            *response.headers,
        ]
        data = conn.send(
            h11.Response(
                status_code=response.status,
                headers=headers,
                reason=_reason(response.status),
            )
        )
        if body:
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        writer.write(data)
        await writer.drain()

    async def _send_protocol_error(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, *, body: bool
    ) -> None:
        """``status`` with a one-line text (``body``: not to a HEAD request), then close."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        text = f"{status} {_reason(status)}\n".encode()
        with contextlib.suppress(h11.LocalProtocolError, OSError):
            data = conn.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(text))),
                        ("Connection", "close"),
                    ],
                    reason=_reason(status),
                )
            )
            if body:
                data = (data or b"") + (conn.send(h11.Data(data=text)) or b"")
            data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
            writer.write(data)
            await writer.drain()


class _Refused(Exception):
    """A request the HTTP layer answers itself with ``status`` before closing; ``head``
    tells a response to HEAD, which carries no body."""

    def __init__(self, status: int, request: h11.Request | None) -> None:
        super().__init__(status)
        self.status = status
        self.head = request is not None and request.method == b"HEAD"


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _split_target(target: str) -> tuple[str, str] | None:
    """Path and query of a request target (RFC 9112 §3.2), or ``None`` when it is none.

    The origin-form (``/path?query``) is split as it is: ``//x`` is a path with an empty
    segment, not a host as :func:`urllib.parse.urlsplit` would read it. The absolute-form
    (``https://host/path``) is parsed as a URL, the asterisk-form (``*``) gives the path
    ``*``. A path must be made of RFC 3986 path characters; the query is taken as it comes,
    as browsers send it. A fragment, which no client should send, is ignored.
    """
    target = target.partition("#")[0]
    if target == "*":
        return "*", ""
    if target.startswith("/"):
        path, _, query = target.partition("?")
    else:
        try:
            parts = urlsplit(target)
        except ValueError:  # e.g. "http://[/": an IPv6 literal without its "]"
            return None
        if not parts.scheme or not parts.netloc:
            return None
        path, query = parts.path or "/", parts.query
    if not _PATH.fullmatch(path):
        return None
    return path, query


def _request(head: h11.Request, body: bytes, client: str) -> Request | None:
    """The :class:`Request` of ``head``; ``None`` when its target is no request target."""
    target = head.target.decode("ascii", "replace")
    split = _split_target(target)
    if split is None:
        return None
    path, raw_query = split
    query: dict[str, str] = {}
    for key, value in parse_qsl(raw_query, keep_blank_values=True):
        query.setdefault(key, value)
    headers: dict[str, str] = {}
    for raw_name, raw_value in head.headers:
        key = raw_name.decode("ascii", "replace").lower()
        text = raw_value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(
        method=head.method.decode("ascii", "replace").upper(),
        target=target,
        path=unquote(path) or "/",
        query=query,
        headers=headers,
        body=body,
        client=client,
    )
