"""The resource owner password grant (ROPC) with real MSAL: where Entra ID reports the user's
problems (wrong password, unknown user, MFA, Conditional Access) in the token response.

MSAL quirk: before ROPC it asks ``https://{host}/common/userrealm/...`` *without the port*
of the authority, which cannot reach a sandbox on a high port. Tests tell MSAL that
``localhost`` has no user realm endpoint, as it learns by itself after a 404.
"""

from __future__ import annotations

from typing import Any

import msal.authority
import pytest

from smtp365.sandbox import Sandbox, SandboxSettings

from .conftest import claims_of

SMTP_SEND = ["https://outlook.office.com/SMTP.Send"]


@pytest.fixture(autouse=True)
def _no_user_realm_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        msal.authority.Authority, "_domains_without_user_realm_discovery", {"localhost"}
    )


def ropc(app: Any, user: str, password: str) -> dict[str, Any]:
    return dict(app.acquire_token_by_username_password(user, password, SMTP_SEND))


def test_confidential_app_gets_tokens(sandbox: Sandbox, cca) -> None:
    result = ropc(cca(sandbox), "bob@contoso.test", sandbox.password("bob@contoso.test"))
    assert claims_of(result["access_token"])["upn"] == "bob@contoso.test"
    assert result["refresh_token"]
    assert sandbox.identity.stats.tokens_issued == {"password": 1}


def test_public_client_is_warned_by_msal(sandbox: Sandbox, pca) -> None:
    with pytest.warns(DeprecationWarning, match="deprecated for public client flows"):
        result = ropc(pca(sandbox), "bob@contoso.test", sandbox.password("bob@contoso.test"))
    assert "access_token" in result


@pytest.mark.parametrize(
    ("user", "password", "code", "text"),
    [
        ("alice@contoso.test", "wrong", 50126, "Error validating credentials due to invalid"),
        ("eve@contoso.test", "x", 50034, "The user account {EUII Hidden} does not exist in the"),
        ("noreply@contoso.test", "x", 50057, "The user account is disabled."),
    ],
    ids=["wrong-password", "unknown-user", "shared-mailbox"],
)
def test_credential_errors(sandbox: Sandbox, cca, user, password, code, text) -> None:
    result = ropc(cca(sandbox), user, password)
    assert (result["error"], result["error_codes"]) == ("invalid_grant", [code])
    assert result["error_description"].startswith(f"AADSTS{code}: {text}")


@pytest.mark.parametrize(
    ("flag", "code"), [("mfa_required", 50076), ("conditional_access_block", 53003)]
)
def test_policy_errors(start_sandbox, cca, flag: str, code: int) -> None:
    settings = SandboxSettings()
    bob = settings.mailbox("bob@contoso.test")
    assert bob is not None
    setattr(bob, flag, True)
    sb = start_sandbox(settings)
    result = ropc(cca(sb), "bob@contoso.test", sb.password("bob@contoso.test"))
    assert result["error_codes"] == [code]
    wrong = ropc(cca(sb), "bob@contoso.test", "wrong")
    assert wrong["error_codes"] == [50126]  # credentials are checked before policies


def test_two_resources_in_one_request(sandbox: Sandbox, cca) -> None:
    result = cca(sandbox).acquire_token_by_username_password(
        "bob@contoso.test",
        sandbox.password("bob@contoso.test"),
        ["https://outlook.office.com/SMTP.Send", "https://graph.microsoft.com/Mail.Send"],
    )
    assert result["error_codes"] == [28000]
