"""The sandbox and demo commands as a user runs them: subprocesses, signals, files."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from tests.e2e.conftest import BIN, Run


async def test_demo_sends_through_the_relay_to_the_sandbox(run_cli: Run, tmp_path: Path) -> None:
    res = await run_cli("demo", "--state-dir", str(tmp_path / "demo"))
    assert res.code == 0, res.stderr
    out = res.stdout
    assert "intake: accepted" in out and "worker: delivered" in out
    assert ": delivered after 1 attempt(s); upstream said: 250 2.0.0 OK" in out
    assert "mechanism    XOAUTH2" in out and "TLSv1.3" in out
    assert "| Subject: Scan from the 3rd floor printer" in out
    assert "| Reply-To: Scanner <scanner@printer.local>" in out


async def test_sandbox_lifecycle_env_send_messages(run_cli: Run, tmp_path: Path) -> None:
    state = tmp_path / "sbx"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP365_")}
    env["HOME"] = str(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        str(BIN),
        "sandbox",
        "--state-dir",
        str(state),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert first.startswith(b"sandbox ready: SMTP on 127.0.0.1:"), first
        info = json.loads((state / "sandbox.json").read_text())
        assert info["smtp"]["port"] > 0 and Path(info["ca_file"]).is_file()

        res = await run_cli(
            "sandbox", "env", "--state-dir", str(state), "--mailbox", "alice@contoso.test"
        )
        assert res.code == 0, res.stderr
        exported = {}
        for line in res.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            exported[key] = shlex.split(value)[0]
        assert exported["SMTP365_PORT"] == str(info["smtp"]["port"])

        res = await run_cli(
            "send", "--to", "bob@example.net", "--subject", "via env", "--body", "hi", env=exported
        )
        assert res.code == 0, res.stderr
        res = await run_cli(
            "sandbox", "env", "--oauth", "--state-dir", str(state), "-m", "alice@contoso.test"
        )
        oauth_env = {}
        for line in res.stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            oauth_env[key] = shlex.split(value)[0]
        assert oauth_env["SMTP365_FLOW"] == "client-credentials"
        oauth_env["XDG_STATE_HOME"] = str(tmp_path / "state")
        res = await run_cli(
            "send",
            "--to",
            "bob@example.net",
            "--subject",
            "via msal",
            "--body",
            "hi",
            env=oauth_env,
        )
        assert res.code == 0, res.stderr

        res = await run_cli("sandbox", "messages", "--state-dir", str(state), "--json")
        first, second = json.loads(res.stdout)
        assert first["subject"] == "via env" and first["mechanism"] == "XOAUTH2"
        assert second["subject"] == "via msal" and second["app_id"] == info["apps"][0]["app_id"]

        tok = await run_cli(
            "sandbox", "token", "--state-dir", str(state), "-m", "alice@contoso.test"
        )
        assert tok.code == 0 and tok.stdout.count(".") == 2, "a JWT"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0
    assert (
        json.loads((state / "sandbox.json").read_text()).get("running") is False
        or sys.platform != "linux"
    )
    stopped = await run_cli("sandbox", "env", "--state-dir", str(state), "-m", "a@contoso.test")
    assert stopped.code == 69 and "not running" in stopped.stderr and not stopped.stdout
    # killed (kill -9): sandbox.json still says running, but its process is gone
    info = json.loads((state / "sandbox.json").read_text())
    (state / "sandbox.json").write_text(json.dumps({**info, "running": True}))
    killed = await run_cli("sandbox", "env", "--state-dir", str(state), "-m", "a@contoso.test")
    assert killed.code == 69 and "start it: smtp365 sandbox" in killed.stderr


async def test_sandbox_commands_without_a_sandbox(run_cli: Run, tmp_path: Path) -> None:
    res = await run_cli("sandbox", "messages", "--state-dir", str(tmp_path / "none"))
    assert res.code == 66 and "start one first" in res.stderr
