"""``smtp365 queue``: the operator's view of the relay's queue, run as a process on a real
SQLite queue built here (and once next to another open handle, as with a running relay)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from smtp365.models import Envelope
from smtp365.relay.queue import Event, State
from smtp365.relay.queue.sqlite import SqliteQueue
from tests.e2e.conftest import Result, Run

ENVELOPE = Envelope("app@contoso.test", ("a@example.test", "b@example.test"))
PENDING = {"queued", "active", "deferred", "held"}
MESSAGE_KEYS = {
    "id",
    "state",
    "attempts",
    "sender",
    "recipients",
    "size",
    "received_at",
    "age",
    "next_attempt_at",
    "lease_until",
    "finished_at",
    "last_reason",
    "account",
    "client",
    "message_id",
    "content_path",
}
UNKNOWN = "01J0000000000000000000NONE"


class Clock:
    """A wall clock the test sets: messages received minutes (or days) ago."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def body(tag: str, size: int = 0) -> bytes:
    head = f"From: app@contoso.test\r\nTo: a@example.test\r\nSubject: {tag}\r\n"
    return (head + f"Message-ID: <{tag}@contoso.test>\r\n\r\nbody of {tag}\r\n").encode() + (
        b"x" * size
    )


async def build(root: Path, *, age: float = 600.0) -> dict[str, str]:
    """One message per state but active, received ``age`` seconds ago, a minute apart."""
    clock = Clock(time.time() - age)
    queue = await SqliteQueue.open(root, clock=clock)
    ids: dict[str, str] = {}
    try:

        async def enqueue(tag: str, size: int = 0) -> str:
            clock.now += 60
            return await queue.enqueue(
                ENVELOPE,
                body(tag, size),
                message_id=f"<{tag}@contoso.test>",
                account="alice",
                client="printer",
            )

        ids["deferred"] = await enqueue("deferred")
        [msg] = await queue.claim(1, 60)
        assert msg.id == ids["deferred"]
        await queue.defer(msg.id, until=time.time() + 3600, reason="421 4.7.0 try again later")

        ids["failed"] = await enqueue("failed")
        [msg] = await queue.claim(1, 60)
        assert msg.id == ids["failed"]
        await queue.fail(msg.id, reason="550 5.1.1 no such user")

        ids["delivered"] = await enqueue("delivered")
        [msg] = await queue.claim(1, 60)
        assert msg.id == ids["delivered"]
        await queue.complete(msg.id, reply="250 2.0.0 OK <x@example.test>")

        ids["held"] = await enqueue("held", 100_000)  # a spool file
        await queue.hold(ids["held"])

        ids["queued"] = await enqueue("queued")
    finally:
        await queue.close()
    return ids


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def ids(state_dir: Path) -> dict[str, str]:
    return await build(state_dir / "queue")


async def queue_cli(run_cli: Run, state_dir: Path, *args: str) -> Result:
    return await run_cli("queue", *args, "--state-dir", str(state_dir))


