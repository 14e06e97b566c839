"""The whole relay (listener → intake → queue → scheduler → worker → bounce) in front of the
sandbox, driven by Python's smtplib: plain, STARTTLS with AUTH, implicit TLS."""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtp365.relay.queue import Event, State
from smtp365.relay.service import PURGE_EVERY, RelayService
from smtp365.relay.users import UserDB
from smtp365.relay.worker import Result
from smtp365.sandbox import Sandbox, SandboxSettings
from smtp365.sandbox.settings import FaultRule, FaultSettings, LimitSettings
from tests.relay.service_helpers import (
    ALICE,
    BOB,
    SteppedClock,
    account,
    settings,
    settled,
    states,
    until,
)


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    sb = Sandbox(tmp_path / "sbx")
    await sb.start()
    yield sb
    await sb.stop()


def body(subject: str, sender: str = ALICE, extra: str = "") -> bytes:
    return (
        f"From: Printer <{sender}>\r\nTo: someone@example.net\r\nSubject: {subject}\r\n{extra}"
        f"\r\nscan attached\r\n"
    ).encode()


def smtp_send(port: int, sender: str, rcpts: list[str], data: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail(sender, rcpts, data)


async def test_plain_client_through_the_relay_reaches_the_sandbox(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    async with RelayService(settings(sandbox, tmp_path / "relay")) as relay:
        port = relay.listeners[0].port
        await asyncio.to_thread(smtp_send, port, ALICE, ["someone@example.net"], body("one"))
        await settled(relay)
        [got] = sandbox.store.list()
        assert got.subject == "one" and got.mail_from == ALICE
        assert got.rcpt_tos == ["someone@example.net"]
        content = sandbox.store.content(got.id)
        assert b"by relay.test (smtp365 relay) with ESMTP" in content
        assert relay.queue is not None
        [entry] = await relay.queue.list(State.DELIVERED)
        assert entry.last_reason.startswith("250")
        assert entry.account == "alice"


async def test_an_internationalised_address_is_relayed_with_smtputf8(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """SMTPUTF8 from the device (RFC 6531) reaches Exchange Online as SMTPUTF8."""
    rcpt = "jörg@bücher.example"

    def send(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail(ALICE, [rcpt], body("grüße"), mail_options=["SMTPUTF8"])

    async with RelayService(settings(sandbox, tmp_path / "relay")) as relay:
        await asyncio.to_thread(send, relay.listeners[0].port)
        await settled(relay)
        [got] = sandbox.store.list()
        assert got.rcpt_tos == [rcpt] and got.smtputf8


async def test_authenticated_device_is_rewritten_to_the_mailbox(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    state = tmp_path / "relay"
    UserDB(state / "users.json").add("scanner", "correct horse battery", ["*@printer.local"])
    cfg = settings(
        sandbox,
        state,
        relay={
            "listeners": [{"port": 0, "mode": "starttls"}],
            "networks": [],
            "routes": [{"client": "scanner", "account": "alice", "rewrite_sender": True}],
        },
    )

    def send(port: int) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the relay's self-signed certificate
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.starttls(context=ctx)
            s.login("scanner", "correct horse battery")
            s.sendmail(
                "scan@printer.local", ["bob@example.net"], body("scan", "scan@printer.local")
            )

    async with RelayService(cfg) as relay:
        assert (state / "tls" / "relay.crt").is_file()
        assert (state / "tls" / "relay.key").stat().st_mode & 0o077 == 0
        await asyncio.to_thread(send, relay.listeners[0].port)
        await settled(relay)
    [got] = sandbox.store.list()
    assert got.mail_from == ALICE  # the envelope sender is the mailbox now
    msg = email.message_from_bytes(sandbox.store.content(got.id), policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == ALICE
    assert msg["From"].addresses[0].display_name == "Printer"
    assert msg["Reply-To"].addresses[0].addr_spec == "scan@printer.local"
    assert "with ESMTPSA" in msg["Received"]


async def test_unauthenticated_client_off_the_allowlist_is_refused(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    cfg = settings(sandbox, tmp_path / "relay", relay={"networks": [{"cidr": "10.9.8.0/24"}]})
    async with RelayService(cfg) as relay:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            await asyncio.to_thread(
                smtp_send, relay.listeners[0].port, ALICE, ["x@example.net"], body("no")
            )
        [(code, text)] = info.value.recipients.values()
        assert code == 554 and b"Relay access denied" in text
        assert relay.queue is not None
        assert (await relay.queue.stats()).pending == 0
    assert sandbox.store.list() == []


async def test_implicit_tls_listener(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = settings(sandbox, tmp_path / "relay", relay={"listeners": [{"port": 0, "mode": "tls"}]})

    def send(port: int, cafile: Path) -> None:
        ctx = ssl.create_default_context(cafile=str(cafile))  # verifies the self-signed cert
        with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=10) as s:
            s.sendmail(ALICE, ["x@example.net"], body("tls"))

    async with RelayService(cfg) as relay:
        await asyncio.to_thread(send, relay.listeners[0].port, relay.state_dir / "tls/relay.crt")
        await settled(relay)
    assert [m.subject for m in sandbox.store.list()] == ["tls"]


async def test_routes_pick_the_account_by_sender(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = settings(
        sandbox,
        tmp_path / "relay",
        relay={"routes": [{"sender": "*@bob.example", "account": "bob", "rewrite_sender": True}]},
        bob=account(sandbox, BOB),
    )
    async with RelayService(cfg) as relay:
        port = relay.listeners[0].port
        await asyncio.to_thread(smtp_send, port, "app@bob.example", ["x@example.net"], body("b"))
        await asyncio.to_thread(smtp_send, port, ALICE, ["x@example.net"], body("a"))
        await settled(relay)
    sent = {m.subject: (m.mailbox, m.mail_from) for m in sandbox.store.list()}
    assert sent == {"b": (BOB, BOB), "a": (ALICE, ALICE)}


async def test_routes_pick_the_account_by_client_network(sandbox: Sandbox, tmp_path: Path) -> None:
    relay_table = {
        "networks": [{"cidr": "127.0.0.0/8", "name": "printers"}],
        "routes": [{"client": "Printers", "account": "bob", "rewrite_sender": True}],
    }
    cfg = settings(sandbox, tmp_path / "relay", relay=relay_table, bob=account(sandbox, BOB))
    async with RelayService(cfg) as relay:
        port = relay.listeners[0].port
        await asyncio.to_thread(smtp_send, port, "scan@printer.local", ["x@example.net"], body("p"))
        await settled(relay)
    [sent] = sandbox.store.list()
    assert (sent.mailbox, sent.mail_from) == (BOB, BOB)


async def test_permanent_failure_bounces_to_the_sender(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="smtp365.relay.worker")
    faults = FaultSettings(
        rcpt=FaultRule(reply="550 5.1.10 RESOLVER.ADR.RecipientNotFound", times=1)
    )
    sb = Sandbox(tmp_path / "sbx", SandboxSettings(faults=faults))
    await sb.start()
    try:
        async with RelayService(settings(sb, tmp_path / "relay")) as relay:
            port = relay.listeners[0].port
            await asyncio.to_thread(smtp_send, port, ALICE, ["gone@example.net"], body("lost"))
            # not settled(): nothing is pending between the failure and its bounce's enqueue
            await until(lambda: has_states(relay, {State.FAILED: 1, State.DELIVERED: 1}))
            assert relay.queue is not None
            [failed] = await relay.queue.list(State.FAILED)
            assert "5.1.10" in failed.last_reason
            [bounce] = await relay.queue.list(State.DELIVERED)
            assert bounce.sender == "" and bounce.recipients == (ALICE,)
            assert f"bounce {bounce.id} for {failed.id} to {ALICE}" in caplog.messages
        [dsn] = sb.store.list()
        assert dsn.rcpt_tos == [ALICE] and dsn.mail_from == ALICE
        report = email.message_from_bytes(sb.store.content(dsn.id), policy=email.policy.default)
        assert report.get_content_type() == "multipart/report"
        assert "Status: 5.1.10" in sb.store.content(dsn.id).decode()
    finally:
        await sb.stop()


async def test_upstream_down_then_back_everything_arrives(tmp_path: Path) -> None:
    sb = Sandbox(tmp_path / "sbx")
    await sb.start()
    port = sb.smtp_port
    cfg = settings(sb, tmp_path / "relay")
    await sb.stop()
    async with RelayService(cfg) as relay:
        rport = relay.listeners[0].port
        for i in range(5):
            await asyncio.to_thread(smtp_send, rport, ALICE, ["x@example.net"], body(f"d{i}"))
        assert relay.queue is not None
        queue = relay.queue

        async def all_deferred() -> bool:
            stats = await queue.stats()
            return stats[State.DEFERRED] == 5 and all(
                m.attempts >= 1 for m in await queue.list(State.DEFERRED)
            )

        await until(all_deferred)
        back = Sandbox(tmp_path / "sbx", SandboxSettings(smtp_port=port))
        await back.start()
        try:
            await settled(relay, timeout=30)
            assert sorted(m.subject for m in back.store.list()) == [f"d{i}" for i in range(5)]
        finally:
            await back.stop()


async def test_30_per_minute_scaled_down_no_throttle_and_over_90_percent_used(
    tmp_path: Path,
) -> None:
    # Exchange's 30 messages a minute, with the minute scaled down to 3 s on both sides.
    limit, window, n = 30, 3.0, 75
    sb = Sandbox(
        tmp_path / "sbx",
        SandboxSettings(
            limits=LimitSettings(messages_per_minute=limit, rate_window_seconds=window)
        ),
    )
    await sb.start()
    try:
        budget = {"messages_per_minute": limit, "minute": window}
        cfg = settings(sb, tmp_path / "relay", relay={"budget": budget, "processes": 2})
        async with RelayService(cfg) as relay:
            port = relay.listeners[0].port
            for i in range(n):  # as fast as a client can: most of them wait in the queue
                await asyncio.to_thread(smtp_send, port, ALICE, ["x@example.net"], body(f"r{i}"))
            await settled(relay, timeout=30)
            assert relay.queue is not None
            delivered = await relay.queue.list(State.DELIVERED)
        assert sb.stats.throttle_replies == 0
        assert len(sb.store.list()) == n
        done = sorted(m.finished_at or 0.0 for m in delivered)
        # The client is faster than the budget, so the relay can send `limit` messages per
        # window and no more: the fastest possible finish is (n - 1) // limit windows after
        # the first message. Budget used = that time / the time the relay took.
        fastest = window * ((n - 1) // limit)
        used = fastest / (done[-1] - done[0])
        print(f"{n} messages in {done[-1] - done[0]:.2f} s (fastest allowed {fastest:.2f} s):")
        print(f"{used:.1%} of the budget used")
        assert used >= 0.9
    finally:
        await sb.stop()


async def has_states(relay: RelayService, expected: dict[State, int]) -> bool:
    return await states(relay) == expected


class Switch:
    """A TCP forwarder on a fixed local port that can be turned off (connection refused)
    and on again: the identity platform going down and coming back."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def on(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def off(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        tasks = {
            asyncio.ensure_future(pipe(reader, up_writer)),
            asyncio.ensure_future(pipe(up_reader, writer)),
        }
        self._pipes |= tasks
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._pipes -= tasks


async def test_identity_platform_down_then_back_nothing_lost(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    switch = Switch(sandbox.identity_port)
    await switch.on()
    await switch.off()  # the port is known; the identity platform is "down"
    app = next(a for a in sandbox.info()["apps"] if not a["public_client"])
    alice = {
        "profile": "custom",
        "host": "localhost",
        "port": sandbox.smtp_port,
        "ca_file": str(sandbox.ca_file),
        "username": ALICE,
        "auth": "xoauth2",
        "timeout": 10,
        "tenant": sandbox.settings.tenant_id,
        "client_id": app["app_id"],
        "client_secret": app["client_secret"],
        "authority_host": f"https://localhost:{switch.port}",
        "token_cache": str(tmp_path / "token-cache.json"),
    }
    cfg = settings(sandbox, tmp_path / "relay")
    cfg = cfg.model_validate(cfg.model_dump() | {"accounts": {"alice": alice}})
    try:
        async with RelayService(cfg) as relay:
            port = relay.listeners[0].port
            for i in range(3):
                await asyncio.to_thread(smtp_send, port, ALICE, ["x@example.net"], body(f"i{i}"))
            assert relay.queue is not None
            queue = relay.queue

            async def deferred_for_the_token() -> bool:
                waiting = await queue.list(State.DEFERRED)
                return len(waiting) == 3 and all(m.attempts >= 1 for m in waiting)

            await until(deferred_for_the_token)
            reasons = {m.last_reason for m in await queue.list(State.DEFERRED)}
            assert sandbox.store.list() == []
            await switch.on()  # back, on the same port
            await settled(relay, timeout=30)
            assert (await queue.stats())[State.FAILED] == 0
        assert sorted(m.subject for m in sandbox.store.list()) == ["i0", "i1", "i2"]
        print(f"deferred while the identity platform was down: {reasons}")
    finally:
        await switch.off()


async def test_smuggling_never_reaches_the_upstream(tmp_path: Path) -> None:
    from tests.relay.test_listener import FAKE_ENDS, SMUGGLED

    sandbox = Sandbox(
        tmp_path / "sbx", SandboxSettings(limits=LimitSettings(messages_per_minute=10_000))
    )
    await sandbox.start()
    try:
        await _smuggling_through(sandbox, tmp_path, FAKE_ENDS, SMUGGLED)
    finally:
        await sandbox.stop()


async def _smuggling_through(
    sandbox: Sandbox, tmp_path: Path, fake_ends: list[bytes], smuggled: bytes
) -> None:

    listeners = [
        {"host": "127.0.0.1", "port": 0, "mode": "plain"},
        {"host": "127.0.0.1", "port": 0, "mode": "starttls"},
        {"host": "127.0.0.1", "port": 0, "mode": "plain", "bare_newline": "normalize"},
    ]
    relay_table = {"listeners": listeners, "budget": {"messages_per_minute": 10_000}}
    cfg = settings(sandbox, tmp_path / "relay", relay=relay_table)

    def session(port: int, tls: bool, fake_end: bytes, tag: str) -> tuple[int, int]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            if tls:
                ctx = ssl.create_default_context(cafile=str(tmp_path / "relay/tls/relay.crt"))
                ctx.check_hostname = False
                smtp.starttls(context=ctx)
            smtp.ehlo("lan.example")
            smtp.mail(ALICE)
            smtp.rcpt("t@example.net")
            assert smtp.docmd("DATA")[0] == 354
            smtp.send(
                f"Subject: one-{tag}\r\n\r\nhello".encode() + fake_end + smuggled + b"\r\n.\r\n"
            )
            first = smtp.getreply()[0]
            # the same session goes on with a second, honest transaction
            second = smtp.sendmail(ALICE, ["t@example.net"], body(f"two-{tag}"))
            assert second == {}
            return first, 250

    async with RelayService(cfg) as relay:
        plain, starttls, normalize = (lst.port for lst in relay.listeners)
        firsts = []
        for i, fake_end in enumerate(fake_ends):
            for port, tls, kind in (
                (plain, False, "plain"),
                (starttls, True, "starttls"),
                (normalize, False, "normalize"),
            ):
                first, _ = await asyncio.to_thread(session, port, tls, fake_end, f"{kind}{i}")
                firsts.append((kind, i, first))
        await settled(relay, timeout=30)
    # Refused where bare CR/LF is refused; accepted as one message where it is normalised
    # (NUL is refused everywhere).
    kept = [i for i, end in enumerate(fake_ends) if b"\x00" not in end]
    assert firsts == [
        (kind, i, 250 if kind == "normalize" and i in kept else 550)
        for i in range(len(fake_ends))
        for kind in ("plain", "starttls", "normalize")
    ]
    got = sandbox.store.list()
    n = len(fake_ends)
    assert sorted(m.subject for m in got) == sorted(
        [f"two-{k}{i}" for k in ("plain", "starttls", "normalize") for i in range(n)]
        + [f"one-normalize{i}" for i in kept]
    )
    assert {m.mail_from for m in got} == {ALICE}  # never the smuggled sender
    assert all(m.rcpt_tos == ["t@example.net"] for m in got)  # never the smuggled recipient
    for m in got:
        if m.subject.startswith("one-"):
            # the smuggled commands arrived as text inside the one message, dot-stuffed
            assert b"MAIL FROM:<evil@smuggled.example>" in sandbox.store.content(m.id)


async def test_purge_loop_drops_old_finished_entries_and_keeps_pending_ones(
    tmp_path: Path,
) -> None:
    sb = Sandbox(tmp_path / "sbx")
    await sb.start()
    clock = SteppedClock()
    day = 86_400.0
    cfg = settings(sb, tmp_path / "relay", relay={"processes": 1, "delivery_log_days": 7})
    try:
        async with RelayService(cfg, clock=clock) as relay:
            assert relay.queue is not None
            queue = relay.queue
            port = relay.listeners[0].port
            await clock.slept(PURGE_EVERY, 1)  # the first round, at start
            await asyncio.to_thread(smtp_send, port, ALICE, ["x@example.net"], body("kept"))
            sb.faults.set("rcpt", reply="550 5.1.10 RESOLVER.ADR.RecipientNotFound", times=1)
            await asyncio.to_thread(smtp_send, port, ALICE, ["gone@example.net"], body("lost"))
            await until(lambda: has_states(relay, {State.FAILED: 1, State.DELIVERED: 2}))
            sb.faults.set("mail", reply="451 4.7.500 Access denied, please try again later")
            await asyncio.to_thread(smtp_send, port, ALICE, ["x@example.net"], body("later"))

            async def deferred() -> bool:
                return (await queue.stats())[State.DEFERRED] == 1

            await until(deferred)  # the clock stands still: no retry until it moves
            [waiting] = await queue.list(State.DEFERRED)
            await queue.hold(waiting.id)
            finished = {State.DELIVERED: 2, State.FAILED: 1, State.HELD: 1}  # with the bounce
            assert await states(relay) == finished

            clock.advance(6 * day)
            await clock.slept(PURGE_EVERY, 2)
            assert await states(relay) == finished  # not a week old yet

            clock.advance(1.5 * day)
            await clock.slept(PURGE_EVERY, 3)
            assert await states(relay) == {State.HELD: 1}
            history = [e.event for e in await queue.history(waiting.id)]
            assert history == [Event.DEFERRED, Event.HELD]
    finally:
        await sb.stop()


async def test_a_restart_keeps_counting_the_messages_of_the_window(tmp_path: Path) -> None:
    # Exchange's 30 messages a minute scaled down to 5 per 5 s on both sides; the relay
    # restarts between two rounds of 5, well within the window.
    limit, window = 5, 5.0
    limits = LimitSettings(messages_per_minute=limit, rate_window_seconds=window)
    sb = Sandbox(tmp_path / "sbx", SandboxSettings(limits=limits))
    await sb.start()
    budget = {"messages_per_minute": limit, "minute": window}
    cfg = settings(sb, tmp_path / "relay", relay={"budget": budget, "processes": 1})
    try:
        for round_ in range(2):
            async with RelayService(cfg) as relay:
                port = relay.listeners[0].port
                for i in range(limit):
                    subject = f"r{round_}-{i}"
                    await asyncio.to_thread(
                        smtp_send, port, ALICE, ["x@example.net"], body(subject)
                    )
                await settled(relay, timeout=30)
        assert sb.stats.throttle_replies == 0
        assert len(sb.store.list()) == 2 * limit
    finally:
        await sb.stop()


async def test_the_day_budget_and_a_quota_pause_survive_a_restart(tmp_path: Path) -> None:
    sb = Sandbox(tmp_path / "sbx")
    await sb.start()
    clock = SteppedClock()
    day = 86_400.0
    quota = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"
    relay_table = {"processes": 1, "budget": {"recipients_per_day": 3}}
    cfg = settings(sb, tmp_path / "relay", relay=relay_table)
    two = ["x@example.net", "y@example.net"]
    try:
        async with RelayService(cfg, clock=clock) as relay:
            port = relay.listeners[0].port
            await asyncio.to_thread(smtp_send, port, ALICE, two, body("first"))
            await settled(relay)
            sb.faults.set("data", reply=quota, times=1)  # Exchange counts more than we do
            await asyncio.to_thread(smtp_send, port, ALICE, ["z@example.net"], body("quota"))
            await until(
                lambda: (
                    relay.worker is not None
                    and relay.worker.limiter.paused_until(ALICE) is not None
                )
            )
            await relay_deferred(relay, 1)

        async with RelayService(cfg, clock=clock) as relay:
            assert relay.worker is not None
            limiter = relay.worker.limiter
            assert limiter.paused_until(ALICE) == pytest.approx(clock.mono + day, abs=1)
            assert limiter.state(ALICE).pause_reason == quota
            assert limiter.state(ALICE).recipients.used(clock.mono) == 3  # 2 + 1 (counted)
            port = relay.listeners[0].port
            await asyncio.to_thread(smtp_send, port, ALICE, ["w@example.net"], body("after"))
            await relay_deferred(relay, 2)
            assert relay.queue is not None
            reasons = {m.last_reason for m in await relay.queue.list(State.DEFERRED)}
            assert f"mailbox paused: {quota}" in reasons
            assert [m.subject for m in sb.store.list()] == ["first"]

            clock.advance(day + 1)  # the pause ends, the day's recipients leave the window
            assert relay.scheduler is not None
            relay.scheduler.wake()  # it may be between two polls, past the moment moved
            await settled(relay)
        assert sorted(m.subject for m in sb.store.list()) == ["after", "first", "quota"]
        assert sb.stats.throttle_replies == 0
    finally:
        await sb.stop()


async def relay_deferred(relay: RelayService, n: int) -> None:
    queue = relay.queue
    assert queue is not None

    async def deferred() -> bool:
        return (await queue.stats())[State.DEFERRED] == n

    await until(deferred)


async def test_a_null_sender_stays_null_on_a_rewriting_route(tmp_path: Path) -> None:
    sb = Sandbox(tmp_path / "sbx")
    await sb.start()
    relay_table = {
        "networks": [{"cidr": "127.0.0.0/8", "name": "printers", "senders": ["*", "<>"]}],
        "routes": [{"client": "printers", "account": "alice", "rewrite_sender": True}],
    }
    report = (
        b"From: Mail Delivery System <MAILER-DAEMON@printer.local>\r\nTo: x@example.net\r\n"
        b"Subject: Undelivered Mail Returned to Sender\r\n\r\nreport\r\n"
    )
    try:
        async with RelayService(settings(sb, tmp_path / "relay", relay=relay_table)) as relay:
            assert relay.queue is not None
            port = relay.listeners[0].port
            await asyncio.to_thread(smtp_send, port, "", ["x@example.net"], report)
            await settled(relay)
            [sent] = sb.store.list()
            assert sent.mail_from == ALICE  # on the wire: Exchange sends only as the mailbox
            msg = email.message_from_bytes(sb.store.content(sent.id), policy=email.policy.default)
            assert msg["From"].addresses[0].addr_spec == ALICE  # else 5.2.252 SendAsDenied
            assert msg["From"].addresses[0].display_name == "Mail Delivery System"
            assert msg["Reply-To"].addresses[0].addr_spec == "MAILER-DAEMON@printer.local"
            [delivered] = await relay.queue.list(State.DELIVERED)
            assert delivered.sender == ""

            sb.faults.set("rcpt", reply="550 5.1.10 RESOLVER.ADR.RecipientNotFound", times=1)
            await asyncio.to_thread(smtp_send, port, "", ["gone@example.net"], report)
            scheduler = relay.scheduler
            assert scheduler is not None
            await until(lambda: scheduler.results[Result.FAILED] == 1)  # its on_failed is done
            [failed] = await relay.queue.list(State.FAILED)
            assert failed.sender == "" and "5.1.10" in failed.last_reason
            assert len(await relay.queue.list()) == 2  # no bounce of the bounce
        assert len(sb.store.list()) == 1
    finally:
        await sb.stop()
