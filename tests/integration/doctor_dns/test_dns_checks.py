"""``smtp365 doctor dns``: every check against prepared zones on a local DNS server."""

from __future__ import annotations

import asyncio
import time

import pytest

from smtp365.doctor.dnsrecords import DnsInputError, check_domain
from smtp365.doctor.model import CheckResult, Status
from tests.integration.doctor_dns.conftest import DnsTestServer, SilentServer


async def run(server: DnsTestServer, domain: str) -> dict[str, CheckResult]:
    results = await check_domain(domain, nameserver="127.0.0.1", port=server.port, timeout=2.0)
    assert [r.id for r in results] == ["dns.mx", "dns.spf", "dns.dkim", "dns.dmarc"]
    return {r.id: r for r in results}


async def test_good_domain_passes_everything(dns_server: DnsTestServer) -> None:
    results = await run(dns_server, "good.test")
    assert {i: r.status for i, r in results.items()} == dict.fromkeys(results, Status.PASS)
    assert "good-test.mail.protection.outlook.com" in results["dns.mx"].detail
    spf = results["dns.spf"]
    assert "2 DNS lookups" in spf.detail  # the include and Microsoft's nested spfd include
    assert "includes spf.protection.outlook.com" in spf.detail
    assert spf.data["lookups"] == 2
    assert "spfd.protection.outlook.com" in spf.data["records"]
    assert "selector1-good-test._domainkey.contoso.onmicrosoft.com" in results["dns.dkim"].detail
    assert "p=reject" in results["dns.dmarc"].detail
    assert all(r.why for r in results.values())
    # Only the local server was asked, and Microsoft's record came from the test zone.
    assert ("udp", "spf.protection.outlook.com", "TXT") in dns_server.queries


async def test_spf_without_microsoft_include_fails_with_fixed_record(
    dns_server: DnsTestServer,
) -> None:
    spf = (await run(dns_server, "nospf-include.test"))["dns.spf"]
    assert spf.status is Status.FAIL
    assert "include:spf.protection.outlook.com is missing" in spf.detail
    fixed = "v=spf1 ip4:192.0.2.0/24 mx include:spf.protection.outlook.com ~all"
    assert f'nospf-include.test. 3600 IN TXT "{fixed}"' in spf.fix


async def test_missing_dkim_fails_with_both_cnames(dns_server: DnsTestServer) -> None:
    dkim = (await run(dns_server, "nodkim.test"))["dns.dkim"]
    assert dkim.status is Status.FAIL
    assert "selector1 and selector2 missing" in dkim.detail
    for sel in ("selector1", "selector2"):
        assert (
            f"{sel}._domainkey.nodkim.test. 3600 IN CNAME "
            f"{sel}-nodkim-test._domainkey.<tenant>.onmicrosoft.com."
        ) in dkim.fix
    assert "enable DKIM signing in the Defender portal" in dkim.fix


async def test_missing_dmarc_fails_with_starter_record(dns_server: DnsTestServer) -> None:
    dmarc = (await run(dns_server, "nodmarc.test"))["dns.dmarc"]
    assert dmarc.status is Status.FAIL
    assert "no DMARC record at _dmarc.nodmarc.test" in dmarc.detail
    assert '"v=DMARC1; p=none; rua=mailto:dmarc@nodmarc.test"' in dmarc.fix
    assert "p=quarantine" in dmarc.fix and "p=reject" in dmarc.fix


async def test_dmarc_p_none_warns(dns_server: DnsTestServer) -> None:
    dmarc = (await run(dns_server, "dmarc-none.test"))["dns.dmarc"]
    assert dmarc.status is Status.WARN
    assert "monitoring only" in dmarc.detail
    assert dmarc.data["tags"]["p"] == "none"


async def test_too_many_spf_lookups_fails_with_the_count(dns_server: DnsTestServer) -> None:
    spf = (await run(dns_server, "toomany.test"))["dns.spf"]
    assert spf.status is Status.FAIL
    assert "12 DNS lookups, over the limit of 10" in spf.detail
    assert "permerror" in spf.detail
    assert spf.data["lookups"] == 12


async def test_nine_spf_lookups_warn(dns_server: DnsTestServer) -> None:
    spf = (await run(dns_server, "ninelookups.test"))["dns.spf"]
    assert spf.status is Status.WARN
    assert "9 DNS lookups, close to the limit of 10" in spf.detail