async def json_of(run_cli: Run, state_dir: Path, *args: str) -> Any:
    result = await queue_cli(run_cli, state_dir, *args, "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


async def states(run_cli: Run, state_dir: Path) -> dict[str, str]:
    data = await json_of(run_cli, state_dir, "list", "--all")
    return {m["id"]: m["state"] for m in data["messages"]}


# ---------------------------------------------------------------------------- list


async def test_list_json_shows_pending_messages_by_default(
    run_cli: Run, state_dir: Path, ids: dict[str, str]
) -> None:
    data = await json_of(run_cli, state_dir, "list")
    assert data["queue"] == str(state_dir / "queue")
    assert set(data["states"]) == PENDING
    messages = data["messages"]
    assert [m["id"] for m in messages] == [ids["deferred"], ids["held"], ids["queued"]]
    for m in messages:
        assert set(m) == MESSAGE_KEYS
        assert m["sender"] == "app@contoso.test"
        assert m["recipients"] == ["a@example.test", "b@example.test"]
        assert m["account"] == "alice" and m["client"] == "printer"
        assert 0 < m["age"] < 700
    deferred, held, queued = messages
    assert deferred["state"] == "deferred" and deferred["attempts"] == 1
    assert deferred["last_reason"] == "421 4.7.0 try again later"
    assert deferred["next_attempt_at"] > time.time() + 3000
    assert deferred["size"] == len(body("deferred"))
    assert held["state"] == "held" and held["content_path"]
    assert held["size"] == len(body("held", 100_000))
    assert queued["state"] == "queued" and queued["attempts"] == 0
    assert queued["message_id"] == "<queued@contoso.test>"


async def test_list_all_state_and_limit(run_cli: Run, state_dir: Path, ids: dict[str, str]) -> None:
    every = await json_of(run_cli, state_dir, "list", "--all")
    assert [m["id"] for m in every["messages"]] == sorted(ids.values())
    assert {m["state"] for m in every["messages"]} == set(ids)

    log = await json_of(run_cli, state_dir, "list", "--state", "failed", "-s", "DELIVERED")
    assert [m["id"] for m in log["messages"]] == [ids["failed"], ids["delivered"]]
    [delivered] = [m for m in log["messages"] if m["state"] == "delivered"]
    assert delivered["last_reason"].startswith("250 2.0.0 OK")
    assert delivered["finished_at"] is not None and delivered["content_path"] is None

    first = await json_of(run_cli, state_dir, "list", "--all", "--limit", "2")
    assert [m["id"] for m in first["messages"]] == [ids["deferred"], ids["failed"]]
    pending = await json_of(run_cli, state_dir, "list", "--limit", "2")
    assert [m["id"] for m in pending["messages"]] == [ids["deferred"], ids["held"]]

    bad = await queue_cli(run_cli, state_dir, "list", "--state", "lost")
    assert bad.code == 64 and "Traceback" not in bad.stderr


async def test_list_human(run_cli: Run, state_dir: Path, ids: dict[str, str]) -> None:
    result = await queue_cli(run_cli, state_dir, "list")
    assert result.code == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "ATT"]
    assert len(rows) == 3
    by_id = {row.split()[0]: row for row in rows}
    assert set(by_id) == {ids["deferred"], ids["held"], ids["queued"]}
    deferred = by_id[ids["deferred"]]
    assert " deferred " in deferred and "a@example.test +1" in deferred
    assert "next in 59m" in deferred or "next in 1h" in deferred
    assert "421 4.7.0 try again later" in deferred
    assert "97.8 KiB" in by_id[ids["held"]]
    assert "due now" in by_id[ids["queued"]]
    assert ids["failed"] not in result.stdout

    everything = await queue_cli(run_cli, state_dir, "list", "--all")
    assert "550 5.1.1 no such user" in everything.stdout
    assert ids["delivered"] in everything.stdout

    none = await queue_cli(run_cli, state_dir, "list", "--state", "active")
    assert none.code == 0 and none.stdout.startswith("no active messages in ")


# ---------------------------------------------------------------------------- show


async def test_show_every_field_and_history(
    run_cli: Run, state_dir: Path, ids: dict[str, str]
) -> None:
    data = await json_of(run_cli, state_dir, "show", ids["failed"])
    assert set(data) == MESSAGE_KEYS | {"history"}
    assert data["state"] == "failed" and data["last_reason"] == "550 5.1.1 no such user"
    [entry] = data["history"]
    assert set(entry) == {"at", "event", "attempt", "detail", "duration"}
    assert entry["event"] == "failed" and entry["attempt"] == 1
    assert entry["detail"] == "550 5.1.1 no such user"
    assert entry["duration"] == 0.0  # the test's clock did not move between claim and fail

    result = await queue_cli(run_cli, state_dir, "show", ids["deferred"].lower())
    assert result.code == 0, result.stderr
    text = result.stdout
    for line in (
        f"id            {ids['deferred']}",
        "state         deferred",
        "attempts      1",
        "sender        <app@contoso.test>",
        "recipients    a@example.test, b@example.test",
        "account       alice",
        "client        printer",
        "message-id    <deferred@contoso.test>",
        "content       in queue.db",
    ):
        assert line in text
    assert "next attempt  " in text and "(in 59m" in text
    assert "history:" in text
    assert "deferred   attempt 1" in text and "421 4.7.0 try again later" in text
    assert "Subject:" not in text  # content only with --content


