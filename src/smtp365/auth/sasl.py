"""SASL encodings for SMTP AUTH (pure functions, no I/O)."""

from __future__ import annotations

import base64

_FORBIDDEN = ("\x00", "\x01", "\r", "\n")


def _check(name: str, value: str) -> None:
    if any(c in value for c in _FORBIDDEN):
        raise ValueError(f"{name} contains a control character (NUL, ^A, CR or LF)")


def xoauth2(user: str, token: str) -> str:
    """``base64("user=" + user + "^Aauth=Bearer " + token + "^A^A")`` as sent after AUTH XOAUTH2."""
    _check("user", user)
    _check("token", token)
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")


def login_step(value: str) -> str:
    """One AUTH LOGIN answer (username or password), base64 encoded."""
    _check("value", value)
    return base64.b64encode(value.encode("utf-8")).decode("ascii")
