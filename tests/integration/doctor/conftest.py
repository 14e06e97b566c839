"""Servers and network conditions for the doctor's network checks (127.0.0.1, port 0 only)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import select
import shutil
import socket
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest

T = TypeVar("T")

CLONE_NEWNET = 0x40000000


@dataclass
class DropTarget:
    """host:port where connection attempts get no answer at all (SYNs are dropped).

    ``run`` runs a coroutine where that holds: in this event loop (accept-queue
    trick), or in a thread inside a private network namespace (fallback).
    """

    host: str
    port: int
    how: str
    netns: str | None = None

    async def run(self, make: Callable[[], Awaitable[T]]) -> T:
        if self.netns is None:
            return await make()
        return await _in_thread_in_netns(self.netns, make)


def _connects_within(addr: tuple[str, int], wait: float) -> socket.socket | None:
    """A connection to ``addr`` if the handshake completes within ``wait`` s, else None."""
    sock = socket.socket()
    sock.setblocking(False)
    rc = sock.connect_ex(addr)
    if rc not in (0, errno.EINPROGRESS):
        sock.close()
        return None
    _, writable, _ = select.select([], [sock], [], wait)
    if writable and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
        return sock
    sock.close()
    return None


@contextlib.contextmanager
def _accept_queue_full() -> Iterator[DropTarget | None]:
    """A listener with backlog 0 whose accept queue is full: Linux drops further SYNs."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        addr = listener.getsockname()
        for _ in range(4):
            conn = _connects_within(addr, 0.3)
            if conn is None:  # this SYN went unanswered: the queue is full, drops confirmed
                yield DropTarget("127.0.0.1", addr[1], "accept queue full")
                return
            fillers.append(conn)
        yield None
    finally:
        for s in fillers:
            s.close()
        listener.close()


@contextlib.contextmanager
def _blackhole_netns() -> Iterator[DropTarget]:
    """A private network namespace in which packets to 10.253.0.2 vanish."""
    name = f"smtp365-doctor-{os.getpid()}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    ip("netns", "add", name)
    try:
        # v0 -> v1, both up; frames for 10.253.0.2 go to a MAC nobody has, so v1 drops them.
        for args in (
            ("link", "set", "lo", "up"),
            ("link", "add", "v0", "type", "veth", "peer", "name", "v1"),
            ("addr", "add", "10.253.0.1/24", "dev", "v0"),
            ("link", "set", "v0", "up"),
            ("link", "set", "v1", "up"),
            (
                "neigh",
                "add",
                "10.253.0.2",
                "lladdr",
                "02:00:5e:00:53:02",
                "dev",
                "v0",
                "nud",
                "permanent",
            ),
        ):
            ip("-n", name, *args)
        yield DropTarget("10.253.0.2", 587, "network namespace, veth to nowhere", netns=name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=10)


async def _in_thread_in_netns(name: str, make: Callable[[], Awaitable[T]]) -> T:
    """Run ``make()`` in a new event loop, in a thread that entered namespace ``name``."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    async def main() -> T:
        return await make()

    def thread() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
            finally:
                os.close(fd)
            value = asyncio.run(main())
        except BaseException as exc:  # handed to the awaiting test
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, value)

    worker = threading.Thread(target=thread, name=f"netns-{name}", daemon=True)
    worker.start()
    try:
        return await done
    finally:
        await asyncio.to_thread(worker.join, 10)


@pytest.fixture
def drop_target() -> Iterator[DropTarget]:
    """Somewhere connection attempts are silently dropped (see DropTarget)."""
    if os.environ.get("SMTP365_TEST_DROP") != "netns":
        with _accept_queue_full() as target:
            if target is not None:
                yield target
                return
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip(
            "cannot make SYNs go unanswered here: the accept-queue trick does not drop them on "
            "this kernel, and a private network namespace needs root and iproute2"
        )
    with _blackhole_netns() as target:
        yield target
