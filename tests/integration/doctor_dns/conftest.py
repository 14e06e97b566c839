"""A small authoritative DNS server on 127.0.0.1 (UDP and TCP, port 0) answering from a dict
zone with dnspython's message API, run in the test's event loop; and a server that never
answers. The resolver under test is always pointed at one of them: nothing reaches the
internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

# {(name, rdtype): [rdata text]}; TXT values are the plain text (quoted and split into
# 255-byte strings by the server).
Zone = dict[tuple[str, str], list[str]]

MS_SPF = (
    "v=spf1 ip4:40.92.0.0/15 ip4:40.107.0.0/16 ip4:52.100.0.0/15 ip4:104.47.0.0/17 "
    "ip6:2a01:111:f400::/48 ip6:2a01:111:f403::/49 include:spfd.protection.outlook.com -all"
)
MS_SPFD = "v=spf1 ip4:51.4.72.0/24 ip4:51.5.72.0/24 ip6:2a01:4180:4051:0800::/64 -all"


def _domain(
    name: str,
    *,
    mx: str | None = None,
    spf: str | None = "v=spf1 include:spf.protection.outlook.com -all",
    dkim: bool = True,
    dmarc: str | None = "v=DMARC1; p=reject; rua=mailto:dmarc@{name}",
) -> Zone:
    """A domain set up for Microsoft 365; each keyword can take something away."""
    dashed = name.replace(".", "-")
    zone: Zone = {
        (name, "MX"): [f"0 {mx or dashed + '.mail.protection.outlook.com.'}"],
        (name, "A"): ["192.0.2.10"],
    }
    if spf is not None:
        zone[(name, "TXT")] = ["ms-domain-verification=1234", spf]
    if dkim:
        for sel in ("selector1", "selector2"):
            zone[(f"{sel}._domainkey.{name}", "CNAME")] = [
                f"{sel}-{dashed}._domainkey.contoso.onmicrosoft.com."
            ]
    if dmarc is not None:
        zone[(f"_dmarc.{name}", "TXT")] = [dmarc.format(name=name)]
    return zone


def build_zone() -> Zone:
    zone: Zone = {
        ("spf.protection.outlook.com", "TXT"): [MS_SPF],
        ("spfd.protection.outlook.com", "TXT"): [MS_SPFD],
    }
    zone |= _domain("good.test")
    zone |= _domain("nospf-include.test", spf="v=spf1 ip4:192.0.2.0/24 mx ~all")
    zone |= _domain("nodkim.test", dkim=False)
    zone |= _domain("nodmarc.test", dmarc=None)
    zone |= _domain("dmarc-none.test", dmarc="v=DMARC1; p=none; rua=mailto:dmarc@{name}")
    zone |= _domain("two-spf.test")
    zone[("two-spf.test", "TXT")] = [
        "v=spf1 include:spf.protection.outlook.com -all",
        "v=spf1 include:_spf.mailer.test ~all",
    ]
    # mx, a (2) + include _spf-a (1) → a:, mx:, include _spf-c (3) → a:, exists: (2)
    # + include _spf-b (1) → a: (1) + include Microsoft (1) → spfd (1) = 12
    zone |= _domain(
        "toomany.test",
        spf=(
            "v=spf1 mx a include:_spf-a.toomany.test include:_spf-b.toomany.test "
            "include:spf.protection.outlook.com -all"
        ),
    )
    zone[("_spf-a.toomany.test", "TXT")] = [
        "v=spf1 a:one.toomany.test mx:two.toomany.test include:_spf-c.toomany.test ~all"
    ]
    zone[("_spf-b.toomany.test", "TXT")] = ["v=spf1 ip4:198.51.100.0/24 a:three.toomany.test -all"]
    zone[("_spf-c.toomany.test", "TXT")] = [
        "v=spf1 a:four.toomany.test exists:%{i}._spf.toomany.test -all"
    ]
    # 9 lookups: include Microsoft (2) + a mx (2) + include _spf (1) → a: ×4 (4)
    zone |= _domain(
        "ninelookups.test",
        spf="v=spf1 a mx include:_spf.ninelookups.test include:spf.protection.outlook.com -all",
    )
    zone[("_spf.ninelookups.test", "TXT")] = [
        "v=spf1 a:w.ninelookups.test a:x.ninelookups.test a:y.ninelookups.test "
        "a:z.ninelookups.test -all"
    ]
    zone |= _domain("plusall.test", spf="v=spf1 include:spf.protection.outlook.com +all")
    zone |= _domain("neutral.test", spf="v=spf1 include:spf.protection.outlook.com ?all")
    zone |= _domain("noall.test", spf="v=spf1 include:spf.protection.outlook.com")
    zone |= _domain(
        "badsyntax.test", spf="v=spf1 include:spf.protection.outlook.com ipv4:1.2.3.4 -all"
    )
    zone |= _domain("gateway.test", mx="mx1.gateway-filter.example.")
    zone |= _domain("nomx.test")
    del zone[("nomx.test", "MX")]
    zone |= _domain("redirect.test", spf="v=spf1 redirect=_spf.redirect.test")
    zone[("_spf.redirect.test", "TXT")] = ["v=spf1 include:spf.protection.outlook.com -all"]
    zone |= _domain(
        "brokeninclude.test", spf="v=spf1 include:gone.test include:spf.protection.outlook.com -all"
    )
    # a record too big for UDP: the resolver must retry over TCP
    zone |= _domain(
        "bigspf.test",
        spf="v=spf1 "
        + " ".join(f"ip4:203.0.{i}.0/24" for i in range(120))
        + " include:spf.protection.outlook.com -all",
    )
    return zone


def _txt_rdata(text: str) -> str:
    raw = text.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join(
        '"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks
    )


@dataclass
class DnsTestServer:
    zone: Zone
    port: int = 0
    queries: list[tuple[str, str, str]] = field(default_factory=list)  # (proto, name, type)

    def answer(self, wire: bytes, proto: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((proto, name, rdtype))
        if name.endswith("servfail.test"):  # a broken zone behind a working server
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        rrset = self._rrset(name, rdtype) or (
            self._rrset(name, "CNAME") if rdtype != "CNAME" else None
        )
        if rrset is not None:
            response.answer.append(rrset)
        elif not any(key[0] == name for key in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        if proto == "tcp":
            return response.to_wire()
        limit = max(query.payload, 512) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    def _rrset(self, name: str, rdtype: str) -> dns.rrset.RRset | None:
        values = self.zone.get((name, rdtype))
        if not values:
            return None
        texts = [_txt_rdata(v) for v in values] if rdtype == "TXT" else values
        return dns.rrset.from_text_list(name + ".", 300, "IN", rdtype, texts)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsTestServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (3.11's selector datagram transport does not subclass DatagramTransport)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply = self.server.answer(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def _tcp_client(
    server: DnsTestServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            reply = server.answer(await reader.readexactly(length), "tcp")
            if reply is None:
                break
            writer.write(struct.pack("!H", len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsTestServer]:
    """The test zones on 127.0.0.1, UDP and TCP on the same (ephemeral) port."""
    loop = asyncio.get_running_loop()
    server = DnsTestServer(build_zone())
    for _ in range(20):  # the UDP port picked by the OS may be taken for TCP: try another
        udp, _protocol = await loop.create_datagram_endpoint(
            lambda: _Udp(server), local_addr=("127.0.0.1", 0)
        )
        port = udp.get_extra_info("sockname")[1]
        try:
            tcp = await asyncio.start_server(
                lambda r, w: _tcp_client(server, r, w), "127.0.0.1", port
            )
        except OSError:
            udp.close()
            continue
        break
    else:
        pytest.fail("no port free for both UDP and TCP on 127.0.0.1")
    server.port = port
    try:
        yield server
    finally:
        udp.close()
        tcp.close()
        await tcp.wait_closed()


@dataclass
class SilentServer:
    port: int
    received: asyncio.Event


class _Drop(asyncio.DatagramProtocol):
    def __init__(self, received: asyncio.Event) -> None:
        self.received = received

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.received.set()  # read, never answer


@pytest.fixture
async def silent_dns() -> AsyncIterator[SilentServer]:
    """A UDP socket on 127.0.0.1 that reads queries and drops them."""
    loop = asyncio.get_running_loop()
    received = asyncio.Event()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Drop(received), local_addr=("127.0.0.1", 0), family=socket.AF_INET
    )
    try:
        yield SilentServer(transport.get_extra_info("sockname")[1], received)
    finally:
        transport.close()
