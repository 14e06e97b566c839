"""The identity platform as a service: OIDC discovery, keys, the HTTP server underneath,
``sandbox.json`` and the settings that configure it."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import stat
import textwrap
from pathlib import Path

import jwt
import msal
import pytest
import requests

from smtp365.sandbox import (
    DEFAULT_PUBLIC_APP_ID,
    Sandbox,
    SandboxSettings,
    read_info,
)

from .conftest import legacy_tls_context, tls_for


def test_openid_configuration(sandbox: Sandbox, https) -> None:
    base = f"https://localhost:{sandbox.identity_port}"
    tid = sandbox.settings.tenant_id
    config = https(sandbox).get(f"{base}/{tid}/v2.0/.well-known/openid-configuration").json()
    assert config["issuer"] == sandbox.issuer.issuer
    assert config["authorization_endpoint"] == f"{base}/{tid}/oauth2/v2.0/authorize"
    assert config["token_endpoint"] == f"{base}/{tid}/oauth2/v2.0/token"
    assert config["device_authorization_endpoint"] == f"{base}/{tid}/oauth2/v2.0/devicecode"
    assert config["jwks_uri"] == f"{base}/{tid}/discovery/v2.0/keys"
    assert config["end_session_endpoint"] == f"{base}/{tid}/oauth2/v2.0/logout"
    assert "code" in config["response_types_supported"]
    assert "form_post" in config["response_modes_supported"]
    assert sandbox.identity.openid_configuration_url == (
        f"{base}/{tid}/v2.0/.well-known/openid-configuration"
    )

    organizations = https(sandbox).get(
        f"{base}/organizations/v2.0/.well-known/openid-configuration"
    )
    orgs = organizations.json()
    assert orgs["issuer"] == "https://sandbox.smtp365.test/{tenantid}/v2.0"
    assert orgs["token_endpoint"] == f"{base}/organizations/oauth2/v2.0/token"
    # the address the client used is the address it is sent back to
    by_ip = https(sandbox).get(
        f"https://127.0.0.1:{sandbox.identity_port}/common/v2.0/.well-known/openid-configuration"
    )
    assert by_ip.json()["token_endpoint"].startswith(f"https://127.0.0.1:{sandbox.identity_port}/")


def test_keys_verify_issued_tokens(sandbox: Sandbox, https) -> None:
    url = f"{sandbox.authority}/discovery/v2.0/keys"
    [key] = https(sandbox).get(url).json()["keys"]
    assert key["kid"] == sandbox.issuer.kid
    token = sandbox.issue_token("bob@contoso.test")
    claims = jwt.decode(
        token,
        jwt.PyJWK(key).key,
        algorithms=["RS256"],
        audience="https://outlook.office365.com",
        issuer=sandbox.issuer.issuer,
    )
    assert claims["upn"] == "bob@contoso.test"


def test_unknown_tenant(sandbox: Sandbox, https) -> None:
    base = f"https://localhost:{sandbox.identity_port}/fabrikam.test"
    response = https(sandbox).get(f"{base}/v2.0/.well-known/openid-configuration")
    assert response.status_code == 400
    body = response.json()
    assert (body["error"], body["error_codes"]) == ("invalid_tenant", [90002])
    assert body["error_description"].startswith("AADSTS90002: Tenant 'fabrikam.test' not found.")
    with pytest.raises(ValueError, match="Unable to get authority configuration"):
        msal.PublicClientApplication(
            DEFAULT_PUBLIC_APP_ID,
            authority=base,
            instance_discovery=False,
            http_client=https(sandbox),
        )


def test_msal_with_the_sandbox_instance_discovery(sandbox: Sandbox, https) -> None:
    app = sandbox.settings.apps[0]
    client = msal.ConfidentialClientApplication(
        app.app_id,
        client_credential=app.client_secret,
        authority=sandbox.authority,
        instance_discovery=f"https://localhost:{sandbox.identity_port}/common/discovery/instance",
        http_client=https(sandbox),
    )
    assert "access_token" in client.acquire_token_for_client(
        ["https://outlook.office365.com/.default"]
    )


def test_http_details(sandbox: Sandbox, https) -> None:
    session = https(sandbox)
    token_url = sandbox.identity.token_endpoint
    wrong_method = session.get(token_url)
    assert wrong_method.status_code == 400
    assert wrong_method.json()["error_codes"] == [900561]
    assert session.get(f"{sandbox.authority}/nothing/here").status_code == 404
    head = session.head(sandbox.identity.openid_configuration_url)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) > 0
    too_big = session.post(token_url, data={"x": "y" * (1 << 21)})
    assert too_big.status_code == 413
    index = session.get(f"https://localhost:{sandbox.identity_port}/")
    assert sandbox.authority in index.text
    realm = session.get(
        f"https://localhost:{sandbox.identity_port}/common/userrealm/bob@contoso.test"
    ).json()
    assert (realm["account_type"], realm["domain_name"]) == ("Managed", "contoso.test")
    logout = session.get(
        f"{sandbox.authority}/oauth2/v2.0/logout",
        params={"post_logout_redirect_uri": "http://localhost:8400"},
        allow_redirects=False,
    )
    assert logout.headers["Location"] == "http://localhost:8400"


def test_keep_alive_and_close(sandbox: Sandbox) -> None:
    context = tls_for(sandbox)
    conn = http.client.HTTPSConnection("localhost", sandbox.identity_port, context=context)
    try:
        for _ in range(3):
            conn.request("GET", "/common/discovery/v2.0/keys")
            response = conn.getresponse()
            assert response.status == 200
            json.loads(response.read())
        conn.request("GET", "/common/discovery/v2.0/keys", headers={"Connection": "close"})
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["keys"]
        assert response.will_close
    finally:
        conn.close()
    assert sandbox.identity.stats.http_requests == 4


def test_garbage_gets_400(sandbox: Sandbox) -> None:
    with (
        socket.create_connection(("127.0.0.1", sandbox.identity_port), timeout=10) as raw,
        tls_for(sandbox).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert tls.recv(100).startswith(b"HTTP/1.1 400 ")


def test_tls_1_1_is_refused(sandbox: Sandbox) -> None:
    with (
        socket.create_connection(("127.0.0.1", sandbox.identity_port), timeout=10) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        legacy_tls_context(sandbox.ca_file).wrap_socket(raw, server_hostname="localhost")


def test_stop_closes_kept_alive_connections(state_dir: Path, https) -> None:
    with Sandbox(state_dir).run_in_thread() as sb:
        session = https(sb)
        assert session.get(sb.identity.openid_configuration_url).status_code == 200
        url = sb.identity.openid_configuration_url
    with pytest.raises(requests.ConnectionError):
        session.get(url)


def test_sandbox_json_identity_and_apps(state_dir: Path) -> None:
    with Sandbox(state_dir).run_in_thread() as sb:
        info = read_info(state_dir)
        port = sb.identity_port
    tid = info["tenant_id"]
    assert info["identity"] == {
        "authority": f"https://localhost:{port}/{tid}",
        "host": "127.0.0.1",
        "port": port,
        "tenant_id": tid,
        "openid_configuration": f"https://localhost:{port}/{tid}/v2.0/.well-known/openid-configuration",
        "token_endpoint": f"https://localhost:{port}/{tid}/oauth2/v2.0/token",
        "devicelogin_url": f"https://localhost:{port}/devicelogin",
        "ca_file": str(state_dir / "ca.pem"),
    }
    confidential, public = info["apps"]
    assert confidential["public_client"] is False
    assert confidential["client_secret"]
    assert confidential["certificate_file"] == str(state_dir / "client-cert.pem")
    assert confidential["certificates"] == [str(state_dir / "client-cert.pem")]
    assert confidential["private_key_file"] == str(state_dir / "client-key.pem")
    assert len(confidential["thumbprint"]) == 40
    assert confidential["app_permissions"] == ["SMTP.SendAsApp", "Mail.Send"]
    assert public["public_client"] is True
    assert public["display_name"] == "smtp365 sandbox public client"
    assert public["client_secret"] is None and public["certificates"] == []
    assert public["redirect_uris"] == ["http://localhost"]
    assert public["delegated_permissions"] == ["SMTP.Send", "Mail.Send"]
    for name in ("client-key.pem", "client-cert.pfx"):
        assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600
    secrets = json.loads((state_dir / "secrets.json").read_text("utf-8"))
    assert list(secrets["apps"]) == [confidential["app_id"]]


def test_generated_credentials_are_reused(tmp_path: Path) -> None:
    first = Sandbox(tmp_path)
    second = Sandbox(tmp_path)
    app_id = first.settings.default_app_id
    assert first.client_certificates[app_id] == second.client_certificates[app_id]
    assert second.settings.apps[0].client_secret == first.settings.apps[0].client_secret


def test_identity_can_be_switched_off(state_dir: Path, https) -> None:
    with Sandbox(state_dir, SandboxSettings(identity_enabled=False)).run_in_thread() as sb:
        assert sb.identity_port == 0
        assert read_info(state_dir)["identity"] is None


def test_settings_toml(tmp_path: Path) -> None:
    config = tmp_path / "sandbox.toml"
    config.write_text(
        textwrap.dedent(
            """
            identity_port = 0
            access_token_lifetime = 120
            refresh_token_lifetime = 600
            device_code_interval = 1
            device_code_lifetime = 300

            [[mailboxes]]
            address = "printer@fabrikam.test"
            mfa_required = true

            [[apps]]
            app_id = "3c1a4f9e-0d2b-4e8f-9a6c-5b7d8e9f0a1b"
            display_name = "Scanner relay"
            certificates = ["certs/scanner.pem"]
            app_permissions = ["SMTP.SendAsApp"]
            delegated_permissions = []

            [[apps]]
            app_id = "6f2e8d4c-1a3b-4c5d-8e9f-0a1b2c3d4e5f"
            public_client = true
            redirect_uris = ["http://localhost", "https://app.fabrikam.test/cb"]
            """
        ),
        encoding="utf-8",
    )
    settings = SandboxSettings.load(config)
    assert (settings.access_token_lifetime, settings.refresh_token_lifetime) == (120, 600)
    assert (settings.device_code_interval, settings.device_code_lifetime) == (1, 300)
    assert settings.mailboxes[0].mfa_required is True
    scanner, public = settings.apps
    assert scanner.certificates == [str(tmp_path / "certs" / "scanner.pem")]
    assert scanner.delegated_permissions == []
    assert public.public_client and public.delegated_permissions == ["SMTP.Send", "Mail.Send"]
    assert settings.domains == ["fabrikam.test"]
    config.write_text('[[apps]]\napp_id = "x"\nredirect_uris = ["localhost"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="redirect URI must be absolute"):
        SandboxSettings.load(config)
