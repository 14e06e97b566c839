"""A local Exchange Online look-alike: the oracle the client side is tested against.

SMTP submission (STARTTLS, AUTH LOGIN/XOAUTH2, limits, faults, captured mail) plus an
identity platform that MSAL talks to unmodified (OIDC discovery, client credentials,
authorization code + PKCE, device code, refresh tokens, Entra's AADSTS errors).

It imports nothing from smtp365 but ``smtp365.models``; its wire replies are
literal text from shared/reference/exchange-online.md.
"""

from __future__ import annotations

from .aadsts import AadError
from .faults import Faults, FiredFault
from .identity import IdentityError, IdentityPlatform
from .pki import ClientCertificate, Pki, ensure_client_certificate, ensure_pki
from .service import (
    Sandbox,
    SandboxError,
    identity_tls_context,
    list_messages,
    mint_token,
    read_info,
    run,
    server_tls_context,
)
from .settings import (
    DEFAULT_APP_ID,
    DEFAULT_PUBLIC_APP_ID,
    DEFAULT_TENANT_ID,
    AppSettings,
    FaultRule,
    FaultSettings,
    LimitSettings,
    MailboxSettings,
    SandboxSettings,
    Stage,
)
from .state import IdentityStats, Stats
from .store import MessageStore, StoredMessage
from .tokens import TokenError, TokenIssuer

__all__ = [
    "DEFAULT_APP_ID",
    "DEFAULT_PUBLIC_APP_ID",
    "DEFAULT_TENANT_ID",
    "AadError",
    "AppSettings",
    "ClientCertificate",
    "FaultRule",
    "FaultSettings",
    "Faults",
    "FiredFault",
    "IdentityError",
    "IdentityPlatform",
    "IdentityStats",
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
    "ensure_client_certificate",
    "ensure_pki",
    "identity_tls_context",
    "list_messages",
    "mint_token",
    "read_info",
    "run",
    "server_tls_context",
]
