"""The doctor's report as data: a stable JSON document and Markdown for support tickets.

JSON schema (``version`` 1)::

    {"version": 1, "account": str, "host": str, "port": int, "ok": bool,
     "elapsed_ms": float,
     "counts": {"pass": int, "warn": int, "fail": int, "skip": int},
     "checks": [{"id": str, "title": str, "status": "pass"|"warn"|"fail"|"skip",
                 "detail": str, "why": str, "fix": str, "catalogue": str|null,
                 "data": {...}, "elapsed_ms": float}, ...]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smtp365.doctor.model import CheckResult, Status

SCHEMA_VERSION = 1
MARKS = {Status.PASS: "PASS", Status.WARN: "WARN", Status.FAIL: "FAIL", Status.SKIP: "SKIP"}


@dataclass
class Report:
    account: str
    host: str
    port: int
    results: list[CheckResult]
    elapsed_ms: float

    @property
    def ok(self) -> bool:
        return not any(r.status is Status.FAIL for r in self.results)

    def counts(self) -> dict[str, int]:
        return {s.value: sum(r.status is s for r in self.results) for s in Status}

    def get(self, check_id: str) -> CheckResult:
        return next(r for r in self.results if r.id == check_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "account": self.account,
            "host": self.host,
            "port": self.port,
            "ok": self.ok,
            "elapsed_ms": round(self.elapsed_ms, 1),
            "counts": self.counts(),
            "checks": [r.as_dict() for r in self.results],
        }

    def to_markdown(self) -> str:
        lines = [
            f"## smtp365 doctor: account `{self.account}` ({self.host}:{self.port})",
            "",
            f"**{'OK' if self.ok else 'FAILED'}** — "
            + ", ".join(f"{n} {k}" for k, n in self.counts().items() if n),
            "",
            "| | check | result |",
            "|---|---|---|",
        ]
        for r in self.results:
            detail = r.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {MARKS[r.status]} | {r.title} (`{r.id}`) | {detail} |")
        problems = [r for r in self.results if r.status in (Status.FAIL, Status.WARN) and r.fix]
        if problems:
            lines += ["", "### What to do", ""]
            for r in problems:
                why = f" — {r.why}" if r.why else ""
                lines.append(f"- **{r.title}** ({MARKS[r.status]}){why}. Fix: {r.fix}")
        return "\n".join(lines) + "\n"
