"""``smtp365 doctor`` and ``smtp365 doctor dns DOMAIN``."""

from __future__ import annotations

import asyncio
import time
from enum import StrEnum
from typing import Annotated

import typer

from smtp365.cli.output import Part, fail, print_json, say
from smtp365.cli.send import AccountOpt, ConfigOpt
from smtp365.config import load
from smtp365.doctor import Report, Status, check_domain, run_doctor
from smtp365.errors import Smtp365Error

app = typer.Typer(
    help="Find out why mail does not leave, and how to fix it.", invoke_without_command=True
)

_STYLE: dict[Status, Part] = {
    Status.PASS: ("PASS", "green"),
    Status.WARN: ("WARN", "yellow"),
    Status.FAIL: ("FAIL", "bold red"),
    Status.SKIP: ("SKIP", "dim"),
}


class Format(StrEnum):
    TEXT = "text"
    JSON = "json"
    MARKDOWN = "markdown"


FormatOpt = Annotated[Format, typer.Option("--format", help="text, json or markdown")]
JsonOpt = Annotated[bool, typer.Option("--json", help="same as --format json")]
NameserverOpt = Annotated[
    str | None,
    typer.Option("--nameserver", help="DNS server to ask, IP[:PORT] (default: the system's)"),
]


def _nameserver(value: str | None) -> tuple[str | None, int]:
    if not value:
        return None, 53
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and "." in host or (sep and host.startswith("[")):
        return host.strip("[]"), int(port)
    return value, 53


def render(report: Report, fmt: Format) -> None:
    if fmt is Format.JSON:
        print_json(report.to_json())
        return
    if fmt is Format.MARKDOWN:
        say(report.to_markdown(), multiline=True, end="")
        return
    say("smtp365 doctor: account ", (report.account, "bold"), f" ({report.host}:{report.port})")
    for r in report.results:
        timing: list[Part] = [" ", (f"{r.elapsed_ms:.0f} ms", "dim")] if r.elapsed_ms >= 1 else []
        # details and fixes can span lines (e.g. the DNS records to publish)
        say(_STYLE[r.status], f"  {r.title}: {r.detail}", *timing, multiline=True)
        if r.status in (Status.FAIL, Status.WARN):
            if r.why:
                say(f"        why: {r.why}", multiline=True)
            if r.fix:
                say("        ", ("fix:", "bold"), f" {r.fix}", multiline=True)
    counts = ", ".join(f"{n} {k}" for k, n in report.counts().items() if n)
    verdict: Part = ("OK", "green") if report.ok else ("problems found", "bold red")
    say(verdict, f" ({counts}) in {report.elapsed_ms / 1000:.2f} s")


@app.callback()
def doctor(
    ctx: typer.Context,
    config: ConfigOpt = None,
    account: AccountOpt = None,
    send_test: Annotated[
        str | None,
        typer.Option("--send-test", help="also send a real test message to this address"),
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds for each network step")] = 10.0,
    no_dns: Annotated[
        bool, typer.Option("--no-dns", help="skip the sender domain's DNS records")
    ] = False,
    nameserver: NameserverOpt = None,
    fmt: FormatOpt = Format.TEXT,
    as_json: JsonOpt = False,
) -> None:
    """Run every check for an account: config, DNS, TCP, TLS, token, AUTH, send-as."""
    if ctx.invoked_subcommand is not None:
        return
    fmt = Format.JSON if as_json else fmt
    try:
        settings = load(config, account=account)
        ns, port = _nameserver(nameserver)
        report = asyncio.run(
            run_doctor(
                settings,
                account,
                timeout=timeout,
                send_test=send_test,
                dns=not no_dns,
                nameserver=ns,
                dns_port=port,
            )
        )
    except Smtp365Error as exc:
        fail(exc, as_json=fmt is Format.JSON)
    render(report, fmt)
    raise typer.Exit(0 if report.ok else 1)


@app.command("dns")
def dns(
    domain: Annotated[str, typer.Argument(help="the domain you send from, e.g. contoso.com")],
    nameserver: NameserverOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds per DNS query")] = 5.0,
    fmt: FormatOpt = Format.TEXT,
    as_json: JsonOpt = False,
) -> None:
    """Check MX, SPF (incl. the 10-lookup limit), DKIM and DMARC for Microsoft 365."""
    fmt = Format.JSON if as_json else fmt
    ns, port = _nameserver(nameserver)
    started = time.perf_counter()
    try:
        results = asyncio.run(check_domain(domain, nameserver=ns, port=port, timeout=timeout))
    except Smtp365Error as exc:
        fail(exc, as_json=fmt is Format.JSON)
    report = Report(
        domain, ns or "system resolver", port, results, (time.perf_counter() - started) * 1000
    )
    render(report, fmt)
    raise typer.Exit(0 if report.ok else 1)
