"""The doctor's data: checks, their results, the shared context. No I/O, no rendering."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from smtp365.config import AccountSettings


class Status(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass
class CheckResult:
    """One check's verdict: what it saw (detail), why it matters, how to fix it."""

    id: str  # stable identifier, e.g. "tcp.connect" (part of the JSON schema)
    title: str
    status: Status
    detail: str
    why: str = ""
    fix: str = ""
    catalogue: str | None = None  # replies.py key, or "AADSTS<code>"
    data: dict[str, Any] = field(default_factory=dict)
    elapsed_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        d["elapsed_ms"] = round(self.elapsed_ms, 1)
        return d


@dataclass
class DoctorContext:
    """What every check can read, and ``facts`` that earlier checks leave for later ones
    (e.g. ``addresses``, ``starttls``, ``tls_version``, ``mechanisms``, ``token``)."""

    account: AccountSettings
    timeout: float = 10.0
    send_test: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)


class Check(Protocol):
    id: str
    title: str
    requires: tuple[str, ...]  # ids that must have passed (PASS or WARN) for this one to run

    async def run(self, ctx: DoctorContext) -> CheckResult: ...


def result(
    check: Check, status: Status, detail: str, *, why: str = "", fix: str = "", **kw: Any
) -> CheckResult:
    """Shorthand for a check building its result."""
    return CheckResult(check.id, check.title, status, detail, why=why, fix=fix, **kw)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000
