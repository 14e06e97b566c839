"""Run checks in order; a failure skips what depends on it and still runs what does not."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from smtp365.doctor.model import Check, CheckResult, DoctorContext, Status, Stopwatch
from smtp365.errors import Smtp365Error


async def run_checks(checks: Sequence[Check], ctx: DoctorContext) -> list[CheckResult]:
    results: list[CheckResult] = []
    by_id: dict[str, CheckResult] = {}
    for check in checks:
        blocked = [
            r
            for r in (by_id.get(dep) for dep in check.requires)
            if r is None or r.status in (Status.FAIL, Status.SKIP)
        ]
        if blocked:
            names = ", ".join(r.id for r in blocked if r is not None) or ", ".join(check.requires)
            res = CheckResult(check.id, check.title, Status.SKIP, f"skipped: depends on {names}")
        else:
            watch = Stopwatch()
            try:
                # Every check carries its own timeouts; this is only the last line of defence
                # against a hang (the doctor must always answer).
                res = await asyncio.wait_for(check.run(ctx), timeout=ctx.timeout * 3 + 5)
            except TimeoutError:
                res = CheckResult(
                    check.id,
                    check.title,
                    Status.FAIL,
                    f"no answer within {ctx.timeout * 3 + 5:g} s",
                    fix="the server or network hangs; try again, or from another network",
                )
            except Smtp365Error as exc:
                res = CheckResult(check.id, check.title, Status.FAIL, exc.what, fix=exc.fix)
            res.elapsed_ms = watch.ms
        results.append(res)
        by_id[check.id] = res
    return results


def exit_code(results: Sequence[CheckResult]) -> int:
    """0 when nothing failed, 1 otherwise (the CLI maps it)."""
    return 1 if any(r.status is Status.FAIL for r in results) else 0
