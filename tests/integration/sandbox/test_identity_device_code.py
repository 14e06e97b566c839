"""Device code flow with real MSAL: the test approves while MSAL polls in a thread, through
the Python API or the ``/devicelogin`` page, and every way it can end."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from smtp365.sandbox import IdentityError, Sandbox, SandboxSettings

from .conftest import claims_of, parse_page, xoauth2_send

SMTP_SEND = ["https://outlook.office.com/SMTP.Send"]


def fast(**changes: Any) -> SandboxSettings:
    """Settings announcing ``interval`` 0: MSAL then polls back to back (no sleep at all)."""
    return SandboxSettings(device_code_interval=0, **changes)


@contextlib.contextmanager
def polling(sb: Sandbox, app: Any, flow: dict[str, Any]) -> Iterator[Future[dict[str, Any]]]:
    """``acquire_token_by_device_flow`` in a thread; declined at exit if still pending, so a
    failing test never leaves MSAL polling."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(app.acquire_token_by_device_flow, flow)
    try:
        yield future
    finally:
        with contextlib.suppress(IdentityError):
            if sb.identity.device_code_status(flow["user_code"]) == "pending":
                sb.identity.decline_device_code(flow["user_code"])
        pool.shutdown(wait=True)


def test_device_code_approved_through_the_api(start_sandbox, pca) -> None:
    sb = start_sandbox(fast())
    app = pca(sb)
    flow = app.initiate_device_flow(scopes=SMTP_SEND)
    uri = f"https://localhost:{sb.identity_port}/devicelogin"
    assert flow["verification_uri"] == uri
    assert flow["interval"] == 0
    assert flow["expires_in"] == 900
    assert flow["message"] == (
        f"To sign in, use a web browser to open the page {uri} and enter the code "
        f"{flow['user_code']} to authenticate."
    )
    with polling(sb, app, flow) as future:
        assert sb.identity.wait_for_device_poll(flow["user_code"])
        assert sb.identity.approve_device_code(flow["user_code"], "alice@contoso.test") is None
        result = future.result(timeout=10)

    assert result["token_source"] == "identity_provider"
    assert result["scope"] == "https://outlook.office.com/SMTP.Send"
    claims = claims_of(result["access_token"])
    assert claims["aud"] == "https://outlook.office.com"
    assert claims["scp"] == "SMTP.Send"
    assert claims["upn"] == claims["preferred_username"] == "alice@contoso.test"
    assert claims["appid"] == sb.settings.apps[1].app_id
    assert claims["amr"] == ["pwd"]
    assert result["refresh_token"]
    assert result["id_token_claims"]["preferred_username"] == "alice@contoso.test"
    assert result["id_token_claims"]["name"] == "Alice Example"
    [account] = app.get_accounts()
    assert account["username"] == "alice@contoso.test"

    assert xoauth2_send(sb, "alice@contoso.test", result["access_token"])[0] == 235
    assert xoauth2_send(sb, "noreply@contoso.test", result["access_token"])[0] == 235
    stats = sb.identity.stats
    assert stats.token_requests["device_code"] == stats.device_code_polls >= 2
    assert stats.errors["AADSTS70016"] == stats.device_code_polls - 1
    assert stats.tokens_issued == {"device_code": 1}


def test_polling_waits_the_announced_interval(start_sandbox, pca) -> None:
    sb = start_sandbox(SandboxSettings(device_code_interval=1))
    app = pca(sb)
    flow = app.initiate_device_flow(scopes=SMTP_SEND)
    assert flow["interval"] == 1
    with polling(sb, app, flow) as future:
        assert sb.identity.wait_for_device_poll(flow["user_code"])
        assert sb.identity.device_code_status(flow["user_code"]) == "pending"
        sb.identity.approve_device_code(flow["user_code"], "bob@contoso.test")
        result = future.result(timeout=10)
    assert claims_of(result["access_token"])["upn"] == "bob@contoso.test"
    assert sb.identity.stats.device_code_polls == 2


def test_declined(start_sandbox, pca) -> None:
    sb = start_sandbox(fast())
    app = pca(sb)
    flow = app.initiate_device_flow(scopes=SMTP_SEND)
    sb.identity.decline_device_code(flow["user_code"])
    result = app.acquire_token_by_device_flow(flow)
    assert result["error"] == "authorization_declined"
    assert result["error_codes"] == [65004]


def test_expired(start_sandbox, pca, wall_clock) -> None:
    sb = start_sandbox(fast(device_code_lifetime=60), wall_clock=wall_clock)
    app = pca(sb)
    flow = app.initiate_device_flow(scopes=SMTP_SEND)
    assert flow["expires_in"] == 60
    wall_clock.advance(61)
    result = app.acquire_token_by_device_flow(flow)
    assert result["error"] == "expired_token"
    assert result["error_codes"] == [70020]
    with pytest.raises(IdentityError):
        sb.identity.approve_device_code(flow["user_code"], "alice@contoso.test")


