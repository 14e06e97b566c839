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
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

__all__ = ["HttpServer", "Request", "Response"]

log = logging.getLogger("smtp365.sandbox.http")

_READ_SIZE = 65_536


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
                except h11.RemoteProtocolError as exc:
                    await self._send_protocol_error(conn, writer, exc.error_status_hint)
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
                await self._send(conn, writer, request, response)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (OSError, TimeoutError, EOFError, h11.LocalProtocolError):
            return  # peer vanished, idle timeout, or the server is stopping
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
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
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
                    raise h11.RemoteProtocolError("request body too large", 413)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _request(head, bytes(body), client)
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
        self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{status} {_reason(status)}\n".encode()
        with contextlib.suppress(h11.LocalProtocolError, OSError):
            data = conn.send(
                h11.Response(
                    status_code=status,
                    headers=[
                        ("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(body))),
                        ("Connection", "close"),
                    ],
                    reason=_reason(status),
                )
            )
            data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
            data += conn.send(h11.EndOfMessage()) or b""
            writer.write(data)
            await writer.drain()


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _request(head: h11.Request, body: bytes, client: str) -> Request:
    target = head.target.decode("ascii", "replace")
    parts = urlsplit(target)
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        query.setdefault(key, value)
    headers: dict[str, str] = {}
    for raw_name, raw_value in head.headers:
        key = raw_name.decode("ascii", "replace").lower()
        text = raw_value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(
        method=head.method.decode("ascii", "replace").upper(),
        target=target,
        path=unquote(parts.path) or "/",
        query=query,
        headers=headers,
        body=body,
        client=client,
    )
