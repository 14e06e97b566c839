"""``smtp365 relay`` as a process, with real clients (smtplib, swaks, curl, a legacy HELO-only
client) and real signals (SIGTERM: graceful). The kill -9 soak (test_soak.py) uses ``Sender``."""

from __future__ import annotations

import asyncio
import json
import shutil
import smtplib
import socket
import sqlite3
import ssl
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from smtp365.sandbox import Sandbox, SandboxSettings
from smtp365.sandbox.settings import LimitSettings
from tests.e2e.conftest import Run
from tests.e2e.relay_process import RelayProcess, write_config

ALICE = "alice@contoso.test"


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    limits = LimitSettings(messages_per_minute=100_000, max_connections=20)
    sb = Sandbox(tmp_path / "sbx", SandboxSettings(limits=limits))
    await sb.start()
    yield sb
    await sb.stop()


def config(tmp_path: Path, sb: Sandbox, **relay: Any) -> Path:
    account = {
        "profile": "custom",
        "host": "localhost",
        "port": sb.smtp_port,
        "ca_file": str(sb.ca_file),
        "username": ALICE,
        "auth": "xoauth2",
        "timeout": 10,
        "token": sb.issue_token(ALICE, lifetime=3600),
    }
    table: dict[str, Any] = {
        "state_dir": str(tmp_path / "relay"),
        "hostname": "relay.test",
        "retry_base": 0.2,
        "retry_max": 1.0,
        "grace": 10,
        "listeners": [{"host": "127.0.0.1", "port": 0, "mode": "plain"}],
        "networks": [{"cidr": "127.0.0.0/8", "name": "lan"}],
        "budget": {"messages_per_minute": 100_000, "connections": 10},
        **relay,
    }
    return write_config(tmp_path / "smtp365.toml", {"alice": account}, table)


def message(tag: str) -> tuple[str, bytes]:
    mid = f"<{tag}-{uuid.uuid4().hex[:12]}@client.test>"
    data = (
        f"From: {ALICE}\r\nTo: x@example.net\r\nSubject: {tag}\r\nMessage-ID: {mid}\r\n"
        f"\r\nbody of {tag}\r\n"
    ).encode()
    return mid, data


