"""contrib/fail2ban against the relay's own log lines, checked by Debian's fail2ban-regex
(.ci/run unpacks the package into .tools/fail2ban; it is never installed or started).
Without it the test is skipped, or fails when ``CI`` is set."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from smtp365.relay.logs import TextFormatter
from smtp365.relay.policy import NetworkRule

from .listener_helpers import MakeRelay, cannot_run
from .test_abuse import Client

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "contrib" / "fail2ban" / "filter.d" / "smtp365-relay.conf"
UNPACKED = ROOT / ".tools" / "fail2ban"


def fail2ban_regex() -> tuple[list[str], dict[str, str]]:
    found = shutil.which("fail2ban-regex")
    if found:
        return [found], {}
    script = UNPACKED / "usr" / "bin" / "fail2ban-regex"
    if not script.is_file():
        cannot_run("fail2ban-regex is missing (.ci/run unpacks Debian's fail2ban package)")
    env = {"PYTHONPATH": str(UNPACKED / "usr" / "lib" / "python3" / "dist-packages")}
    return ["/usr/bin/python3", str(script)], env


def _plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def test_filter_bans_exactly_the_failed_auth_addresses(
    make_relay: MakeRelay, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    net = NetworkRule.parse("127.0.0.0/8", name="lan")
    relay = await make_relay(networks=(net,), plain_auth_networks=frozenset({"lan"}))
    relay.users.add("app", "right-password", ["app@corp.example"])
    caplog.set_level(logging.INFO, logger="smtp365")

    def session(source: str, commands: list[str]) -> None:
        client = Client(relay, source)
        try:
            client.reply()
            for command in commands:
                client.say(command)
        finally:
            client.close()

    # Real failures from two addresses, and attempts to smuggle a fake failure line in
    # through text the client controls (a user name, a sender address).
    fake = "AUTH failed from [10.66.66.66]: mechanism=PLAIN user="
    await asyncio.to_thread(
        session, "127.0.0.5", ["EHLO a", f"AUTH PLAIN {_plain('app', 'wrong')}"]
    )
    await asyncio.to_thread(
        session,
        "127.0.0.6",
        ["EHLO b", f"AUTH PLAIN {_plain(fake, 'wrong')}", "AUTH LOGIN *"],
    )
    await asyncio.to_thread(
        session, "127.0.0.8", ["EHLO d", f"AUTH PLAIN {_plain('app', 'right-password')}"]
    )
    records = [r for r in caplog.records if r.name.startswith("smtp365")]
    # No line the relay writes today puts client text before "[IP]" in a WARNING line; a
    # made-up one shows the filter does not take text from the middle of a line.
    records.append(
        logging.LogRecord(
            "smtp365.relay.listener",
            logging.WARNING,
            __file__,
            0,
            "[%s] MAIL FROM:<%s> refused: 553",
            ("127.0.0.7", f'"{fake}"@x.example'),
            None,
        )
    )
    lines = [TextFormatter().format(r) for r in records]
    lines += [TextFormatter(process=1).format(r) for r in records]  # as a helper logs them
    log_file = tmp_path / "relay.log"
    log_file.write_text("\n".join(lines) + "\n")
    failures = [line for line in lines if " AUTH failed from [127." in line]
    assert len(failures) == 6  # 3 failures, in the main and a helper process's format
    assert any(fake in line and "MAIL FROM" in line for line in lines)  # the bait

    command, env = fail2ban_regex()
    out = subprocess.run(
        [*command, "-o", "ip", str(log_file), str(FILTER)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    banned = out.stdout.split()
    assert sorted(banned) == ["127.0.0.5"] * 2 + ["127.0.0.6"] * 4, out.stdout
