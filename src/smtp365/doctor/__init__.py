"""``smtp365 doctor``: ordered checks that find out why mail does not leave, with the fix."""

from __future__ import annotations

import time

from smtp365.config import Settings
from smtp365.config.check import check as check_config
from smtp365.doctor.checks_auth import ConfigCheck, auth_checks
from smtp365.doctor.dnsrecords import check_domain
from smtp365.doctor.model import Check, CheckResult, DoctorContext, Status
from smtp365.doctor.network import network_checks
from smtp365.doctor.report import Report
from smtp365.doctor.runner import run_checks
from smtp365.errors import ConfigError


def all_checks() -> list[Check]:
    return [ConfigCheck(), *network_checks(), *auth_checks()]


async def run_doctor(
    settings: Settings,
    account: str | None = None,
    *,
    timeout: float = 10.0,
    send_test: str | None = None,
    dns: bool = True,
    nameserver: str | None = None,
    dns_port: int = 53,
) -> Report:
    """Run every check for ``account``; with ``dns``, also the sender domain's DNS records."""
    started = time.perf_counter()
    try:
        acc = settings.account(account)
    except ConfigError as exc:  # still a report, so --json keeps its schema
        failed = CheckResult("config", ConfigCheck.title, Status.FAIL, exc.what, fix=exc.fix)
        name = account or settings.default_account
        return Report(name, "", 0, [failed], (time.perf_counter() - started) * 1000)
    ctx = DoctorContext(acc, timeout=timeout, send_test=send_test)
    ctx.facts["config_findings"] = check_config(settings, account)
    try:
        results = await run_checks(all_checks(), ctx)
    finally:
        transport = ctx.facts.get("transport")
        if transport is not None:
            await transport.close()
    domain = (acc.sender or "").rpartition("@")[2]
    if dns and domain:
        results += await check_domain(
            domain, nameserver=nameserver, port=dns_port, timeout=min(timeout, 5.0)
        )
    return Report(acc.name, acc.host, acc.port, results, (time.perf_counter() - started) * 1000)


__all__ = [
    "Check",
    "CheckResult",
    "DoctorContext",
    "Report",
    "Status",
    "all_checks",
    "check_domain",
    "run_doctor",
]
