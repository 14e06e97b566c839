"""Counters (SMTP and identity platform) and per-mailbox usage (concurrent sessions, message
rate, recipients per window)."""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["IdentityStats", "Stats", "Usage"]


@dataclass
class Stats:
    """What the sandbox saw since it started. Read it from any thread."""

    connections: int = 0
    active_connections: int = 0
    tls_sessions: int = 0
    legacy_tls_refused: int = 0
    auth_successes: int = 0
    auth_failures: int = 0
    auth_failure_reasons: Counter[str] = field(default_factory=Counter)
    throttle_replies: int = 0
    """Every 451 rate-limit, 432 concurrency and 554 5.2.0 quota reply."""
    rate_limited: int = 0
    concurrency_limited: int = 0
    quota_exceeded: int = 0
    send_as_denied: int = 0
    messages_accepted: int = 0
    messages_rejected: int = 0
    recipients_accepted: int = 0
    faults_injected: int = 0
    commands_in_clear: int = 0
    """AUTH, MAIL, RCPT, DATA and BDAT received outside TLS (a client that sends them is
    refused, and should never have tried: Exchange Online wants STARTTLS first)."""

    def snapshot(self) -> dict[str, Any]:
        data = asdict(self)
        data["auth_failure_reasons"] = dict(self.auth_failure_reasons)
        return data


@dataclass
class IdentityStats:
    """What the identity platform saw since the sandbox started. Read it from any thread.

    Grant types are counted by short name: ``client_credentials``, ``authorization_code``,
    ``refresh_token``, ``device_code``, ``password`` (anything else as sent).
    """

    http_requests: int = 0
    discovery_requests: int = 0
    """GETs of the OpenID configuration (MSAL fetches it once per application object)."""
    token_requests: Counter[str] = field(default_factory=Counter)
    """Every POST to the token endpoint, by grant type, failed ones included."""
    tokens_issued: Counter[str] = field(default_factory=Counter)
    """Successful token responses, by grant type."""
    refresh_tokens_issued: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """Error answers by code, e.g. ``{"AADSTS7000215": 1}`` (pages and redirects included)."""
    device_codes_issued: int = 0
    device_code_polls: int = 0
    authorize_requests: int = 0
    sign_ins: int = 0
    """Successful interactive sign-ins (sign-in form, device code page, or the test API)."""

    @property
    def token_requests_total(self) -> int:
        return sum(self.token_requests.values())

    def snapshot(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("token_requests", "tokens_issued", "errors"):
            data[name] = dict(getattr(self, name))
        return data


class Usage:
    """Per-mailbox sliding windows and session counts; keys are lower-cased addresses."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._active: Counter[str] = Counter()
        self._sent: dict[str, deque[float]] = {}
        self._rcpts: dict[str, deque[tuple[float, int]]] = {}

    def acquire(self, mailbox: str, limit: int) -> bool:
        """Take a session slot for ``mailbox``; ``False`` when ``limit`` are already taken."""
        key = mailbox.lower()
        with self._lock:
            if self._active[key] >= limit:
                return False
            self._active[key] += 1
            return True

    def release(self, mailbox: str) -> None:
        key = mailbox.lower()
        with self._lock:
            if self._active[key] > 0:
                self._active[key] -= 1
            if self._active[key] == 0:
                del self._active[key]

    def active(self, mailbox: str) -> int:
        with self._lock:
            return self._active.get(mailbox.lower(), 0)

    def rate_ok(self, mailbox: str, limit: int, window: float) -> bool:
        """Fewer than ``limit`` messages accepted in the last ``window`` seconds."""
        now = self._clock()
        with self._lock:
            sent = self._sent.setdefault(mailbox.lower(), deque())
            while sent and sent[0] <= now - window:
                sent.popleft()
            return len(sent) < limit

    def recipients_ok(self, mailbox: str, count: int, limit: int, window: float) -> bool:
        """``count`` more recipients stay within ``limit`` over the last ``window`` seconds."""
        now = self._clock()
        with self._lock:
            rcpts = self._rcpts.setdefault(mailbox.lower(), deque())
            while rcpts and rcpts[0][0] <= now - window:
                rcpts.popleft()
            return sum(n for _, n in rcpts) + count <= limit

    def record(self, mailbox: str, recipients: int) -> None:
        """Count one accepted message with ``recipients`` recipients."""
        now = self._clock()
        key = mailbox.lower()
        with self._lock:
            self._sent.setdefault(key, deque()).append(now)
            self._rcpts.setdefault(key, deque()).append((now, recipients))
