"""Text that comes from users (subjects, addresses, names, paths, replies, findings) is
printed as data on every output path: never read as Rich markup or emoji codes, terminal
control characters made visible, bytes that were not UTF-8 shown as ``\\xNN``, JSON valid.

The commands run in-process through typer's runner (stdout is strict UTF-8 there, as on a
real terminal, so text that cannot be encoded would fail the command)."""

from __future__ import annotations

import asyncio
import io
import json
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from smtp365.cli import app, auth_cmd, doctor_cmd
from smtp365.cli.send import sendmail_main
from smtp365.doctor import Report, Status
from smtp365.doctor.model import CheckResult
from smtp365.models import Envelope
from smtp365.relay.queue.sqlite import SqliteQueue
from tests.fakesmtp import FakeSMTPServer, Script

# Markup (closing tags with nothing to close, styles, links), a bracketed word Rich
# leaves alone, an emoji code, an ANSI colour sequence and a byte that was not UTF-8.
MARKUP = [
    "[/] broken",
    "[ALERT] disk full",
    "[alert] disk full",
    "[bold]cron[/]",
    "[link=http://x]y[/link]",
    ":thumbs_up: ok",
]
ANSI = "\x1b[31mred"
ANSI_SHOWN = "\\x1b[31mred"
SURROGATE = "x\udcff"
SURROGATE_SHOWN = "x\\xff"

runner = CliRunner()


