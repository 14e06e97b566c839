"""Authorization code + PKCE with real MSAL; the test is the browser (GET /authorize, post the
sign-in form, read the redirect or the form_post page)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from smtp365.sandbox import Sandbox, SandboxSettings

from .conftest import claims_of, parse_page, xoauth2_send

SMTP_SEND = ["https://outlook.office.com/SMTP.Send"]
REDIRECT = "http://localhost:53123"  # registered as http://localhost: any port is fine


def sign_in(sb: Sandbox, app, browser, scopes=SMTP_SEND, user="alice@contoso.test", **kwargs):
    """Initiate the flow (form_post), sign in as ``user`` in the browser, redeem the code."""
    flow = app.initiate_auth_code_flow(
        scopes, redirect_uri=REDIRECT, response_mode="form_post", **kwargs
    )
    outcome = browser(sb).sign_in(flow["auth_uri"], user, sb.password(user))
    assert outcome.auth_response is not None, outcome.page
    return flow, outcome, app.acquire_token_by_auth_code_flow(flow, outcome.auth_response)


def test_public_client_form_post(sandbox: Sandbox, pca, browser) -> None:
    app = pca(sandbox)
    flow, outcome, result = sign_in(sandbox, app, browser)
    assert outcome.location == REDIRECT
    assert set(outcome.auth_response or {}) == {"code", "state", "session_state"}
    assert "access_token" in result, result
    claims = claims_of(result["access_token"])
    assert (claims["aud"], claims["scp"], claims["upn"]) == (
        "https://outlook.office.com",
        "SMTP.Send",
        "alice@contoso.test",
    )
    assert result["refresh_token"]
    assert result["id_token_claims"]["nonce"]  # MSAL checked it against its own
    assert xoauth2_send(sandbox, "alice@contoso.test", result["access_token"])[0] == 235

    [account] = app.get_accounts()
    cached = app.acquire_token_silent(SMTP_SEND, account=account)
    assert cached["token_source"] == "cache"
    assert sandbox.identity.stats.token_requests == {"authorization_code": 1}
    assert sandbox.identity.stats.sign_ins == 1


def test_query_response_mode(sandbox: Sandbox, pca, browser) -> None:
    app = pca(sandbox)
    with pytest.warns(UserWarning, match="form_post"):  # MSAL nudges towards form_post
        flow = app.initiate_auth_code_flow(SMTP_SEND, redirect_uri=REDIRECT)
    outcome = browser(sandbox).sign_in(
        flow["auth_uri"], "bob@contoso.test", sandbox.password("bob@contoso.test")
    )
    assert outcome.location is not None and outcome.location.startswith(f"{REDIRECT}?code=")
    result = app.acquire_token_by_auth_code_flow(flow, outcome.auth_response)
    assert claims_of(result["access_token"])["upn"] == "bob@contoso.test"


def test_confidential_web_app_and_graph(sandbox: Sandbox, cca, browser) -> None:
    app = cca(sandbox)
    _, _, result = sign_in(sandbox, app, browser, scopes=["https://graph.microsoft.com/Mail.Send"])
    claims = claims_of(result["access_token"])
    assert (claims["aud"], claims["scp"]) == ("https://graph.microsoft.com", "Mail.Send")
    assert result["scope"] == "https://graph.microsoft.com/Mail.Send"
    assert claims["appid"] == sandbox.settings.default_app_id


def test_wrong_password_then_right(sandbox: Sandbox, pca, browser) -> None:
    app = pca(sandbox)
    flow = app.initiate_auth_code_flow(SMTP_SEND, redirect_uri=REDIRECT, response_mode="form_post")
    web = browser(sandbox)
    outcome = web.sign_in(flow["auth_uri"], "alice@contoso.test", "wrong")
    assert outcome.auth_response is None and outcome.page is not None
    assert outcome.page.error_code.startswith("AADSTS50126:")
    assert "Your account or password is incorrect" in outcome.page.text
    unknown = web.sign_in(flow["auth_uri"], "eve@contoso.test", "x")
    assert unknown.page is not None and unknown.page.error_code.startswith("AADSTS50034:")
    # the form keeps the request: posting it again with the right password works
    form = outcome.page.forms[0]
    fields = {**form.fields, "passwd": sandbox.password("alice@contoso.test")}
    answer = web.session.post(
        f"https://localhost:{sandbox.identity_port}{form.action}", data=fields
    )
    response = parse_page(answer).forms[0].fields
    result = app.acquire_token_by_auth_code_flow(flow, response)
    assert claims_of(result["access_token"])["upn"] == "alice@contoso.test"


def test_login_hint_prefills_the_form(sandbox: Sandbox, pca, browser) -> None:
    flow = pca(sandbox).initiate_auth_code_flow(
        SMTP_SEND, redirect_uri=REDIRECT, response_mode="form_post", login_hint="bob@contoso.test"
    )
    page = parse_page(browser(sandbox).open(flow["auth_uri"]))
    assert page.forms[0].fields["login"] == "bob@contoso.test"
    assert page.forms[0].fields["code_challenge_method"] == "S256"


def test_unregistered_redirect_uri_shows_an_error_page(sandbox: Sandbox, pca, browser) -> None:
    flow = pca(sandbox).initiate_auth_code_flow(
        SMTP_SEND, redirect_uri="https://evil.example/cb", response_mode="form_post"
    )
    outcome = browser(sandbox).sign_in(flow["auth_uri"], "alice@contoso.test", "x")
    assert outcome.auth_response is None and outcome.page is not None
    assert outcome.page.status == 400
    assert outcome.page.error_code.startswith(
        "AADSTS50011: The redirect URI 'https://evil.example/cb' specified in the request does "
        "not match the redirect URIs configured for the application"
    )


def test_loopback_path_must_match(sandbox: Sandbox, pca, browser) -> None:
    flow = pca(sandbox).initiate_auth_code_flow(
        SMTP_SEND, redirect_uri="http://localhost:53123/other", response_mode="form_post"
    )
    page = parse_page(browser(sandbox).open(flow["auth_uri"]))
    assert page.error_code.startswith("AADSTS50011:")


def test_consent_required(start_sandbox, pca, browser) -> None:
    settings = SandboxSettings()
    settings.apps[1].delegated_permissions = ["SMTP.Send"]
    sb = start_sandbox(settings)
    app = pca(sb)
    flow = app.initiate_auth_code_flow(
        ["https://graph.microsoft.com/Mail.Send"], redirect_uri=REDIRECT, response_mode="form_post"
    )
    outcome = browser(sb).sign_in(
        flow["auth_uri"], "alice@contoso.test", sb.password("alice@contoso.test")
    )
    result = app.acquire_token_by_auth_code_flow(flow, outcome.auth_response)
    assert result["error"] == "consent_required"
    assert result["error_description"].startswith("AADSTS65001: The user or administrator has not")
    assert sb.identity.stats.errors == {"AADSTS65001": 1}


def test_conditional_access_block(start_sandbox, pca, browser) -> None:
    settings = SandboxSettings()
    alice = settings.mailbox("alice@contoso.test")
    assert alice is not None
    alice.conditional_access_block = True
    sb = start_sandbox(settings)
    app = pca(sb)
    flow = app.initiate_auth_code_flow(SMTP_SEND, redirect_uri=REDIRECT, response_mode="form_post")
    outcome = browser(sb).sign_in(
        flow["auth_uri"], "alice@contoso.test", sb.password("alice@contoso.test")
    )
    result = app.acquire_token_by_auth_code_flow(flow, outcome.auth_response)
    assert result["error"] == "access_denied"
    assert result["error_description"].startswith("AADSTS53003:")


def test_bad_pkce_verifier(sandbox: Sandbox, pca, browser) -> None:
    app = pca(sandbox)
    flow = app.initiate_auth_code_flow(SMTP_SEND, redirect_uri=REDIRECT, response_mode="form_post")
    outcome = browser(sandbox).sign_in(
        flow["auth_uri"], "alice@contoso.test", sandbox.password("alice@contoso.test")
    )
    flow["code_verifier"] = "x" * 43
    result = app.acquire_token_by_auth_code_flow(flow, outcome.auth_response)
    assert (result["error"], result["error_codes"]) == ("invalid_grant", [501481])


def test_code_is_single_use(sandbox: Sandbox, pca, browser) -> None:
    app = pca(sandbox)
    flow, outcome, first = sign_in(sandbox, app, browser)
    assert "access_token" in first
    again = app.acquire_token_by_auth_code_flow(flow, outcome.auth_response)
    assert again["error_codes"] == [54005]


def test_code_expires(start_sandbox, pca, browser, wall_clock) -> None:
    sb = start_sandbox(wall_clock=wall_clock)
    app = pca(sb)
    flow = app.initiate_auth_code_flow(SMTP_SEND, redirect_uri=REDIRECT, response_mode="form_post")
    outcome = browser(sb).sign_in(
        flow["auth_uri"], "bob@contoso.test", sb.password("bob@contoso.test")
    )
    wall_clock.advance(601)
    result = app.acquire_token_by_auth_code_flow(flow, outcome.auth_response)
    assert result["error_codes"] == [70008]


def test_authorize_errors_before_and_after_the_redirect_is_trusted(
    sandbox: Sandbox, browser
) -> None:
    web = browser(sandbox)
    base = f"https://localhost:{sandbox.identity_port}/{sandbox.settings.tenant_id}"
    public = sandbox.settings.apps[1].app_id

    def authorize(**params: str):
        return web.open(f"{base}/oauth2/v2.0/authorize?{urlencode(params)}")

    unknown = parse_page(authorize(client_id="00000000-0000-0000-0000-000000000001"))
    assert unknown.error_code.startswith("AADSTS700016:")

    common = {"client_id": public, "redirect_uri": REDIRECT, "state": "s1"}
    token = authorize(**common, response_type="token", scope="openid")
    answer = dict(parse_qsl(urlsplit(token.headers["Location"]).query))
    assert (answer["error"], answer["state"]) == ("unsupported_response_type", "s1")
    assert answer["error_description"].startswith("AADSTS700054:")

    silent = authorize(**common, response_type="code", scope="openid", prompt="none")
    answer = dict(parse_qsl(urlsplit(silent.headers["Location"]).query))
    assert answer["error"] == "login_required"

    fragment = authorize(
        **common, response_type="code", scope="bogus scope!", response_mode="fragment"
    )
    answer = dict(parse_qsl(urlsplit(fragment.headers["Location"]).fragment))
    assert (answer["error"], answer["error_description"][:12]) == ("invalid_scope", "AADSTS70011:")

    unknown_tenant = parse_page(
        web.open(
            f"https://localhost:{sandbox.identity_port}/fabrikam.test/oauth2/v2.0/authorize?client_id={public}"
        )
    )
    assert unknown_tenant.error_code.startswith("AADSTS90002: Tenant 'fabrikam.test' not found.")
