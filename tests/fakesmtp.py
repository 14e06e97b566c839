"""A scriptable SMTP server for testing the client's defences against misbehaving servers.

The sandbox imitates Exchange Online faithfully; this one misbehaves on
purpose (hides STARTTLS, injects bytes after 220, serves the wrong
certificate, answers anything we script) and records every command it gets.
:class:`ImplicitTLSServer` speaks TLS from the first byte (port 465 style), for
clients set to the wrong TLS mode.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field


@dataclass
class Script:
    banner: str = "220 fake.test ESMTP ready"
    starttls_offered: bool = True
    starttls_reply: str = "220 2.0.0 SMTP server ready"
    inject_after_starttls: bytes = b""
    tls_context: ssl.SSLContext | None = None
    auth_mechs: str = "LOGIN XOAUTH2"
    auth_reply: str = "235 2.7.0 Authentication successful"
    mail_reply: str = "250 2.1.0 Sender OK"
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str = "250 2.0.0 OK <fake-queue-id> [Hostname=fake.test]"
    close_after_messages: int = 0  # close the connection after this many messages (0: never)
    rset_reply: str = "250 2.0.0 OK"  # a 421 closes the connection after it
    silent: bool = False  # accept the connection but never greet
    # greet only once this many connections have arrived (a greeting later than a client's
    # first wait; the later connections are not held up by the earlier ones)
    greet_after_connections: int = 0


class FakeSMTPServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._enough_connections = asyncio.Event()
        self.port = 0

    async def __aenter__(self) -> FakeSMTPServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        await asyncio.sleep(0)  # let the aborted transports run their close callbacks

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.connections >= self.script.greet_after_connections:
            self._enough_connections.set()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        raw_transport = writer.transport
        s = self.script
        tls = False
        delivered = 0

        async def send(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        try:
            if s.silent:
                await reader.read()
                return
            await self._enough_connections.wait()
            await send(s.banner)
            if not s.banner.startswith("220"):
                return
            while True:
                raw = await reader.readline()
                if not raw:
                    return
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.commands.append(line)
                verb = line.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    caps = ["250-fake.test Hello", "250-SIZE 157286400", "250-8BITMIME"]
                    if not tls and s.starttls_offered:
                        caps.append("250-STARTTLS")
                    if tls or s.tls_context is None:
                        caps.append(f"250-AUTH {s.auth_mechs}")
                    caps.append("250 SMTPUTF8")
                    for c in caps:
                        await send(c)
                elif verb == "STARTTLS":
                    writer.write(s.starttls_reply.encode() + b"\r\n" + s.inject_after_starttls)
                    await writer.drain()
                    if not s.starttls_reply.startswith("220"):
                        continue
                    assert s.tls_context is not None
                    try:
                        await writer.start_tls(s.tls_context)
                    except (ssl.SSLError, OSError):
                        return
                    tls = True
                elif verb == "AUTH":
                    parts = line.split()
                    if parts[1].upper() == "LOGIN":
                        if len(parts) == 2:
                            await send("334 VXNlcm5hbWU6")
                            self.commands.append((await reader.readline()).decode().strip())
                        await send("334 UGFzc3dvcmQ6")
                        self.commands.append((await reader.readline()).decode().strip())
                    await send(s.auth_reply)
                elif verb == "MAIL":
                    await send(s.mail_reply)
                elif verb == "RCPT":
                    addr = line.partition(":")[2].strip().strip("<>")
                    await send(s.rcpt_replies.get(addr, "250 2.1.5 Recipient OK"))
                elif verb == "DATA":
                    await send("354 Start mail input; end with <CRLF>.<CRLF>")
                    data = bytearray()
                    while True:
                        chunk = await reader.readline()
                        if not chunk or chunk == b".\r\n":
                            break
                        data += chunk
                    self.messages.append(bytes(data))
                    await send(s.data_reply)
                    delivered += 1
                    if s.close_after_messages and delivered >= s.close_after_messages:
                        return
                elif verb == "RSET":
                    await send(s.rset_reply)
                    if s.rset_reply.startswith("421"):
                        return
                elif verb == "NOOP":
                    await send("250 2.0.0 OK")
                elif verb == "QUIT":
                    await send("221 2.0.0 Service closing transmission channel")
                    return
                else:
                    await send("500 5.3.3 Unrecognized command")
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.transport.abort()
            raw_transport.abort()


class ImplicitTLSServer:
    """An SMTP server that speaks TLS from the first byte (port 465 style)."""

    def __init__(self, context: ssl.SSLContext, *, handshake_timeout: float = 5) -> None:
        self.context = context
        self.handshake_timeout = handshake_timeout  # then the server gives up on a client
        self.commands: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ImplicitTLSServer:
        self._server = await asyncio.start_server(
            self._handle,
            "127.0.0.1",
            0,
            ssl=self.context,
            ssl_handshake_timeout=self.handshake_timeout,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    __aexit__ = FakeSMTPServer.__aexit__

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)

        async def send(*lines: str) -> None:
            writer.write(b"".join(line.encode() + b"\r\n" for line in lines))
            await writer.drain()

        try:
            await send("220 implicit.test ESMTP ready")
            while raw := await reader.readline():
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.commands.append(line)
                verb = line.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    await send("250-implicit.test Hello", "250-AUTH LOGIN XOAUTH2", "250 SMTPUTF8")
                elif verb == "QUIT":
                    await send("221 2.0.0 Bye")
                    return
                else:
                    await send("500 5.3.3 Unrecognized command")
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            writer.transport.abort()
