"""``smtp365 doctor`` as a subprocess: text, JSON and Markdown; exit codes; DNS checks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtp365.sandbox import Sandbox
from smtp365.sandbox.settings import DEFAULT_APP_ID
from tests.e2e.conftest import Run
from tests.integration.doctor_dns.conftest import DnsTestServer, dns_server  # noqa: F401

ALICE = "alice@contoso.test"


@pytest.fixture
async def sb(tmp_path: Path) -> AsyncIterator[Sandbox]:
    async with Sandbox(tmp_path / "sbx") as sandbox:
        yield sandbox


def write_config(sb: Sandbox, tmp_path: Path, secret: str | None = None) -> dict[str, str]:
    app = next(a for a in sb.info()["apps"] if a["app_id"] == DEFAULT_APP_ID)
    (tmp_path / "smtp365.toml").write_text(
        f"""[accounts.default]
profile = "custom"
host = "localhost"
port = {sb.smtp_port}
ca_file = "{sb.ca_file}"
username = "{ALICE}"
tenant = "{sb.settings.tenant_id}"
client_id = "{DEFAULT_APP_ID}"
client_secret_env = "SBX_SECRET"
authority_host = "https://localhost:{sb.identity_port}"
timeout = 5
"""
    )
    return {"SBX_SECRET": secret or app["client_secret"], "XDG_STATE_HOME": str(tmp_path / "st")}


async def test_doctor_healthy_json_and_markdown(run_cli: Run, sb: Sandbox, tmp_path: Path) -> None:
    env = write_config(sb, tmp_path)
    res = await run_cli("doctor", "--no-dns", "--json", env=env)
    assert res.code == 0, res.stdout + res.stderr
    data = json.loads(res.stdout)
    assert data["version"] == 1 and data["ok"] is True
    ids = [c["id"] for c in data["checks"]]
    assert ids[:6] == [
        "config",
        "dns.resolve",
        "tcp.connect",
        "smtp.greeting",
        "tls.mode",
        "tls.handshake",
    ]
    assert {c["status"] for c in data["checks"]} <= {"pass", "skip"}
    for check in data["checks"]:
        assert set(check) == {
            "id",
            "title",
            "status",
            "detail",
            "why",
            "fix",
            "catalogue",
            "data",
            "elapsed_ms",
        }
    md = await run_cli("doctor", "--no-dns", "--format", "markdown", env=env)
    assert md.code == 0 and md.stdout.startswith("## smtp365 doctor: account `default`")
    assert "| PASS | SMTP AUTH (`smtp.auth`) |" in md.stdout
    text = await run_cli("doctor", "--no-dns", env=env)
    assert text.code == 0 and "PASS  TLS " in text.stdout and "OK (" in text.stdout


async def test_doctor_failure_exit_code_and_no_secret(
    run_cli: Run, sb: Sandbox, tmp_path: Path
) -> None:
    env = write_config(sb, tmp_path, secret="definitely-wrong-secret")
    res = await run_cli("doctor", "--no-dns", env=env)
    assert res.code == 1
    assert "FAIL  OAuth2 token and claims" in res.stdout and "AADSTS7000215" in res.stdout
    assert "fix:" in res.stdout
    for fmt in ("json", "markdown", "text"):
        out = await run_cli("doctor", "--no-dns", "--format", fmt, env=env)
        assert "definitely-wrong-secret" not in out.stdout + out.stderr


async def test_doctor_dns_command(
    run_cli: Run,
    dns_server: DnsTestServer,  # noqa: F811
) -> None:
    ns = f"127.0.0.1:{dns_server.port}"
    good = await run_cli("doctor", "dns", "good.test", "--nameserver", ns, "--json")
    assert good.code == 0, good.stdout + good.stderr
    assert [c["id"] for c in json.loads(good.stdout)["checks"]] == [
        "dns.mx",
        "dns.spf",
        "dns.dkim",
        "dns.dmarc",
    ]
    bad = await run_cli("doctor", "dns", "nospf-include.test", "--nameserver", ns)
    assert bad.code == 1 and "include:spf.protection.outlook.com" in bad.stdout
    junk = await run_cli("doctor", "dns", "not a domain!", "--nameserver", ns)
    assert junk.code != 0 and "Traceback" not in junk.stderr
