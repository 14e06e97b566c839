"""The doctor's network checks against real sockets and real TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from smtp365.config import AccountSettings
from smtp365.doctor import network
from smtp365.doctor.model import CheckResult, DoctorContext, Status
from smtp365.doctor.network import network_checks
from smtp365.doctor.runner import run_checks
from tests.fakesmtp import FakeSMTPServer, ImplicitTLSServer, Script
from tests.integration.doctor.conftest import DropTarget

MakeAccount = Callable[..., AccountSettings]
ServerContext = Callable[..., ssl.SSLContext]
IDS = ["dns.resolve", "tcp.connect", "smtp.greeting", "tls.mode", "tls.handshake"]


async def doctor(
    account: AccountSettings, timeout: float = 5.0
) -> tuple[dict[str, CheckResult], DoctorContext]:
    ctx = DoctorContext(account=account, timeout=timeout)
    results = await run_checks(network_checks(), ctx)
    assert [r.id for r in results] == IDS
    return {r.id: r for r in results}, ctx


def statuses(results: dict[str, CheckResult]) -> dict[str, Status]:
    return {k: r.status for k, r in results.items()}


def leaf_context(ca: trustme.CA, *names: str, **cert: Any) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*(names or ("localhost", "127.0.0.1")), **cert).configure_cert(ctx)
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- the healthy path ------------------------------------------------------------


async def test_healthy_starttls_server_all_pass(
    server_context: ServerContext, make_account: MakeAccount
) -> None:
    async with FakeSMTPServer(Script(tls_context=server_context())) as server:
        results, ctx = await doctor(make_account(server.port))
    assert statuses(results) == dict.fromkeys(IDS, Status.PASS), {
        k: r.detail for k, r in results.items()
    }
    assert "127.0.0.1" in ctx.facts["addresses"]
    assert ctx.facts["address"] == "127.0.0.1"
    assert isinstance(results["tcp.connect"].data["connect_ms"], float)
    assert ctx.facts["starttls"] is True
    assert "STARTTLS" in ctx.facts["ehlo_plain"]
    assert ctx.facts["ehlo_tls"]["SIZE"] == "157286400"
    assert "STARTTLS" not in ctx.facts["ehlo_tls"]
    assert ctx.facts["mechanisms"] == ["LOGIN", "XOAUTH2"]
    assert ctx.facts["tls_version"] in ("TLSv1.2", "TLSv1.3")
    hs = results["tls.handshake"]
    assert "localhost" in hs.data["sans"] and hs.data["days_left"] > 21
    assert "plain SMTP first" in results["tls.mode"].detail
    # Only EHLO, STARTTLS and QUIT ever reach the server; every session ends with QUIT.
    verbs = [c.split(" ", 1)[0].upper() for c in server.commands]
    assert set(verbs) == {"EHLO", "STARTTLS", "QUIT"}
    assert verbs.count("QUIT") == 3  # greeting, tls.mode, tls.handshake


async def test_healthy_implicit_tls_server_all_pass(
    server_context: ServerContext, make_account: MakeAccount
) -> None:
    async with ImplicitTLSServer(server_context()) as server:
        results, ctx = await doctor(make_account(server.port, tls="implicit"))
    assert statuses(results) == dict.fromkeys(IDS, Status.PASS), {
        k: r.detail for k, r in results.items()
    }
    assert "from the first byte" in results["tls.mode"].detail
    assert ctx.facts["mechanisms"] == ["LOGIN", "XOAUTH2"]
    assert "ehlo_plain" not in ctx.facts


# -- name and TCP ------------------------------------------------------------------


async def test_unresolvable_host(make_account: MakeAccount) -> None:
    results, ctx = await doctor(make_account(587, host="no-such-host.invalid"))
    dns = results["dns.resolve"]
    assert dns.status is Status.FAIL
    # NXDOMAIN normally; a machine without any DNS answers "temporary failure" instead
    assert "name does not exist" in dns.detail or "temporary failure" in dns.detail
    assert "no-such-host.invalid" in dns.detail
    assert "smtp.office365.com" in dns.fix
    assert all(results[i].status is Status.SKIP for i in IDS[1:])
    assert "addresses" not in ctx.facts


@pytest.mark.parametrize(
    ("code", "route", "phrase"),
    [
        (socket.EAI_NONAME, True, "name does not exist"),
        (socket.EAI_AGAIN, True, "temporary failure"),
        (socket.EAI_AGAIN, False, "no network"),
        (socket.EAI_FAIL, True, "SERVFAIL"),
    ],
)
async def test_resolver_errors_spelled_out(
    make_account: MakeAccount,
    monkeypatch: pytest.MonkeyPatch,
    code: int,
    route: bool,
    phrase: str,
) -> None:
    async def fail(*args: Any, **kw: Any) -> Any:
        raise socket.gaierror(code, "resolver says no")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fail)
    monkeypatch.setattr(network, "_has_route", lambda: route)
    ctx = DoctorContext(account=make_account(587, host="smtp.example.test"), timeout=1)
    res = await network.DnsResolve().run(ctx)
    assert res.status is Status.FAIL
    assert phrase in res.detail


async def test_closed_port_refused_and_dependents_skipped(make_account: MakeAccount) -> None:
    results, _ = await doctor(make_account(free_port()))
    tcp = results["tcp.connect"]
    assert results["dns.resolve"].status is Status.PASS
    assert tcp.status is Status.FAIL
    assert "refused" in tcp.detail and "nothing listens" in tcp.detail
    assert "wrong port" in tcp.why and "587" in tcp.fix
    for dependent in ("smtp.greeting", "tls.mode"):
        assert results[dependent].status is Status.SKIP
        assert "depends on tcp.connect" in results[dependent].detail
    assert results["tls.handshake"].status is Status.SKIP
    assert "depends on smtp.greeting" in results["tls.handshake"].detail


async def test_dropped_packets_time_out_promptly(
    drop_target: DropTarget, make_account: MakeAccount
) -> None:
    account = make_account(drop_target.port, host=drop_target.host)
    started = time.monotonic()
    results, _ = await drop_target.run(lambda: doctor(account, timeout=1.0))
    elapsed = time.monotonic() - started
    tcp = results["tcp.connect"]
    assert tcp.status is Status.FAIL, (drop_target.how, tcp.detail)
    assert "no answer" in tcp.detail and "silently dropped" in tcp.detail
    assert "firewall" in tcp.why
    assert "phone hotspot" in tcp.fix
    assert 0.9 <= tcp.elapsed_ms / 1000 < 2.0
    assert elapsed < 3.0
    assert all(results[i].status is Status.SKIP for i in IDS[2:])


async def test_dropped_submission_port_blames_isp_or_firewall(
    make_account: MakeAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    never = asyncio.Event()

    async def dropped(ip: str, port: int) -> socket.socket:
        await never.wait()
        raise AssertionError("unreachable")

    monkeypatch.setattr(network, "_connect_one", dropped)
    ctx = DoctorContext(account=make_account(587), timeout=0.3)
    ctx.facts["addresses"] = ["192.0.2.10", "2001:db8::10"]
    res = await network.TcpConnect().run(ctx)
    assert res.status is Status.FAIL
    assert "outbound port 587" in res.why and "ISP" in res.why
    assert "25 and often 587" in res.why
    assert "another network" in res.fix
    assert res.data["attempts"] == {"192.0.2.10": "no answer", "2001:db8::10": "no answer"}


# -- SMTP and TLS mode -------------------------------------------------------------


async def test_starttls_not_offered(
    server_context: ServerContext, make_account: MakeAccount
) -> None:
    script = Script(starttls_offered=False, tls_context=server_context())
    async with FakeSMTPServer(script) as server:
        results, ctx = await doctor(make_account(server.port))
    greeting = results["smtp.greeting"]
    assert greeting.status is Status.FAIL
    assert "STARTTLS not offered" in greeting.detail
    assert "strips it" in greeting.detail
    assert ctx.facts["starttls"] is False
    assert results["tls.mode"].status is Status.PASS
    assert results["tls.handshake"].status is Status.SKIP
    assert "STARTTLS" not in [c.upper() for c in server.commands]


async def test_starttls_account_on_implicit_tls_port(
    server_context: ServerContext, make_account: MakeAccount
) -> None:
    async with ImplicitTLSServer(server_context()) as server:
        results, _ = await doctor(make_account(server.port), timeout=1.0)
    greeting = results["smtp.greeting"]
    assert greeting.status is Status.FAIL
    assert "instead of an SMTP greeting" in greeting.detail and "implicit TLS" in greeting.why
    mode = results["tls.mode"]
    assert mode.status is Status.FAIL
    assert "speaks implicit TLS" in mode.detail and "handshake succeeded" in mode.detail
    assert "465" in mode.why and "does not serve implicit TLS" in mode.why
    assert "587" in mode.fix and "tls = starttls" in mode.fix
    assert results["tls.handshake"].status is Status.SKIP
    assert server.commands == []  # nothing was said inside the probe's unverified TLS


async def test_implicit_account_on_starttls_port(
    server_context: ServerContext, make_account: MakeAccount
) -> None:
    async with FakeSMTPServer(Script(tls_context=server_context())) as server:
        results, _ = await doctor(make_account(server.port, tls="ssl"))
    mode = results["tls.mode"]
    assert mode.status is Status.FAIL
    assert "set to implicit TLS/SSL but the server expects STARTTLS" in mode.detail
    assert "greeted in clear text: 220 fake.test" in mode.detail
    assert "tls = starttls" in mode.fix
    greeting = results["smtp.greeting"]
    assert greeting.status is Status.FAIL and "plain text" in greeting.detail
    assert results["tls.handshake"].status is Status.SKIP


# -- certificates and TLS versions -----------------------------------------------


async def tls_results(
    context: ssl.SSLContext, account: Callable[[int], AccountSettings]
) -> tuple[CheckResult, DoctorContext]:
    async with FakeSMTPServer(Script(tls_context=context)) as server:
        results, ctx = await doctor(account(server.port))
    assert statuses(results)["smtp.greeting"] is Status.PASS
    assert results["tls.mode"].status is Status.PASS
    return results["tls.handshake"], ctx


async def test_expired_certificate(ca: trustme.CA, make_account: MakeAccount) -> None:
    now = dt.datetime.now(dt.UTC)
    context = leaf_context(
        ca, not_before=now - dt.timedelta(days=100), not_after=now - dt.timedelta(days=3)
    )
    res, ctx = await tls_results(context, make_account)
    assert res.status is Status.FAIL
    assert "expired on" in res.detail and "3 days ago" in res.detail
    assert "renew" in res.fix
    assert "tls_version" not in ctx.facts and "mechanisms" not in ctx.facts


async def test_wrong_host_certificate_names_its_names(
    server_context: ServerContext, make_account: MakeAccount
) -> None:
    res, _ = await tls_results(
        server_context("mail.wrong.example", "other.wrong.example"), make_account
    )
    assert res.status is Status.FAIL
    assert "host name mismatch" in res.detail
    assert "mail.wrong.example, other.wrong.example" in res.detail
    assert "'localhost'" in res.detail
    assert res.data["sans"] == ["mail.wrong.example", "other.wrong.example"]


async def test_untrusted_chain_suggests_ca_file(
    server_context: ServerContext, make_account: MakeAccount, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    res, _ = await tls_results(server_context(), lambda p: make_account(p, ca_file=other_ca))
    assert res.status is Status.FAIL
    assert "untrusted certificate chain" in res.detail
    assert "ca_file" in res.fix and "intercepting" in res.fix


async def test_certificate_expiring_soon_warns(ca: trustme.CA, make_account: MakeAccount) -> None:
    context = leaf_context(ca, not_after=dt.datetime.now(dt.UTC) + dt.timedelta(days=10))
    res, ctx = await tls_results(context, make_account)
    assert res.status is Status.WARN
    assert "expires in 10 days" in res.detail
    assert ctx.facts["mechanisms"] == ["LOGIN", "XOAUTH2"]  # a WARN still fills the facts


async def test_tls10_only_server(ca: trustme.CA, make_account: MakeAccount) -> None:
    context = leaf_context(ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0 on purpose
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    res, ctx = await tls_results(context, make_account)
    assert res.status is Status.FAIL
    assert "only speaks TLSv1" in res.detail and "TLS 1.2 or newer is required" in res.detail
    assert "Exchange Online refuses them" in res.why
    assert res.catalogue == "tls-too-old"
    assert "tls_version" not in ctx.facts