async def test_show_content_prints_the_header_section(
    run_cli: Run, state_dir: Path, ids: dict[str, str]
) -> None:
    result = await queue_cli(run_cli, state_dir, "show", ids["held"], "--content")
    assert result.code == 0, result.stderr
    assert "  | Subject: held" in result.stdout
    assert "  | Message-ID: <held@contoso.test>" in result.stdout
    assert "body of held" not in result.stdout
    assert f"spool file {state_dir / 'queue' / 'spool' / ids['held']}" in result.stdout

    data = await json_of(run_cli, state_dir, "show", ids["queued"], "--content")
    assert data["headers"].splitlines()[2] == "Subject: queued"
    gone = await json_of(run_cli, state_dir, "show", ids["delivered"], "--content")
    assert gone["headers"] is None
    assert "headers" not in await json_of(run_cli, state_dir, "show", ids["queued"])


# ---------------------------------------------------------------------------- acts


async def test_retry_one_message(run_cli: Run, state_dir: Path, ids: dict[str, str]) -> None:
    before = time.time()
    data = await json_of(run_cli, state_dir, "retry", ids["deferred"])
    assert data["ok"] and data["action"] == "retried" and data["was"] == "deferred"
    assert data["message"]["state"] == "deferred"
    assert before - 1 <= data["message"]["next_attempt_at"] <= time.time()
    assert data["warnings"] == []

    result = await queue_cli(run_cli, state_dir, "retry", ids["failed"])
    assert result.code == 0, result.stderr
    assert f"retried {ids['failed']}: failed -> queued and due now" in result.stdout

    queue = await SqliteQueue.open(state_dir / "queue")
    try:
        failed = await queue.get(ids["failed"])
        assert failed is not None and failed.state is State.QUEUED
        assert failed.finished_at is None and failed.next_attempt_at <= time.time()
        assert [e.event for e in await queue.history(ids["failed"])] == [
            Event.FAILED,
            Event.RETRIED,
        ]
        # due now: the relay's next claim takes both
        claimed = await queue.claim(10, 60)
        assert {m.id for m in claimed} == {ids["deferred"], ids["failed"], ids["queued"]}
    finally:
        await queue.close()


async def test_retry_refusals(run_cli: Run, state_dir: Path, ids: dict[str, str]) -> None:
    held = await queue_cli(run_cli, state_dir, "retry", ids["held"])
    assert held.code == 65
    assert "held; release it instead" in held.stderr and "Traceback" not in held.stderr
    delivered = await queue_cli(run_cli, state_dir, "retry", ids["delivered"], "--json")
    assert delivered.code == 65
    error = json.loads(delivered.stdout)
    assert error["ok"] is False and error["exit_code"] == 65
    assert "delivered; nothing to retry" in error["what"]

    both = await queue_cli(run_cli, state_dir, "retry", ids["deferred"], "--all")
    neither = await queue_cli(run_cli, state_dir, "retry")
    assert both.code == neither.code == 64
    assert "--all" in both.stderr
    assert (await states(run_cli, state_dir))[ids["deferred"]] == "deferred"


async def test_retry_all_makes_every_deferred_message_due(
    run_cli: Run, state_dir: Path, ids: dict[str, str]
) -> None:
    queue = await SqliteQueue.open(state_dir / "queue")
    try:
        [claimed] = await queue.claim(1, 60)  # the queued one
        await queue.defer(claimed.id, until=time.time() + 3600, reason="452 4.5.3 later")
    finally:
        await queue.close()

    data = await json_of(run_cli, state_dir, "retry", "--all")
    assert data["ids"] == [ids["deferred"], ids["queued"]] and data["skipped"] == []
    listed = await json_of(run_cli, state_dir, "list", "--state", "deferred")
    assert all(m["next_attempt_at"] <= time.time() for m in listed["messages"])
    assert (await states(run_cli, state_dir))[ids["failed"]] == "failed"  # not failed ones

    again = await queue_cli(run_cli, state_dir, "retry", "--all")
    assert again.code == 0 and "2 deferred message(s) due now" in again.stdout


