"""The per-address table behind the listener's connection and AUTH limits, shared by the
relay's processes."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from smtp365.relay.clients import ClientTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tiny(ClientTable):
    SLOTS = 4
    PROBE = 4


def test_connections_are_counted_per_address() -> None:
    table = ClientTable()
    assert [table.connect("192.0.2.1") for _ in range(3)] == [1, 2, 3]
    assert table.connect("2001:db8::1") == 1
    table.disconnect("192.0.2.1")
    assert table.connections("192.0.2.1") == 2
    assert table.connections("2001:db8::1") == 1
    assert table.connections("192.0.2.99") == 0
    table.disconnect("192.0.2.99")  # never seen: nothing to do, no slot taken
    assert table.connections("192.0.2.99") == 0


def test_auth_failures_are_those_of_the_last_minute() -> None:
    clock = Clock()
    table = ClientTable(clock=clock)
    assert [table.add_auth_failure("192.0.2.1") for _ in range(3)] == [1, 2, 3]
    clock.now += 30
    assert table.add_auth_failure("192.0.2.1") == 4
    assert table.auth_failures("192.0.2.2") == 0
    clock.now += 31  # the first three are now older than a minute
    assert table.auth_failures("192.0.2.1") == 1
    clock.now += 30
    assert table.auth_failures("192.0.2.1") == 0


def test_a_burst_of_failures_is_held_up_to_the_ring() -> None:
    table = ClientTable(clock=Clock())
    counts = [table.add_auth_failure("192.0.2.1") for _ in range(ClientTable.RING + 5)]
    assert counts[: ClientTable.RING] == list(range(1, ClientTable.RING + 1))
    assert set(counts[ClientTable.RING :]) == {ClientTable.RING}


def test_idle_slots_are_reused_and_a_full_window_counts_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    table = Tiny(clock=clock)
    for i in range(4):
        assert table.connect(f"192.0.2.{i}") == 1
    assert table.add_auth_failure("192.0.2.0") == 1
    with caplog.at_level(logging.WARNING):
        assert table.connect("198.51.100.1") == 0  # no slot: not counted, and said once
        assert table.connect("198.51.100.2") == 0
    assert [r.message for r in caplog.records].count(
        "client table: 4 busy addresses collide; new ones go uncounted"
    ) == 1
    table.disconnect("192.0.2.0")  # no connection, but a failure in the last minute: kept
    assert table.connect("198.51.100.1") == 0
    table.disconnect("192.0.2.1")  # idle: its slot goes to the next new address
    assert table.connect("198.51.100.1") == 1
    assert table.connections("192.0.2.1") == 0
    clock.now += 61  # 192.0.2.0's failure has aged out: its slot is free too
    assert table.connect("198.51.100.2") == 1
    assert table.auth_failures("192.0.2.0") == 0
    assert table.connections("192.0.2.2") == table.connections("192.0.2.3") == 1


def test_a_closed_table_counts_nothing() -> None:
    table = ClientTable.shared()
    table.connect("192.0.2.1")
    table.close()
    assert table.fileno() is None
    assert table.connect("192.0.2.1") == 0
    table.disconnect("192.0.2.1")
    assert table.auth_failures("192.0.2.1") == 0


_CHILD = """
import sys
from smtp365.relay.clients import ClientTable
table = ClientTable(int(sys.argv[1]))
sys.stdin.readline()  # start together
for _ in range(int(sys.argv[2])):
    table.connect("192.0.2.7")
    table.add_auth_failure("192.0.2.8")
print(table.connections("192.0.2.7"))
"""


def test_processes_share_one_table_without_losing_updates() -> None:
    table = ClientTable.shared()
    fd = table.fileno()
    assert fd is not None
    try:
        table.connect("192.0.2.7")
        children = [
            subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(fd), "2000"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=[fd],
                text=True,
            )
            for _ in range(2)
        ]
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        seen = [int(child.communicate(timeout=60)[0]) for child in children]
        assert all(child.returncode == 0 for child in children)
        assert table.connections("192.0.2.7") == 4001  # each read-modify-write under the lock
        assert max(seen) == 4001
        assert table.auth_failures("192.0.2.8") == ClientTable.RING
    finally:
        table.close()
