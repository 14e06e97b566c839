"""Microsoft identity platform (Entra ID) errors: AADSTS codes explained, like replies.py does
for SMTP replies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class AadstsEntry:
    code: int
    meaning: str
    fix: str
    temporary: bool = False
    relogin: bool = False  # the user must sign in again (smtp365 auth login)


_LOGIN = "run `smtp365 auth login` again to sign in"

CATALOGUE: dict[int, AadstsEntry] = {
    e.code: e
    for e in (
        AadstsEntry(
            7000215,
            "the client secret is wrong",
            "copy the secret's Value (not its Secret ID) from App registrations > Certificates & "
            "secrets into client_secret_env / client_secret_file",
        ),
        AadstsEntry(
            7000222,
            "the client secret has expired",
            "create a new client secret in App registrations > Certificates & secrets",
        ),
        AadstsEntry(
            700016,
            "no application with this client_id exists in the tenant",
            "check client_id (the Application (client) ID) and tenant; a multi-tenant app needs "
            "admin consent in this tenant first",
        ),
        AadstsEntry(
            65001,
            "the permission was not consented",
            "an admin grants consent: App registrations > API permissions > Grant admin consent "
            "(SMTP app-only: Office 365 Exchange Online > Application > SMTP.SendAsApp; delegated: "
            "SMTP.Send; Graph: Mail.Send)",
        ),
        AadstsEntry(
            700027,
            "the client certificate or assertion was not accepted",
            "upload the certificate (public part) under App registrations > Certificates & "
            "secrets and make certificate_file / private_key_file the matching pair",
        ),
        AadstsEntry(
            700024,
            "the client assertion is outside its validity window",
            "fix this machine's clock (NTP)",
        ),
        AadstsEntry(70008, "the refresh token expired", _LOGIN, relogin=True),
        AadstsEntry(
            50173,
            "the sign-in grant was revoked (password change, admin revocation)",
            _LOGIN,
            relogin=True,
        ),
        AadstsEntry(
            70043,
            "the refresh token expired under a Conditional Access sign-in frequency policy",
            _LOGIN + "; or use the client-credentials flow for unattended sending",
            relogin=True,
        ),
        AadstsEntry(
            50076,
            "multi-factor authentication is required",
            "sign in interactively (`smtp365 auth login`), which can complete MFA; for services "
            "use the client-credentials flow",
            relogin=True,
        ),
        AadstsEntry(
            50079,
            "the user must register for multi-factor authentication",
            "sign in once at https://aka.ms/mfasetup, then `smtp365 auth login`",
            relogin=True,
        ),
        AadstsEntry(
            53003,
            "a Conditional Access policy blocked the sign-in",
            "adjust or exclude this app/user in the Conditional Access policy, or use the "
            "client-credentials flow",
        ),
        AadstsEntry(50034, "the user account does not exist in this tenant", "check the user"),
        AadstsEntry(50126, "the username or password is wrong", "check the credentials"),
        AadstsEntry(
            70011,
            "the requested scope is invalid",
            "smtp365 picks scopes itself; check authority_host and that the app is a work/school "
            "app (not a personal Microsoft account app)",
        ),
        AadstsEntry(
            7000218,
            "the app is confidential but no client secret or certificate was sent",
            "for device code / interactive sign-in enable App registrations > Authentication > "
            "Allow public client flows",
        ),
        AadstsEntry(90002, "the tenant was not found", "check tenant (id or verified domain)"),
        AadstsEntry(
            50059, "no tenant was given", "set tenant to your tenant id or verified domain"
        ),
        AadstsEntry(
            70003,
            "the app may not use this grant type",
            "check the app registration's platform settings for this flow",
        ),
        AadstsEntry(
            501481,
            "the PKCE code verifier did not match",
            "retry the sign-in; if it persists, report it",
            temporary=True,
        ),
    )
}

_CODE = re.compile(r"AADSTS(\d+)")

# OAuth2 error strings that carry no AADSTS code (device flow and generic ones).
_OAUTH: dict[str, tuple[str, str, bool]] = {
    "authorization_pending": ("the user has not finished signing in", "finish the sign-in", True),
    "authorization_declined": ("the user declined the sign-in", _LOGIN, False),
    "expired_token": ("the sign-in code expired before it was used", _LOGIN, False),
    "invalid_grant": ("the grant (code or refresh token) is not valid any more", _LOGIN, False),
    "temporarily_unavailable": ("the identity platform is busy", "try again later", True),
}


def code_of(result: dict[str, Any]) -> int | None:
    """The AADSTS code of an error response (``error_codes`` or the description)."""
    codes = result.get("error_codes")
    if isinstance(codes, list) and codes and isinstance(codes[0], int):
        return codes[0]
    m = _CODE.search(str(result.get("error_description", "")))
    return int(m.group(1)) if m else None


def explain(result: dict[str, Any]) -> tuple[str, str, bool, bool]:
    """``(what, fix, temporary, relogin)`` for an MSAL error result."""
    error = str(result.get("error", "error"))
    description = str(result.get("error_description", "")).split("\r\n")[0].split("\n")[0]
    code = code_of(result)
    entry = CATALOGUE.get(code) if code is not None else None
    if entry is not None:
        return (
            f"the identity platform refused: AADSTS{code} -- {entry.meaning} ({description})",
            entry.fix,
            entry.temporary,
            entry.relogin,
        )
    if error in _OAUTH:
        meaning, fix, temporary = _OAUTH[error]
        return (f"the identity platform said {error}: {meaning}", fix, temporary, not temporary)
    return (
        f"the identity platform refused: {error}: {description}",
        "look the AADSTS code up at https://login.microsoftonline.com/error",
        False,
        False,
    )
