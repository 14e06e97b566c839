"""The relay listener against real sockets: smtplib as the client, a real SQLite queue."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import socket
from pathlib import Path

import pytest

from smtp365.relay.listener import Limits
from smtp365.relay.policy import NetworkRule, RelayPolicy
from smtp365.relay.users import UserDB

from .listener_helpers import FAST_HASHER, HOSTNAME, LOCALHOST, MakeRelay, Relay

D = "foreign.example"
S = HOSTNAME
IP = "127.0.0.1"

MESSAGE = (
    b"From: app@corp.example\r\nTo: t@foreign.example\r\nSubject: hello\r\n"
    b"Message-ID: <abc.123@corp.example>\r\n\r\nbody line 1\r\n.leading dot\r\n\r\nend\r\n"
)


def _ok(code: int) -> None:
    assert 200 <= code < 400, code


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# ---------------------------------------------------------------- acceptance


async def test_accepted_message_is_queued_byte_exact(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(LOCALHOST,))

    def send() -> tuple[int, bytes]:
        with relay.connect() as smtp:
            smtp.ehlo("client.example")
            assert "size" in smtp.esmtp_features
            _ok(smtp.mail("app@corp.example")[0])
            _ok(smtp.rcpt("t@foreign.example")[0])
            _ok(smtp.rcpt("u@foreign.example")[0])
            return smtp.data(MESSAGE)

    code, reply = await asyncio.to_thread(send)
    assert code == 250
    [msg] = await relay.queue.list()
    assert reply.decode() == f"2.0.0 Ok: queued as {msg.id}"
    assert msg.sender == "app@corp.example"
    assert msg.recipients == ("t@foreign.example", "u@foreign.example")
    assert msg.message_id == "<abc.123@corp.example>"
    assert msg.client == "127.0.0.1"
    content = await relay.queue.read(msg.id)
    assert content.endswith(MESSAGE)
    head = content[: -len(MESSAGE)].decode()
    assert head.startswith("Received: from client.example ([127.0.0.1])\r\n\tby relay.test")
    assert "with ESMTP" in head and head.endswith("\r\n")
    assert f"\tid {msg.id};" in head  # the queue id: `smtp365 queue show` finds it
    assert all(line.startswith(("Received:", "\t")) for line in head.splitlines())


async def test_message_id_added_and_large_message_streamed(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(LOCALHOST,))
    body = b"Subject: big\r\n\r\n" + b"".join(
        b"%06d " % i + b"x" * 90 + b"\r\n" for i in range(3000)
    )

    def send() -> None:
        with relay.connect() as smtp:
            smtp.sendmail("app@corp.example", ["t@foreign.example"], body)

    await asyncio.to_thread(send)
    [msg] = await relay.queue.list()
    content = await relay.queue.read(msg.id)
    assert content.endswith(body)
    assert msg.message_id.startswith("<") and msg.message_id.endswith(f"@{HOSTNAME}>")
    assert f"Message-ID: {msg.message_id}\r\n".encode() in content[: -len(body)]
    assert msg.content_path is not None  # went through incoming/ into the spool
    assert list((relay.queue.root / "incoming").iterdir()) == []


# ---------------------------------------------------------------- open relay

MATRIX = [
    ("", f"t@{D}"),
    (f"f@{D}", f"t@{D}"),
    (f"f@{S}", f"t@{D}"),
    (f"f@[{IP}]", f"t@{D}"),
    *(
        (f"f@[{IP}]", rcpt)
        for rcpt in (
            f"t%{D}@[{IP}]",
            f"t%{D}@{S}",
            f'"t@{D}"',
            f'"t%{D}"',
            f"t@{D}@[{IP}]",
            f'"t@{D}"@[{IP}]',
            f"t@{D}@{S}",
            f"@[{IP}]:t@{D}",
            f"@{S}:t@{D}",
            f"{D}!t",
            f"{D}!t@[{IP}]",
            f"{D}!t@{S}",
        )
    ),
]


def _probe(relay: Relay, cases: list[tuple[str, str]]) -> list[tuple[str, int, bytes]]:
    results = []
    with relay.connect() as smtp:
        smtp.ehlo("probe.example")
        for sender, rcpt in cases:
            mail = smtp.docmd(f"MAIL FROM:<{sender}>")[0]
            rcpt_code, text = smtp.docmd(f"RCPT TO:<{rcpt}>")
            if mail == 250:
                assert rcpt_code == 554 and b"Relay access denied" in text, (rcpt, text)
            assert 500 <= smtp.docmd("DATA")[0] < 600
            smtp.rset()
            results.append((rcpt, rcpt_code, text))
    return results


async def test_open_relay_matrix_unauthorised_client(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(NetworkRule.parse("192.0.2.0/24"),))
    # Sessions of a few cases each, so the hard error limit (20) is not what answers.
    for i in range(0, len(MATRIX), 5):
        results = await asyncio.to_thread(_probe, relay, MATRIX[i : i + 5])
        for rcpt, code, text in results:
            assert 500 <= code < 600, (rcpt, code, text)
    assert await relay.queue.list() == []


def _scan(port: int, cases: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """An open-relay scanner as nmap's smtp-open-relay is: one ``recv`` per command, the
    first line of what came taken as the reply. A reply split over several segments puts it
    out of step, and a later ``250-...`` line read as a RCPT's reply says "open relay"."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.recv(4096)  # greeting
        sock.sendall(b"EHLO scanner.example\r\n")
        sock.recv(4096)
        for sender, rcpt in cases:
            for line in (f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>", "RSET"):
                sock.sendall(line.encode() + b"\r\n")
                reply = sock.recv(4096)
                if line.startswith("RCPT"):
                    out.append((rcpt, reply.split(b"\r\n")[0]))
    return out


async def test_a_scanner_reading_one_segment_per_command_sees_a_closed_relay(
    make_relay: MakeRelay,
) -> None:
    relay = await make_relay(networks=(NetworkRule.parse("192.0.2.0/24"),))
    for i in range(0, len(MATRIX), 5):  # under the hard error limit
        for rcpt, first in await asyncio.to_thread(_scan, relay.port, MATRIX[i : i + 5]):
            assert first[:1] == b"5", (rcpt, first)  # never a 250 taken for the RCPT's


ROUTING_FORMS = [
    f"t%{D}@[{IP}]",
    f"t%{D}@{S}",
    f'"t%{D}"@{S}',
    f'"t@{D}"@{S}',
    f'"t@{D}"@[{IP}]',
    f"t@{D}@{S}",
    f"@[{IP}]:t@{D}",
    f"@{S}:t@{D}",
    f"@a.example,@b.example:t@{D}",
    f"{D}!t",
    f"{D}!t@{S}",
    f"t@[{IP}]",
]


async def test_allowed_client_relays_but_routing_forms_are_refused(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(LOCALHOST,))

    def run() -> list[tuple[str, int, bytes]]:
        out = []
        with relay.connect() as smtp:
            smtp.ehlo("lan.example")
            _ok(smtp.mail("app@corp.example")[0])
            for rcpt in ROUTING_FORMS:
                code, text = smtp.docmd(f"RCPT TO:<{rcpt}>")
                out.append((rcpt, code, text))
            _ok(smtp.rcpt(f"good@{D}")[0])
            _ok(smtp.data(MESSAGE)[0])
        return out

    for rcpt, code, text in await asyncio.to_thread(run):
        assert 500 <= code < 600, (rcpt, code, text)
    [msg] = await relay.queue.list()
    assert msg.recipients == (f"good@{D}",)


# ---------------------------------------------------------------- AUTH


async def test_auth_refused_in_plain_text_and_works_inside_starttls(
    make_relay: MakeRelay,
) -> None:
    relay = await make_relay(mode="starttls")
    relay.users.add("scanner", "s3cret-pw", ["scanner@corp.example", "*@printers.example"])

    def run() -> tuple[int, int]:
        with relay.connect() as smtp:
            smtp.ehlo("dev.example")
            assert "auth" not in smtp.esmtp_features
            assert "starttls" in smtp.esmtp_features
            plain = smtp.docmd("AUTH", "PLAIN " + _plain("scanner", "s3cret-pw"))
            assert plain[0] == 538, plain
            smtp.starttls(context=relay.client_context())
            smtp.ehlo("dev.example")
            assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            smtp.login("scanner", "s3cret-pw")
            refused = smtp.docmd("MAIL FROM:<boss@corp.example>")[0]
            smtp.sendmail("x@printers.example", [f"t@{D}"], MESSAGE)
            return plain[0], refused

    _, refused = await asyncio.to_thread(run)
    assert refused == 553
    [msg] = await relay.queue.list()
    assert msg.client == "scanner" and msg.sender == "x@printers.example"
    content = await relay.queue.read(msg.id)
    assert b"with ESMTPSA (version=TLSv1." in content


async def test_auth_login_on_implicit_tls(make_relay: MakeRelay) -> None:
    relay = await make_relay(mode="tls")
    relay.users.add("app", "pw-123", ["*"])

    def run() -> None:
        with relay.connect() as smtp:
            smtp.ehlo("dev.example")
            assert smtp.docmd("AUTH LOGIN")[0] == 334
            assert smtp.docmd(base64.b64encode(b"app").decode())[0] == 334
            assert smtp.docmd(base64.b64encode(b"pw-123").decode())[0] == 235
            smtp.sendmail("any@where.example", [f"t@{D}"], MESSAGE)

    await asyncio.to_thread(run)
    assert len(await relay.queue.list()) == 1


async def test_wrong_password_535_then_421_on_fourth_attempt(make_relay: MakeRelay) -> None:
    relay = await make_relay(mode="starttls")
    relay.users.add("scanner", "right", ["*"])

    def run() -> list[int]:
        codes = []
        with relay.connect() as smtp:
            smtp.starttls(context=relay.client_context())
            smtp.ehlo("dev.example")
            for _ in range(4):
                codes.append(smtp.docmd("AUTH", "PLAIN " + _plain("scanner", "wrong"))[0])
            with pytest.raises(smtplib.SMTPServerDisconnected):
                smtp.noop()
        return codes

    assert await asyncio.to_thread(run) == [535, 535, 535, 421]


@pytest.mark.parametrize(
    "plain_auth_networks",
    [frozenset(), frozenset({"other"})],
    ids=["listener-allows-none", "listener-names-another-network"],
)
async def test_plain_auth_refused_unless_the_listener_names_the_clients_network(
    make_relay: MakeRelay, plain_auth_networks: frozenset[str]
) -> None:
    """An allow-listed network alone does not open AUTH in clear: the listener must name it."""
    lan = NetworkRule.parse("127.0.0.0/8", senders=["dev@corp.example"], name="lan")
    relay = await make_relay(networks=(lan,), plain_auth_networks=plain_auth_networks)
    relay.users.add("app", "pw", ["app@corp.example"])

    def run() -> tuple[bool, int]:
        with relay.connect() as smtp:
            smtp.ehlo("dev.example")
            offered = "auth" in smtp.esmtp_features
            return offered, smtp.docmd("AUTH", "PLAIN " + _plain("app", "pw"))[0]

    assert await asyncio.to_thread(run) == (False, 538)


async def test_plain_auth_allowed_where_the_listener_names_the_network(
    make_relay: MakeRelay,
) -> None:
    net = NetworkRule.parse("127.0.0.0/8", senders=["dev@corp.example"], name="dev")
    relay = await make_relay(networks=(net,), plain_auth_networks=frozenset({"dev"}))
    relay.users.add("app", "pw", ["app@corp.example"])

    def run() -> tuple[int, int]:
        with relay.connect() as smtp:
            smtp.ehlo("dev.example")
            before = smtp.docmd("MAIL FROM:<app@corp.example>")[0]  # network identity
            smtp.rset()
            smtp.login("app", "pw")
            smtp.sendmail("app@corp.example", [f"t@{D}"], MESSAGE)
            return before, 0

    before, _ = await asyncio.to_thread(run)
    assert before == 553
    [msg] = await relay.queue.list()
    assert msg.client == "app"


async def test_starttls_forgets_an_auth_done_in_clear(make_relay: MakeRelay) -> None:
    net = NetworkRule.parse("127.0.0.0/8", senders=["dev@corp.example"], name="dev")
    relay = await make_relay(
        mode="starttls", networks=(net,), plain_auth_networks=frozenset({"dev"})
    )
    relay.users.add("app", "pw", ["app@corp.example"])

    def run() -> tuple[int, list[str], int, int]:
        with relay.connect() as smtp:
            smtp.ehlo("dev.example")
            authed = smtp.docmd("AUTH", "PLAIN " + _plain("app", "pw"))[0]  # allowed in clear
            smtp.starttls(context=relay.client_context())
            smtp.ehlo("dev.example")
            offered = smtp.esmtp_features.get("auth", "").split()
            # The network's identity again, not the user's: the user's sender is refused.
            as_user = smtp.docmd("MAIL FROM:<app@corp.example>")[0]
            as_network = smtp.docmd("MAIL FROM:<dev@corp.example>")[0]
            return authed, offered, as_user, as_network

    authed, offered, as_user, as_network = await asyncio.to_thread(run)
    assert authed == 235
    assert offered == ["PLAIN", "LOGIN"]
    assert as_user == 553
    assert as_network == 250


# ---------------------------------------------------------------- smuggling

FAKE_ENDS = [
    b"\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
]
SMUGGLED = (
    b"MAIL FROM:<evil@smuggled.example>\r\nRCPT TO:<victim@foreign.example>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nevil\r\n"
)


def _smuggle(relay: Relay, fake_end: bytes, tls: bool) -> tuple[int, bytes]:
    with relay.connect() as smtp:
        if tls:
            smtp.starttls(context=relay.client_context())
        smtp.ehlo("lan.example")
        _ok(smtp.mail("app@corp.example")[0])
        _ok(smtp.rcpt(f"t@{D}")[0])
        assert smtp.docmd("DATA")[0] == 354
        smtp.send(b"Subject: one\r\n\r\nhello" + fake_end + SMUGGLED + b"\r\n.\r\n")
        reply = smtp.getreply()
        assert smtp.noop()[0] == 250  # the session goes on, no pending transaction
        assert smtp.docmd("DATA")[0] == 503
        return reply


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
@pytest.mark.parametrize("fake_end", FAKE_ENDS, ids=[repr(f)[2:-1] for f in FAKE_ENDS])
async def test_smuggling_rejected(make_relay: MakeRelay, fake_end: bytes, tls: bool) -> None:
    relay = await make_relay(mode="starttls" if tls else "plain", networks=(LOCALHOST,))
    code, text = await asyncio.to_thread(_smuggle, relay, fake_end, tls)
    assert code == 550 and text.startswith(b"5.6.0"), (code, text)
    assert await relay.queue.list() == []
    assert list((relay.queue.root / "incoming").iterdir()) == []


@pytest.mark.parametrize("fake_end", FAKE_ENDS, ids=[repr(f)[2:-1] for f in FAKE_ENDS])
async def test_smuggling_normalised(make_relay: MakeRelay, fake_end: bytes) -> None:
    relay = await make_relay(networks=(LOCALHOST,), bare_newline="normalize")
    code, _ = await asyncio.to_thread(_smuggle, relay, fake_end, False)
    messages = await relay.queue.list()
    assert all(m.sender == "app@corp.example" for m in messages)
    if b"\x00" in fake_end:
        assert code == 550 and messages == []
        return
    assert code == 250 and len(messages) == 1
    content = await relay.queue.read(messages[0].id)
    assert b"\r" not in content.replace(b"\r\n", b"") and b"\n" not in content.replace(b"\r\n", b"")


# ---------------------------------------------------------------- limits


async def test_oversized_message_552_nothing_queued(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(LOCALHOST,), limits=Limits(max_message_size=100_000))
    big = b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 2000

    def run() -> tuple[int, int]:
        with relay.connect() as smtp:
            smtp.ehlo("lan.example")
            assert smtp.esmtp_features["size"] == "100000"
            size_code = smtp.docmd("MAIL FROM:<a@corp.example> SIZE=200000")[0]
            # Without SIZE: refused at the end of DATA.
            _ok(smtp.docmd("MAIL FROM:<a@corp.example>")[0])
            _ok(smtp.rcpt(f"t@{D}")[0])
            code = smtp.data(big)[0]
            assert smtp.noop()[0] == 250
            return size_code, code

    assert await asyncio.to_thread(run) == (552, 552)
    assert await relay.queue.list() == []
    assert list((relay.queue.root / "incoming").iterdir()) == []


async def test_long_line_and_recipient_limit(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(LOCALHOST,), limits=Limits(max_recipients=2))

    def run() -> tuple[int, int, int]:
        with relay.connect() as smtp:
            smtp.ehlo("lan.example")
            smtp.mail("a@corp.example")
            smtp.rcpt(f"t1@{D}")
            smtp.rcpt(f"t2@{D}")
            third = smtp.rcpt(f"t3@{D}")[0]
            long_line = smtp.data(b"Subject: x\r\n\r\n" + b"z" * 1001 + b"\r\n")[0]
            cmd = smtp.docmd("NOOP " + "n" * 600)[0]
            return third, long_line, cmd

    assert await asyncio.to_thread(run) == (452, 500, 500)
    assert await relay.queue.list() == []


async def test_low_disk_452_at_mail(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(LOCALHOST,), min_free_bytes=2**62)

    def run() -> tuple[int, bytes]:
        with relay.connect() as smtp:
            smtp.ehlo("lan.example")
            return smtp.docmd("MAIL FROM:<a@corp.example>")

    code, text = await asyncio.to_thread(run)
    assert (code, text) == (452, b"4.3.1 Insufficient system storage")


async def test_hard_error_limit(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(LOCALHOST,))

    def run() -> list[int]:
        with relay.connect() as smtp:
            smtp.ehlo("lan.example")
            codes = [smtp.docmd("RCPT TO:<x@y.example>")[0] for _ in range(19)]
            smtp.send(b"RCPT TO:<x@y.example>\r\n")
            codes.append(smtp.getreply()[0])
            codes.append(smtp.getreply()[0])
            return codes

    codes = await asyncio.to_thread(run)
    assert codes == [503] * 20 + [421]


# ---------------------------------------------------------------- synchronisation


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


async def test_pipelining_before_greeting_554(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(LOCALHOST,), greet_pause=30.0)

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            sock.sendall(b"EHLO early.example\r\nMAIL FROM:<a@corp.example>\r\n")
            return _recv_all(sock)

    assert await asyncio.to_thread(run) == b"554 5.5.0 SMTP protocol synchronization error\r\n"
    assert await relay.queue.list() == []


async def test_pipelining_after_ehlo_554(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(LOCALHOST,))

    def run() -> tuple[int, bytes]:
        with relay.connect() as smtp:
            smtp.send(b"EHLO x.example\r\nMAIL FROM:<a@corp.example>\r\n")
            return smtp.getreply()

    assert await asyncio.to_thread(run) == (554, b"5.5.0 SMTP protocol synchronization error")


async def test_starttls_injection_discarded_and_session_reset(make_relay: MakeRelay) -> None:
    relay = await make_relay(mode="starttls", networks=(LOCALHOST,))
    ctx = relay.client_context()

    def run() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
            f = raw.makefile("rb")
            assert f.readline().startswith(b"220 ")
            raw.sendall(b"EHLO a.example\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            raw.sendall(b"STARTTLS\r\nRSET\r\n")
            assert f.readline().startswith(b"220 ")
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"MAIL FROM:<a@corp.example>\r\n")
                tf = tls.makefile("rb")
                first = tf.readline()  # no stray RSET reply; EHLO forgotten
                tls.sendall(b"QUIT\r\n")
                return [first, tf.readline()]

    first, bye = await asyncio.to_thread(run)
    assert first == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    assert bye.startswith(b"221")


# ---------------------------------------------------------------- units


def test_users_file(tmp_path: Path) -> None:
    db = UserDB(tmp_path / "users.json", hasher=FAST_HASHER)
    db.add("scanner", "pw", ["*@corp.example", "boss@other.example"])
    assert (tmp_path / "users.json").stat().st_mode & 0o777 == 0o600
    assert b'pw"' not in (tmp_path / "users.json").read_bytes()
    again = UserDB(tmp_path / "users.json", hasher=FAST_HASHER)
    assert again.verify("scanner", "pw")
    assert not again.verify("scanner", "PW")
    assert not again.verify("nobody", "pw")
    user = again.get("scanner")
    assert user is not None and "$argon2" not in repr(user)
    assert user.may_send_as("x@CORP.example") and user.may_send_as("boss@other.example")
    assert not user.may_send_as("x@other.example") and not user.may_send_as("")


def test_users_file_changed_by_another_process_is_read_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "users.json"
    UserDB(path, hasher=FAST_HASHER).add("scanner", "old pw")
    running = UserDB(path, hasher=FAST_HASHER)  # the relay's copy
    assert running.verify("scanner", "old pw") and not running.refresh()
    UserDB(path, hasher=FAST_HASHER).add("scanner", "new pw", ["*@corp.example"])
    assert running.verify("scanner", "new pw") and not running.verify("scanner", "old pw")
    assert running.get("scanner") is not None
    UserDB(path, hasher=FAST_HASHER).remove("scanner")
    assert not running.verify("scanner", "new pw") and running.names() == []
    UserDB(path, hasher=FAST_HASHER).add("printer", "pw")
    path.write_text('{"users": ')  # damaged (by hand): nobody gets in, said once
    with caplog.at_level("ERROR", "smtp365.relay.users"):
        assert not running.verify("printer", "pw") and not running.verify("printer", "pw")
    assert sum("users file unusable" in r.getMessage() for r in caplog.records) == 1
    path.unlink()
    UserDB(path, hasher=FAST_HASHER).add("printer", "pw")
    assert running.verify("printer", "pw")


def test_network_policy_ipv6_and_mapped() -> None:
    policy = RelayPolicy([NetworkRule.parse("2001:db8::/32"), NetworkRule.parse("10.0.0.0/8")])
    assert policy.network_for("2001:db8::1") is not None
    assert policy.network_for("::ffff:10.1.2.3") is not None
    assert policy.network_for("192.0.2.1") is None
    assert (
        policy.check_recipient(None, "t@x.example")
        == "554 5.7.1 <t@x.example>: Relay access denied"
    )


async def test_nothing_runs_after_421(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(LOCALHOST,))

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"HELO a.example\r\n")
            f.readline()
            burst = b"RCPT TO:<x@y.example>\r\n" * 20
            burst += b"MAIL FROM:<a@corp.example>\r\nRCPT TO:<t@foreign.example>\r\nDATA\r\n"
            burst += b"Subject: late\r\n\r\nlate\r\n.\r\n"
            sock.sendall(burst)
            return _recv_all(sock)

    replies = (await asyncio.to_thread(run)).splitlines()
    assert replies[-1].startswith(b"421 ") and len(replies) == 21
    assert await relay.queue.list() == []


