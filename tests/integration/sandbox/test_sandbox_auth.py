"""AUTH LOGIN and AUTH XOAUTH2 with the 535 variants (reference §2, §3, §4, §6)."""

from __future__ import annotations

import base64

import pytest

from smtp365.sandbox import MailboxSettings, Sandbox, SandboxSettings

HOST = "SBX0P365CA0001.outlook.sandbox.test"
OK = "235 2.7.0 Authentication successful"
XOAUTH2_FAILED = "535 5.7.3 Authentication unsuccessful"
TENANT_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
    "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
)
MAILBOX_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
    "Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information."
)
BASIC_DISABLED = "535 5.7.139 Authentication unsuccessful, basic authentication is disabled."
BAD_CREDENTIALS = "535 5.7.139 Authentication unsuccessful, the user credentials were incorrect."


def settings_with(**alice: object) -> SandboxSettings:
    settings = SandboxSettings()
    mbx = settings.mailbox("alice@contoso.test")
    assert mbx is not None
    for key, value in alice.items():
        setattr(mbx, key, value)
    return settings


# ------------------------------------------------------------------ LOGIN


def test_login_challenge_form_succeeds(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    resp = client.auth_login("alice@contoso.test", sandbox.password("alice@contoso.test"))
    assert resp.raw == OK
    assert sandbox.stats.auth_successes == 1


def test_login_initial_response_form_succeeds(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    user = base64.b64encode(b"bob@contoso.test").decode()
    assert client.cmd(f"AUTH LOGIN {user}").raw == "334 UGFzc3dvcmQ6"
    password = base64.b64encode(sandbox.password("bob@contoso.test").encode()).decode()
    assert client.cmd(password).raw == OK


def test_login_wrong_password(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    assert client.auth_login("alice@contoso.test", "not-the-password").bare == BAD_CREDENTIALS
    assert client.auth_login("nobody@contoso.test", "x").bare == BAD_CREDENTIALS
    assert sandbox.stats.auth_failures == 2


def test_login_basic_disabled(start_sandbox, secured) -> None:
    sb = start_sandbox(settings_with(basic_auth_enabled=False))
    client = secured(sb)
    assert client.auth_login("alice@contoso.test", sb.password("alice@contoso.test")).bare == (
        BASIC_DISABLED
    )


def test_login_mailbox_smtp_auth_disabled(start_sandbox, secured) -> None:
    sb = start_sandbox(settings_with(smtp_auth_enabled=False))
    client = secured(sb)
    resp = client.auth_login("alice@contoso.test", sb.password("alice@contoso.test"))
    assert resp.bare == MAILBOX_DISABLED


def test_login_tenant_smtp_auth_disabled_and_mailbox_override(start_sandbox, secured) -> None:
    settings = SandboxSettings(smtp_auth_enabled=False)
    bob = settings.mailbox("bob@contoso.test")
    assert bob is not None
    bob.smtp_auth_enabled = True  # the mailbox setting wins
    sb = start_sandbox(settings)
    client = secured(sb)
    resp = client.auth_login("alice@contoso.test", sb.password("alice@contoso.test"))
    assert resp.bare == TENANT_DISABLED
    assert client.auth_login("bob@contoso.test", sb.password("bob@contoso.test")).raw == OK


def test_security_defaults_and_conditional_access_block_login(start_sandbox, secured) -> None:
    settings = settings_with(conditional_access_block=True)
    sb = start_sandbox(settings)
    client = secured(sb)
    resp = client.auth_login("alice@contoso.test", sb.password("alice@contoso.test"))
    assert resp.raw.startswith("535 5.7.139 Authentication unsuccessful, the request did not meet")
    sb.settings.security_defaults = True  # settings are read live
    resp = client.auth_login("bob@contoso.test", sb.password("bob@contoso.test"))
    assert resp.raw.startswith("535 5.7.139 Authentication unsuccessful, user is locked by")
    assert "security defaults policy" in resp.raw


def test_shared_mailbox_cannot_login(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    assert client.auth_login("noreply@contoso.test", "whatever").bare == BAD_CREDENTIALS


def test_plain_is_not_offered(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    blob = base64.b64encode(b"\0alice@contoso.test\0pw").decode()
    assert client.cmd(f"AUTH PLAIN {blob}").bare == ("504 5.7.4 Unrecognized authentication type")


def test_bad_base64_and_abort(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    assert client.cmd("AUTH LOGIN").code == 334
    assert client.cmd("*").raw == "501 5.0.0 Authentication Aborted"
    assert client.cmd("AUTH LOGIN !!!").raw == "501 5.5.2 Cannot Decode response"


# ---------------------------------------------------------------- XOAUTH2


@pytest.mark.parametrize("initial", [True, False], ids=["initial-response", "challenge"])
def test_xoauth2_delegated_succeeds(sandbox: Sandbox, secured, initial: bool) -> None:
    client = secured(sandbox)
    token = sandbox.issue_token("bob@contoso.test")
    assert client.auth_xoauth2("bob@contoso.test", token, initial=initial).raw == OK


def test_xoauth2_expired_token(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    token = sandbox.issue_token("bob@contoso.test", lifetime=-60)
    assert client.auth_xoauth2("bob@contoso.test", token).bare == XOAUTH2_FAILED
    assert sandbox.stats.auth_failure_reasons == {"token_expired": 1}


def test_xoauth2_graph_audience_is_refused(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    token = sandbox.issue_token("bob@contoso.test", audience="https://graph.microsoft.com")
    assert client.auth_xoauth2("bob@contoso.test", token).bare == XOAUTH2_FAILED
    assert sandbox.stats.auth_failure_reasons == {"token_audience": 1}


@pytest.mark.parametrize(
    "audience", ["https://outlook.office.com", "00000002-0000-0ff1-ce00-000000000000"]
)
def test_xoauth2_other_exchange_audiences_are_accepted(
    sandbox: Sandbox, secured, audience: str
) -> None:
    client = secured(sandbox)
    token = sandbox.issue_token("bob@contoso.test", audience=audience)
    assert client.auth_xoauth2("bob@contoso.test", token).raw == OK


def test_xoauth2_missing_scope(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    token = sandbox.issue_token("bob@contoso.test", scopes=["Mail.Read"])
    assert client.auth_xoauth2("bob@contoso.test", token).bare == XOAUTH2_FAILED
    assert sandbox.stats.auth_failure_reasons == {"token_scope": 1}


def test_xoauth2_token_of_another_mailbox(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    token = sandbox.issue_token("bob@contoso.test")
    assert client.auth_xoauth2("alice@contoso.test", token).bare == XOAUTH2_FAILED
    assert sandbox.stats.auth_failure_reasons == {"wrong_mailbox": 1}


def test_xoauth2_garbage_token(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    assert client.auth_xoauth2("bob@contoso.test", "not.a.jwt").bare == XOAUTH2_FAILED


def test_xoauth2_delegated_full_access_to_shared_mailbox(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    token = sandbox.issue_token("alice@contoso.test")
    assert client.auth_xoauth2("noreply@contoso.test", token).raw == OK


def test_xoauth2_app_only(start_sandbox, secured) -> None:
    settings = SandboxSettings()
    settings.mailboxes.append(
        MailboxSettings(address="locked@contoso.test", allowed_apps=[])  # app not granted
    )
    sb = start_sandbox(settings)
    token = sb.issue_token(app_only=True)
    assert secured(sb).auth_xoauth2("noreply@contoso.test", token).raw == OK
    assert secured(sb).auth_xoauth2("locked@contoso.test", token).bare == XOAUTH2_FAILED
    other_app = sb.issue_token(app_only=True, app_id="11111111-2222-3333-4444-555555555555")
    assert secured(sb).auth_xoauth2("bob@contoso.test", other_app).bare == XOAUTH2_FAILED
    no_role = sb.issue_token(app_only=True, scopes=["Mail.Send"])
    assert secured(sb).auth_xoauth2("bob@contoso.test", no_role).bare == XOAUTH2_FAILED
    assert sb.stats.auth_failure_reasons == {"app_not_granted": 2, "token_scope": 1}


def test_xoauth2_respects_smtp_auth_switch(start_sandbox, secured) -> None:
    sb = start_sandbox(SandboxSettings(smtp_auth_enabled=False))
    token = sb.issue_token("bob@contoso.test")
    assert secured(sb).auth_xoauth2("bob@contoso.test", token).bare == TENANT_DISABLED


def test_token_counters(sandbox: Sandbox, secured, make_message) -> None:
    token = sandbox.issue_token("alice@contoso.test")
    for _ in range(3):
        client = secured(sandbox)
        assert client.auth_xoauth2("alice@contoso.test", token).raw == OK
        resp = client.send_message("alice@contoso.test", ["x@example.net"], make_message())
        assert resp.code == 250
        client.cmd("QUIT")
    assert sandbox.issuer.issued == 1
    assert sandbox.issuer.verified == 3
    assert sandbox.issuer.distinct_verified == 1
