"""More processes accepting connections: Postfix's master running several smtpd.

One Python process keeps about one core busy, and receiving mail is CPU work (parsing
commands, copying the body, committing it). So the main process binds every listener's
sockets, serves them itself, and starts ``processes - 1`` helpers (``python -m
smtp365.relay.procs``) that inherit the same listening sockets and serve them too: the
kernel gives each new connection to whichever process accepts it first.

A helper only receives. It opens the same queue (SQLite serialises the commits of all
processes; each commits and fsyncs its own batches, so a ``250`` still means durable) and
answers exactly like the main process, with the same listeners, users, networks and routes.
Delivery, bounces and queue recovery stay in the main process.

* It counts connections and failed AUTHs per client address in the main process's tables
  (:mod:`smtp365.relay.clients`, shared memory it inherits), so per-address limits hold
  for the relay as a whole.
* It tells the main process about each message it queued (one byte on a socketpair), so
  the scheduler claims it at once instead of at its next poll.
* It dies with the main process (``PR_SET_PDEATHSIG`` on Linux, and EOF on the socketpair
  everywhere), so a killed relay leaves nothing holding its port and nothing accepting mail
  that no one would deliver; a message it had not yet acknowledged is simply not
  acknowledged, as with a single process.
* SIGTERM from the main process: stop accepting, finish open sessions within the grace
  period, exit. One that exits on its own is restarted after a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from smtp365.relay.clients import ClientTable

__all__ = ["IntakeProcesses", "main"]

log = logging.getLogger("smtp365.relay")

RESTART_DELAY = 1.0


class IntakeProcesses:
    """The helper processes of one running relay (main-process side)."""

    def __init__(
        self,
        count: int,
        *,
        settings: dict[str, Any],
        state_dir: Path,
        sockets: Sequence[Sequence[socket.socket]],
        clients: Sequence[ClientTable],
        on_enqueued: Callable[[], None],
        log_setup: tuple[str, int],
    ) -> None:
        self.count = count
        self._spec: dict[str, Any] = {
            "settings": settings,
            "state_dir": str(state_dir),
            "listeners": [[s.fileno() for s in group] for group in sockets],
            "clients": [table.fileno() for table in clients],
            "parent": os.getpid(),
            "log": list(log_setup),
        }
        self._fds = [s.fileno() for group in sockets for s in group]
        self._fds += [fd for fd in self._spec["clients"] if fd is not None]
        self._on_enqueued = on_enqueued
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        for index in range(1, self.count + 1):
            await self._spawn(index)

    async def _spawn(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs_fd = theirs.fileno()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smtp365.relay.procs",
                stdin=asyncio.subprocess.PIPE,
                pass_fds=[*self._fds, theirs_fd],
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        spec = dict(self._spec, notify=theirs_fd, index=index)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode())
        await proc.stdin.drain()
        proc.stdin.close()
        self._procs[index] = proc
        loop.add_reader(ours.fileno(), self._readable, ours)
        watcher = loop.create_task(self._watch(index, proc, ours), name=f"smtp365-intake-{index}")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    def _readable(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            return
        self._on_enqueued()

    async def _watch(
        self, index: int, proc: asyncio.subprocess.Process, sock: socket.socket
    ) -> None:
        try:
            code = await proc.wait()
        finally:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
            if self._procs.get(index) is proc:
                del self._procs[index]
        if self._stopping:
            return
        log.error(
            "intake process %d (pid %d) exited with code %s; restarting it", index, proc.pid, code
        )
        await asyncio.sleep(RESTART_DELAY)
        if not self._stopping:
            await self._spawn(index)

    async def stop(self, grace: float) -> None:
        """SIGTERM every helper; SIGKILL those still running ``grace`` + 5 s later."""
        self._stopping = True
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if self._watchers:
            _, pending = await asyncio.wait(set(self._watchers), timeout=grace + 5.0)
            for proc in list(self._procs.values()):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


# ------------------------------------------------------------------ helper side


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)


def main() -> None:
    spec = json.loads(sys.stdin.read())
    _die_with_parent(int(spec["parent"]))
    from smtp365.config import Settings
    from smtp365.relay import logs, loop
    from smtp365.relay.clients import ClientTable
    from smtp365.relay.service import RelayService

    fmt, level = spec["log"]
    logs.setup(fmt, level=int(level), process=int(spec["index"]))
    sockets = [[socket.socket(fileno=fd) for fd in group] for group in spec["listeners"]]
    notify = socket.socket(fileno=int(spec["notify"]))
    clients = [ClientTable(int(fd)) for fd in spec["clients"]]
    service = RelayService(
        Settings.model_validate(spec["settings"]), state_dir=Path(spec["state_dir"])
    )
    with contextlib.suppress(KeyboardInterrupt):
        loop.run(
            service.run_intake(sockets, notify, index=int(spec["index"]), clients=clients),
            service.settings.relay.event_loop,
        )


if __name__ == "__main__":
    main()
