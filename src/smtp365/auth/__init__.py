"""Credentials for SMTP AUTH: the :class:`TokenProvider` seam and its implementations."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from smtp365.config import AccountSettings, Flow

Target = Literal["smtp", "graph"]


@dataclass(frozen=True, slots=True)
class AccessToken:
    """An OAuth2 access token. ``repr()`` never shows the token itself."""

    token: str = field(repr=False)
    expires_at: float = float("inf")  # UNIX time; inf when unknown
    source: str = "static"

    def expires_within(self, seconds: float, *, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) + seconds >= self.expires_at


@runtime_checkable
class TokenProvider(Protocol):
    """Anything that can hand out an access token for one mailbox."""

    async def get_token(self, *, force_refresh: bool = False) -> AccessToken: ...


class StaticTokenProvider:
    """Always returns the same token (from config, an env var or a file).

    With ``check`` set, a JWT's claims are checked for that target before it is
    handed out, so a wrong audience or an expired token is named precisely.
    """

    def __init__(self, token: str, *, check: Target | None = None) -> None:
        self._token = AccessToken(token=token)
        self._check = check

    def __repr__(self) -> str:
        return "StaticTokenProvider(token=***)"

    async def get_token(self, *, force_refresh: bool = False) -> AccessToken:
        if self._check is not None:
            from smtp365.auth import claims

            claims.require(self._token.token, self._check)
        return self._token


def provider_for(account: AccountSettings, *, target: Target = "smtp") -> TokenProvider:
    """The token provider an account's settings ask for (static token or an MSAL flow)."""
    if account.flow is Flow.STATIC:
        return StaticTokenProvider(account.token_value(), check=target)
    from smtp365.auth.msal_provider import MsalTokenProvider

    return MsalTokenProvider(account, target=target)


__all__ = ["AccessToken", "StaticTokenProvider", "TokenProvider", "provider_for"]
