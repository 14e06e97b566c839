"""Fault injection: forced replies per stage, dropped connections, slow replies."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest

from smtp365.models import Reply
from smtp365.replies import lookup
from smtp365.sandbox import Faults, FaultSettings, Sandbox, SandboxSettings
from smtp365.sandbox.settings import FAULT_REPLIES

THROTTLED = "451 4.7.500 Access denied, please try again later"
CLOSED = (EOFError, ConnectionError, ssl.SSLError)


def test_forced_reply_at_greeting(sandbox: Sandbox, wire) -> None:
    sandbox.faults.set("greeting", reply="421 4.3.2 Service not available", times=1)
    client = wire(sandbox)
    assert client.greeting.raw == "421 4.3.2 Service not available"
    with pytest.raises(CLOSED):
        client.cmd("EHLO client.example")
    assert wire(sandbox).greeting.code == 220  # times=1: the next connection is normal


def test_forced_reply_at_ehlo(sandbox: Sandbox, wire) -> None:
    sandbox.faults.set("ehlo", reply=THROTTLED, times=1)
    client = wire(sandbox)
    assert client.ehlo().raw == THROTTLED
    assert client.ehlo().code == 250


def test_forced_reply_at_starttls(sandbox: Sandbox, wire, client_tls) -> None:
    sandbox.faults.set("starttls", reply="454 4.7.0 Temporary failure", times=1)
    client = wire(sandbox)
    client.ehlo()
    assert client.starttls(client_tls(sandbox)).raw == "454 4.7.0 Temporary failure"
    assert client.starttls(client_tls(sandbox)).raw == "220 2.0.0 SMTP server ready"


def test_forced_reply_at_auth(sandbox: Sandbox, secured) -> None:
    sandbox.faults.set("auth", reply=THROTTLED, times=1)
    client = secured(sandbox)
    password = sandbox.password("alice@contoso.test")
    assert client.auth_login("alice@contoso.test", password).raw == THROTTLED
    assert client.auth_login("alice@contoso.test", password).code == 235


def test_forced_reply_at_mail(sandbox: Sandbox, authed) -> None:
    client = authed(sandbox)
    sandbox.faults.set("mail", reply=THROTTLED, times=1)
    assert client.cmd("MAIL FROM:<alice@contoso.test>").raw == THROTTLED
    assert client.cmd("MAIL FROM:<alice@contoso.test>").code == 250


def test_forced_reply_at_rcpt(sandbox: Sandbox, authed) -> None:
    client = authed(sandbox)
    sandbox.faults.set("rcpt", reply=THROTTLED, times=1)
    client.cmd("MAIL FROM:<alice@contoso.test>")
    assert client.cmd("RCPT TO:<x@example.net>").raw == THROTTLED
    assert client.cmd("RCPT TO:<x@example.net>").code == 250


def test_forced_reply_after_data(sandbox: Sandbox, authed, make_message) -> None:
    client = authed(sandbox)
    sandbox.faults.set("data", reply=THROTTLED, times=1)
    assert client.send_message("alice@contoso.test", ["x@example.net"], make_message()).raw == (
        THROTTLED
    )
    assert sandbox.store.list() == []
    assert client.send_message("alice@contoso.test", ["x@example.net"], make_message()).code == 250
    assert sandbox.stats.faults_injected == 1
    assert sandbox.faults.fired["data"] == 1


def test_421_closes_the_connection(sandbox: Sandbox, authed) -> None:
    client = authed(sandbox)
    sandbox.faults.set("mail", reply="421 4.3.2 Service not available")
    assert client.cmd("MAIL FROM:<alice@contoso.test>").raw == "421 4.3.2 Service not available"
    with pytest.raises(CLOSED):
        client.cmd("NOOP")


def test_drop_mid_data(sandbox: Sandbox, authed, make_message) -> None:
    client = authed(sandbox)
    sandbox.faults.set("data", drop=True, times=1)
    client.cmd("MAIL FROM:<alice@contoso.test>")
    client.cmd("RCPT TO:<x@example.net>")
    assert client.cmd("DATA").code == 354
    with pytest.raises(CLOSED):
        client.send(make_message(body="line\r\n" * 2000) + b".\r\n")
        client.read()
    assert sandbox.store.list() == []
    again = authed(sandbox)
    assert again.send_message("alice@contoso.test", ["x@example.net"], make_message()).code == 250


def test_drop_at_ehlo(sandbox: Sandbox, wire) -> None:
    sandbox.faults.set("ehlo", drop=True)
    client = wire(sandbox)
    with pytest.raises(CLOSED):
        client.ehlo()


def test_slow_reply(sandbox: Sandbox, authed) -> None:
    client = authed(sandbox)
    sandbox.faults.set("mail", delay=0.3)
    started = time.monotonic()
    assert client.cmd("MAIL FROM:<alice@contoso.test>").code == 250
    assert time.monotonic() - started >= 0.2  # loose on purpose


def test_runtime_clear(sandbox: Sandbox, authed) -> None:
    client = authed(sandbox)
    sandbox.faults.set("mail", reply=THROTTLED)
    assert client.cmd("MAIL FROM:<alice@contoso.test>").code == 451
    sandbox.faults.clear()
    assert client.cmd("MAIL FROM:<alice@contoso.test>").code == 250


def test_seeded_probability_is_reproducible() -> None:
    def draws(seed: int) -> list[bool]:
        faults = Faults(FaultSettings(seed=seed))
        faults.set("rcpt", reply=THROTTLED, probability=0.5)
        return [faults.pick("rcpt") is not None for _ in range(40)]

    first = draws(7)
    assert first == draws(7)
    assert 5 < sum(first) < 35
    assert first != draws(8)


def test_faults_from_toml_settings(start_sandbox, authed, tmp_path: Path) -> None:
    config = tmp_path / "sandbox.toml"
    config.write_text(
        '[faults]\nseed = 3\n\n[faults.rcpt]\nreply = "452 4.5.3 Too many recipients"\ntimes = 2\n',
        encoding="utf-8",
    )
    sb = start_sandbox(SandboxSettings.load(config))
    client = authed(sb)
    client.cmd("MAIL FROM:<alice@contoso.test>")
    assert client.cmd("RCPT TO:<x@example.net>").code == 452
    assert client.cmd("RCPT TO:<x@example.net>").code == 452
    assert client.cmd("RCPT TO:<x@example.net>").code == 250


def test_fault_reply_must_look_like_smtp() -> None:
    faults = Faults()
    with pytest.raises(ValueError):
        faults.set("mail", reply="oops")
    with pytest.raises(ValueError):
        faults.set("nowhere", reply=THROTTLED)  # type: ignore[arg-type]


def test_late_drop_at_data_stores_then_closes_without_the_250(
    sandbox: Sandbox, authed, make_message
) -> None:
    client = authed(sandbox)
    sandbox.faults.set("data", drop=True, late=True, times=1)
    client.cmd("MAIL FROM:<alice@contoso.test>")
    client.cmd("RCPT TO:<x@example.net>")
    assert client.cmd("DATA").code == 354
    with pytest.raises(CLOSED):
        client.send(make_message() + b".\r\n")
        client.read()
    assert len(sandbox.store.list()) == 1  # delivered, though the client never heard it


def test_late_delay_at_data_stores_before_the_slow_250(
    sandbox: Sandbox, authed, make_message
) -> None:
    client = authed(sandbox)
    sandbox.faults.set("data", delay=0.3, late=True, times=1)
    client.cmd("MAIL FROM:<alice@contoso.test>")
    client.cmd("RCPT TO:<x@example.net>")
    assert client.cmd("DATA").code == 354
    client.send(make_message() + b".\r\n")
    time.sleep(0.1)
    assert len(sandbox.store.list()) == 1  # stored while the 250 waits
    assert client.read().code == 250


def test_late_drop_at_starttls_comes_after_the_220(sandbox: Sandbox, wire, client_tls) -> None:
    sandbox.faults.set("starttls", drop=True, late=True, times=1)
    client = wire(sandbox)
    client.ehlo()
    with pytest.raises(CLOSED):
        client.starttls(client_tls(sandbox))  # the 220, then no TLS handshake
    again = wire(sandbox)
    again.secure(client_tls(sandbox))


def test_late_faults_exist_at_data_and_starttls_only() -> None:
    faults = Faults()
    with pytest.raises(ValueError):
        faults.set("mail", delay=1.0, late=True)
    with pytest.raises(ValueError):
        faults.set("starttls", delay=1.0, late=True)  # late at starttls drops
    with pytest.raises(ValueError):
        FaultSettings.model_validate({"rcpt": {"drop": True, "late": True}})


def test_commands_outside_tls_are_counted(sandbox: Sandbox, wire, client_tls) -> None:
    client = wire(sandbox)
    client.ehlo()
    client.cmd("AUTH LOGIN")
    client.cmd("MAIL FROM:<alice@contoso.test>")
    assert sandbox.stats.commands_in_clear == 2
    client.secure(client_tls(sandbox))
    client.cmd("MAIL FROM:<alice@contoso.test>")
    assert sandbox.stats.commands_in_clear == 2


@pytest.mark.parametrize(
    ("name", "stage", "code"),
    [
        ("throttled-mailbox-full", "data", "5.2.251"),
        ("throttled-send-as-denied", "data", "5.2.252"),
        ("throttled-invalid-license", "data", "5.2.253"),
        ("throttled-too-many-recipients", "data", "5.2.254"),
        ("throttled-invalid-recipients", "data", "5.2.255"),
        ("basic-auth-retired", "auth", "5.7.30"),
    ],
)
def test_named_fault_replies_are_exchange_texts_the_catalogue_explains(
    sandbox: Sandbox, authed, secured, make_message, name: str, stage: str, code: str
) -> None:
    sandbox.faults.set(stage, reply=name, times=1)  # type: ignore[arg-type]
    if stage == "auth":
        client = secured(sandbox)
        resp = client.auth_login("alice@contoso.test", sandbox.password("alice@contoso.test"))
    else:
        client = authed(sandbox)
        resp = client.send_message("alice@contoso.test", ["x@example.net"], make_message())
    assert resp.raw == FAULT_REPLIES[name]
    assert resp.raw.split()[1] == code and resp.code == 550
    entry = lookup(Reply.parse(resp.code, resp.raw[4:]))
    want = "basic-auth-retired" if stage == "auth" else "sender-throttled"
    assert entry is not None and entry.key == want


def test_unknown_fault_reply_name_lists_the_names() -> None:
    with pytest.raises(ValueError, match="throttled-mailbox-full"):
        Faults().set("data", reply="throttled-everything")
