"""Who may relay through the listener, as whom, and to which addresses.

The relay never delivers locally: every recipient goes to Exchange Online, so every RCPT is a
relay request. A client may relay when it authenticated as a local user (:mod:`.users`) or
when its address is in an allow-listed network; anyone else gets ``554 5.7.1 Relay access
denied`` at RCPT, whatever the address looks like (security.md §4). From allowed clients the
old routing forms are refused, never interpreted: ``%`` and ``!`` in the local part, source
routes (``@a,@b:user@d``), quoted local parts that contain ``@``, and address literals as the
recipient domain. Each client identity may use only its own envelope senders.

Replies are returned as strings (``None``: accepted) so the listener only has to push them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from smtp365.models import undecodable
from smtp365.relay.users import sender_allowed

__all__ = [
    "Address",
    "ClientIdentity",
    "NetworkRule",
    "RelayPolicy",
    "parse_address",
    "split_path",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Non-ASCII text (RFC 6531) without the surrogates: a lone one stands for a byte that was not
# UTF-8 (aiosmtpd decodes command lines with surrogateescape) and is never part of an address.
_U8 = r"\u0080-\ud7ff\ue000-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_U8}]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(\.{_ATEXT}+)*")
_QUOTED = re.compile(rf'"((?:[\x20\x21\x23-\x5b\x5d-\x7e{_U8}]|\\[\x20-\x7e])*)"')
_LABEL = rf"[A-Za-z0-9{_U8}]([A-Za-z0-9\-{_U8}]*[A-Za-z0-9{_U8}])?"
_DOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_LITERAL = re.compile(r"\[(IPv6:[0-9A-Fa-f:.]+|[0-9.]+)\]")


@dataclass(frozen=True, slots=True)
class Address:
    """A syntactically valid mailbox: ``local@domain``."""

    local: str  # as written (quotes kept)
    domain: str
    quoted: bool = False

    @property
    def local_text(self) -> str:
        """The local part without quoting."""
        if not self.quoted:
            return self.local
        return re.sub(r"\\(.)", r"\1", self.local[1:-1])

    @property
    def literal(self) -> bool:
        return self.domain.startswith("[")

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


def split_path(arg: str) -> tuple[str, str] | None:
    """``<path> params`` -> (path, params); ``None`` when there are no angle brackets."""
    arg = arg.strip()
    if not arg.startswith("<"):
        return None
    in_quote = False
    i = 1
    while i < len(arg):
        c = arg[i]
        if in_quote and c == "\\":
            i += 2
            continue
        if c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            return arg[1:i], arg[i + 1 :].strip()
        i += 1
    return None


def parse_address(path: str, *, utf8: bool = False) -> Address | None:
    """Parse a mailbox (no source route, no brackets); ``None`` when the syntax is invalid."""
    if not path or len(path) > 320 or any(c in path for c in "\x00\r\n"):
        return None
    if not utf8 and not path.isascii():
        return None
    if path.startswith('"'):
        m = _QUOTED.match(path)
        if m is None or path[m.end() : m.end() + 1] != "@":
            return None
        local, quoted, rest = path[: m.end()], True, path[m.end() + 1 :]
    else:
        local, at, rest = path.partition("@")
        if not at or not _DOT_ATOM.fullmatch(local):
            return None
        quoted = False
    if not (_DOMAIN.fullmatch(rest) or _LITERAL.fullmatch(rest)) or len(local) > 64:
        return None
    if _LITERAL.fullmatch(rest):
        try:
            text = rest[1:-1]
            ipaddress.ip_address(text[5:] if text.startswith("IPv6:") else text)
        except ValueError:
            return None
    return Address(local, rest, quoted)


@dataclass(frozen=True, slots=True)
class NetworkRule:
    """An allow-listed client network and the envelope senders its hosts may use."""

    network: IPNetwork
    senders: tuple[str, ...] = ("*",)
    name: str = ""

    @property
    def label(self) -> str:
        """The name, or the CIDR of an unnamed network."""
        return self.name or str(self.network)

    @classmethod
    def parse(cls, cidr: str, senders: Iterable[str] = ("*",), **kw: object) -> NetworkRule:
        net = ipaddress.ip_network(cidr, strict=False)
        return cls(net, tuple(senders), **kw)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """Who is handing us mail: an authenticated user or an allow-listed network."""

    kind: str  # "user" or "network"
    name: str  # user name, or the network's name / CIDR
    senders: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class RelayPolicy:
    """The relay decisions of one listener."""

    def __init__(self, networks: Iterable[NetworkRule] = ()) -> None:
        self.networks = tuple(networks)

    def network_for(self, client_ip: str) -> NetworkRule | None:
        ip = _ip(client_ip)
        if ip is None:
            return None
        for rule in self.networks:
            if ip.version == rule.network.version and ip in rule.network:
                return rule
        return None

    def identity(
        self, client_ip: str, user: str | None, user_senders: tuple[str, ...] = ()
    ) -> ClientIdentity | None:
        """The identity whose permissions apply: the user if authenticated, else the network."""
        if user is not None:
            return ClientIdentity("user", user, user_senders)
        rule = self.network_for(client_ip)
        if rule is None:
            return None
        return ClientIdentity("network", rule.label, rule.senders)

    def plain_auth_allowed(self, client_ip: str, networks: Collection[str]) -> bool:
        """Whether the client is in one of the allow-listed ``networks`` (names, or CIDRs of
        unnamed ones) that a listener lets AUTH before TLS."""
        if not networks:
            return False
        rule = self.network_for(client_ip)
        return rule is not None and rule.label in networks

    # ------------------------------------------------------------- MAIL / RCPT

    def check_sender(
        self, identity: ClientIdentity | None, path: str, *, utf8: bool = False
    ) -> str | None:
        """The reply refusing ``MAIL FROM:<path>``, or ``None``. Unknown clients pass here and
        are refused at RCPT (as Postfix does)."""
        if path.startswith("@"):
            return "553 5.1.7 Source routes are not accepted in the sender address"
        if path:
            if undecodable(path):
                return "553 5.1.7 Bad sender address syntax: it is not valid UTF-8"
            addr = parse_address(path, utf8=utf8)
            if addr is None:
                if not utf8 and not path.isascii():
                    return "553 5.1.7 Bad sender address syntax: 8-bit address without SMTPUTF8"
                return "501 5.1.7 Bad sender address syntax"
            if "%" in addr.local_text or "!" in addr.local_text or "@" in addr.local_text:
                return "553 5.1.7 Routing characters (%, !, @) are not accepted in the sender"
        if identity is None:
            return None
        if not sender_allowed(identity.senders, path):
            return (
                f"553 5.7.1 <{path}>: Sender address rejected: not allowed for "
                f"{identity.kind} {identity.name}"
            )
        return None

    def check_recipient(
        self, identity: ClientIdentity | None, path: str, *, utf8: bool = False
    ) -> str | None:
        """The reply refusing ``RCPT TO:<path>``, or ``None`` when it may be relayed."""
        if undecodable(path):  # never echoed: the reply could not carry it
            return "553 5.1.3 Bad recipient address syntax: it is not valid UTF-8"
        shown = path.replace("\r", "").replace("\n", "")[:320]
        if identity is None:
            return f"554 5.7.1 <{shown}>: Relay access denied"
        if path.startswith("@"):
            return f"553 5.7.1 <{shown}>: Source-routed addresses are not accepted"
        if not path:
            return "501 5.1.3 Bad recipient address syntax"
        addr = parse_address(path, utf8=utf8)
        local = addr.local_text if addr is not None else path.rpartition("@")[0] or path
        if "%" in local or "!" in local or (addr is None and ("!" in path or "%" in path)):
            return f"553 5.7.1 <{shown}>: % and ! routing forms are not accepted"
        if addr is None:
            if not utf8 and not path.isascii():
                return f"553 5.1.3 <{shown}>: 8-bit recipient address without SMTPUTF8"
            return f"501 5.1.3 <{shown}>: Bad recipient address syntax"
        if "@" in local:
            return f"553 5.7.1 <{shown}>: Quoted local parts containing @ are not accepted"
        if addr.literal:
            return f"553 5.7.1 <{shown}>: Address literals are not accepted as recipients"
        return None
