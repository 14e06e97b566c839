"""``smtp365 auth`` as a user runs it: device-code login, status, token, send, logout."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtp365.sandbox import Sandbox, SandboxSettings
from smtp365.sandbox.settings import DEFAULT_APP_ID, DEFAULT_PUBLIC_APP_ID
from tests.e2e.conftest import BIN, Run

ALICE = "alice@contoso.test"


@pytest.fixture
async def sb(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(tmp_path / "sbx", SandboxSettings(device_code_interval=0)) as sandbox:
        yield sandbox


def write_config(sb: Sandbox, tmp_path: Path) -> Path:
    secret = next(a for a in sb.info()["apps"] if a["app_id"] == DEFAULT_APP_ID)["client_secret"]
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    common = f"""
profile = "custom"
host = "localhost"
port = {sb.smtp_port}
ca_file = "{sb.ca_file}"
username = "{ALICE}"
auth = "xoauth2"
authority_host = "https://localhost:{sb.identity_port}"
tenant = "{sb.settings.tenant_id}"
"""
    text = f"""default_account = "me"
[accounts.me]{common}flow = "device-code"
client_id = "{DEFAULT_PUBLIC_APP_ID}"

[accounts.app]{common}client_id = "{DEFAULT_APP_ID}"
client_secret_file = "{secret_file}"
"""
    path = tmp_path / "smtp365.toml"
    path.write_text(text)
    return path


async def test_device_code_login_status_token_send_logout(
    run_cli: Run, sb: Sandbox, tmp_path: Path
) -> None:
    write_config(sb, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP365_")}
    env |= {"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("DISPLAY", None)
    env.pop("WAYLAND_DISPLAY", None)
    proc = await asyncio.create_subprocess_exec(
        str(BIN),
        "auth",
        "login",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None and proc.stdout is not None
    seen = b""
    while b"enter the code" not in seen:
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line, seen
        seen += line
    code = re.search(rb"code ([A-Z0-9-]+)", seen)
    assert code, seen
    assert b"/devicelogin" in seen, "the user is told where to go"
    sb.identity.approve_device_code(code.group(1).decode(), ALICE)
    out = (await asyncio.wait_for(proc.stdout.read(), 30)).decode()
    assert await proc.wait() == 0
    assert "signed in" in out and "SMTP.Send" in out and "claims check OK" in out

    cache = tmp_path / "state" / "smtp365" / "tokens" / "me.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    extra = {"XDG_STATE_HOME": str(tmp_path / "state")}

    status = await run_cli("auth", "status", "--json", env=extra)
    assert status.code == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["flow"] == "device-code" and data["token"]["ok"] is True
    assert data["token"]["audience"] in (
        "https://outlook.office.com",
        "https://outlook.office365.com",
    )
    assert data["token"]["user"] == ALICE

    tok = await run_cli("auth", "token", env=extra)
    assert tok.code == 0 and tok.stdout.strip().count(".") == 2
    assert "bearer token" in tok.stderr
    assert tok.stdout.strip() not in status.stdout, "status never prints the token"

    sent = await run_cli("send", "--to", "bob@example.net", "--body", "via device code", env=extra)
    assert sent.code == 0, sent.stderr
    assert sb.store.list()[-1].mechanism == "XOAUTH2"

    out_ = await run_cli("auth", "logout", env=extra)
    assert out_.code == 0 and not cache.exists()
    after = await run_cli("auth", "status", env=extra)
    assert after.code == 77 and "not signed in" in after.stderr, after.stdout + after.stderr
    assert "auth login --account me" in after.stderr
    again = await run_cli("send", "--to", "bob@example.net", "--body", "x", env=extra)
    assert again.code == 77 and "auth login --account me" in again.stderr


async def test_app_login_and_bad_secret(run_cli: Run, sb: Sandbox, tmp_path: Path) -> None:
    write_config(sb, tmp_path)
    extra = {"XDG_STATE_HOME": str(tmp_path / "state")}
    res = await run_cli("auth", "login", "--account", "app", env=extra)
    assert res.code == 0, res.stderr
    assert "SMTP.SendAsApp" in res.stdout and "claims check OK" in res.stdout
    status = await run_cli("auth", "status", "--account", "app", env=extra)
    assert status.code == 0 and "claims check OK" in status.stdout  # the cached token
    (tmp_path / "client-secret").write_text("not-the-secret")
    await run_cli("auth", "logout", "--account", "app", env=extra)
    # status only reads the cache: it never gets a token (so it cannot sign in again)
    requests = sum(sb.identity.stats.token_requests.values())
    res = await run_cli("auth", "status", "--account", "app", env=extra)
    assert res.code == 0 and "none cached" in res.stdout, res.stdout + res.stderr
    assert sum(sb.identity.stats.token_requests.values()) == requests
    res = await run_cli("auth", "login", "--account", "app", env=extra)
    assert res.code == 77
    assert "AADSTS7000215" in res.stderr and "fix:" in res.stderr
