"""Credentials for SMTP AUTH: the :class:`TokenProvider` seam and its implementations."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


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
    """Always returns the same token (from config, an env var or a file)."""

    def __init__(self, token: str) -> None:
        self._token = AccessToken(token=token)

    def __repr__(self) -> str:
        return "StaticTokenProvider(token=***)"

    async def get_token(self, *, force_refresh: bool = False) -> AccessToken:
        return self._token


__all__ = ["AccessToken", "StaticTokenProvider", "TokenProvider"]
