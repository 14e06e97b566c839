"""Every queue backend against the one contract (see queue_contract.py)."""

from __future__ import annotations

from tests.relay.queue_contract import QueueContract


class TestQueueContract(QueueContract):
    pass