async def test_two_spf_records_fail(dns_server: DnsTestServer) -> None:
    spf = (await run(dns_server, "two-spf.test"))["dns.spf"]
    assert spf.status is Status.FAIL
    assert "multiple SPF records = permerror" in spf.detail
    merged = "v=spf1 include:_spf.mailer.test include:spf.protection.outlook.com -all"
    assert f'"{merged}"' in spf.fix


@pytest.mark.parametrize(
    ("domain", "status", "phrase", "fixed"),
    [
        ("plusall.test", Status.FAIL, "anyone may send", "include:spf.protection.outlook.com -all"),
        ("neutral.test", Status.WARN, "?all (neutral)", "include:spf.protection.outlook.com -all"),
        ("noall.test", Status.WARN, "no all mechanism", "include:spf.protection.outlook.com -all"),
        ("badsyntax.test", Status.FAIL, "unknown mechanism 'ipv4:1.2.3.4'", None),
    ],
)
async def test_spf_all_and_syntax(
    dns_server: DnsTestServer, domain: str, status: Status, phrase: str, fixed: str | None
) -> None:
    spf = (await run(dns_server, domain))["dns.spf"]
    assert spf.status is status
    assert phrase in spf.detail
    if fixed is not None:
        assert f'{domain}. 3600 IN TXT "v=spf1 {fixed}"' in spf.fix


async def test_spf_redirect_and_broken_include(dns_server: DnsTestServer) -> None:
    redirect, broken = await asyncio.gather(
        run(dns_server, "redirect.test"), run(dns_server, "brokeninclude.test")
    )
    assert redirect["dns.spf"].status is Status.PASS
    assert "through _spf.redirect.test" in redirect["dns.spf"].detail
    assert redirect["dns.spf"].data["lookups"] == 3
    assert broken["dns.spf"].status is Status.FAIL
    assert "gone.test does not exist (NXDOMAIN): permerror" in broken["dns.spf"].detail


async def test_spf_record_too_big_for_udp_comes_over_tcp(dns_server: DnsTestServer) -> None:
    spf = (await run(dns_server, "bigspf.test"))["dns.spf"]
    assert spf.status is Status.PASS, spf.detail
    assert ("tcp", "bigspf.test", "TXT") in dns_server.queries


async def test_mx_elsewhere_warns_and_missing_mx_fails(dns_server: DnsTestServer) -> None:
    gateway, nomx = await asyncio.gather(
        run(dns_server, "gateway.test"), run(dns_server, "nomx.test")
    )
    assert gateway["dns.mx"].status is Status.WARN
    assert "not handled by Exchange Online" in gateway["dns.mx"].detail
    assert nomx["dns.mx"].status is Status.FAIL
    assert "nomx.test. 3600 IN MX 0 nomx-test.mail.protection.outlook.com." in nomx["dns.mx"].fix


async def test_unknown_domain_does_not_exist(dns_server: DnsTestServer) -> None:
    results = await run(dns_server, "Nowhere.TEST.")
    assert results["dns.mx"].status is Status.FAIL
    assert "the domain does not exist" in results["dns.mx"].detail
    assert "the domain does not exist" in results["dns.spf"].detail
    assert results["dns.dkim"].status is Status.FAIL
    assert results["dns.dmarc"].status is Status.FAIL


async def test_silent_server_did_not_answer_within_the_timeout(silent_dns: SilentServer) -> None:
    start = time.monotonic()
    results = await check_domain(
        "good.test", nameserver="127.0.0.1", port=silent_dns.port, timeout=1.0
    )
    elapsed = time.monotonic() - start
    assert silent_dns.received.is_set()  # the queries went there, and only there
    for res in results:
        assert res.status is Status.FAIL
        assert "did not answer within 1 s" in res.detail
    assert elapsed < 2.5  # the four checks wait concurrently, each bounded by the timeout


async def test_servfail_is_a_server_that_did_not_answer(dns_server: DnsTestServer) -> None:
    for res in (await run(dns_server, "servfail.test")).values():
        assert res.status is Status.FAIL
        assert "the DNS server did not answer" in res.detail
        assert "SERVFAIL" in res.detail


@pytest.mark.parametrize(
    ("domain", "nameserver"),
    [("not a domain", "127.0.0.1"), ("localhost", "127.0.0.1"), ("good.test", "dns.google")],
)
async def test_unusable_input_raises(domain: str, nameserver: str) -> None:
    with pytest.raises(DnsInputError):
        await check_domain(domain, nameserver=nameserver)