async def test_retry_of_an_expired_message_warns(run_cli: Run, state_dir: Path) -> None:
    ids = await build(state_dir / "queue", age=6 * 86_400)  # older than the 5-day lifetime
    result = await queue_cli(run_cli, state_dir, "retry", ids["failed"])
    assert result.code == 0, result.stderr
    assert "older than the relay's max_queue_lifetime (5d00h)" in result.stderr
    assert "[relay] max_queue_lifetime" in result.stderr
    fresh = await json_of(run_cli, state_dir, "retry", ids["deferred"])
    assert fresh["warnings"] == []  # only failed messages fail again at once


async def test_hold_and_release(run_cli: Run, state_dir: Path, ids: dict[str, str]) -> None:
    result = await queue_cli(run_cli, state_dir, "hold", ids["deferred"])
    assert result.code == 0, result.stderr
    assert f"held {ids['deferred']}: deferred -> held" in result.stdout
    again = await queue_cli(run_cli, state_dir, "hold", ids["deferred"])
    assert again.code == 0 and "was already held" in again.stdout
    assert (await states(run_cli, state_dir))[ids["deferred"]] == "held"

    data = await json_of(run_cli, state_dir, "release", ids["deferred"])
    assert data["was"] == "held" and data["message"]["state"] == "queued"
    assert data["message"]["next_attempt_at"] <= time.time()

    not_held = await queue_cli(run_cli, state_dir, "release", ids["queued"])
    assert not_held.code == 65 and "not held but queued" in not_held.stderr
    finished = await queue_cli(run_cli, state_dir, "hold", ids["delivered"])
    assert finished.code == 65 and "already delivered" in finished.stderr

    queue = await SqliteQueue.open(state_dir / "queue")
    try:
        events = [e.event for e in await queue.history(ids["deferred"])]
        assert events == [Event.DEFERRED, Event.HELD, Event.RELEASED]
    finally:
        await queue.close()


async def test_delete_says_what_it_removed(
    run_cli: Run, state_dir: Path, ids: dict[str, str]
) -> None:
    spool = state_dir / "queue" / "spool" / ids["held"]
    assert spool.exists()
    result = await queue_cli(run_cli, state_dir, "delete", ids["held"])
    assert result.code == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"deleted {ids['held']} (held, 0 attempt(s), 97.8 KiB")
    assert "from <app@contoso.test> to a@example.test +1" in line
    assert not spool.exists()
    assert ids["held"] not in await states(run_cli, state_dir)

    data = await json_of(run_cli, state_dir, "delete", ids["failed"])
    assert data["action"] == "deleted" and data["was"] == "failed"
    assert data["message"]["last_reason"] == "550 5.1.1 no such user"

    shown = await queue_cli(run_cli, state_dir, "show", ids["held"])
    assert shown.code == 65
    assert f"no message {ids['held']!r} in the queue (last event: deleted at " in shown.stderr


# ---------------------------------------------------------------------------- stats