# ---------------------------------------------------------------- stopping


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole (possibly multi-line) reply."""
    lines = b""
    while True:
        line = await asyncio.wait_for(reader.readline(), 10)
        assert line, f"connection closed after {lines!r}"
        lines += line
        if line[3:4] != b"-":
            return lines


async def _in_a_transaction(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A session that has sent EHLO and MAIL FROM (both accepted)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await _reply(reader)).startswith(b"220")
    for command in (b"EHLO client.test", b"MAIL FROM:<app@corp.example>"):
        writer.write(command + b"\r\n")
        assert (await _reply(reader))[:1] == b"2"
    return reader, writer


async def test_stop_with_grace_lets_an_open_session_finish_its_message(
    make_relay: MakeRelay,
) -> None:
    relay = await make_relay(networks=(LOCALHOST,))
    port = relay.port
    reader, writer = await _in_a_transaction(port)
    try:
        writer.write(b"RCPT TO:<t@foreign.example>\r\n")
        assert (await _reply(reader))[:1] == b"2"
        writer.write(b"DATA\r\n")
        assert (await _reply(reader)).startswith(b"354")
        writer.write(MESSAGE[:40])  # half a message when the stop begins
        await writer.drain()

        stopping = asyncio.create_task(relay.listener.stop(grace=20))
        # No new connections once stopping has begun ...
        await asyncio.sleep(0)
        with pytest.raises(OSError):
            _, late = await asyncio.open_connection("127.0.0.1", port)
            late.close()
        assert not stopping.done()
        # ... but the open session finishes its message, which is queued.
        writer.write(MESSAGE[40:] + b".\r\n")
        reply = await _reply(reader)
        assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
        queue_id = reply.split()[-1].decode()
        assert (await relay.queue.get(queue_id)) is not None
        writer.write(b"QUIT\r\n")
        assert (await _reply(reader)).startswith(b"221")
        await asyncio.wait_for(stopping, 10)  # returns as soon as the last session is gone
    finally:
        writer.close()


@pytest.mark.parametrize("mode", ["plain", "starttls", "tls"])
async def test_stop_tells_idle_sessions_at_once(make_relay: MakeRelay, mode: str) -> None:
    """An idle session does not hold the stop for the whole grace: it gets 421 and is closed,
    also over TLS when the client never reads again (so never answers the TLS close)."""
    relay = await make_relay(mode=mode, networks=(LOCALHOST,))

    def idle_client() -> smtplib.SMTP:
        client = relay.connect()
        client.ehlo("client.test")
        if mode == "starttls":
            client.starttls(context=relay.client_context())
            client.ehlo("client.test")
        return client  # and then it sits there, reading nothing

    client = await asyncio.to_thread(idle_client)
    try:
        await asyncio.wait_for(relay.listener.stop(grace=600), 10)  # not the 600 s grace
        assert relay.listener.sessions == 0
        code, text = await asyncio.to_thread(client.getreply)
        assert (code, text) == (421, b"4.3.2 Service shutting down, closing transmission channel")
    finally:
        client.close()


async def test_a_tls_handshake_that_ends_after_the_stop_began_gets_421(
    make_relay: MakeRelay,
) -> None:
    """Implicit TLS: the session starts when the handshake ends; if the stop began in
    between, it is told 421 instead of being greeted."""
    relay = await make_relay(mode="tls", networks=(LOCALHOST,))
    [server] = relay.listener._servers
    raw = socket.create_connection(("127.0.0.1", relay.port))
    raw.setblocking(False)
    deadline = asyncio.get_running_loop().time() + 10
    while server._active_count == 0:  # type: ignore[attr-defined]  # accepted, no handshake
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    await relay.listener.stop(grace=0)
    reader, writer = await asyncio.open_connection(
        sock=raw, ssl=relay.client_context(), server_hostname=HOSTNAME
    )
    try:
        told = await asyncio.wait_for(reader.readline(), 10)
        assert told == b"421 4.3.2 Service shutting down, closing transmission channel\r\n"
    finally:
        writer.transport.abort()


async def test_stop_refuses_a_new_transaction_after_the_message(make_relay: MakeRelay) -> None:
    """While stopping, a session that finished its message gets 421 for the next one."""
    relay = await make_relay(networks=(LOCALHOST,))
    reader, writer = await _in_a_transaction(relay.port)
    try:
        stopping = asyncio.create_task(relay.listener.stop(grace=600))
        await asyncio.sleep(0)
        writer.write(b"RCPT TO:<t@foreign.example>\r\nDATA\r\n")
        assert (await _reply(reader))[:1] == b"2"
        assert (await _reply(reader)).startswith(b"354")
        writer.write(MESSAGE + b".\r\n")
        assert (await _reply(reader)).startswith(b"250 2.0.0 Ok: queued as ")
        writer.write(b"MAIL FROM:<app@corp.example>\r\n")
        assert (await _reply(reader)).startswith(b"421 4.3.2")
        assert await asyncio.wait_for(reader.read(), 10) == b""
        await asyncio.wait_for(stopping, 10)
        assert len(await relay.queue.list()) == 1
    finally:
        writer.close()


async def test_stop_closes_sessions_still_open_after_the_grace(make_relay: MakeRelay) -> None:
    relay = await make_relay(networks=(LOCALHOST,))
    reader, writer = await _in_a_transaction(relay.port)
    try:
        # In a transaction, but it never finishes: closed when the grace ends.
        await relay.listener.stop(grace=0.2)
        rest = await asyncio.wait_for(reader.read(), 10)  # closed by the relay: EOF
        assert b"250 2.0.0 Ok: queued" not in rest
        assert relay.listener.sessions == 0
        assert await relay.queue.list() == []
    finally:
        writer.close()


@pytest.mark.parametrize(
    "content",
    [
        b"Subject: caf\xc3\xa9 \xff\xfe\r\n\r\n8-bit body \xe9\xe8 without BODY=8BITMIME\r\n",
        b"no colon in this header line\r\nSubject x\r\n\r\nbody\r\n",
        b"Subject: no blank line and no body\r\n",
        b"\r\nno headers at all\r\n",
        b"X-Long: " + b"a" * 900 + b"\r\n" + b"X-Fold: b\r\n\tc\r\n" * 3000 + b"\r\nbody\r\n",
    ],
    ids=["8bit-without-8bitmime", "no-colon", "no-body", "no-headers", "huge-header-section"],
)
async def test_odd_content_is_kept_byte_exact(make_relay: MakeRelay, content: bytes) -> None:
    relay = await make_relay(networks=(LOCALHOST,))

    def send() -> tuple[int, bytes]:
        with relay.connect() as smtp:
            smtp.ehlo("client.example")
            smtp.mail("app@corp.example")  # no BODY=8BITMIME, whatever the content
            smtp.rcpt("t@foreign.example")
            return smtp.data(content)

    code, _ = await asyncio.to_thread(send)
    assert code == 250
    [msg] = await relay.queue.list()
    stored = await relay.queue.read(msg.id)
    # What the relay adds goes in front (Received:, and Message-ID: when there is none).
    assert stored.endswith(content)
    added = stored[: -len(content)]
    assert added.startswith(b"Received: from client.example")
    assert added.count(b"Message-ID:") == 1