def cli(*args: str, stdin: str | None = None) -> Result:
    """Run ``smtp365 ARGS`` in-process; an exception other than an exit fails the test."""
    result = runner.invoke(app, list(args), input=stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_literal(output: str, *texts: str) -> None:
    """Each of ``texts`` appears as it is; no control character reached the terminal."""
    for text in texts:
        assert text in output, f"{text!r} not in output:\n{output}"
    assert "\x1b" not in output and "\x07" not in output, output
    assert "\N{THUMBS UP SIGN}" not in output, output


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No config, state or colour settings of the machine running the tests."""
    import os

    for key in list(os.environ):
        if key.startswith("SMTP365_") or key in ("FORCE_COLOR", "TTY_COMPATIBLE"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.chdir(tmp_path)
    yield


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string (JSON escapes are TOML escapes for these)."""
    return json.dumps(text)


# ---------------------------------------------------------------------------- sandbox


def _sandbox_with(state: Path, entries: list[dict[str, Any]]) -> None:
    """A stopped sandbox's state directory whose index holds ``entries``."""
    messages = state / "messages"
    messages.mkdir(parents=True)
    (state / "sandbox.json").write_text(json.dumps({"version": 1, "running": False}))
    lines = []
    for i, fields in enumerate(entries):
        path = messages / f"m{i}.eml"
        path.write_bytes(b"Subject: x\r\n\r\nbody\r\n")
        entry = {
            "id": f"m{i}",
            "received_at": "2024-01-01T00:00:00Z",
            "mailbox": "alice@contoso.test",
            "mechanism": "XOAUTH2",
            "mail_from": "alice@contoso.test",
            "rcpt_tos": ["bob@example.net"],
            "message_id": f"<m{i}@contoso.test>",
            "subject": "hello",
            "size": 20,
            "tls_version": "TLSv1.3",
            "smtp_id": f"id{i}",
            "path": str(path),
        } | fields
        lines.append(json.dumps(entry))  # ASCII: lone surrogates as \udcff escapes
    (messages / "index.jsonl").write_text("\n".join(lines) + "\n")


def test_sandbox_messages_lists_hostile_subjects_and_addresses(tmp_path: Path) -> None:
    state = tmp_path / "sbx"
    entries: list[dict[str, Any]] = [{"subject": s} for s in [*MARKUP, ANSI, SURROGATE]]
    entries.append({"mail_from": "[bold]cron[/]@x.test", "rcpt_tos": ["[/]a@x.test", ANSI]})
    entries.append({"subject": "after the bad ones"})
    _sandbox_with(state, entries)

    res = cli("sandbox", "messages", "--state-dir", str(state))
    assert res.exit_code == 0, res.output
    assert_literal(
        res.stdout,
        *MARKUP,
        ANSI_SHOWN,
        SURROGATE_SHOWN,
        "[bold]cron[/]@x.test -> [/]a@x.test, " + ANSI_SHOWN,
        "after the bad ones",
    )
    assert len(res.stdout.splitlines()) == len(entries)  # one line per message

    data = json.loads(cli("sandbox", "messages", "--state-dir", str(state), "--json").stdout)
    assert [m["subject"] for m in data[: len(MARKUP) + 2]] == [*MARKUP, ANSI, SURROGATE]


def test_sandbox_missing_state_dir_error_shows_the_path(tmp_path: Path) -> None:
    where = tmp_path / f"[/] {ANSI}"
    res = cli("sandbox", "messages", "--state-dir", str(where))
    assert res.exit_code == 66
    shown = str(tmp_path / f"[/] {ANSI_SHOWN}")
    assert_literal(res.stderr, f"no sandbox state in {shown}", f"--state-dir {shown}")


# ---------------------------------------------------------------------------- config


def test_config_check_unknown_default_account_fix_line(tmp_path: Path) -> None:
    cfg = tmp_path / "smtp365.toml"
    cfg.write_text('default_account = "nope"\n[accounts.main]\nusername = "a@contoso.test"\n')
    res = cli("config", "check", "--config", str(cfg))
    assert res.exit_code == 78, res.output
    assert_literal(
        res.stdout,
        "account nope from",
        "add an [accounts.nope] table, or pick one of: main",
    )


@pytest.mark.parametrize("hostile", [*MARKUP, ANSI])
def test_config_check_and_show_with_hostile_username_and_account(
    tmp_path: Path, hostile: str
) -> None:
    cfg = tmp_path / "smtp365.toml"
    name = f"{hostile} acct"
    cfg.write_text(
        f"default_account = {toml_string(name)}\n"
        f"[accounts.{toml_string(name)}]\n"
        f"username = {toml_string(hostile + 'reports')}\n"
        'auth = "login"\npassword_env = "NOT_SET_ANYWHERE"\n'
    )
    shown = hostile.replace("\x1b", "\\x1b")
    check = cli("config", "check", "--config", str(cfg))
    assert check.exit_code in (0, 78), check.output
    assert_literal(check.stdout, f"account {shown} acct from {cfg}", f"{shown}reports")

    show = cli("config", "show", "--config", str(cfg))
    assert show.exit_code == 0, show.output
    assert_literal(show.stdout, f"{shown} acct", f"{shown}reports")

    data = json.loads(cli("config", "check", "--config", str(cfg), "--json").stdout)
    assert data["account"] == name


def test_config_show_with_undecodable_username_flag(tmp_path: Path) -> None:
    res = cli("config", "show", "--username", SURROGATE)
    assert res.exit_code == 0, res.output
    assert_literal(res.stdout, f"username         {SURROGATE_SHOWN}")


def test_config_error_fix_keeps_literal_brackets(tmp_path: Path) -> None:
    cfg = tmp_path / "smtp365.toml"
    cfg.write_text("[accounts.main]\n")
    res = cli("config", "show", "--config", str(cfg), "--account", f"[/]{ANSI}")
    assert res.exit_code == 78
    assert_literal(res.stderr, f"add an [accounts.[/]{ANSI_SHOWN}] table")


# ---------------------------------------------------------------------------- queue


async def _build_queue(root: Path) -> tuple[str, str]:
    queue = await SqliteQueue.open(root)
    try:
        content = (
            "From: app@contoso.test\r\n"
            f"Subject: [bold]cron[/] {ANSI} :thumbs_up: ok\r\n"
            "\r\nbody\r\n"
        ).encode()
        deferred = await queue.enqueue(
            Envelope("[bold]cron[/]@contoso.test", ("[/]a@example.test", f"{ANSI}@example.test")),
            content,
            message_id="<[link=http://x]y[/link]@contoso.test>",
            account="[alert] disk full",
            client=f"printer {ANSI}",
        )
        [msg] = await queue.claim(1, 60)
        await queue.defer(msg.id, until=time.time() + 3600, reason=f"421 [/] broken {ANSI}")
        failed = await queue.enqueue(
            Envelope(":thumbs_up: ok@contoso.test", ("b@example.test",)),
            content,
            message_id="<f@contoso.test>",
        )
        [msg] = await queue.claim(1, 60)
        await queue.fail(msg.id, reason="550 5.1.1 [ALERT] disk full [bold]x[/]")
    finally:
        await queue.close()
    return deferred, failed


@pytest.fixture
def queue_state(tmp_path: Path) -> tuple[Path, str, str]:
    state = tmp_path / "relay"
    deferred, failed = asyncio.run(_build_queue(state / "queue"))
    return state, deferred, failed


def test_queue_list_show_delete_with_hostile_envelope(queue_state: tuple[Path, str, str]) -> None:
    state, deferred, failed = queue_state
    listing = cli("queue", "list", "--all", "--state-dir", str(state))
    assert listing.exit_code == 0, listing.output
    assert_literal(
        listing.stdout,
        "[bold]cron[/]@contoso.test",
        "[/]a@example.test +1",
        f"421 [/] broken {ANSI_SHOWN}",
        ":thumbs_up: ok@contoso.test",
        "550 5.1.1 [ALERT] disk full [bold]x[/]",
    )

    show = cli("queue", "show", deferred, "--content", "--state-dir", str(state))
    assert show.exit_code == 0, show.output
    assert_literal(
        show.stdout,
        "sender        <[bold]cron[/]@contoso.test>",
        f"recipients    [/]a@example.test, {ANSI_SHOWN}@example.test",
        f"last reason   421 [/] broken {ANSI_SHOWN}",
        "account       [alert] disk full",
        f"client        printer {ANSI_SHOWN}",
        "message-id    <[link=http://x]y[/link]@contoso.test>",
        f"  | Subject: [bold]cron[/] {ANSI_SHOWN} :thumbs_up: ok",
    )

    data = json.loads(cli("queue", "show", deferred, "--json", "--state-dir", str(state)).stdout)
    assert data["recipients"] == ["[/]a@example.test", f"{ANSI}@example.test"]

    gone = cli("queue", "delete", deferred, "--state-dir", str(state))
    assert gone.exit_code == 0, gone.output
    assert_literal(gone.stdout, "from <[bold]cron[/]@contoso.test> to [/]a@example.test +1")


def test_queue_errors_show_ids_and_paths_literally(
    queue_state: tuple[Path, str, str], tmp_path: Path
) -> None:
    state, _, _ = queue_state
    unknown = cli("queue", "show", f"[/]{ANSI}", "--state-dir", str(state))
    assert unknown.exit_code == 65
    assert_literal(unknown.stderr, "no message '[/]\\x1b[31MRED' in the queue")

    nowhere = tmp_path / f"[bold]{ANSI}"
    missing = cli("queue", "list", "--state-dir", str(nowhere))
    assert missing.exit_code == 66
    assert_literal(missing.stderr, f"no relay queue in {tmp_path}/[bold]{ANSI_SHOWN}")
    as_json = cli("queue", "list", "--json", "--state-dir", str(nowhere))
    assert json.loads(as_json.stdout)["what"] == f"no relay queue in {nowhere}"


# ---------------------------------------------------------------------------- relay users


@pytest.mark.parametrize("hostile", ["[bold]cron[/]", "[/] broken", ANSI, ":thumbs_up: ok"])
def test_relay_passwd_and_users_with_hostile_names(tmp_path: Path, hostile: str) -> None:
    state = tmp_path / "relay"
    shown = hostile.replace("\x1b", "\\x1b")
    made = cli(
        "relay", "passwd", hostile, "-s", f"{hostile}@x.test", "--password-stdin",
        "--state-dir", str(state), stdin="a long enough secret\n",
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    assert_literal(made.stdout, f"created relay user {shown} in", f"(may send as: {shown}@x.test)")

    listed = cli("relay", "users", "--state-dir", str(state))
    assert listed.exit_code == 0, listed.output
    assert_literal(listed.stdout, f"{shown}: {shown}@x.test")
    data = json.loads(cli("relay", "users", "--json", "--state-dir", str(state)).stdout)
    assert data == [{"user": hostile, "senders": [f"{hostile}@x.test"]}]

    removed = cli("relay", "passwd", hostile, "--delete", "--state-dir", str(state))
    assert removed.exit_code == 0, removed.output
    assert_literal(removed.stdout, f"removed relay user {shown} from")
    again = cli("relay", "passwd", hostile, "--delete", "--state-dir", str(state))
    assert again.exit_code == 65
    assert_literal(again.stderr, "no relay user '")


def test_relay_users_empty_listing_with_hostile_path(tmp_path: Path) -> None:
    state = tmp_path / "[bold]relay[/]"
    res = cli("relay", "users", "--state-dir", str(state))
    assert res.exit_code == 0, res.output
    assert_literal(res.stdout, f"no relay users in {state / 'users.json'}")


# ---------------------------------------------------------------------------- send


def _send_config(tmp_path: Path, port: int, ca_file: Path) -> Path:
    token = tmp_path / "token"
    token.write_text("e2e-token\n")
    token.chmod(0o600)
    path = tmp_path / "smtp365.toml"
    path.write_text(
        'default_account = "main"\n[accounts.main]\nprofile = "custom"\nhost = "localhost"\n'
        f'port = {port}\nca_file = "{ca_file}"\nusername = "alice@contoso.test"\n'
        f'auth = "xoauth2"\ntoken_file = "{token}"\ntimeout = 10\n'
    )
    return path


async def test_send_reports_hostile_replies_and_refusals(
    server_context: Callable[..., ssl.SSLContext], ca_file: Path, tmp_path: Path
) -> None:
    script = Script(
        tls_context=server_context(),
        rcpt_replies={"bob@example.net": "550 5.1.1 [/] broken [bold]cron[/] :thumbs_up: ok"},
        data_reply="250 2.0.0 OK <id> [link=http://x]y[/link] [alert] disk full",
    )
    async with FakeSMTPServer(script) as server:
        cfg = _send_config(tmp_path, server.port, ca_file)
        res = await asyncio.to_thread(
            cli, "send", "--config", str(cfg), "--to", "alice@example.net",
            "--to", "bob@example.net", "--subject", "[/] broken", "--body", "hi",
        )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert_literal(
        res.stdout,
        "250 2.0.0 OK <id> [link=http://x]y[/link] [alert] disk full",
        "refused bob@example.net: 550 5.1.1 [/] broken [bold]cron[/] :thumbs_up: ok",
    )


@pytest.mark.parametrize("bad", [f"[/] broken {ANSI}", SURROGATE])
def test_send_error_output_shows_user_text(tmp_path: Path, bad: str) -> None:
    cfg = tmp_path / "smtp365.toml"
    cfg.write_text("[accounts.main]\n")
    shown = bad.replace("\x1b", "\\x1b").replace("\udcff", "\\xff")
    res = cli("send", "--config", str(cfg), "--account", bad, "--to", "a@b.test", "--body", "x")
    assert res.exit_code == 78
    assert_literal(res.stderr, f"add an [accounts.{shown}] table, or pick one of: main")

    as_json = cli(
        "send", "--json", "--config", str(cfg), "--account", bad, "--to", "a@b.test", "-b", "x"
    )
    assert as_json.exit_code == 78
    assert json.loads(as_json.stdout)["fix"].startswith(f"add an [accounts.{bad}] table")


def test_send_message_errors_are_literal(tmp_path: Path) -> None:
    res = cli("send", "--to", "a@b.test", "--subject", f"[bold]x[/]\n{ANSI}", "--body", "x")
    assert res.exit_code == 65, res.output
    assert_literal(
        res.stderr,
        "smtp365: error: the Subject header '[bold]x[/]\\n\\x1b[31mred' is not valid",
        "fix: header values are single lines without CR or LF",
    )
    body = tmp_path / f"[/]{ANSI}.txt"
    unread = cli("send", "--to", "a@b.test", "--body-file", str(body))
    assert unread.exit_code == 66, unread.output
    assert_literal(unread.stderr, f"cannot read body file {tmp_path}/[/]{ANSI_SHOWN}.txt")


def test_sendmail_errors_make_control_characters_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b"Subject: x\n\nbody\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    missing = tmp_path / f"[bold]{ANSI}.toml"
    code = sendmail_main(["--config", str(missing), "a@b.test"])
    assert code == 78
    assert_literal(
        capsys.readouterr().err,
        f"sendmail: config file {tmp_path}/[bold]{ANSI_SHOWN}.toml does not exist\n  fix: ",
    )
    assert sendmail_main([f"-q{ANSI}"]) == 64
    assert_literal(capsys.readouterr().err, f"sendmail: unsupported option -q{ANSI_SHOWN}")


# ---------------------------------------------------------------------------- doctor


def _hostile_report() -> Report:
    results = [
        CheckResult("config", f"config {ANSI}", Status.PASS, "[bold]cron[/] ok"),
        CheckResult(
            "tcp.connect",
            "[/] broken",
            Status.FAIL,
            f"refused by [link=http://x]y[/link] {SURROGATE}",
            why="[alert] disk full",
            fix="add an [accounts.nope] table",
        ),
    ]
    return Report("[bold]cron[/]", f"host{ANSI}", 587, results, 12.0)


def test_doctor_text_report_prints_results_as_data(capsys: pytest.CaptureFixture[str]) -> None:
    doctor_cmd.render(_hostile_report(), doctor_cmd.Format.TEXT)
    assert_literal(
        capsys.readouterr().out,
        f"smtp365 doctor: account [bold]cron[/] (host{ANSI_SHOWN}:587)",
        f"PASS  config {ANSI_SHOWN}: [bold]cron[/] ok",
        f"FAIL  [/] broken: refused by [link=http://x]y[/link] {SURROGATE_SHOWN}",
        "why: [alert] disk full",
        "fix: add an [accounts.nope] table",
        "problems found (1 pass, 1 fail)",
    )


def test_doctor_markdown_report_prints_results_as_data(capsys: pytest.CaptureFixture[str]) -> None:
    doctor_cmd.render(_hostile_report(), doctor_cmd.Format.MARKDOWN)
    assert_literal(
        capsys.readouterr().out,
        f"account `[bold]cron[/]` (host{ANSI_SHOWN}:587)",
        f"refused by [link=http://x]y[/link] {SURROGATE_SHOWN}",
    )


def test_doctor_unknown_account_error(tmp_path: Path) -> None:
    cfg = tmp_path / "smtp365.toml"
    cfg.write_text("[accounts.main]\n")
    res = cli("doctor", "--config", str(cfg), "--account", f"[/]{ANSI}", "--no-dns")
    assert res.exit_code == 78, res.output
    assert_literal(res.stderr, f"add an [accounts.[/]{ANSI_SHOWN}] table")


# ---------------------------------------------------------------------------- auth


def test_auth_status_summary_prints_claims_as_data(capsys: pytest.CaptureFixture[str]) -> None:
    auth_cmd._print_summary(
        {
            "account": "[bold]cron[/]",
            "flow": "device-code",
            "target": "smtp",
            "authority": f"https://login.test/{ANSI}",
            "client_id": "[/] broken",
            "mailbox": "a@b.test",
            "token_cache": "/tmp/[alert]/cache.json",
            "token": {
                "jwt": True,
                "app_only": False,
                "user": f"[link=http://x]y[/link]{SURROGATE}",
                "audience": "[ALERT] disk full",
                "permissions": ["SMTP.Send", "[bold]x[/]"],
                "expires_in": 3599,
                "source": "cache",
                "ok": False,
                "problems": [{"what": "[/] bad audience", "fix": "use [accounts.x] tenant"}],
                "warnings": [f"[bold]warn[/] {ANSI}"],
            },
        }
    )
    assert_literal(
        capsys.readouterr().out,
        "account      [bold]cron[/] (device-code, smtp)",
        f"authority    https://login.test/{ANSI_SHOWN}  client_id [/] broken",
        "token cache  /tmp/[alert]/cache.json",
        f"for [link=http://x]y[/link]{SURROGATE_SHOWN}, aud [ALERT] disk full",
        "scp: SMTP.Send, [bold]x[/]",
        "claims check FAIL [/] bad audience",
        "fix: use [accounts.x] tenant",
        f"warning      [bold]warn[/] {ANSI_SHOWN}",
    )


def test_auth_logout_and_wrong_auth_with_hostile_names(tmp_path: Path) -> None:
    cache = tmp_path / "[red]cron" / f"{ANSI}.json"
    cfg = tmp_path / "smtp365.toml"
    cfg.write_text(
        'default_account = "[/] oauth"\n'
        '[accounts."[/] oauth"]\nauth = "xoauth2"\nclient_id = "app"\ntenant = "contoso.test"\n'
        f"token_cache = {toml_string(str(cache))}\n"
        '[accounts."[bold]pw[/]"]\nauth = "login"\npassword_env = "NOT_SET_ANYWHERE"\n'
    )
    cache.parent.mkdir()
    cache.write_text("{}")
    out = cli("auth", "logout", "--config", str(cfg))
    assert out.exit_code == 0, out.output
    assert_literal(out.stdout, f"removed {tmp_path}/[red]cron/{ANSI_SHOWN}.json")

    wrong = cli("auth", "status", "--config", str(cfg), "--account", "[bold]pw[/]")
    assert wrong.exit_code == 78
    assert_literal(wrong.stderr, "account '[bold]pw[/]' uses auth = 'login', not OAuth2")
