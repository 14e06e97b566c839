"""Life cycle, sandbox.json, captured mail, tokens from the state dir, ESMTP extensions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import jwt
import pytest

from smtp365.sandbox import (
    Sandbox,
    SandboxError,
    SandboxSettings,
    list_messages,
    mint_token,
    read_info,
)

OK = "235 2.7.0 Authentication successful"


def test_store_records_each_accepted_message(sandbox: Sandbox, secured, make_message) -> None:
    client = secured(sandbox)
    token = sandbox.issue_token("alice@contoso.test")
    assert client.auth_xoauth2("alice@contoso.test", token).raw == OK
    content = make_message(subject="Quarterly report")
    assert client.cmd("MAIL FROM:<alice@contoso.test> RET=HDRS ENVID=abc123").code == 250
    assert client.cmd("RCPT TO:<a@example.net> NOTIFY=SUCCESS,FAILURE").code == 250
    assert client.cmd("RCPT TO:<b@example.net> NOTIFY=NEVER ORCPT=rfc822;b@example.net").code == 250
    assert client.cmd("DATA").code == 354
    client.send(content + b".\r\n")
    assert client.read().code == 250

    [entry] = sandbox.store.list()
    assert entry.mailbox == "alice@contoso.test"
    assert entry.mechanism == "XOAUTH2"
    assert entry.app_id == sandbox.settings.default_app_id
    assert entry.mail_from == "alice@contoso.test"
    assert entry.rcpt_tos == ["a@example.net", "b@example.net"]
    assert entry.message_id == "<Quarterly-report@client.example>"
    assert entry.subject == "Quarterly report"
    assert entry.size == len(content)
    assert entry.tls_version in ("TLSv1.2", "TLSv1.3")
    assert entry.received_at.endswith("Z")
    assert entry.dsn == {
        "ret": "HDRS",
        "envid": "abc123",
        "notify": {"a@example.net": "SUCCESS,FAILURE", "b@example.net": "NEVER"},
        "orcpt": {"b@example.net": "rfc822;b@example.net"},
    }
    assert sandbox.store.get(entry.id).read_bytes() == content
    assert Path(entry.path).parent == sandbox.state_dir / "messages"

    # Another process (the CLI) reads the same index.
    assert list_messages(sandbox.state_dir) == [entry.to_dict()]

    sandbox.store.clear()
    assert sandbox.store.list() == []
    assert list_messages(sandbox.state_dir) == []
    with pytest.raises(KeyError):
        sandbox.store.get(entry.id)


def test_dot_stuffing_is_undone(sandbox: Sandbox, authed) -> None:
    client = authed(sandbox)
    content = b"From: alice@contoso.test\r\nSubject: dots\r\n\r\n..leading dot\r\n.\r\n"
    client.cmd("MAIL FROM:<alice@contoso.test>")
    client.cmd("RCPT TO:<x@example.net>")
    client.cmd("DATA")
    client.send(content)
    assert client.read().code == 250
    assert sandbox.store.list()[0].read_bytes().endswith(b"\r\n.leading dot\r\n")


def test_sandbox_json_while_running_and_after(state_dir: Path) -> None:
    info_file = state_dir / "sandbox.json"
    with Sandbox(state_dir).run_in_thread() as sb:
        info = read_info(state_dir)
        assert stat.S_IMODE(info_file.stat().st_mode) == 0o600
        assert info["version"] == 1
        assert info["running"] is True
        assert info["pid"] == os.getpid()
        assert info["smtp"] == {
            "host": "127.0.0.1",
            "port": sb.smtp_port,
            "hostname": sb.settings.hostname,
            "starttls": True,
        }
        assert info["ca_file"] == str(state_dir / "ca.pem")
        assert Path(info["ca_file"]).is_absolute()
        assert info["tenant_id"] == sb.settings.tenant_id
        assert info["token"]["issuer"] == f"https://sandbox.smtp365.test/{info['tenant_id']}/v2.0"
        assert info["token"]["audience"] == "https://outlook.office365.com"
        assert info["token"]["how"] == (
            f"smtp365 sandbox token --state-dir {state_dir} --mailbox ADDRESS"
        )
        mailboxes = {m["address"]: m for m in info["mailboxes"]}
        assert set(mailboxes) == {"alice@contoso.test", "bob@contoso.test", "noreply@contoso.test"}
        alice = mailboxes["alice@contoso.test"]
        assert alice["password"] == sb.password("alice@contoso.test")
        assert alice["smtp_auth_enabled"] is True
        assert alice["basic_auth_enabled"] is True
        assert alice["send_as"] == ["noreply@contoso.test"]
        assert mailboxes["noreply@contoso.test"]["password"] is None
        assert info["messages_dir"] == str(state_dir / "messages")
        port = sb.smtp_port
    info = read_info(state_dir)
    assert info["running"] is False
    assert info["stopped_at"]
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.1", port, timeout=5)


def test_read_info_without_a_sandbox(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="no sandbox"):
        read_info(tmp_path)


def test_state_is_reused_across_restarts(state_dir: Path) -> None:
    first = Sandbox(state_dir)
    ca = first.ca_file.read_bytes()
    second = Sandbox(state_dir)
    assert second.password("alice@contoso.test") == first.password("alice@contoso.test")
    assert second.settings.apps[0].client_secret == first.settings.apps[0].client_secret
    assert second.ca_file.read_bytes() == ca
    assert second.issuer.kid == first.issuer.kid
    secrets_file = state_dir / "secrets.json"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600


def test_explicit_password_wins(state_dir: Path) -> None:
    settings = SandboxSettings()
    bob = settings.mailbox("bob@contoso.test")
    assert bob is not None
    bob.password = "Secret-123"
    assert Sandbox(state_dir, settings).password("bob@contoso.test") == "Secret-123"


def test_mint_token_from_state_dir(sandbox: Sandbox, secured) -> None:
    token = mint_token(sandbox.state_dir, "bob@contoso.test", app_only=False, lifetime=600)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["upn"] == claims["preferred_username"] == "bob@contoso.test"
    assert claims["scp"] == "SMTP.Send"
    assert claims["aud"] == "https://outlook.office365.com"
    assert claims["tid"] == sandbox.settings.tenant_id
    assert claims["exp"] - claims["iat"] == 600 + 300  # iat is back-dated like Entra's
    assert jwt.get_unverified_header(token)["kid"] == sandbox.issuer.kid
    assert secured(sandbox).auth_xoauth2("bob@contoso.test", token).raw == OK

    app_token = mint_token(sandbox.state_dir, None, app_only=True, lifetime=600)
    claims = jwt.decode(app_token, options={"verify_signature": False})
    assert claims["roles"] == ["SMTP.SendAsApp"]
    assert "upn" not in claims
    assert secured(sandbox).auth_xoauth2("noreply@contoso.test", app_token).raw == OK

    with pytest.raises(SandboxError, match="not a mailbox"):
        mint_token(sandbox.state_dir, "nobody@contoso.test", app_only=False, lifetime=600)
    with pytest.raises(SandboxError, match="shared mailbox"):
        mint_token(sandbox.state_dir, "noreply@contoso.test", app_only=False, lifetime=600)


def test_mint_token_from_another_process(sandbox: Sandbox, secured) -> None:
    code = (
        "import sys; from smtp365.sandbox import mint_token; "
        "print(mint_token(sys.argv[1], 'alice@contoso.test', app_only=False, lifetime=300))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(sandbox.state_dir)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    token = out.stdout.strip()
    assert secured(sandbox).auth_xoauth2("alice@contoso.test", token).raw == OK
    assert sandbox.issuer.issued == 0  # minted elsewhere, verified here
    assert sandbox.issuer.verified == 1


def test_run_in_thread_serves_smtplib(state_dir: Path, make_message) -> None:
    with Sandbox(state_dir).run_in_thread() as sb:
        assert sb.running
        context = ssl.create_default_context(cafile=str(sb.ca_file))
        with smtplib.SMTP("127.0.0.1", sb.smtp_port, timeout=10) as smtp:
            smtp.starttls(context=context)
            smtp.login("bob@contoso.test", sb.password("bob@contoso.test"))
            smtp.sendmail("bob@contoso.test", ["x@example.net"], make_message("bob@contoso.test"))
    assert not sb.running
    assert sb.stats.messages_accepted == 1
    assert sb.stats.active_connections == 0


def test_open_sessions_are_closed_at_stop(state_dir: Path, wire) -> None:
    with Sandbox(state_dir).run_in_thread() as sb:
        client = wire(sb)
        client.ehlo()
    with pytest.raises((EOFError, ConnectionError)):
        client.cmd("NOOP")


async def test_async_context_manager(state_dir: Path, make_message) -> None:
    async with Sandbox(state_dir) as sb:
        context = ssl.create_default_context(cafile=str(sb.ca_file))
        password = sb.password("alice@contoso.test")

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", sb.smtp_port, timeout=10) as smtp:
                smtp.starttls(context=context)
                smtp.login("alice@contoso.test", password)
                return smtp.sendmail("alice@contoso.test", ["x@example.net"], make_message())

        assert await asyncio.to_thread(send) == {}
        assert len(sb.store.list()) == 1
    assert read_info(state_dir)["running"] is False


def test_run_until_sigterm(state_dir: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from smtp365.sandbox import run
        run(Path(sys.argv[1]), on_ready=lambda sb: print(sb.smtp_port, flush=True))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(state_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert read_info(state_dir)["running"] is True
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            assert smtp.noop()[0] == 250
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert read_info(state_dir)["running"] is False


def test_chunking_with_bdat(sandbox: Sandbox, authed, make_message) -> None:
    client = authed(sandbox)
    content = make_message(body="binary \x00 payload")
    first, second = content[:20], content[20:]
    assert client.cmd("MAIL FROM:<alice@contoso.test> BODY=BINARYMIME").code == 250
    assert client.cmd("RCPT TO:<x@example.net>").code == 250
    assert client.cmd("DATA").raw == "503 5.5.1 Bad sequence of commands"
    client.send(f"BDAT {len(first)}\r\n".encode() + first)
    assert client.read().raw == f"250 2.6.0 CHUNK received OK, {len(first)} octets"
    client.send(f"BDAT {len(second)} LAST\r\n".encode() + second)
    assert client.read().raw.startswith("250 2.0.0 OK <")
    [entry] = sandbox.store.list()
    assert entry.read_bytes() == content
    assert entry.chunking is True
    assert entry.body == "BINARYMIME"


def test_bdat_without_transaction_reads_the_chunk(sandbox: Sandbox, authed) -> None:
    client = authed(sandbox)
    client.send(b"BDAT 6 LAST\r\nNOOP\r\n")
    assert client.read().raw == "503 5.5.2 Need mail command"
    assert client.cmd("NOOP").raw == "250 2.0.0 OK"  # the chunk was not taken for a command


def test_smtputf8_and_8bitmime(sandbox: Sandbox, authed) -> None:
    client = authed(sandbox)
    content = "From: alice@contoso.test\r\nSubject: Grüße\r\n\r\nHéllo\r\n".encode()
    assert client.cmd("MAIL FROM:<alice@contoso.test> BODY=8BITMIME SMTPUTF8").code == 250
    assert client.cmd("RCPT TO:<jürgen@exämple.de>").code == 250
    assert client.cmd("DATA").code == 354
    client.send(content + b".\r\n")
    assert client.read().code == 250
    [entry] = sandbox.store.list()
    assert entry.rcpt_tos == ["jürgen@exämple.de"]
    assert entry.smtputf8 is True
    assert entry.body == "8BITMIME"
    assert entry.subject == "Grüße"


def test_pipelining(sandbox: Sandbox, authed, make_message) -> None:
    client = authed(sandbox)
    client.send(
        b"MAIL FROM:<alice@contoso.test>\r\nRCPT TO:<a@example.net>\r\n"
        b"RCPT TO:<b@example.net>\r\nDATA\r\n"
    )
    assert [client.read().code for _ in range(4)] == [250, 250, 250, 354]
    client.send(make_message() + b".\r\n")
    assert client.read().code == 250


def test_settings_toml_round_trip(tmp_path: Path) -> None:
    config = tmp_path / "sandbox.toml"
    config.write_text(
        textwrap.dedent(
            """
            tenant_id = "11111111-1111-1111-1111-111111111111"
            smtp_auth_enabled = false
            send_as_check = "mail"

            [limits]
            messages_per_minute = 5
            rate_window_seconds = 1.5

            [[mailboxes]]
            address = "printer@fabrikam.test"
            smtp_auth_enabled = true
            basic_auth_enabled = false
            send_as = ["scans@fabrikam.test"]
            """
        ),
        encoding="utf-8",
    )
    settings = SandboxSettings.load(config)
    assert settings.tenant_id == "11111111-1111-1111-1111-111111111111"
    assert settings.limits.messages_per_minute == 5
    assert settings.limits.max_connections == 3
    [printer] = settings.mailboxes
    assert settings.smtp_auth_effective(printer) is True
    assert printer.may_send_as("Scans@Fabrikam.test")
    config.write_text("unknown_key = 1\n", encoding="utf-8")
    with pytest.raises(ValueError):
        SandboxSettings.load(config)


def test_info_file_is_valid_json_for_other_readers(sandbox: Sandbox) -> None:
    data = json.loads((sandbox.state_dir / "sandbox.json").read_text("utf-8"))
    assert data["smtp"]["port"] == sandbox.smtp_port


async def test_a_restarted_sandbox_keeps_its_ports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "restart"
    first = Sandbox(state)
    await first.start()
    ports, authority = (first.smtp_port, first.identity_port), first.authority
    await first.stop()
    again = Sandbox(state)
    await again.start()
    try:
        # configurations written from the first run (SMTP365_PORT, the OAuth authority) work
        assert (again.smtp_port, again.identity_port) == ports
        assert again.authority == authority
    finally:
        await again.stop()
    # the old identity port is taken: another one, and a warning that says so
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[1]))
        taken.listen()
        moved = Sandbox(state)
        await moved.start()
        try:
            assert moved.identity_port != ports[1] and moved.smtp_port == ports[0]
        finally:
            await moved.stop()
    assert any("identity port" in r.getMessage() for r in caplog.records)
