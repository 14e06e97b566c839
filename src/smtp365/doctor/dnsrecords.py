"""``smtp365 doctor dns DOMAIN``: the DNS records that make mail from a domain look legitimate
when it is sent through Microsoft 365 (MX, SPF, DKIM, DMARC).

Every lookup goes through one dnspython async resolver: the system's, or only ``nameserver``
(and ``port``) when one is given, with no system configuration read at all. dnspython's
exceptions never leave this module: they become the ``detail`` of a result ("the domain does
not exist", "no record of that type", "the DNS server did not answer").
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TXT import TXT

from smtp365.doctor.model import CheckResult, Status, Stopwatch
from smtp365.errors import Smtp365Error

__all__ = [
    "DKIM_SELECTORS",
    "DnsInputError",
    "MS_SPF_INCLUDE",
    "SPF_LOOKUP_LIMIT",
    "check_domain",
    "normalize_domain",
]

MS_SPF_INCLUDE = "spf.protection.outlook.com"
SPF_LOOKUP_LIMIT = 10  # RFC 7208 §4.6.4
DKIM_SELECTORS = ("selector1", "selector2")

# Exchange Online's inbound hosts: <domain-with-dashes>.mail.protection.outlook.com, and the
# DNSSEC-signed <domain-with-dashes>.<x>-v1.mx.microsoft given to newer domains.
_EXO_MX_SUFFIXES = (".mail.protection.outlook.com", ".mx.microsoft")
# DKIM CNAME targets: <tenant>.onmicrosoft.com, and <tenant>.<x>-v1.dkim.mail.microsoft for
# custom domains added since May 2025.
_MS_DKIM_SUFFIXES = (".onmicrosoft.com", ".dkim.mail.microsoft")

_TTL = 3600
_MAX_SPF_LOOKUPS_COUNTED = 50  # stop counting there: the verdict is long settled
_MAX_SPF_FETCHES = 30  # records fetched while walking includes/redirects
_SPF_LOOKUP_MECHANISMS = frozenset({"include", "a", "mx", "ptr", "exists"})
_SPF_MECHANISMS = frozenset({"all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists"})
_SPF_VERSION = re.compile(r"v=spf1(?:\s|$)", re.IGNORECASE)
_DMARC_VERSION = re.compile(r"v\s*=\s*DMARC1\s*(?:;|$)", re.IGNORECASE)
_MODIFIER = re.compile(r"([a-z][a-z0-9_.-]*)=(.*)", re.IGNORECASE | re.DOTALL)
_MECHANISM = re.compile(r"([+\-~?]?)([a-z][a-z0-9_.-]*)(.*)", re.IGNORECASE | re.DOTALL)
_DUAL_CIDR = re.compile(r"(?::([^/]+))?(?:/(\d+))?(?://(\d+))?")

_ORDER = {Status.PASS: 0, Status.SKIP: 0, Status.WARN: 1, Status.FAIL: 2}

_TITLES = {
    "dns.mx": "MX record",
    "dns.spf": "SPF record",
    "dns.dkim": "DKIM CNAMEs",
    "dns.dmarc": "DMARC record",
}

_WHY = {
    "dns.mx": (
        "Mail to the domain (replies, bounces, non-delivery reports) goes where its MX points; "
        "Exchange Online receives it only when the MX points to its protection host."
    ),
    "dns.spf": (
        "Receivers check the sending server's IP against the From domain's SPF record: without "
        f"include:{MS_SPF_INCLUDE} mail sent through Microsoft 365 fails SPF, and an invalid "
        "record (several of them, a syntax error, more than 10 DNS lookups) is a permerror, "
        "which fails just the same."
    ),
    "dns.dkim": (
        "Exchange Online signs with your own domain only once both CNAMEs exist and signing is "
        "enabled; until then it signs as the onmicrosoft.com domain, which does not align with "
        "your From address for DMARC."
    ),
    "dns.dmarc": (
        "DMARC tells receivers what to do with mail whose SPF and DKIM do not align with the "
        "From domain; large mailbox providers expect one from bulk senders, and without it "
        "anyone can spoof the domain and receivers decide alone."
    ),
}


class DnsInputError(Smtp365Error, ValueError):
    """The domain or the DNS server given to ``doctor dns`` is unusable."""


# --------------------------------------------------------------------------- lookups


LookupKind = Literal["nxdomain", "nodata", "unreachable"]


class _LookupFailed(Exception):
    def __init__(self, kind: LookupKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class _Dns:
    """One resolver, the messages its failures map to, and a per-run cache."""

    def __init__(
        self, resolver: dns.asyncresolver.Resolver, server: str, timeout: float, apex: str
    ) -> None:
        self.resolver = resolver
        self.server = server
        self.timeout = timeout
        self.apex = apex
        self._cache: dict[tuple[str, str], list[Any] | _LookupFailed] = {}

    async def query(self, name: str, rdtype: str) -> list[Any]:
        """The rdatas of ``name``/``rdtype``, or :class:`_LookupFailed`."""
        key = (name, rdtype)
        if key not in self._cache:
            try:
                self._cache[key] = await self._query(name, rdtype)
            except _LookupFailed as lk:
                self._cache[key] = lk
        cached = self._cache[key]
        if isinstance(cached, _LookupFailed):
            raise _LookupFailed(cached.kind, cached.message)
        return cached

    async def _query(self, name: str, rdtype: str) -> list[Any]:
        try:
            qname = dns.name.from_text(name)
            answer = await self.resolver.resolve(qname, rdtype, lifetime=self.timeout, search=False)
        except dns.resolver.NXDOMAIN:
            what = "the domain" if name == self.apex else name
            raise _LookupFailed("nxdomain", f"{what} does not exist (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            raise _LookupFailed("nodata", f"no {rdtype} record at {name}") from None
        except dns.exception.Timeout:  # LifetimeTimeout included
            raise _LookupFailed(
                "unreachable",
                f"the DNS server did not answer within {self.timeout:g} s "
                f"({self.server}; {rdtype} {name})",
            ) from None
        except dns.resolver.NoNameservers as exc:
            raise _LookupFailed(
                "unreachable", f"the DNS server did not answer {rdtype} {name} usefully: {exc}"
            ) from None
        except dns.exception.DNSException as exc:  # YXDOMAIN, a label too long...
            raise _LookupFailed(
                "unreachable", f"the DNS lookup of {rdtype} {name} failed: {exc}"
            ) from None
        return list(answer)

    def nxdomain(self, name: str) -> bool:
        """Whether a lookup already found that ``name`` does not exist."""
        return any(
            key[0] == name and isinstance(v, _LookupFailed) and v.kind == "nxdomain"
            for key, v in self._cache.items()
        )

    async def txt(self, name: str) -> list[str]:
        return [_txt_text(r) for r in await self.query(name, "TXT") if isinstance(r, TXT)]


def _txt_text(rdata: TXT) -> str:
    return b"".join(rdata.strings).decode("utf-8", errors="replace")


def _unreachable_fix(lk: _LookupFailed) -> str:
    return (
        "Check the network path to the DNS server (DNS over UDP and TCP), or ask another DNS "
        "server, then run the check again."
        if lk.kind == "unreachable"
        else ""
    )


def _make_resolver(nameserver: str | None, port: int) -> tuple[dns.asyncresolver.Resolver, str]:
    if nameserver is None:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.exception.DNSException as exc:
            raise DnsInputError(
                f"no DNS server is configured on this system ({exc})",
                fix="name a DNS server to ask explicitly",
            ) from None
        return resolver, "the system's DNS servers"
    try:
        address = str(ipaddress.ip_address(nameserver.strip()))
    except ValueError:
        raise DnsInputError(
            f"not an IP address for a DNS server: {nameserver!r}",
            fix="give the DNS server as an IPv4 or IPv6 address, e.g. 1.1.1.1",
        ) from None
    if not 0 < port < 65536:
        raise DnsInputError(f"not a port number: {port}", fix="use a port from 1 to 65535")
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [address]
    resolver.port = port
    return resolver, f"{address} port {port}"


def normalize_domain(domain: str) -> str:
    """``Contoso.COM.`` → ``contoso.com``; an address gives its domain; IDNs become A-labels."""
    text = domain.strip()
    if "@" in text:
        text = text.rpartition("@")[2]
    text = text.rstrip(".")
    if not text or any(c.isspace() for c in text):
        raise DnsInputError(
            f"not a domain name: {domain!r}", fix="give the domain, e.g. contoso.com"
        )
    try:
        name = dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise DnsInputError(
            f"not a domain name: {domain!r} ({exc})", fix="give the domain, e.g. contoso.com"
        ) from None
    # Room for "selector1._domainkey." in front of it.
    if len(name.labels) < 3 or sum(len(label) + 1 for label in name.labels) > 255 - 22:
        raise DnsInputError(
            f"not a usable mail domain: {domain!r}", fix="give the domain, e.g. contoso.com"
        )
    return name.to_text(omit_final_dot=True).lower()


def _dashed(domain: str) -> str:
    return domain.replace(".", "-")


def _worst(statuses: list[Status]) -> Status:
    return max(statuses, key=_ORDER.__getitem__, default=Status.PASS)


def _result(check_id: str, status: Status, detail: str, fix: str = "", **data: Any) -> CheckResult:
    return CheckResult(
        check_id, _TITLES[check_id], status, detail, why=_WHY[check_id], fix=fix, data=data
    )


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------- the API


async def check_domain(
    domain: str,
    *,
    nameserver: str | None = None,
    port: int = 53,
    timeout: float = 5.0,
) -> list[CheckResult]:
    """Check ``domain``'s MX, SPF, DKIM and DMARC records for sending through Microsoft 365.

    Returns the results ``dns.mx``, ``dns.spf``, ``dns.dkim``, ``dns.dmarc`` in that order.
    ``nameserver`` (an IP address) with ``port``: ask only that server, read no system
    configuration; ``None``: the system's resolvers. ``timeout`` bounds each lookup; the four
    checks run concurrently. DNS failures become results; only an unusable ``domain`` or
    ``nameserver`` (or no DNS configuration at all) raises :class:`DnsInputError`.
    """
    apex = normalize_domain(domain)
    if timeout <= 0:
        raise DnsInputError(f"not a timeout: {timeout}", fix="use a positive number of seconds")
    resolver, server = _make_resolver(nameserver, port)
    resolver.timeout = min(timeout, 2.0)  # per try; a lost UDP datagram is retried
    resolver.lifetime = timeout
    lookups = _Dns(resolver, server, timeout, apex)
    checks: tuple[Callable[[_Dns, str], Awaitable[CheckResult]], ...] = (
        _check_mx,
        _check_spf,
        _check_dkim,
        _check_dmarc,
    )
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(_timed(check(lookups, apex))) for check in checks]
    results = [task.result() for task in tasks]
    if lookups.nxdomain(apex):  # the names under it are missing for that reason
        for res in results:
            if res.status is Status.FAIL and "does not exist" not in res.detail.split(":")[0]:
                res.detail = f"the domain does not exist (NXDOMAIN), so: {res.detail}"
    return results


async def _timed(run: Awaitable[CheckResult]) -> CheckResult:
    watch = Stopwatch()
    res = await run
    res.elapsed_ms = watch.ms
    return res


# --------------------------------------------------------------------------- MX


def _mx_to_publish(domain: str) -> str:
    return f"{domain}. {_TTL} IN MX 0 {_dashed(domain)}.mail.protection.outlook.com."


async def _check_mx(lookups: _Dns, domain: str) -> CheckResult:
    publish = (
        f"Publish the MX record Microsoft 365 gives for the domain (Microsoft 365 admin center "
        f"→ Settings → Domains → {domain} → DNS records), usually:\n  {_mx_to_publish(domain)}"
    )
    try:
        rdatas = [r for r in await lookups.query(domain, "MX") if isinstance(r, MX)]
    except _LookupFailed as lk:
        if lk.kind == "unreachable":
            return _result("dns.mx", Status.FAIL, lk.message, _unreachable_fix(lk))
        if lk.kind == "nxdomain":
            return _result(
                "dns.mx",
                Status.FAIL,
                lk.message,
                f"Check the spelling of the domain (and that it is registered). Then:\n{publish}",
            )
        rdatas = []
    hosts = sorted(
        (r.preference, "." if r.exchange == dns.name.root else r.exchange.to_text(True).lower())
        for r in rdatas
    )
    if not hosts:
        return _result(
            "dns.mx",
            Status.FAIL,
            f"no MX record for {domain}: mail to it cannot be delivered",
            publish,
        )
    shown = ", ".join(f"{pref} {host}" for pref, host in hosts)
    if all(host == "." for _, host in hosts):
        return _result(
            "dns.mx",
            Status.WARN,
            f"null MX ({shown}): the domain says it receives no mail (RFC 7505); "
            "mail for it is not handled by Exchange Online",
            f"Fine if the domain only sends. Otherwise replace it with:\n  "
            f"{_mx_to_publish(domain)}",
            mx=hosts,
        )
    preferred = hosts[0][1]
    exo = [host for _, host in hosts if host.endswith(_EXO_MX_SUFFIXES)]
    if preferred.endswith(_EXO_MX_SUFFIXES):
        others = [host for _, host in hosts if host not in exo]
        if others:
            return _result(
                "dns.mx",
                Status.WARN,
                f"MX {shown}: Exchange Online first, but also {', '.join(others)}, "
                "where mail would bypass Exchange Online Protection",
                "Microsoft recommends a single MX record pointing to Exchange Online; remove "
                "the others unless they are an intended backup.",
                mx=hosts,
            )
        return _result("dns.mx", Status.PASS, f"MX {shown} (Exchange Online)", mx=hosts)
    return _result(
        "dns.mx",
        Status.WARN,
        f"MX {shown}: mail for this domain is not handled by Exchange Online",
        "Fine if intended (a mail gateway or filtering service in front of Microsoft 365, or "
        "mailboxes hosted elsewhere). Otherwise publish instead:\n  "
        f"{_mx_to_publish(domain)}",
        mx=hosts,
    )


# --------------------------------------------------------------------------- SPF


@dataclass(frozen=True)
class _Term:
    raw: str
    modifier: bool
    name: str  # lower case
    qualifier: str  # "+", "-", "~", "?"; "" for a modifier
    value: str  # the domain-spec, address or modifier value; "" when absent


@dataclass
class _Finding:
    status: Status
    text: str


@dataclass
class _SpfWalk:
    lookups: int = 0
    fetches: int = 0
    ms_found_in: str | None = None
    redirect_all: str | None = None  # the "all" qualifier reached through a redirect
    findings: list[_Finding] = field(default_factory=list)
    records: dict[str, str] = field(default_factory=dict)  # domain → SPF record walked

    def add(self, status: Status, text: str) -> None:
        self.findings.append(_Finding(status, text))


def _is_spf(text: str) -> bool:
    return _SPF_VERSION.match(text.strip()) is not None


def _check_domain_spec(term: str, spec: str) -> str | None:
    if not spec:
        return f"{term}: a domain is required"
    if "%" in spec:  # macros (RFC 7208 §7); only their expansion can be checked
        return None
    try:
        dns.name.from_text(spec)
    except dns.exception.DNSException:
        return f"{term}: not a domain name"
    return None


def _check_cidr(term: str, value: str | None, maximum: int) -> str | None:
    if value is not None and (len(value) > 3 or int(value) > maximum):
        return f"{term}: prefix length over /{maximum}"
    return None


def _parse_spf(record: str) -> tuple[list[_Term], list[str]]:
    """The terms after ``v=spf1``, and the syntax errors (each a permerror)."""
    terms: list[_Term] = []
    errors: list[str] = []
    seen_modifiers: set[str] = set()
    for raw in record.split()[1:]:
        mod = _MODIFIER.fullmatch(raw)
        if mod is not None:
            name, value = mod.group(1).lower(), mod.group(2)
            if name in ("redirect", "exp"):
                if name in seen_modifiers:
                    errors.append(f"{raw}: {name}= appears twice")
                seen_modifiers.add(name)
                error = _check_domain_spec(raw, value)
                if error:
                    errors.append(error)
            # unknown modifiers are ignored (RFC 7208 §6)
            terms.append(_Term(raw, True, name, "", value))
            continue
        mech = _MECHANISM.fullmatch(raw)
        name = mech.group(2).lower() if mech else ""
        if mech is None or name not in _SPF_MECHANISMS:
            errors.append(f"unknown mechanism {raw!r}")
            continue
        qualifier, rest = mech.group(1) or "+", mech.group(3)
        value = ""
        error = None
        if name == "all":
            error = f"{raw}: all takes no argument" if rest else None
        elif name in ("include", "exists"):
            if rest.startswith(":"):
                value = rest[1:]
                error = _check_domain_spec(raw, value)
            else:
                error = f"unknown mechanism {raw!r}" if rest else f"{raw}: a domain is required"
        elif name in ("a", "mx"):
            cidr = _DUAL_CIDR.fullmatch(rest)
            if cidr is None:
                error = f"{raw}: malformed"
            else:
                value = cidr.group(1) or ""
                error = (
                    (_check_domain_spec(raw, value) if cidr.group(1) is not None else None)
                    or _check_cidr(raw, cidr.group(2), 32)
                    or _check_cidr(raw, cidr.group(3), 128)
                )
        elif name == "ptr":
            if rest.startswith(":"):
                value = rest[1:]
                error = _check_domain_spec(raw, value)
            elif rest:
                error = f"{raw}: malformed"
        else:  # ip4, ip6
            value = rest[1:] if rest.startswith(":") else ""
            error = _check_ip(raw, name, value)
        if error:
            errors.append(error)
            continue
        terms.append(_Term(raw, False, name, qualifier, value))
    return terms, errors


def _check_ip(raw: str, name: str, value: str) -> str | None:
    address, slash, prefix = value.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{raw}: not an IP address"
    if (name == "ip4") != (ip.version == 4):
        return f"{raw}: {name} needs an IPv{4 if name == 'ip4' else 6} address"
    if slash and (not prefix.isdigit() or int(prefix) > (32 if ip.version == 4 else 128)):
        return f"{raw}: bad prefix length"
    return None


def _spf_all(terms: list[_Term]) -> str | None:
    for term in terms:
        if not term.modifier and term.name == "all":
            return term.qualifier
    return None


def _spf_with(terms: list[_Term], *, include_ms: bool, fix_all: bool) -> str:
    """The record rebuilt: the Microsoft include before ``all`` (or before the modifiers),
    a permissive or missing ``all`` made ``-all``."""
    words = [t.raw for t in terms]
    has_all = _spf_all(terms) is not None
    has_redirect = any(t.modifier and t.name == "redirect" for t in terms)
    if fix_all:
        words = [
            "-all" if not t.modifier and t.name == "all" and t.qualifier in "+?" else t.raw
            for t in terms
        ]
    if include_ms and f"include:{MS_SPF_INCLUDE}" not in (w.lower() for w in words):
        at = next((i for i, t in enumerate(terms) if t.modifier or t.name == "all"), len(terms))
        words.insert(at, f"include:{MS_SPF_INCLUDE}")
    if fix_all and not has_all and not has_redirect:
        words.append("-all")
    return " ".join(["v=spf1", *words])


async def _spf_record_at(
    lookups: _Dns, target: str, via: str, walk: _SpfWalk
) -> list[_Term] | None:
    """The parsed SPF record an include/redirect points to, or None (the finding noted)."""
    try:
        found = [t for t in await lookups.txt(target) if _is_spf(t)]
    except _LookupFailed as lk:
        if lk.kind == "unreachable":
            walk.add(Status.WARN, f"{via}: not checked, {lk.message}; the lookup count may be low")
        elif lk.kind == "nxdomain":
            walk.add(Status.FAIL, f"{via}: {lk.message}: permerror")
        else:
            walk.add(Status.FAIL, f"{via}: {target} has no SPF record: permerror")
        return None
    if not found:
        walk.add(Status.FAIL, f"{via}: {target} has no SPF record: permerror")
        return None
    if len(found) > 1:
        walk.add(Status.FAIL, f"{via}: {target} has {len(found)} SPF records: permerror")
        return None
    terms, errors = _parse_spf(found[0])
    if errors:
        walk.add(Status.FAIL, f"{via}: {target}'s SPF record is invalid ({'; '.join(errors)})")
        return None
    walk.records[target] = found[0]
    return terms


async def _walk_spf(
    lookups: _Dns, terms: list[_Term], chain: tuple[str, ...], walk: _SpfWalk, *, top: bool
) -> None:
    """Count the DNS-querying terms of ``terms`` and, recursively, of what they include."""
    has_all = _spf_all(terms) is not None
    for term in terms:
        if walk.lookups >= _MAX_SPF_LOOKUPS_COUNTED:
            return
        follow: str | None = None
        if not term.modifier and term.name in _SPF_LOOKUP_MECHANISMS:
            walk.lookups += 1
            if term.name == "include":
                follow = term.value
        elif term.modifier and term.name == "redirect" and not has_all:
            walk.lookups += 1  # redirect= is ignored when the record has an "all"
            follow = term.value
        if follow is None:
            continue
        target = follow.lower().rstrip(".")
        if target == MS_SPF_INCLUDE and walk.ms_found_in is None:
            walk.ms_found_in = chain[-1]
        if "%" in target:
            continue  # a macro: expanded per message, cannot be followed here
        if target in chain:
            walk.add(Status.FAIL, f"{term.raw} in {chain[-1]}: a loop back to {target}: permerror")
            continue
        if walk.fetches >= _MAX_SPF_FETCHES:
            return
        walk.fetches += 1
        nested = await _spf_record_at(lookups, target, f"{term.raw} (in {chain[-1]})", walk)
        if nested is None:
            continue
        is_redirect = term.modifier
        if top and is_redirect:
            walk.redirect_all = _spf_all(nested)
        await _walk_spf(lookups, nested, (*chain, target), walk, top=top and is_redirect)


async def _spf_cost(lookups: _Dns, domain: str) -> int:
    """How many lookups include:spf.protection.outlook.com adds (2 as Microsoft publishes it)."""
    walk = _SpfWalk()
    term = _Term(f"include:{MS_SPF_INCLUDE}", False, "include", "+", MS_SPF_INCLUDE)
    await _walk_spf(lookups, [term], (domain,), walk, top=False)
    return walk.lookups


async def _check_spf(lookups: _Dns, domain: str) -> CheckResult:
    starter = f"{domain}. {_TTL} IN TXT {_quoted(f'v=spf1 include:{MS_SPF_INCLUDE} -all')}"
    try:
        txts = await lookups.txt(domain)
    except _LookupFailed as lk:
        if lk.kind == "unreachable":
            return _result("dns.spf", Status.FAIL, lk.message, _unreachable_fix(lk))
        if lk.kind == "nxdomain":
            return _result(
                "dns.spf",
                Status.FAIL,
                lk.message,
                f"Check the spelling of the domain (and that it is registered). Then publish:"
                f"\n  {starter}",
            )
        txts = []
    spf = sorted(t for t in txts if _is_spf(t))  # DNS gives no order; be stable
    if not spf:
        return _result(
            "dns.spf",
            Status.FAIL,
            f"no SPF record (no TXT record starting v=spf1 among {len(txts)} TXT records)",
            f"Publish (add ip4:/include: for any other service that sends as {domain}):\n"
            f"  {starter}",
        )
    if len(spf) > 1:
        merged_terms: list[_Term] = []
        seen: set[str] = set()
        for record in spf:
            for t in _parse_spf(record)[0]:
                if t.name in ("all", "redirect") or t.raw.lower() in seen:
                    continue
                seen.add(t.raw.lower())
                merged_terms.append(t)
        merged = _spf_with(merged_terms, include_ms=True, fix_all=True)
        return _result(
            "dns.spf",
            Status.FAIL,
            f"{len(spf)} SPF records: multiple SPF records = permerror (RFC 7208 §4.5), "
            "so SPF fails for every message: " + " | ".join(_quoted(r) for r in spf),
            "Merge them into one record and delete the others, for example:\n"
            f"  {domain}. {_TTL} IN TXT {_quoted(merged)}",
            records=spf,
        )
    record = spf[0]
    terms, errors = _parse_spf(record)
    if errors:
        return _result(
            "dns.spf",
            Status.FAIL,
            f"SPF record {_quoted(record)} is invalid: {'; '.join(errors)} (permerror: "
            "SPF fails for every message)",
            "Correct the record; the mechanisms are all, include:, a, mx, ptr, ip4:, ip6:, "
            "exists: (RFC 7208 §5). A minimal one for Microsoft 365:\n  " + starter,
            record=record,
        )

    walk = _SpfWalk(records={domain: record})
    await _walk_spf(lookups, terms, (domain,), walk, top=True)
    findings = walk.findings
    fixes: list[str] = []
    if any(f.status is Status.FAIL for f in findings):
        fixes.append("Correct or remove the include/redirect that points to a broken record.")
    include_ms = walk.ms_found_in is None
    all_q = _spf_all(terms)
    effective_all = all_q if all_q is not None else walk.redirect_all
    fix_all = effective_all is None or effective_all in "+?"

    if include_ms:
        findings.append(
            _Finding(
                Status.FAIL,
                f"include:{MS_SPF_INCLUDE} is missing: mail sent through Microsoft 365 fails SPF",
            )
        )
    if effective_all == "+":
        findings.append(_Finding(Status.FAIL, "+all: anyone may send as this domain"))
    elif effective_all == "?":
        findings.append(
            _Finding(
                Status.WARN, "?all (neutral): mail from anywhere else is not marked as failing"
            )
        )
    elif effective_all is None:
        findings.append(
            _Finding(
                Status.WARN, "no all mechanism: the result for other senders is neutral (?all)"
            )
        )
    count = walk.lookups
    counted = f"{count}" if count < _MAX_SPF_LOOKUPS_COUNTED else f"at least {count}"
    counted += " DNS lookup" if count == 1 else " DNS lookups"
    if count > SPF_LOOKUP_LIMIT:
        findings.append(
            _Finding(
                Status.FAIL,
                f"{counted}, over the limit of {SPF_LOOKUP_LIMIT} "
                "(RFC 7208 §4.6.4): permerror, SPF fails for every message",
            )
        )
        fixes.append(
            "Reduce the DNS lookups (include, a, mx, ptr, exists, redirect, counted through "
            "every include) to 10 or fewer: remove includes of services that no longer send, "
            "replace a/mx with ip4:/ip6:, or flatten an include into its addresses."
        )
    elif count >= SPF_LOOKUP_LIMIT - 1:
        findings.append(
            _Finding(
                Status.WARN,
                f"{count} DNS lookups, close to the limit of {SPF_LOOKUP_LIMIT}: one "
                "more include and SPF fails (permerror)",
            )
        )
        fixes.append("Make room before adding senders: remove unused includes or flatten one.")
    if include_ms or fix_all:
        fixed = _spf_with(terms, include_ms=include_ms, fix_all=fix_all)
        fixes.insert(
            0, f"Publish instead (one record only):\n  {domain}. {_TTL} IN TXT {_quoted(fixed)}"
        )
    if include_ms and count <= SPF_LOOKUP_LIMIT:
        cost = await _spf_cost(lookups, domain)
        if count + cost > SPF_LOOKUP_LIMIT:
            fixes.append(
                f"include:{MS_SPF_INCLUDE} costs {cost} lookups: that makes {count + cost}, over "
                f"the limit of {SPF_LOOKUP_LIMIT}; make room first (remove unused includes, "
                "replace a/mx with ip4:/ip6:)."
            )
    if any(t.name == "ptr" and not t.modifier for t in terms):
        findings.append(
            _Finding(
                Status.WARN, "ptr is slow and unreliable and should not be used (RFC 7208 §5.5)"
            )
        )

    status = _worst([f.status for f in findings])
    facts = [] if count >= SPF_LOOKUP_LIMIT - 1 else [counted]
    if walk.ms_found_in is not None:
        where = "" if walk.ms_found_in == domain else f" (through {walk.ms_found_in})"
        facts.append(f"includes {MS_SPF_INCLUDE}{where}")
    if effective_all is not None:
        facts.append(f"ends with {effective_all}all")
    problems = [f.text for f in findings if f.status is not Status.PASS]
    detail = f"SPF record {_quoted(record)}: " + "; ".join(problems or facts)
    if problems and facts:
        detail += f" ({'; '.join(facts)})"
    return _result(
        "dns.spf",
        status,
        detail,
        "\n".join(fixes),
        record=record,
        lookups=count,
        all=effective_all,
        microsoft_include=not include_ms,
        problems=problems,
        records=walk.records,
    )


# --------------------------------------------------------------------------- DKIM


def _dkim_to_publish(domain: str, selector: str) -> str:
    return (
        f"{selector}._domainkey.{domain}. {_TTL} IN CNAME "
        f"{selector}-{_dashed(domain)}._domainkey.<tenant>.onmicrosoft.com."
    )


async def _check_dkim(lookups: _Dns, domain: str) -> CheckResult:
    found: dict[str, str] = {}
    missing: list[str] = []
    elsewhere: list[str] = []
    problems: list[str] = []
    unreachable: list[_LookupFailed] = []

    async def one(selector: str) -> None:
        name = f"{selector}._domainkey.{domain}"
        try:
            rdatas = [r for r in await lookups.query(name, "CNAME") if isinstance(r, CNAME)]
        except _LookupFailed as lk:
            if lk.kind == "unreachable":
                unreachable.append(lk)
            else:
                missing.append(selector)
                problems.append(lk.message)
            return
        target = rdatas[0].target.to_text(omit_final_dot=True).lower() if rdatas else ""
        found[selector] = target
        if not target.endswith(_MS_DKIM_SUFFIXES):
            elsewhere.append(selector)
            problems.append(f"{name} → {target}, not Microsoft 365")

    async with asyncio.TaskGroup() as group:
        for selector in DKIM_SELECTORS:
            group.create_task(one(selector))
    if unreachable:
        lk = unreachable[0]
        return _result("dns.dkim", Status.FAIL, lk.message, _unreachable_fix(lk))
    shown = "; ".join(f"{s}._domainkey → {t}" for s, t in sorted(found.items()))
    enable = (
        "then enable DKIM signing in the Defender portal (Email & collaboration → Policies "
        "& rules → Threat policies → Email authentication settings → DKIM → "
        f"{domain} → Sign messages for this domain with DKIM signatures), or with "
        f"Set-DkimSigningConfig -Identity {domain} -Enabled $true."
    )
    if missing:
        records = "\n".join(f"  {_dkim_to_publish(domain, s)}" for s in DKIM_SELECTORS)
        return _result(
            "dns.dkim",
            Status.FAIL,
            f"{' and '.join(sorted(missing))} missing: {'; '.join(sorted(problems))}"
            + (f" (found {shown})" if shown else ""),
            "Publish both CNAMEs, with the exact targets the Defender portal shows for the "
            f"domain (or Get-DkimSigningConfig -Identity {domain} | Format-List "
            "Selector1CNAME,Selector2CNAME; domains added since May 2025 point into "
            "<tenant>.<x>-v1.dkim.mail.microsoft instead):\n"
            f"{records}\n{enable[0].upper()}{enable[1:]}",
            cnames=found,
        )
    if elsewhere:
        return _result(
            "dns.dkim",
            Status.WARN,
            f"{'; '.join(sorted(problems))}: Exchange Online cannot sign with these selectors",
            "Fine if another service signs this domain's mail with them. For Microsoft 365, "
            "point both to the targets the Defender portal shows, e.g.:\n"
            + "\n".join(f"  {_dkim_to_publish(domain, s)}" for s in DKIM_SELECTORS)
            + f"\n{enable[0].upper()}{enable[1:]}",
            cnames=found,
        )
    return _result(
        "dns.dkim",
        Status.PASS,
        f"{shown} (Microsoft 365; signing itself is enabled in the Defender portal)",
        cnames=found,
    )


# --------------------------------------------------------------------------- DMARC


def _dmarc_tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), value.strip())
    return tags


async def _check_dmarc(lookups: _Dns, domain: str) -> CheckResult:
    name = f"_dmarc.{domain}"
    starter = f"{name}. {_TTL} IN TXT {_quoted(f'v=DMARC1; p=none; rua=mailto:dmarc@{domain}')}"
    advice = (
        "Read the aggregate reports sent to rua for a few weeks; once every legitimate sender "
        "passes SPF or DKIM aligned with the domain, move to p=quarantine, then p=reject."
    )
    try:
        txts = await lookups.txt(name)
    except _LookupFailed as lk:
        if lk.kind == "unreachable":
            return _result("dns.dmarc", Status.FAIL, lk.message, _unreachable_fix(lk))
        txts = []
    records = [t for t in txts if _DMARC_VERSION.match(t.strip())]
    if not records:
        return _result(
            "dns.dmarc",
            Status.FAIL,
            f"no DMARC record at {name}",
            f"Publish a starter record (monitoring only):\n  {starter}\n{advice}",
        )
    if len(records) > 1:
        return _result(
            "dns.dmarc",
            Status.FAIL,
            f"{len(records)} DMARC records at {name}: receivers then apply none of them "
            "(RFC 7489 §6.6.3): " + " | ".join(_quoted(r) for r in records),
            "Keep exactly one v=DMARC1 record at " + name + ".",
            records=records,
        )
    record = records[0]
    tags = _dmarc_tags(record)
    policy = tags.get("p", "").lower()
    data: dict[str, Any] = {"record": record, "tags": tags}
    if policy not in ("none", "quarantine", "reject"):
        what = "no p= tag" if "p" not in tags else f"p={tags['p']} is not a policy"
        return _result(
            "dns.dmarc",
            Status.FAIL,
            f"DMARC record {_quoted(record)}: {what} (p=none, quarantine or reject is required)",
            f"Publish a valid record, e.g.:\n  {starter}\n{advice}",
            **data,
        )
    extras = [f"p={policy}"]
    if "sp" in tags:
        extras.append(f"sp={tags['sp']}")
    if "pct" in tags and tags["pct"] != "100":
        extras.append(f"pct={tags['pct']} (applied to that share of failing mail only)")
    extras.append("reports to " + tags["rua"] if "rua" in tags else "no rua= (no reports)")
    detail = f"DMARC record {_quoted(record)}: {', '.join(extras)}"
    if policy == "none":
        return _result(
            "dns.dmarc",
            Status.WARN,
            f"{detail}; p=none is monitoring only: spoofed mail is still delivered",
            ("" if "rua" in tags else f"Add rua=mailto:dmarc@{domain} to receive reports. ")
            + advice,
            **data,
        )
    return _result("dns.dmarc", Status.PASS, detail, **data)
