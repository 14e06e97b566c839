"""A local Exchange Online look-alike: the oracle the client side is tested against.

It imports nothing from smtp365 but ``smtp365.models``; its wire replies are
literal text from shared/reference/exchange-online.md.
"""

from __future__ import annotations

from .faults import Faults, FiredFault
from .pki import Pki, ensure_pki
from .service import (
    Sandbox,
    SandboxError,
    list_messages,
    mint_token,
    read_info,
    run,
    server_tls_context,
)
from .settings import (
    AppSettings,
    FaultRule,
    FaultSettings,
    LimitSettings,
    MailboxSettings,
    SandboxSettings,
    Stage,
)
from .state import Stats
from .store import MessageStore, StoredMessage
from .tokens import TokenError, TokenIssuer

__all__ = [
    "AppSettings",
    "FaultRule",
    "FaultSettings",
    "Faults",
    "FiredFault",
    "LimitSettings",
    "MailboxSettings",
    "MessageStore",
    "Pki",
    "Sandbox",
    "SandboxError",
    "SandboxSettings",
    "Stage",
    "Stats",
    "StoredMessage",
    "TokenError",
    "TokenIssuer",
    "ensure_pki",
    "list_messages",
    "mint_token",
    "read_info",
    "run",
    "server_tls_context",
]
