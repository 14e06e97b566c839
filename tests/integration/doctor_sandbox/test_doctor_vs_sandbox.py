"""The whole doctor against the sandbox in each failure mode: the right check, status and
catalogue entry, not merely "failed"."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smtp365 import replies
from smtp365.config import Settings, load
from smtp365.doctor import Report, Status, run_doctor
from smtp365.sandbox import Sandbox, SandboxSettings
from smtp365.sandbox.settings import DEFAULT_APP_ID, AppSettings, LimitSettings

ALICE = "alice@contoso.test"
BOB = "bob@contoso.test"


def settings_for(sb: Sandbox, tmp_path: Path, **keys: Any) -> Settings:
    fields: dict[str, Any] = {
        "profile": "custom",
        "host": "localhost",
        "port": sb.smtp_port,
        "ca_file": str(sb.ca_file),
        "username": ALICE,
        "auth": "xoauth2",
        "tenant": sb.settings.tenant_id,
        "client_id": DEFAULT_APP_ID,
        "client_secret_env": "SBX_SECRET",
        "authority_host": f"https://localhost:{sb.identity_port}",
        "token_cache": str(tmp_path / "cache.json"),
        "timeout": 5,
    }
    fields.update(keys)
    lines = ["[accounts.default]"] + [
        f"{k} = {json.dumps(v)}" for k, v in fields.items() if v is not None
    ]
    path = tmp_path / "smtp365.toml"
    path.write_text("\n".join(lines) + "\n")
    return load(path, env={"HOME": str(tmp_path)})


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[Sandbox], None]:
    def set_secret(sb: Sandbox) -> None:
        app = next(a for a in sb.info()["apps"] if a["app_id"] == DEFAULT_APP_ID)
        monkeypatch.setenv("SBX_SECRET", app["client_secret"])

    return set_secret


async def doctor(settings: Settings, **kw: Any) -> Report:
    return await run_doctor(settings, dns=False, timeout=5, **kw)


def statuses(report: Report) -> dict[str, Status]:
    return {r.id: r.status for r in report.results}


async def test_healthy_full_run(tmp_path: Path, secret_env: Callable[[Sandbox], None]) -> None:
    async with Sandbox(tmp_path / "sbx") as sb:
        secret_env(sb)
        report = await doctor(settings_for(sb, tmp_path), send_test="bob@example.net")
        st = statuses(report)
        assert report.ok, report.to_markdown()
        for cid in (
            "config",
            "dns.resolve",
            "tcp.connect",
            "smtp.greeting",
            "tls.mode",
            "tls.handshake",
            "smtp.auth_mechanisms",
            "token",
            "smtp.auth",
            "smtp.send_as",
            "smtp.send_test",
        ):
            assert st[cid] is Status.PASS, (cid, report.get(cid).detail)
        assert "SMTP.SendAsApp" in report.get("token").detail
        assert report.get("smtp.send_test").detail.startswith("accepted: 250 2.0.0 OK")
        assert len(sb.store.list()) == 1, "only --send-test sends a message"


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda s: setattr(s, "smtp_auth_enabled", False), "smtp-auth-disabled-tenant"),
        (
            lambda s: setattr(s.mailbox(ALICE), "smtp_auth_enabled", False),
            "smtp-auth-disabled-mailbox",
        ),
        (lambda s: setattr(s.mailbox(ALICE), "basic_auth_enabled", False), "basic-auth-disabled"),
    ],
)
async def test_auth_policy_failures_with_login(
    tmp_path: Path,
    mutate: Callable[[SandboxSettings], None],
    key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = SandboxSettings()
    mutate(settings)
    async with Sandbox(tmp_path / "sbx", settings) as sb:
        monkeypatch.setenv("SBX_PW", sb.password(ALICE))
        cfg = settings_for(
            sb,
            tmp_path,
            auth="login",
            password_env="SBX_PW",
            client_id=None,
            client_secret_env=None,
            tenant=None,
        )
        with pytest.warns(FutureWarning):
            report = await doctor(cfg)
    auth = report.get("smtp.auth")
    assert auth.status is Status.FAIL and auth.catalogue == key
    assert auth.data["code"] == 535 and auth.data["enhanced"] == "5.7.139"
    assert auth.fix == replies.by_key(key).fix
    assert report.get("smtp.send_as").status is Status.SKIP
    assert report.get("config").status is Status.PASS or report.get("config").status is Status.WARN


async def test_bad_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Sandbox(tmp_path / "sbx") as sb:
        monkeypatch.setenv("SBX_PW", "not-the-password")
        cfg = settings_for(
            sb,
            tmp_path,
            auth="login",
            password_env="SBX_PW",
            client_id=None,
            client_secret_env=None,
            tenant=None,
        )
        with pytest.warns(FutureWarning):
            report = await doctor(cfg)
    assert report.get("smtp.auth").catalogue == "bad-password"
    assert "not-the-password" not in json.dumps(report.to_json())
    assert "not-the-password" not in report.to_markdown()


async def test_bad_token_audience(tmp_path: Path) -> None:
    async with Sandbox(tmp_path / "sbx") as sb:
        token = sb.issue_token(ALICE, audience="https://graph.microsoft.com")
        cfg = settings_for(
            sb, tmp_path, token=token, flow="static", client_id=None, client_secret_env=None
        )
        report = await doctor(cfg)
    tok = report.get("token")
    assert tok.status is Status.FAIL and "is for Microsoft Graph" in tok.detail
    assert tok.catalogue == "claims.audience"
    assert "outlook.office365.com/.default" in tok.fix
    assert report.get("smtp.auth").status is Status.SKIP
    text = json.dumps(report.to_json()) + report.to_markdown()
    assert token not in text and token[:30] not in text, "tokens never appear in reports"


async def test_missing_role(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = AppSettings(app_id="aaaaaaaa-0000-0000-0000-000000000002", app_permissions=["Mail.Send"])
    async with Sandbox(tmp_path / "sbx", SandboxSettings(apps=[app])) as sb:
        info = next(a for a in sb.info()["apps"] if a["app_id"] == app.app_id)
        monkeypatch.setenv("SBX_SECRET", info["client_secret"])
        report = await doctor(settings_for(sb, tmp_path, client_id=app.app_id))
    tok = report.get("token")
    assert tok.status is Status.FAIL and "no SMTP.SendAsApp" in tok.detail
    assert tok.catalogue == "claims.permission"
    assert "admin consent" in tok.fix


async def test_bad_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Sandbox(tmp_path / "sbx") as sb:
        monkeypatch.setenv("SBX_SECRET", "wrong-secret-value")
        report = await doctor(settings_for(sb, tmp_path))
    tok = report.get("token")
    assert tok.status is Status.FAIL and tok.catalogue == "AADSTS7000215"
    assert "wrong-secret-value" not in json.dumps(report.to_json())


async def test_send_as_denied(tmp_path: Path, secret_env: Callable[[Sandbox], None]) -> None:
    async with Sandbox(tmp_path / "sbx") as sb:
        secret_env(sb)
        cfg = settings_for(sb, tmp_path, username=BOB, from_address="ceo@contoso.test")
        report = await doctor(cfg, send_test="x@example.net")
    assert report.get("config").status is Status.WARN
    assert report.get("config").catalogue == "from-not-mailbox"
    probe = report.get("smtp.send_as")
    assert probe.status is Status.WARN and "does not prove SendAs" in probe.detail
    sent = report.get("smtp.send_test")
    assert sent.status is Status.FAIL and sent.catalogue == "send-as-denied-data"
    assert "Add-RecipientPermission" in sent.fix


async def test_send_as_denied_at_mail_from(
    tmp_path: Path, secret_env: Callable[[Sandbox], None]
) -> None:
    async with Sandbox(tmp_path / "sbx", SandboxSettings(send_as_check="mail")) as sb:
        secret_env(sb)
        cfg = settings_for(sb, tmp_path, username=BOB, from_address="ceo@contoso.test")
        report = await doctor(cfg)
    probe = report.get("smtp.send_as")
    assert probe.status is Status.FAIL and probe.catalogue == "send-as-denied-mail"


async def test_throttled(tmp_path: Path, secret_env: Callable[[Sandbox], None]) -> None:
    limits = LimitSettings(messages_per_minute=0)
    async with Sandbox(tmp_path / "sbx", SandboxSettings(limits=limits)) as sb:
        secret_env(sb)
        report = await doctor(settings_for(sb, tmp_path))
    probe = report.get("smtp.send_as")
    assert probe.status is Status.WARN, "throttling is temporary"
    assert probe.catalogue == "access-denied-retry" and probe.data["temporary"] is True


async def test_concurrent_connection_limit(
    tmp_path: Path, secret_env: Callable[[Sandbox], None]
) -> None:
    async with Sandbox(
        tmp_path / "sbx", SandboxSettings(limits=LimitSettings(max_connections=0))
    ) as sb:
        secret_env(sb)
        report = await doctor(settings_for(sb, tmp_path))
    auth = report.get("smtp.auth")
    assert auth.status is Status.WARN and auth.catalogue == "concurrent-connections"


async def test_unusable_account_is_a_config_failure_in_the_report(tmp_path: Path) -> None:
    path = tmp_path / "smtp365.toml"
    path.write_text('[accounts.default]\nprofile = "direct-send"\n')
    report = await run_doctor(load(path, env={"HOME": str(tmp_path)}), dns=False)
    [only] = report.results
    assert (only.id, only.status) == ("config", Status.FAIL)
    assert "no host" in only.detail and "MX" in only.fix
    assert report.to_json()["ok"] is False