async def arrived(sb: Sandbox, wanted: set[str], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not wanted <= {m.message_id for m in sb.store.list()}:
        missing = wanted - {m.message_id for m in sb.store.list()}
        assert loop.time() < deadline, f"never arrived: {sorted(missing)[:5]}"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------- users


async def test_passwd_creates_an_argon2_user(run_cli: Run, tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = await run_cli(
        "relay", "passwd", "scanner", "-s", "*@printer.local", "--password-stdin",
        "--state-dir", str(state), stdin=b"a long enough secret\n",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    assert "created relay user scanner" in r.stdout
    stored = (state / "users.json").read_text()
    assert "a long enough secret" not in stored and "$argon2id$" in stored
    assert (state / "users.json").stat().st_mode & 0o077 == 0
    r = await run_cli("relay", "users", "--json", "--state-dir", str(state))
    assert json.loads(r.stdout) == [{"user": "scanner", "senders": ["*@printer.local"]}]
    short = await run_cli(
        "relay", "passwd", "scanner", "--password-stdin", "--state-dir", str(state), stdin=b"x\n"
    )
    assert short.code == 64 and "too short" in short.stderr
    gone = await run_cli("relay", "passwd", "nobody", "--delete", "--state-dir", str(state))
    assert gone.code == 65 and "no relay user 'nobody'" in gone.stderr


async def test_bad_config_is_explained(run_cli: Run, tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[relay]\nlisteners = [{mode = "carrier-pigeon"}]\n')
    r = await run_cli("relay", "--config", str(tmp_path / "bad.toml"))
    assert r.code == 78
    assert "relay.listeners.0.mode" in r.stderr and "Traceback" not in r.stderr


async def test_queue_from_a_newer_version_exits_74(
    run_cli: Run, sandbox: Sandbox, tmp_path: Path
) -> None:
    queue = tmp_path / "relay" / "queue"
    queue.mkdir(parents=True)
    with sqlite3.connect(queue / "queue.db") as db:
        db.execute("PRAGMA user_version = 999")
    r = await run_cli("relay", "--config", str(config(tmp_path, sandbox)))
    assert r.code == 74, r.stderr
    assert "made by a newer smtp365" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------- real clients


def legacy_client(port: int, mid: str, data: bytes) -> None:
    """An old device: HELO (not EHLO), no pipelining, no TLS, one command at a time."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rwb")

        def say(line: bytes | None, expect: bytes) -> None:
            if line is not None:
                f.write(line + b"\r\n")
                f.flush()
            reply = f.readline()
            while reply[3:4] == b"-":
                reply = f.readline()
            assert reply.startswith(expect), reply

        say(None, b"220")
        say(b"HELO printer", b"250")
        say(b"MAIL FROM:<" + ALICE.encode() + b">", b"250")
        say(b"RCPT TO:<x@example.net>", b"250")
        say(b"DATA", b"354")
        f.write(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        f.flush()
        say(None, b"250")
        say(b"QUIT", b"221")


async def run_tool(*argv: str, stdin: bytes = b"") -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}):\n{out.decode()}"
    return out.decode()


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it: apt-get install {tool})")
    return path


async def test_real_clients_through_the_relay_process(
    run_cli: Run, sandbox: Sandbox, tmp_path: Path
) -> None:
    swaks, curl = need("swaks"), need("curl")
    r = await run_cli(
        "relay", "passwd", "mfp", "-s", ALICE, "--password-stdin",
        "--state-dir", str(tmp_path / "relay"), stdin=b"printer password 1\n",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    cfg = config(
        tmp_path,
        sandbox,
        listeners=[
            {"host": "127.0.0.1", "port": 0, "mode": "plain"},
            {"host": "127.0.0.1", "port": 0, "mode": "starttls"},
        ],
    )
    relay = await RelayProcess(cfg, cwd=tmp_path).start()
    try:
        plain, starttls = relay.ports["plain"], relay.ports["starttls"]
        wanted: dict[str, str] = {}

        mid, data = message("smtplib")
        await asyncio.to_thread(_smtplib_send, plain, data)
        wanted["smtplib"] = mid

        mid, data = message("legacy")
        await asyncio.to_thread(legacy_client, plain, mid, data)
        wanted["legacy"] = mid

        mid, data = message("swaks")
        await run_tool(
            swaks, "--server", "127.0.0.1", "--port", str(plain), "--from", ALICE,
            "--to", "x@example.net", "--data", "-", stdin=data,
        )  # fmt: skip
        wanted["swaks"] = mid

        mid, data = message("swaks-tls-auth")
        await run_tool(
            swaks, "--server", "127.0.0.1", "--port", str(starttls), "--tls",
            "--auth", "PLAIN", "--auth-user", "mfp", "--auth-password", "printer password 1",
            "--from", ALICE, "--to", "x@example.net", "--data", "-", stdin=data,
        )  # fmt: skip
        wanted["swaks-tls-auth"] = mid

        mid, data = message("curl")
        (tmp_path / "curl.eml").write_bytes(data)
        await run_tool(
            curl, "-sS", f"smtp://127.0.0.1:{plain}", "--mail-from", ALICE,
            "--mail-rcpt", "x@example.net", "-T", str(tmp_path / "curl.eml"),
        )  # fmt: skip
        wanted["curl"] = mid

        mid, data = message("curl-tls-auth")
        (tmp_path / "curl2.eml").write_bytes(data)
        await run_tool(
            curl, "-sS", f"smtp://127.0.0.1:{starttls}", "--ssl-reqd", "-k",
            "--user", "mfp:printer password 1", "--mail-from", ALICE,
            "--mail-rcpt", "x@example.net", "-T", str(tmp_path / "curl2.eml"),
        )  # fmt: skip
        wanted["curl-tls-auth"] = mid

        await arrived(sandbox, set(wanted.values()))
        subjects = Counter(m.subject for m in sandbox.store.list())
        assert subjects == Counter(list(wanted)), "each client's message exactly once"
        for stored in sandbox.store.list():
            assert stored.mailbox == ALICE and stored.mechanism == "XOAUTH2"
    finally:
        code = await relay.terminate()
    assert code == 0
    log = "\n".join(relay.log)
    assert "SIGTERM: stopping" in log and "relay stopped" in log
    assert log.count("accepted ") == 6 and log.count("delivered ") == 6
    assert "printer password 1" not in log


def _starttls_login(port: int, user: str, password: str) -> bool:
    """A real AUTH inside STARTTLS; whether the relay took it (235)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the relay's self-signed certificate
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=ctx)
        try:
            s.login(user, password)
        except smtplib.SMTPAuthenticationError as exc:
            assert exc.smtp_code == 535, exc
            return False
        return True


async def test_passwd_takes_effect_in_the_running_relay(
    run_cli: Run, sandbox: Sandbox, tmp_path: Path
) -> None:
    state = tmp_path / "relay"

    async def passwd(*args: str, password: str | None = None) -> None:
        """``smtp365 relay passwd``, the command an operator runs."""
        if password is not None:
            args += ("--password-stdin",)
        stdin = b"" if password is None else f"{password}\n".encode()
        r = await run_cli("relay", "passwd", *args, "--state-dir", str(state), stdin=stdin)
        assert r.code == 0, r.stderr

    await passwd("mfp", "-s", ALICE, password="first password 1")
    await passwd("other", "-s", ALICE, password="other password 1")
    listeners = [{"host": "127.0.0.1", "port": 0, "mode": "starttls"}]
    relay = await RelayProcess(
        config(tmp_path, sandbox, listeners=listeners, processes=2), cwd=tmp_path
    ).start()
    try:
        port = relay.ports["starttls"]
        assert await asyncio.to_thread(_starttls_login, port, "mfp", "first password 1")
        await passwd("mfp", password="second password 2")
        # Each connection goes to whichever of the two processes accepts it first: every
        # one of them has to see the new password.
        for _ in range(6):
            assert await asyncio.to_thread(_starttls_login, port, "mfp", "second password 2")
        assert not await asyncio.to_thread(_starttls_login, port, "mfp", "first password 1")
        await passwd("mfp", "--delete")
        assert not await asyncio.to_thread(_starttls_login, port, "mfp", "second password 2")
        assert await asyncio.to_thread(_starttls_login, port, "other", "other password 1")
    finally:
        assert await relay.terminate() == 0
    log = "\n".join(relay.log)
    assert "users file" in log and "changed: 1 user(s)" in log
    assert "second password 2" not in log


def _smtplib_send(port: int, data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail(ALICE, ["x@example.net"], data)


async def test_sigterm_finishes_then_restart_delivers_the_rest(
    run_cli: Run, tmp_path: Path
) -> None:
    # 2 messages per 6 s on both sides (Exchange's 30 a minute, scaled down): most of the 6
    # are still queued at SIGTERM, and the restarted relay goes on counting the first sends.
    limits = LimitSettings(messages_per_minute=2, rate_window_seconds=6.0, max_connections=20)
    sandbox = Sandbox(tmp_path / "sbx", SandboxSettings(limits=limits))
    await sandbox.start()
    try:
        cfg = config(tmp_path, sandbox, budget={"messages_per_minute": 2, "minute": 6.0})
        relay = await RelayProcess(cfg, cwd=tmp_path).start()
        mids = set()
        for i in range(6):
            mid, data = message(f"t{i}")
            await asyncio.to_thread(_smtplib_send, relay.port, data)
            mids.add(mid)
        while len(sandbox.store.list()) < 2:  # the first window's share is out
            await asyncio.sleep(0.05)
        assert await relay.terminate() == 0
        first = {m.message_id for m in sandbox.store.list()}
        assert 2 <= len(first) < 6 and first <= mids
        again = await RelayProcess(cfg, cwd=tmp_path).start()
        try:
            # The operator says "now"; the budget still decides when.
            r = await run_cli("queue", "retry", "--all", "--state-dir", str(tmp_path / "relay"))
            assert r.code == 0, r.stderr
            await arrived(sandbox, mids, timeout=45)
        finally:
            assert await again.terminate() == 0
        assert len(sandbox.store.list()) == 6
        assert sandbox.stats.throttle_replies == 0
        assert "earlier submission(s) of 1 mailbox(es) still count" in "\n".join(again.log)
    finally:
        await sandbox.stop()


# --------------------------------------------------------------- load (for the soak)


class Sender:
    """Sends messages on a few connections until stopped; records what got 250."""

    def __init__(self, port_of: dict[str, int], sessions: int = 3) -> None:
        self.port_of = port_of
        self.acked: list[str] = []
        self.attempted = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(sessions)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port_of["plain"], timeout=5) as s:
                    while not self.stop.is_set():
                        mid, data = message("k")
                        self.attempted += 1
                        s.sendmail(ALICE, ["x@example.net"], data)
                        self.acked.append(mid)  # only after the 250
            except (OSError, smtplib.SMTPException):
                self.stop.wait(0.05)  # the relay is down: try again shortly

    def __enter__(self) -> Sender:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)