def test_blocked_by_conditional_access(start_sandbox, pca) -> None:
    settings = fast()
    bob = settings.mailbox("bob@contoso.test")
    assert bob is not None
    bob.conditional_access_block = True
    sb = start_sandbox(settings)
    app = pca(sb)
    flow = app.initiate_device_flow(scopes=SMTP_SEND)
    shown = sb.identity.approve_device_code(flow["user_code"], "bob@contoso.test")
    assert shown is not None and shown.startswith("AADSTS53003: Access has been blocked")
    result = app.acquire_token_by_device_flow(flow)
    assert (result["error"], result["error_codes"]) == ("invalid_grant", [53003])


def test_consent_missing(start_sandbox, pca) -> None:
    settings = fast()
    settings.apps[1].delegated_permissions = ["Mail.Send"]  # no SMTP.Send
    sb = start_sandbox(settings)
    app = pca(sb)
    flow = app.initiate_device_flow(scopes=SMTP_SEND)
    assert sb.identity.approve_device_code(flow["user_code"], "alice@contoso.test")
    result = app.acquire_token_by_device_flow(flow)
    assert result["error_codes"] == [65001]
    assert result["suberror"] == "consent_required"
    assert "has not consented to use the application with ID" in result["error_description"]


@pytest.mark.parametrize(
    ("scopes", "code"),
    [
        (["SMTP.Send"], 70011),  # unqualified = Microsoft Graph, which has no SMTP.Send
        (["https://outlook.office.com/SMTP.Send", "https://graph.microsoft.com/Mail.Send"], 28000),
        (["https://outlook.office.com/.default", "https://outlook.office.com/SMTP.Send"], 70011),
    ],
    ids=["graph-smtp", "two-resources", "default-mixed"],
)
def test_invalid_scopes_at_initiation(sandbox: Sandbox, pca, scopes, code) -> None:
    flow = pca(sandbox).initiate_device_flow(scopes=scopes)
    assert flow["error_codes"] == [code]
    assert "user_code" not in flow


def test_mfa_user_signs_in_interactively(start_sandbox, pca) -> None:
    settings = fast()
    alice = settings.mailbox("alice@contoso.test")
    assert alice is not None
    alice.mfa_required = True
    sb = start_sandbox(settings)
    app = pca(sb)
    flow = app.initiate_device_flow(scopes=SMTP_SEND)
    sb.identity.approve_device_code(flow["user_code"], "alice@contoso.test")
    result = app.acquire_token_by_device_flow(flow)
    assert claims_of(result["access_token"])["amr"] == ["pwd", "mfa"]


def test_api_refuses_unknown_codes_and_users(sandbox: Sandbox, pca) -> None:
    with pytest.raises(IdentityError):
        sandbox.identity.approve_device_code("NOSUCHCOD", "alice@contoso.test")
    flow = pca(sandbox).initiate_device_flow(scopes=SMTP_SEND)
    with pytest.raises(IdentityError):
        sandbox.identity.approve_device_code(flow["user_code"], "noreply@contoso.test")  # shared
    sandbox.identity.decline_device_code(flow["user_code"])


# --------------------------------------------------------------- the web page


def test_devicelogin_page(start_sandbox, pca, https) -> None:
    sb = start_sandbox(fast())
    app = pca(sb)
    session = https(sb)
    flow = app.initiate_device_flow(scopes=SMTP_SEND)
    url = flow["verification_uri"]
    page = parse_page(session.get(url))
    assert page.status == 200
    assert set(page.forms[0].fields) >= {"otc", "login", "passwd"}
    password = sb.password("alice@contoso.test")

    def post(**fields: str):
        return parse_page(session.post(url, data={"action": "continue", **fields}))

    assert post(otc="WRONGCODE").error_code.startswith("AADSTS70018:")
    code = flow["user_code"]
    assert post(otc=code, login="alice@contoso.test", passwd="nope").error_code.startswith(
        "AADSTS50126: Error validating credentials due to invalid username or password."
    )
    assert post(otc=code, login="eve@contoso.test", passwd="x").error_code.startswith(
        "AADSTS50034: The user account {EUII Hidden} does not exist"
    )
    assert post(otc=code, login="noreply@contoso.test", passwd="x").error_code.startswith(
        "AADSTS50057:"
    )
    assert sb.identity.device_code_status(code) == "pending"
    done = post(otc=code.lower(), login="alice@contoso.test", passwd=password)
    assert done.status == 200
    assert "You have signed in to the smtp365 sandbox public client application" in done.text
    result = app.acquire_token_by_device_flow(flow)
    assert claims_of(result["access_token"])["upn"] == "alice@contoso.test"
    assert sb.identity.stats.errors == {
        "AADSTS70018": 1,
        "AADSTS50126": 1,
        "AADSTS50034": 1,
        "AADSTS50057": 1,
    }
    assert post(otc=code, login="alice@contoso.test", passwd=password).error_code.startswith(
        "AADSTS70018:"  # a code works once
    )


def test_devicelogin_cancel(start_sandbox, pca, https) -> None:
    sb = start_sandbox(fast())
    app = pca(sb)
    flow = app.initiate_device_flow(scopes=SMTP_SEND)
    page = https(sb).post(
        flow["verification_uri"], data={"otc": flow["user_code"], "action": "cancel"}
    )
    assert "You have declined to sign in" in page.text
    assert app.acquire_token_by_device_flow(flow)["error"] == "authorization_declined"
