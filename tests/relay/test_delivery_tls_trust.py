"""The relay meets an upstream certificate it does not trust: the account is refused, not the
message, and someone is told (the worker's ``_account_refused``), instead of a quiet deferral
per attempt that no retry can ever end."""

from __future__ import annotations

import random
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from smtp365.config import AccountSettings
from smtp365.models import Envelope
from smtp365.relay.backoff import Backoff
from smtp365.relay.queue import Bounce, QueuedMessage, State
from smtp365.relay.queue.sqlite import SqliteQueue
from smtp365.relay.ratelimit import RateLimiter
from smtp365.relay.worker import Result, Worker
from tests.fakesmtp import FakeSMTPServer, Script
from tests.relay.conftest import FakeClock

ALICE = "alice@contoso.test"


@pytest.fixture
async def queue(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SqliteQueue]:
    q = await SqliteQueue.open(tmp_path / "queue", clock=clock)
    yield q
    await q.close()


def _alerts(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT")]


@pytest.mark.parametrize("problem", ["untrusted-chain", "wrong-host-name"])
async def test_an_untrusted_upstream_certificate_pauses_the_account_with_an_alert(
    queue: SqliteQueue,
    clock: FakeClock,
    server_context: Callable[..., ssl.SSLContext],
    make_account: Callable[..., AccountSettings],
    caplog: pytest.LogCaptureFixture,
    problem: str,
) -> None:
    names = ("mail.other.test",) if problem == "wrong-host-name" else ()
    overrides = {"ca_file": None} if problem == "untrusted-chain" else {}
    failed: list[str] = []

    async def on_failed(msg: QueuedMessage, reason: str, rcpts: tuple[str, ...]) -> Bounce | None:
        failed.append(reason)
        return None

    async with FakeSMTPServer(Script(tls_context=server_context(*names))) as server:
        account = make_account(server.port, username=ALICE, **overrides)
        worker = Worker(
            queue,
            {"alice": account},
            limiter=RateLimiter(clock=clock.monotonic),
            backoff=Backoff(base=60, cap=240, rng=random.Random(1)),
            clock=clock,
            on_failed=on_failed,
        )
        qid = await queue.enqueue(
            Envelope(ALICE, ("x@example.net",)), b"Subject: s\r\n\r\nbody\r\n", message_id="<m@t>"
        )
        [msg] = await queue.claim(1, 30)
        t0 = clock.now
        try:
            assert await worker.deliver(msg, "alice") is Result.DEFERRED
        finally:
            await worker.close()

    # the message waits (never failed for the account's trouble), the mailbox is paused
    stored = await queue.get(qid)
    assert stored is not None and stored.state is State.DEFERRED and not failed
    assert stored.next_attempt_at == t0 + 60
    assert stored.last_reason.startswith("TLSError: TLS certificate of localhost:")
    assert worker.limiter.paused_until(ALICE) == t0 + 60
    # and someone is told what to change
    [alert] = _alerts(caplog)
    assert alert.startswith(f"ALERT {ALICE} cannot send: TLS certificate of localhost:")
    assert "its mail waits; paused for 60 s, refusal 1" in alert
    if problem == "untrusted-chain":
        assert "fix: the server's certificate chain is not trusted" in alert and "ca_file" in alert
    else:
        assert "fix: the certificate is not valid for 'localhost'" in alert
    verbs = {c.split(" ", 1)[0].upper() for c in server.commands}
    assert not {"AUTH", "MAIL", "RCPT"} & verbs
