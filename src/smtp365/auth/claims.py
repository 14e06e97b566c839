"""Check an access token's claims before using it (no network, no signature check).

A token for the wrong audience, without the permission, or expired would be
refused by the server with a bare ``535 5.7.3``; checking here lets smtp365
say precisely what is wrong.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from smtp365.errors import AuthError

Target = Literal["smtp", "graph"]  # (the same alias as smtp365.auth.Target)

SMTP_AUDIENCES = (
    "https://outlook.office365.com",
    "https://outlook.office.com",
    "00000002-0000-0ff1-ce00-000000000000",
)
GRAPH_AUDIENCES = ("https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000")
NEEDED = {"smtp": ("SMTP.Send", "SMTP.SendAsApp"), "graph": ("Mail.Send", "Mail.Send")}


class ClaimsError(AuthError):
    """A token unfit for its target; ``key`` is the first problem's stable key."""

    def __init__(self, what: str, *, fix: str, key: str) -> None:
        super().__init__(what, fix=fix)
        self.key = key


def decode(token: str) -> dict[str, Any] | None:
    """The payload of a JWT, or ``None`` when the token is not a JWT (opaque tokens exist)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


@dataclass(frozen=True, slots=True)
class ClaimsReport:
    """What a token says about itself, and what is wrong with it for ``target``."""

    target: Target
    audience: str
    app_only: bool
    permissions: tuple[str, ...]
    expires_at: float | None
    user: str | None
    tenant: str | None
    problems: list[tuple[str, str]] = field(default_factory=list)  # (what, fix)
    keys: list[str] = field(default_factory=list)  # a stable key per problem, same order
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        """What the token says, JSON-ready (never the token itself)."""
        return {
            "audience": self.audience,
            "app_only": self.app_only,
            "permissions": list(self.permissions),
            "user": self.user,
            "tenant": self.tenant,
            "expires_at": self.expires_at,
        }


def _aud(claims: dict[str, Any]) -> str:
    aud = claims.get("aud", "")
    if isinstance(aud, list):
        aud = aud[0] if aud else ""
    return str(aud).rstrip("/")


def check(
    claims: dict[str, Any], target: Target, *, mailbox: str | None = None, now: float | None = None
) -> ClaimsReport:
    now = time.time() if now is None else now
    aud = _aud(claims)
    roles = claims.get("roles") or []
    scp = str(claims.get("scp") or "").split()
    # App-only tokens carry no scp at all (Entra may also say idtyp=app); delegated ones do.
    app_only = claims.get("idtyp") == "app" or "scp" not in claims
    perms = tuple(str(r) for r in roles) if app_only else tuple(scp)
    exp = claims.get("exp")
    user = claims.get("upn") or claims.get("preferred_username") or claims.get("unique_name")
    report = ClaimsReport(
        target=target,
        audience=aud,
        app_only=app_only,
        permissions=perms,
        expires_at=float(exp) if isinstance(exp, int | float) else None,
        user=str(user) if user else None,
        tenant=str(claims["tid"]) if claims.get("tid") else None,
    )
    wanted_aud = SMTP_AUDIENCES if target == "smtp" else GRAPH_AUDIENCES
    other = "Microsoft Graph" if target == "smtp" else "Exchange Online (SMTP)"
    if aud not in wanted_aud:
        if aud in (GRAPH_AUDIENCES if target == "smtp" else SMTP_AUDIENCES):
            what = f"the token is for {other} (aud {aud}), not for {target.upper()}"
        else:
            what = f"the token's audience is {aud or '(none)'}, not {wanted_aud[0]}"
        scope = (
            "https://outlook.office365.com/.default (app-only) or "
            "https://outlook.office.com/SMTP.Send (delegated)"
            if target == "smtp"
            else "https://graph.microsoft.com/.default (app-only) or Mail.Send (delegated)"
        )
        report.problems.append((what, f"request the token with scope {scope}"))
        report.keys.append("claims.audience")
    delegated_perm, app_perm = NEEDED[target]
    needed = app_perm if app_only else delegated_perm
    if needed not in perms:
        report.keys.append("claims.permission")
        kind = "roles" if app_only else "scp"
        api = "Office 365 Exchange Online" if target == "smtp" else "Microsoft Graph"
        grant = "Application" if app_only else "Delegated"
        report.problems.append(
            (
                f"the token has no {needed} in its {kind} (it has: {', '.join(perms) or 'none'})",
                f"add the API permission {api} > {grant} > {needed} to the app registration and "
                "grant admin consent",
            )
        )
    if report.expires_at is not None and report.expires_at <= now:
        report.keys.append("claims.expired")
        report.problems.append(
            (
                f"the token expired {int(now - report.expires_at)} s ago",
                "get a fresh token (smtp365 does this itself with an MSAL flow)",
            )
        )
    if mailbox and report.user and not app_only and report.user.lower() != mailbox.lower():
        report.warnings.append(
            f"the token belongs to {report.user} but signs in as {mailbox}: that works only with "
            "FullAccess on that mailbox (Add-MailboxPermission)"
        )
    return report


def require(token: str, target: Target, *, mailbox: str | None = None) -> ClaimsReport | None:
    """Raise :class:`AuthError` naming the first problem; ``None`` for opaque tokens."""
    claims = decode(token)
    if claims is None:
        return None
    report = check(claims, target, mailbox=mailbox)
    if report.problems:
        what, fix = report.problems[0]
        more = "; ".join(p for p, _ in report.problems[1:])
        raise ClaimsError(what + (f" (also: {more})" if more else ""), fix=fix, key=report.keys[0])
    return report
