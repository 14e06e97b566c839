"""Client credentials against the identity platform with real MSAL: secret and certificate,
tokens accepted by SMTP XOAUTH2, MSAL's cache, and Entra's AADSTS errors (reference §3, §9)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import jwt
import msal
import pytest

from smtp365.sandbox import AppSettings, Sandbox, SandboxSettings, ensure_client_certificate

from .conftest import assertion_claims, bare, claims_of, registered_key, xoauth2_send

EXCHANGE = ["https://outlook.office365.com/.default"]
GRAPH = ["https://graph.microsoft.com/.default"]
XOAUTH2_FAILED = "5.7.3 Authentication unsuccessful"


def test_secret_token_is_shaped_like_entra_and_cached(sandbox: Sandbox, cca) -> None:
    app = cca(sandbox)
    result = app.acquire_token_for_client(EXCHANGE)
    assert result["token_source"] == "identity_provider"
    assert result["token_type"] == "Bearer"
    assert "refresh_token" not in result
    claims = claims_of(result["access_token"])
    assert claims["aud"] == "https://outlook.office365.com"
    assert claims["roles"] == ["SMTP.SendAsApp"]
    assert claims["appid"] == sandbox.settings.default_app_id
    assert claims["tid"] == sandbox.settings.tenant_id
    assert claims["idtyp"] == "app"
    assert "scp" not in claims and "upn" not in claims
    assert claims["exp"] - claims["iat"] == 3600 + 300  # iat back-dated five minutes

    again = app.acquire_token_for_client(EXCHANGE)
    assert again["token_source"] == "cache"
    assert again["access_token"] == result["access_token"]
    assert sandbox.identity.stats.token_requests == {"client_credentials": 1}
    assert sandbox.identity.stats.discovery_requests == 1


def test_n_sends_cost_one_token_request(sandbox: Sandbox, cca) -> None:
    app = cca(sandbox)
    for _ in range(3):
        token = app.acquire_token_for_client(EXCHANGE)["access_token"]
        code, _ = xoauth2_send(sandbox, "noreply@contoso.test", token)
        assert code == 235
    assert sandbox.identity.stats.token_requests["client_credentials"] == 1
    assert sandbox.identity.stats.tokens_issued["client_credentials"] == 1
    assert sandbox.issuer.distinct_verified == 1
    assert sandbox.stats.messages_accepted == 3


def test_graph_token_has_graph_roles_and_is_refused_by_smtp(sandbox: Sandbox, cca) -> None:
    token = cca(sandbox).acquire_token_for_client(GRAPH)["access_token"]
    claims = claims_of(token)
    assert claims["aud"] == "https://graph.microsoft.com"
    assert claims["roles"] == ["Mail.Send"]
    code, text = xoauth2_send(sandbox, "noreply@contoso.test", token)
    assert (code, bare(text)) == (535, XOAUTH2_FAILED)
    assert sandbox.stats.auth_failure_reasons == {"token_audience": 1}


@pytest.mark.parametrize("form", ["public_certificate", "thumbprint", "pfx"])
def test_certificate_credential(sandbox: Sandbox, cca, form: str) -> None:
    cert = sandbox.client_certificates[sandbox.settings.default_app_id]
    if form == "public_certificate":  # MSAL ≥1.35: PS256 with x5t#S256 and x5c
        credential = {
            "private_key": cert.key_file.read_text(),
            "public_certificate": cert.cert_file.read_text(),
        }
    elif form == "thumbprint":  # the classic form: RS256 with the SHA-1 x5t
        credential = {"private_key": cert.key_file.read_text(), "thumbprint": cert.thumbprint}
    else:
        credential = {"private_key_pfx_path": str(cert.pfx_file)}
    result = cca(sandbox, credential).acquire_token_for_client(EXCHANGE)
    assert "access_token" in result, result
    assert xoauth2_send(sandbox, "bob@contoso.test", result["access_token"])[0] == 235


def test_app_without_permissions_gets_a_token_without_roles(start_sandbox, cca) -> None:
    settings = SandboxSettings()
    settings.apps[0].app_permissions = []
    sb = start_sandbox(settings)
    token = cca(sb).acquire_token_for_client(EXCHANGE)["access_token"]
    assert "roles" not in claims_of(token)  # as Entra ID: no error, just no roles
    code, text = xoauth2_send(sb, "bob@contoso.test", token)
    assert (code, bare(text)) == (535, XOAUTH2_FAILED)
    assert sb.stats.auth_failure_reasons == {"token_scope": 1}


def test_qualified_exchange_permission(start_sandbox, cca) -> None:
    settings = SandboxSettings()
    settings.apps[0].app_permissions = ["SMTP.SendAsApp", "https://outlook.office365.com/Mail.Send"]
    sb = start_sandbox(settings)
    token = cca(sb).acquire_token_for_client(EXCHANGE)["access_token"]
    assert claims_of(token)["roles"] == ["SMTP.SendAsApp", "Mail.Send"]
    assert "roles" not in claims_of(cca(sb).acquire_token_for_client(GRAPH)["access_token"])


# ------------------------------------------------------------------ errors


def codes(result: dict) -> list[int]:
    assert "access_token" not in result, result
    return list(result["error_codes"])


def test_wrong_secret(sandbox: Sandbox, cca) -> None:
    result = cca(sandbox, "not-the-secret").acquire_token_for_client(EXCHANGE)
    assert result["error"] == "invalid_client"
    assert codes(result) == [7000215]
    assert result["error_description"].startswith(
        "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the "
        "request is the client secret value, not the client secret ID, for a secret added to "
        f"app '{sandbox.settings.default_app_id}'.\r\nTrace ID: "
    )
    assert result["error_uri"] == f"https://localhost:{sandbox.identity_port}/error?code=7000215"
    assert sandbox.identity.stats.errors == {"AADSTS7000215": 1}


def test_unknown_app(sandbox: Sandbox, https) -> None:
    app = msal.ConfidentialClientApplication(
        str(uuid.uuid4()),
        client_credential="x",
        authority=sandbox.authority,
        instance_discovery=False,
        http_client=https(sandbox),
    )
    result = app.acquire_token_for_client(EXCHANGE)
    assert result["error"] == "unauthorized_client"
    assert codes(result) == [700016]


def test_certificate_not_registered(sandbox: Sandbox, cca, tmp_path: Path) -> None:
    other = ensure_client_certificate(tmp_path, "other")
    credential = {
        "private_key": other.key_file.read_text(),
        "public_certificate": other.cert_file.read_text(),
    }
    result = cca(sandbox, credential).acquire_token_for_client(EXCHANGE)
    assert codes(result) == [700027]
    assert (
        "The certificate with identifier used to sign the client assertion is not registered"
        in (result["error_description"])
    )


def test_registered_thumbprint_signed_by_another_key(sandbox: Sandbox, cca, tmp_path) -> None:
    registered = sandbox.client_certificates[sandbox.settings.default_app_id]
    other = ensure_client_certificate(tmp_path, "other")
    credential = {"private_key": other.key_file.read_text(), "thumbprint": registered.thumbprint}
    result = cca(sandbox, credential).acquire_token_for_client(EXCHANGE)
    assert codes(result) == [700027]
    assert "Client assertion contains an invalid signature" in result["error_description"]
    assert registered.thumbprint in result["error_description"]


def _assertion(sb: Sandbox, **overrides: object) -> str:
    key, thumb = registered_key(sb)
    return jwt.encode(
        assertion_claims(sb, **overrides), key, algorithm="RS256", headers={"x5t": thumb}
    )


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({}, None),
        ({"exp": int(time.time()) - 3600, "nbf": int(time.time()) - 4000}, 700024),
        ({"aud": "https://login.microsoftonline.com/common/oauth2/v2.0/token"}, 700023),
        ({"iss": "11111111-2222-3333-4444-555555555555"}, 700021),
    ],
    ids=["valid", "expired", "audience", "issuer"],
)
def test_hand_made_assertions(sandbox: Sandbox, https, overrides, code) -> None:
    response = https(sandbox).post(
        sandbox.identity.token_endpoint,
        data={
            "client_id": sandbox.settings.default_app_id,
            "grant_type": "client_credentials",
            "scope": EXCHANGE[0],
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": _assertion(sandbox, **overrides),
        },
    )
    body = response.json()
    if code is None:
        assert response.status_code == 200, body
        assert body["token_type"] == "Bearer"
    else:
        assert (response.status_code, body["error"], body["error_codes"]) == (
            401,
            "invalid_client",
            [code],
        )


def test_confidential_app_without_credential(start_sandbox, https) -> None:
    sb = start_sandbox()
    response = https(sb).post(
        sb.identity.token_endpoint,
        data={
            "client_id": sb.settings.default_app_id,
            "grant_type": "client_credentials",
            "scope": EXCHANGE[0],
        },
    )
    assert response.status_code == 401
    assert response.json()["error_codes"] == [7000218]


def test_public_client_presenting_a_secret(sandbox: Sandbox, cca) -> None:
    public = sandbox.settings.apps[1]
    result = cca(sandbox, "a-secret", app_id=public.app_id).acquire_token_for_client(EXCHANGE)
    assert codes(result) == [700025]


@pytest.mark.parametrize(
    ("scopes", "code"),
    [
        (["https://outlook.office365.com/SMTP.SendAsApp"], 1002012),
        (["https://contoso.example/.default"], 500011),
    ],
)
def test_client_credentials_scope_errors(sandbox: Sandbox, cca, scopes, code) -> None:
    assert codes(cca(sandbox).acquire_token_for_client(scopes)) == [code]


def test_client_credentials_need_a_tenant(sandbox: Sandbox, cca) -> None:
    authority = f"https://localhost:{sandbox.identity_port}/organizations"
    with pytest.warns(DeprecationWarning, match="/common or /organizations"):  # MSAL's own
        result = cca(sandbox, authority=authority).acquire_token_for_client(EXCHANGE)
    assert codes(result) == [50059]


def test_domain_as_tenant(sandbox: Sandbox, cca) -> None:
    authority = f"https://localhost:{sandbox.identity_port}/contoso.test"
    result = cca(sandbox, authority=authority).acquire_token_for_client(EXCHANGE)
    assert claims_of(result["access_token"])["tid"] == sandbox.settings.tenant_id


def test_client_secret_basic(sandbox: Sandbox, https) -> None:
    app = sandbox.settings.apps[0]
    response = https(sandbox).post(
        sandbox.identity.token_endpoint,
        data={"grant_type": "client_credentials", "scope": EXCHANGE[0]},
        auth=(app.app_id, app.client_secret or ""),
    )
    assert response.status_code == 200, response.text


def test_unsupported_and_missing_grant(sandbox: Sandbox, https) -> None:
    session = https(sandbox)
    app_id = sandbox.settings.default_app_id
    url = sandbox.identity.token_endpoint
    odd = session.post(url, data={"client_id": app_id, "grant_type": "implicit"}).json()
    assert (odd["error"], odd["error_codes"]) == ("unsupported_grant_type", [70003])
    assert odd["error_description"].startswith(
        "AADSTS70003: The app requested an unsupported grant type 'implicit'."
    )
    missing = session.post(url, data={"client_id": app_id}).json()
    assert missing["error_codes"] == [900144]
    assert sandbox.identity.stats.token_requests == {"implicit": 1, "(none)": 1}


def test_settings_certificates_from_a_file(start_sandbox, cca, tmp_path: Path) -> None:
    own = ensure_client_certificate(tmp_path, "scanner", subject="Scanner relay")
    settings = SandboxSettings()
    settings.apps.append(
        AppSettings(
            app_id="3c1a4f9e-0d2b-4e8f-9a6c-5b7d8e9f0a1b",
            display_name="Scanner relay",
            certificates=[str(own.cert_file)],
            app_permissions=["SMTP.SendAsApp"],
        )
    )
    sb = start_sandbox(settings)
    credential = {"private_key": own.key_file.read_text(), "thumbprint": own.thumbprint}
    result = cca(sb, credential, app_id="3c1a4f9e-0d2b-4e8f-9a6c-5b7d8e9f0a1b")
    token = result.acquire_token_for_client(EXCHANGE)
    assert claims_of(token["access_token"])["app_displayname"] == "Scanner relay"
    assert "3c1a4f9e-0d2b-4e8f-9a6c-5b7d8e9f0a1b" not in sb.client_certificates
