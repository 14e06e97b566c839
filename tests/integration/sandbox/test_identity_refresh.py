"""Refresh tokens with real MSAL: ``acquire_token_silent`` refreshes through the identity
platform when the access token is (nearly) expired, rotates the refresh token, and fails
with Entra's codes when the grant is revoked, expired or newly restricted."""

from __future__ import annotations

from typing import Any

import pytest

from smtp365.sandbox import Sandbox, SandboxSettings

from .conftest import claims_of, xoauth2_send

SMTP_SEND = ["https://outlook.office.com/SMTP.Send"]


def signed_in(sb: Sandbox, app: Any, user: str = "alice@contoso.test") -> dict[str, Any]:
    """A device-code sign-in approved up front (MSAL's first poll gets the tokens)."""
    flow = app.initiate_device_flow(scopes=SMTP_SEND)
    assert sb.identity.approve_device_code(flow["user_code"], user) is None
    result = app.acquire_token_by_device_flow(flow)
    assert "access_token" in result, result
    [account] = app.get_accounts()
    return account


def refresh_tokens(app: Any) -> list[str]:
    return [
        rt["secret"] for rt in app.token_cache.search(app.token_cache.CredentialType.REFRESH_TOKEN)
    ]


def test_short_access_token_is_refreshed_and_rotated(start_sandbox, pca) -> None:
    # MSAL treats an access token with less than five minutes left as expired.
    sb = start_sandbox(SandboxSettings(access_token_lifetime=60))
    app = pca(sb)
    account = signed_in(sb, app)
    [first_rt] = refresh_tokens(app)

    result = app.acquire_token_silent(SMTP_SEND, account=account)
    assert result["token_source"] == "identity_provider"
    assert result["expires_in"] == 60
    [second_rt] = refresh_tokens(app)
    assert second_rt != first_rt
    assert sb.identity.stats.token_requests["refresh_token"] == 1
    assert sb.identity.stats.refresh_tokens_issued == 2
    assert xoauth2_send(sb, "alice@contoso.test", result["access_token"])[0] == 235

    app.acquire_token_silent(SMTP_SEND, account=account)
    assert sb.identity.stats.token_requests["refresh_token"] == 2


def test_long_access_token_comes_from_the_cache(sandbox: Sandbox, pca) -> None:
    app = pca(sandbox)
    account = signed_in(sandbox, app)
    for _ in range(3):
        assert app.acquire_token_silent(SMTP_SEND, account=account)["token_source"] == "cache"
    assert sandbox.identity.stats.token_requests == {"device_code": 1}


def test_one_refresh_token_serves_another_resource(sandbox: Sandbox, pca) -> None:
    app = pca(sandbox)
    account = signed_in(sandbox, app)
    result = app.acquire_token_silent(["https://graph.microsoft.com/Mail.Send"], account=account)
    assert result["token_source"] == "identity_provider"
    claims = claims_of(result["access_token"])
    assert (claims["aud"], claims["scp"]) == ("https://graph.microsoft.com", "Mail.Send")


def silent_error(
    app: Any, account: dict[str, Any], scopes: list[str] = SMTP_SEND
) -> dict[str, Any]:
    assert app.acquire_token_silent(scopes, account=account) is None
    result = app.acquire_token_silent_with_error(scopes, account=account)
    assert result is not None and "error" in result, result
    return result


def test_revoked(start_sandbox, pca) -> None:
    sb = start_sandbox(SandboxSettings(access_token_lifetime=60))
    app = pca(sb)
    account = signed_in(sb, app)
    sb.identity.revoke_refresh_tokens("alice@contoso.test")
    result = silent_error(app, account)
    assert (result["error"], result["error_codes"]) == ("invalid_grant", [50173])
    assert "The provided grant has expired due to it being revoked" in result["error_description"]
    assert signed_in(sb, app)  # a new sign-in works again
    assert (
        app.acquire_token_silent(SMTP_SEND, account=account)["token_source"] == "identity_provider"
    )


def test_expired(start_sandbox, pca, wall_clock) -> None:
    settings = SandboxSettings(access_token_lifetime=60, refresh_token_lifetime=3600)
    sb = start_sandbox(settings, wall_clock=wall_clock)
    app = pca(sb)
    account = signed_in(sb, app)
    wall_clock.advance(3601)
    result = silent_error(app, account)
    assert result["error_codes"] == [70008]
    assert result["suberror"] == "bad_token"


@pytest.mark.parametrize(
    ("flag", "code"), [("mfa_required", 50076), ("conditional_access_block", 53003)]
)
def test_new_policy_stops_refresh(start_sandbox, pca, flag: str, code: int) -> None:
    sb = start_sandbox(SandboxSettings(access_token_lifetime=60))
    app = pca(sb)
    account = signed_in(sb, app)  # signed in without MFA
    alice = sb.settings.mailbox("alice@contoso.test")
    assert alice is not None
    setattr(alice, flag, True)  # settings are read live
    result = silent_error(app, account)
    assert result["error_codes"] == [code]
    if flag == "mfa_required":
        assert result["suberror"] == "basic_action"
        assert "claims" in result
        assert "'00000002-0000-0ff1-ce00-000000000000'" in result["error_description"]


def test_scope_without_consent(sandbox: Sandbox, pca) -> None:
    app = pca(sandbox)
    account = signed_in(sandbox, app)
    result = silent_error(app, account, ["https://graph.microsoft.com/Mail.Read"])
    assert result["error_codes"] == [65001]


def test_garbage_and_foreign_refresh_tokens(sandbox: Sandbox, pca, https) -> None:
    app = pca(sandbox)
    signed_in(sandbox, app)
    [rt] = refresh_tokens(app)
    session = https(sandbox)

    def redeem(token: str, client_id: str) -> dict[str, Any]:
        data = {
            "client_id": client_id,
            "grant_type": "refresh_token",
            "refresh_token": token,
            "scope": "https://outlook.office.com/SMTP.Send offline_access",
        }
        if client_id == sandbox.settings.default_app_id:
            data["client_secret"] = sandbox.settings.apps[0].client_secret or ""
        return session.post(sandbox.identity.token_endpoint, data=data).json()

    assert redeem("garbage", sandbox.settings.apps[1].app_id)["error_codes"] == [9002313]
    assert redeem(rt, sandbox.settings.default_app_id)["error_codes"] == [9002313]
    fresh = redeem(rt, sandbox.settings.apps[1].app_id)
    assert fresh["refresh_token"] != rt
    assert "id_token" not in fresh  # no openid asked
    assert (
        redeem(rt, sandbox.settings.apps[1].app_id)["token_type"] == "Bearer"
    )  # old RT still valid


def test_refresh_tokens_survive_a_restart(state_dir, pca) -> None:
    settings = SandboxSettings(access_token_lifetime=60)
    with Sandbox(state_dir, settings).run_in_thread() as first:
        app = pca(first)
        account = signed_in(first, app)
        [rt] = refresh_tokens(app)
    with Sandbox(state_dir, settings).run_in_thread() as second:
        app = pca(second)
        response = app.acquire_token_by_refresh_token(rt, SMTP_SEND)
        assert claims_of(response["access_token"])["upn"] == account["username"]
