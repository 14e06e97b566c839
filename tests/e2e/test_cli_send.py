"""``smtp365 send`` and the sendmail interface, run as subprocesses against a real TLS server."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable
from email import message_from_bytes, policy
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, Run
from tests.fakesmtp import FakeSMTPServer, ImplicitTLSServer, Script


def _write_config(
    tmp_path: Path, port: int, ca_file: Path | None, **extra: str | int | None
) -> Path:
    """An account ``main`` on localhost:``port``; ``extra`` adds or replaces settings (None
    leaves one out)."""
    token = tmp_path / "token"
    token.write_text("e2e-token\n")
    token.chmod(0o600)
    fields: dict[str, str | int | None] = {
        "profile": "custom",
        "host": "localhost",
        "port": port,
        "ca_file": None if ca_file is None else str(ca_file),
        "username": "alice@contoso.test",
        "auth": "xoauth2",
        "token_file": str(token),
        "timeout": 10,
    }
    fields.update(extra)
    lines = ['default_account = "main"', "[accounts.main]"] + [
        f"{k} = {json.dumps(v)}" for k, v in fields.items() if v is not None
    ]
    path = tmp_path / "smtp365.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
async def server(
    server_context: Callable[..., ssl.SSLContext],
) -> AsyncIterator[FakeSMTPServer]:
    async with FakeSMTPServer(Script(tls_context=server_context())) as s:
        yield s


def _mail_from(server: FakeSMTPServer) -> list[str]:
    return [c for c in server.commands if c.startswith("MAIL FROM")]


def _rcpts(server: FakeSMTPServer) -> list[str]:
    return [
        c.partition(":")[2].split()[0].strip("<>") for c in server.commands if c.startswith("RCPT")
    ]


async def test_send_fields_and_attachment(
    run_cli: Run, server: FakeSMTPServer, ca_file: Path, tmp_path: Path
) -> None:
    _write_config(tmp_path, server.port, ca_file)
    att = tmp_path / "report.pdf"
    att.write_bytes(b"%PDF-1.4 fake")
    res = await run_cli(
        "send",
        "--to",
        "bob@example.net",
        "--bcc",
        "eve@example.net",
        "--subject",
        "Hello",
        "--body",
        "Body text",
        "--attach",
        str(att),
    )
    assert res.code == 0, res.stderr
    assert "sent <" in res.stdout and "2 recipients" in res.stdout
    msg = message_from_bytes(server.messages[0], policy=policy.default)
    assert msg["Subject"] == "Hello" and msg["Bcc"] is None
    assert [p.get_filename() for p in msg.iter_attachments()] == ["report.pdf"]
    assert _rcpts(server) == ["bob@example.net", "eve@example.net"]


async def test_send_eml_from_stdin_json(
    run_cli: Run, server: FakeSMTPServer, ca_file: Path, tmp_path: Path
) -> None:
    _write_config(tmp_path, server.port, ca_file)
    eml = b"From: alice@contoso.test\nTo: bob@example.net\nSubject: from eml\n\nline\n"
    res = await run_cli("send", "--eml", "-", "--json", stdin=eml)
    assert res.code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["ok"] is True and data["accepted"] == ["bob@example.net"]
    assert data["reply"].startswith("250 2.0.0 OK")
    assert b"Subject: from eml\r\n" in server.messages[0]


async def test_sendmail_t_i_reads_recipients_and_hides_bcc(
    run_cli: Run, server: FakeSMTPServer, ca_file: Path, tmp_path: Path
) -> None:
    _write_config(tmp_path, server.port, ca_file)
    eml = (
        b"From: cron@contoso.test\nTo: ops@example.net\nBcc: audit@example.net\n"
        b"Subject: cron\n\nfirst\n.\nafter a lone dot\n"
    )
    res = await run_cli("sendmail", "-t", "-i", stdin=eml)
    assert res.code == 0, res.stderr
    assert _rcpts(server) == ["ops@example.net", "audit@example.net"]
    body = server.messages[0]
    assert b"Bcc" not in body and b"after a lone dot" in body


async def test_sendmail_symlink_args_and_f(
    run_cli: Run, server: FakeSMTPServer, ca_file: Path, tmp_path: Path
) -> None:
    config = _write_config(tmp_path, server.port, ca_file)
    link = tmp_path / "sendmail"
    link.symlink_to(BIN)
    eml = b"Subject: dot ends\n\nkept\n.\nnot sent\n"
    res = await run_cli(
        "-oi",
        "-f",
        "bounce@contoso.test",
        "--config",
        str(config),
        "x@example.net",
        stdin=eml,
        program=link,
    )
    # -oi keeps the dot; now without it:
    assert res.code == 0, res.stderr
    assert b"not sent" in server.messages[0]
    res = await run_cli(
        "-fbounce@contoso.test",
        "x@example.net",
        stdin=eml,
        program=link,
        env={"SMTP365_CONFIG": str(config)},
    )
    assert res.code == 0, res.stderr
    assert b"not sent" not in server.messages[1] and b"kept" in server.messages[1]
    assert _mail_from(server)[-1].startswith("MAIL FROM:<bounce@contoso.test>")


async def test_sendmail_without_recipients_is_usage_error(run_cli: Run) -> None:
    res = await run_cli("sendmail", stdin=b"Subject: x\n\ny\n")
    assert res.code == 64 and "no recipients" in res.stderr


@pytest.mark.parametrize(
    ("stage", "reply", "code"),
    [
        ("data", "451 4.7.500 Access denied, please try again later", 75),
        ("data", "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException", 75),
        ("mail", "550 5.7.60 SMTP; Client does not have permissions to send as this sender", 69),
        ("auth", "535 5.7.3 Authentication unsuccessful [SANDBOX]", 77),
        ("auth", "432 4.3.2 Concurrent connections limit exceeded.", 75),
    ],
)
async def test_exit_codes_follow_sysexits(
    run_cli: Run,
    server_context: Callable[..., ssl.SSLContext],
    ca_file: Path,
    tmp_path: Path,
    stage: str,
    reply: str,
    code: int,
) -> None:
    script = Script(tls_context=server_context(), **{f"{stage}_reply": reply})
    async with FakeSMTPServer(script) as server:
        _write_config(tmp_path, server.port, ca_file)
        res = await run_cli("send", "--to", "bob@example.net", "--body", "x")
        sm = await run_cli("sendmail", "bob@example.net", stdin=b"Subject: s\n\nx\n")
    assert res.code == code, res.stderr
    assert sm.code == code, sm.stderr
    assert "fix:" in res.stderr


async def test_tls_and_config_exit_codes(
    run_cli: Run, server_context: Callable[..., ssl.SSLContext], ca_file: Path, tmp_path: Path
) -> None:
    async with FakeSMTPServer(Script(tls_context=server_context("wrong.test"))) as server:
        _write_config(tmp_path, server.port, ca_file)
        res = await run_cli("send", "--to", "bob@example.net", "--body", "x")
    assert res.code == 76 and "certificate" in res.stderr
    res = await run_cli("send", "--to", "b@example.net", "--config", str(tmp_path / "nope.toml"))
    assert res.code == 78 and "does not exist" in res.stderr
    res = await run_cli("send", "--body", "x")
    assert res.code == 64 and "no recipients" in res.stderr


async def test_config_check_subprocess(run_cli: Run, tmp_path: Path) -> None:
    (tmp_path / "smtp365.toml").write_text(
        '[accounts.default]\nusername = "bob"\nport = 587\ntls = "ssl"\n'
    )
    res = await run_cli("config", "check", "--json")
    assert res.code == 78
    codes = {f["code"] for f in json.loads(res.stdout)["findings"]}
    assert {"username-not-upn", "ssl-on-587", "no-token"} <= codes
    res = await run_cli("config", "check")
    assert "not a full address" in res.stdout and "fix:" in res.stdout


async def test_bad_input_gets_a_clear_error_not_a_traceback(run_cli: Run, tmp_path: Path) -> None:
    (tmp_path / "m.eml").write_bytes(b"Subject: x\n\nbody\n")
    (tmp_path / "b.html").write_bytes(b"\xff\xfe")
    (tmp_path / "bad.toml").write_bytes(b"\xff\xfe")
    res = await run_cli("send", "--eml", "m.eml", "--to", "a@b.test", "--subject", "a\nBcc: x@y.z")
    assert res.code == 65 and "cannot be built" in res.stderr
    res = await run_cli("send", "--to", "a@b.test", "--html-file", "b.html")
    assert res.code == 65 and "UTF-8" in res.stderr
    res = await run_cli("config", "show", "-c", "bad.toml")
    assert res.code == 78 and "not UTF-8" in res.stderr
    res = await run_cli("doctor", "dns", "bad domain!!", "--nameserver", "127.0.0.1")
    assert res.code == 64
    res = await run_cli("sandbox", "-d", "s", "--config", "missing.toml")
    assert res.code == 66 and "cannot read" in res.stderr
    for r in (res,):
        assert "Traceback" not in r.stderr


# -- settings that cannot work: named, permanent, at once ----------------------------------
# The account's timeout is 60 s: a send that waited for it would outlast run_cli's 30 s.


async def test_implicit_tls_on_a_starttls_port_is_named_not_retried(
    run_cli: Run, server_context: Callable[..., ssl.SSLContext], ca_file: Path, tmp_path: Path
) -> None:
    async with FakeSMTPServer(Script(tls_context=server_context())) as server:
        _write_config(tmp_path, server.port, ca_file, tls="implicit", timeout=60)
        res = await run_cli("send", "--to", "bob@example.net", "--body", "x")
    assert res.code == 76, res.stderr
    assert (
        f"smtp365: error: set to implicit TLS/SSL but the server expects STARTTLS on this port: "
        f"localhost:{server.port} speaks plain SMTP first" in res.stderr
    )
    assert '"SSL on 587" is a misconfiguration' in res.stderr
    assert (
        "  fix: set tls = starttls (Microsoft 365: smtp.office365.com, port 587, tls = starttls)"
        in res.stderr
    )
    assert "temporary" not in res.stderr and "TLS 1.2+" not in res.stderr
    assert not server.messages


async def test_starttls_on_an_implicit_tls_port_is_named_at_once(
    run_cli: Run, server_context: Callable[..., ssl.SSLContext], ca_file: Path, tmp_path: Path
) -> None:
    async with ImplicitTLSServer(server_context(), handshake_timeout=120) as server:
        _write_config(tmp_path, server.port, ca_file, timeout=60)
        res = await run_cli("send", "--to", "bob@example.net", "--body", "x")
    assert res.code == 76, res.stderr
    assert f"smtp365: error: tls = starttls but localhost:{server.port} speaks implicit TLS" in (
        res.stderr
    )
    assert (
        "  fix: for Microsoft 365: port = 587 and tls = starttls; for another server that only "
        "offers implicit TLS: tls = implicit" in res.stderr
    )
    assert "firewall" not in res.stderr and "temporary" not in res.stderr
    assert server.commands == []


async def test_an_untrusted_certificate_is_not_temporary(
    run_cli: Run, server_context: Callable[..., ssl.SSLContext], tmp_path: Path
) -> None:
    async with FakeSMTPServer(Script(tls_context=server_context())) as server:
        _write_config(tmp_path, server.port, None, timeout=60)
        res = await run_cli("send", "--to", "bob@example.net", "--body", "x")
    assert res.code == 76, res.stderr
    assert "certificate" in res.stderr and "set ca_file" in res.stderr
    assert "temporary" not in res.stderr


async def test_a_refused_password_is_explained_as_a_password(
    run_cli: Run, server_context: Callable[..., ssl.SSLContext], ca_file: Path, tmp_path: Path
) -> None:
    script = Script(
        tls_context=server_context(), auth_reply="535 5.7.3 Authentication unsuccessful"
    )
    async with FakeSMTPServer(script) as server:
        _write_config(
            tmp_path, server.port, ca_file, auth="login", token_file=None, password_env="E2E_PW"
        )
        res = await run_cli(
            "send", "--to", "bob@example.net", "--body", "x", env={"E2E_PW": "wrong"}
        )
    assert res.code == 77, res.stderr
    assert "refused AUTH: 535 5.7.3 Authentication unsuccessful -- " in res.stderr
    assert "password" in res.stderr and "app password" in res.stderr
    assert "token" not in res.stderr and "New-ServicePrincipal" not in res.stderr
