"""``[relay] processes``: helper processes share the listening socket and the queue, die with
the main process and are restarted when they die alone."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import select
import signal
import smtplib
import socket
from collections import Counter
from pathlib import Path

from smtp365.sandbox import Sandbox
from tests.e2e.relay_process import RelayProcess
from tests.e2e.test_cli_relay import ALICE, arrived, config, message, sandbox

__all__ = ["sandbox"]  # the fixture, shared with test_cli_relay

_ACCEPTED = re.compile(r" (intake(?:#\d+)?): accepted ")


def _send(port: int, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail(ALICE, ["x@example.net"], data)


async def _send_many(port: int, count: int, tag: str) -> set[str]:
    mids = set()
    for i in range(count):  # a new connection for each: the processes race to accept
        mid, data = message(f"{tag}{i}")
        await asyncio.to_thread(_send, port, data)
        mids.add(mid)
    return mids


async def _gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` exits within ``timeout`` (waits on a pidfd, no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = await asyncio.to_thread(select.select, [fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def _accepted_by(relay: RelayProcess) -> Counter[str]:
    return Counter(m.group(1) for line in relay.log if (m := _ACCEPTED.search(line)))


async def test_two_processes_accept_on_one_port_into_one_queue(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    relay = await RelayProcess(config(tmp_path, sandbox, processes=2), cwd=tmp_path).start()
    try:
        (helper,) = relay.helpers()
        await relay.wait_for_line(r"relay#1: intake process 1 \(pid \d+\) serving")
        # Which process accepts a connection is the kernel's choice (an idle helper tends
        # to win); the helper's messages are delivered by the main process.
        mids = set()
        while not _accepted_by(relay)["intake#1"] and len(mids) < 200:
            mids |= await _send_many(relay.port, 5, "h")
        # With the helper stopped, the main process alone accepts, on the same socket.
        os.kill(helper, signal.SIGSTOP)
        try:
            mids |= await _send_many(relay.port, 5, "m")
        finally:
            os.kill(helper, signal.SIGCONT)
        await arrived(sandbox, mids)
        by = _accepted_by(relay)
        assert sum(by.values()) == len(mids)
        assert by["intake#1"] > 0 and by["intake"] >= 5, by
    finally:
        assert await relay.terminate() == 0
    assert await _gone(helper, 5)
    assert len(sandbox.store.list()) == len(mids)


async def test_a_helper_killed_alone_is_restarted_and_nothing_is_lost(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    relay = await RelayProcess(config(tmp_path, sandbox, processes=2), cwd=tmp_path).start()
    try:
        await relay.wait_for_line(r"relay#1: intake process 1 \(pid \d+\) serving")
        (old,) = relay.helpers()
        os.kill(old, signal.SIGKILL)
        mark = len(relay.log)
        await relay.wait_for_line(
            rf"intake process 1 \(pid {old}\) exited with code -9", start=mark
        )
        found = await relay.wait_for_line(r"intake process 1 \(pid (\d+)\) serving", start=mark)
        new = int(found.group(1))
        assert new != old and relay.helpers() == [new]
        mids = await _send_many(relay.port, 30, "r")
        await arrived(sandbox, mids)
    finally:
        assert await relay.terminate() == 0
    assert await _gone(new, 5)


async def test_helpers_die_with_the_main_process(sandbox: Sandbox, tmp_path: Path) -> None:
    relay = await RelayProcess(config(tmp_path, sandbox, processes=3), cwd=tmp_path).start()
    helpers = relay.helpers()
    assert len(helpers) == 2
    assert relay.proc is not None
    os.kill(relay.proc.pid, signal.SIGKILL)
    for pid in helpers:
        assert await _gone(pid, 5), f"helper {pid} outlived the main process"
    await relay.kill()
    # The port is free and the queue not held: a new relay starts on the same port and state.
    same = [{"host": "127.0.0.1", "port": relay.port, "mode": "plain"}]
    cfg = config(tmp_path, sandbox, processes=2, listeners=same)
    again = await RelayProcess(cfg, cwd=tmp_path).start()
    try:
        mids = await _send_many(again.port, 5, "d")
        await arrived(sandbox, mids)
    finally:
        assert await again.terminate() == 0


class _Line:
    """A raw SMTP client that reads one reply at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.file = self.sock.makefile("rb")

    def reply(self) -> bytes:
        lines = b""
        while (line := self.file.readline())[3:4] == b"-":
            lines += line
        return lines + line

    def say(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


async def test_per_address_limits_hold_across_processes(sandbox: Sandbox, tmp_path: Path) -> None:
    """The connections and failed AUTHs of one address count once for the whole relay,
    whichever process accepted them: each process is made to accept in turn by stopping
    the other (SIGSTOP)."""
    cfg = config(
        tmp_path,
        sandbox,
        processes=2,
        listeners=[
            {
                "host": "127.0.0.1",
                "port": 0,
                "mode": "plain",
                "max_connections_per_client": 4,
                "auth_failures_per_minute": 2,
                "plain_auth_networks": ["lan"],
            }
        ],
        networks=[{"cidr": "127.0.0.0/8", "name": "lan"}],
    )
    relay = await RelayProcess(cfg, cwd=tmp_path).start()
    held: list[_Line] = []
    bad = "AUTH PLAIN " + base64.b64encode(b"\0nobody\0wrong").decode()

    async def connect() -> tuple[_Line, bytes]:
        line = await asyncio.to_thread(_Line, relay.port)
        held.append(line)
        return line, await asyncio.to_thread(line.reply)

    try:
        (helper,) = relay.helpers()
        await relay.wait_for_line(r"relay#1: intake process 1 \(pid \d+\) serving")
        assert relay.proc is not None
        main = relay.proc.pid
        for stopped in (helper, main):  # two connections and one failed AUTH in each
            os.kill(stopped, signal.SIGSTOP)
            try:
                for _ in range(2):
                    line, greeting = await connect()
                    assert greeting.startswith(b"220 "), greeting
                await asyncio.to_thread(line.say, "EHLO client.test")
                assert (await asyncio.to_thread(line.say, bad)).startswith(b"535 ")
                if stopped == main:  # the helper, holding 2 of the address's 4 connections
                    _, refused = await connect()
                    assert refused.startswith(b"421 4.7.0 Error: too many connections"), refused
            finally:
                os.kill(stopped, signal.SIGCONT)
        blocked = await asyncio.to_thread(line.say, bad)
        assert blocked.startswith(b"421 4.7.0 Error: too many failed authentications"), blocked
        failures = [ln for ln in relay.log if "AUTH failed from [127.0.0.1]" in ln]
        assert len(failures) == 2
        assert " listener: " in failures[0] and " listener#1: " in failures[1], failures
        assert "failures_last_minute=2" in failures[1], failures
    finally:
        for line in held:
            line.close()
        assert await relay.terminate() == 0