async def test_stats(run_cli: Run, state_dir: Path, ids: dict[str, str]) -> None:
    data = await json_of(run_cli, state_dir, "stats")
    assert data["counts"] == {
        "queued": 1,
        "active": 0,
        "deferred": 1,
        "held": 1,
        "delivered": 1,
        "failed": 1,
    }
    assert data["pending"] == 3
    assert data["pending_bytes"] == sum(
        len(body(tag, size)) for tag, size in (("deferred", 0), ("held", 100_000), ("queued", 0))
    )
    # the deferred message came first, 540 s ago
    assert 530 < data["oldest_pending_age"] < 600
    assert abs(time.time() - data["oldest_pending_at"] - data["oldest_pending_age"]) < 30

    result = await queue_cli(run_cli, state_dir, "stats")
    assert result.code == 0, result.stderr
    assert "deferred        1" in result.stdout
    assert "pending         3 message(s), 98.0 KiB; oldest received " in result.stdout


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("command", ["show", "retry", "hold", "release", "delete"])
async def test_unknown_id(run_cli: Run, state_dir: Path, ids: dict[str, str], command: str) -> None:
    result = await queue_cli(run_cli, state_dir, command, UNKNOWN)
    assert result.code == 65
    assert f"no message {UNKNOWN!r} in the queue" in result.stderr
    assert "smtp365 queue list" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""

    as_json = await queue_cli(run_cli, state_dir, command, UNKNOWN, "--json")
    assert as_json.code == 65
    error = json.loads(as_json.stdout)
    assert error["ok"] is False and error["exit_code"] == 65
    assert error["error"] == "QueueError" and UNKNOWN in error["what"]


async def test_no_queue_is_an_error_not_an_empty_queue(run_cli: Run, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for command in (["list"], ["stats"], ["show", UNKNOWN], ["retry", "--all"]):
        result = await queue_cli(run_cli, missing, *command)
        assert result.code == 66, command
        assert f"no relay queue in {missing}" in result.stderr
        assert "start the relay first (smtp365 relay) or pass --state-dir" in result.stderr
        assert "Traceback" not in result.stderr
    as_json = await queue_cli(run_cli, missing, "list", "--json")
    assert as_json.code == 66 and json.loads(as_json.stdout)["exit_code"] == 66
    assert not missing.exists()


async def test_state_dir_from_the_config_and_the_default(run_cli: Run, tmp_path: Path) -> None:
    from_config = tmp_path / "from-config"
    ids = await build(from_config / "queue")
    config = tmp_path / "etc" / "relay.toml"  # not ./smtp365.toml: found without --config
    config.parent.mkdir()
    config.write_text(f'[relay]\nstate_dir = "{from_config}"\n', encoding="utf-8")
    result = await run_cli("queue", "list", "--json", "--config", str(config))
    assert result.code == 0, result.stderr
    assert len(json.loads(result.stdout)["messages"]) == 3

    xdg = {"XDG_STATE_HOME": str(tmp_path / "xdg-state")}
    nothing = await run_cli("queue", "stats", env=xdg)
    default = tmp_path / "xdg-state" / "smtp365" / "relay"
    assert nothing.code == 66 and f"no relay queue in {default}" in nothing.stderr
    await build(default / "queue")
    found = await run_cli("queue", "stats", "--json", env=xdg)
    assert found.code == 0, found.stderr
    assert json.loads(found.stdout)["queue"] == str(default / "queue")
    assert ids  # the first queue was untouched by the second


async def test_works_while_another_process_has_the_queue_open(
    run_cli: Run, state_dir: Path, ids: dict[str, str]
) -> None:
    """As next to a running relay: no recovery (the relay's leases stay), both keep working."""
    queue = await SqliteQueue.open(state_dir / "queue")
    try:
        [active] = await queue.claim(1, 600)
        assert active.id == ids["queued"]

        data = await json_of(run_cli, state_dir, "list")
        listed = {m["id"]: m for m in data["messages"]}
        assert listed[active.id]["state"] == "active"
        assert listed[active.id]["lease_until"] > time.time()
        held = await queue_cli(run_cli, state_dir, "release", ids["held"])
        assert held.code == 0, held.stderr

        # the handle that stayed open sees the change and still writes
        released = await queue.get(ids["held"])
        assert released is not None and released.state is State.QUEUED
        await queue.complete(active.id, reply="250 2.0.0 OK")
        later = await queue.enqueue(ENVELOPE, body("later"))
        got = await queue.get(later)
        assert got is not None and got.state is State.QUEUED
    finally:
        await queue.close()
    stats = await json_of(run_cli, state_dir, "stats")
    assert stats["counts"]["active"] == 0 and stats["counts"]["delivered"] == 2
