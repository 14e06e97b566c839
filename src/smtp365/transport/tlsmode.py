"""The two TLS-mode mistakes, told once: implicit TLS on a port that speaks plain SMTP first
("SSL on 587"), and STARTTLS (or no TLS) on a port that expects a TLS ClientHello (465).

The SMTP transport reaches these verdicts while it connects; the doctor's ``tls.mode`` check
reaches them with its own probes. Both say it in these words.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

# OpenSSL's reasons for "what came back is not TLS at all" (usually a clear-text banner)
NOT_TLS_REASONS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "UNKNOWN_PROTOCOL",
        "HTTP_REQUEST",
        "UNEXPECTED_RECORD",
        "RECORD_TOO_LARGE",
    }
)


def answered_in_plain_text(exc: BaseException) -> bool:
    """The TLS handshake failed because the server answered with something that is not TLS."""
    return isinstance(exc, ssl.SSLError) and (exc.reason or "") in NOT_TLS_REASONS


@dataclass(frozen=True, slots=True)
class TLSModeMistake:
    """One mistake: ``what`` (a template: ``{mode}``, ``{where}``, ``{seen}``), why it is one,
    and the fix."""

    key: str
    template: str
    why: str
    fix: str

    def what(self, *, where: str, seen: str, mode: str = "") -> str:
        return self.template.format(mode=mode, where=where, seen=seen)


IMPLICIT_ON_PLAIN_PORT = TLSModeMistake(
    key="implicit-tls-on-starttls-port",
    template="set to implicit TLS/SSL but the server expects STARTTLS on this port: "
    "{where} speaks plain SMTP first ({seen})",
    why='implicit TLS ("SSL", port 465 style) starts TLS on the first byte; this port greets '
    'in plain text and upgrades with STARTTLS. "SSL on 587" is a misconfiguration',
    fix="set tls = starttls (Microsoft 365: smtp.office365.com, port 587, tls = starttls)",
)

PLAIN_FIRST_ON_TLS_PORT = TLSModeMistake(
    key="starttls-on-implicit-tls-port",
    template="tls = {mode} but {where} speaks implicit TLS: {seen}",
    why="port 465 (SMTPS) starts TLS on the first byte; port 587 speaks plain SMTP first and "
    "upgrades with STARTTLS. Microsoft 365 does not serve implicit TLS on 465: SMTP AUTH "
    "client submission is smtp.office365.com:587 with STARTTLS",
    fix="for Microsoft 365: port = 587 and tls = starttls; for another server that only "
    "offers implicit TLS: tls = implicit",
)


def no_greeting_but_tls(version: str, *, wait: float | None) -> str:
    """``seen`` for :data:`PLAIN_FIRST_ON_TLS_PORT`: no clear-text greeting within ``wait``
    seconds (``None``: the server closed the connection before greeting), and a TLS
    handshake succeeded with ``version``."""
    silent = (
        "the server closed the connection without a greeting in clear text"
        if wait is None
        else f"no greeting in clear text within {wait:g} s"
    )
    return f"{silent}, and a TLS handshake succeeded ({version})"


__all__ = [
    "IMPLICIT_ON_PLAIN_PORT",
    "NOT_TLS_REASONS",
    "PLAIN_FIRST_ON_TLS_PORT",
    "TLSModeMistake",
    "answered_in_plain_text",
    "no_greeting_but_tls",
]
