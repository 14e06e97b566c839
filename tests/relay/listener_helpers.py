"""Helpers for the listener tests: a relay on 127.0.0.1 port 0 over a real SQLite queue."""

from __future__ import annotations

import os
import smtplib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trustme
from argon2 import PasswordHasher

from smtp365.relay.listener import Limits, ListenerConfig, RelayListener
from smtp365.relay.policy import NetworkRule, RelayPolicy
from smtp365.relay.queue.sqlite import SqliteQueue
from smtp365.relay.users import UserDB

HOSTNAME = "relay.test"
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)


@dataclass
class Relay:
    listener: RelayListener
    queue: SqliteQueue
    users: UserDB
    ca: trustme.CA
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.listener.port

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def connect(self) -> smtplib.SMTP:
        if self.listener.config.mode == "tls":
            return smtplib.SMTP_SSL(
                "127.0.0.1", self.port, timeout=10, context=self.client_context()
            )
        return smtplib.SMTP("127.0.0.1", self.port, timeout=10)


MakeRelay = Callable[..., Awaitable[Relay]]


def cannot_run(reason: str) -> NoReturn:
    """Skip a test that needs what this machine lacks; fail it when ``CI`` is set (.ci/run
    sets it), where a defence's test must never be skipped unnoticed."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: this test must run)")
    pytest.skip(reason)


@asynccontextmanager
async def relay_factory(tmp_path: Path) -> AsyncIterator[MakeRelay]:
    made: list[Relay] = []
    ca = trustme.CA()
    cert = ca.issue_cert(HOSTNAME, "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))

    async def make(
        *,
        mode: str = "plain",
        networks: tuple[NetworkRule, ...] = (),
        limits: Limits | None = None,
        **config: Any,
    ) -> Relay:
        n = len(made)
        queue = await SqliteQueue.open(tmp_path / f"queue{n}")
        users = UserDB(tmp_path / f"users{n}.json", hasher=FAST_HASHER)
        cfg = ListenerConfig(
            host="127.0.0.1",
            port=0,
            mode=mode,  # type: ignore[arg-type]
            hostname=HOSTNAME,
            cert_file=cert_file,
            key_file=key_file,
            limits=limits or Limits(auth_delay=0.001),
            **config,
        )
        listener = RelayListener(cfg, queue=queue, policy=RelayPolicy(networks), users=users)
        await listener.start()
        relay = Relay(listener, queue, users, ca)
        made.append(relay)
        return relay

    try:
        yield make
    finally:
        for relay in made:
            await relay.listener.stop()
            await relay.queue.close()


LOCALHOST = NetworkRule.parse("127.0.0.0/8", name="lan")
