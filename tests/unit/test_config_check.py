"""``smtp365 config check``: one test per rule, asserting the exact codes and levels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from smtp365.config import Finding, Level, Settings, check, load

E, W = Level.ERROR, Level.WARNING

# A correct Office 365 / OAuth2 account: every test below adds exactly one mistake to it.
CLEAN = """
username = "reports@contoso.com"
token_env = "REPORTS_TOKEN"
"""

Load = Callable[..., Settings]


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)


@pytest.fixture
def settings(tmp_path: Path) -> Load:
    """Write ``[accounts.default]`` with the given lines and load it with a fake environment."""

    def _load(body: str, **env: str) -> Settings:
        path = tmp_path / "smtp365.toml"
        path.write_text(f"[accounts.default]\n{body}\n", encoding="utf-8")
        return load(path, env={"HOME": str(tmp_path), **env})

    return _load


def found(settings: Settings, account: str | None = None) -> list[tuple[Level, str]]:
    return [(f.level, f.code) for f in check(settings, account)]


def one(settings: Settings, code: str) -> Finding:
    matches = [f for f in check(settings) if f.code == code]
    assert len(matches) == 1, check(settings)
    finding = matches[0]
    assert finding.what and finding.why and finding.fix
    return finding


# ------------------------------------------------------------------ clean accounts


def test_clean_office365_account_has_no_findings(settings: Load) -> None:
    assert check(settings(CLEAN)) == []


def test_clean_hve_account_has_no_findings(settings: Load) -> None:
    assert check(settings(CLEAN + 'profile = "office365-hve"')) == []


def test_clean_direct_send_account_has_no_findings(settings: Load) -> None:
    body = """
profile = "direct-send"
host = "contoso-com.mail.protection.outlook.com"
from_address = "scanner@contoso.com"
"""
    assert check(settings(body)) == []


def test_clean_relay_connector_account_has_no_findings(settings: Load) -> None:
    body = 'profile = "relay-connector"\nhost = "contoso-com.mail.protection.outlook.com"'
    assert check(settings(body)) == []


def test_clean_custom_login_account_has_no_findings(settings: Load) -> None:
    body = """
profile = "custom"
host = "mail.example.org"
port = 465
tls = "ssl"
auth = "login"
username = "bob@example.org"
password_env = "BOB_PW"
"""
    assert check(settings(body)) == []


# ------------------------------------------------------------------ TLS and port


@pytest.mark.parametrize(
    "body", ["port = 465", 'port = 465\ntls = "implicit"', 'tls = "ssl"\nport = 25']
)
def test_implicit_tls(settings: Load, body: str) -> None:
    s = settings(CLEAN + body)
    assert found(s) == [(E, "implicit-tls")]
    assert "587" in one(s, "implicit-tls").fix


@pytest.mark.parametrize("tls", ["ssl", "implicit", "SSL"])
def test_ssl_on_587_for_office365(settings: Load, tls: str) -> None:
    s = settings(CLEAN + f'tls = "{tls}"')  # port 587 from the profile
    assert found(s) == [(E, "ssl-on-587")]
    assert 'tls = "starttls"' in one(s, "ssl-on-587").fix


def test_ssl_on_587_for_a_custom_server(settings: Load) -> None:
    body = CLEAN + 'profile = "custom"\nhost = "mail.example.org"\nport = 587\ntls = "ssl"'
    assert found(settings(body)) == [(E, "ssl-on-587")]


def test_implicit_tls_on_465_is_fine_for_a_custom_server(settings: Load) -> None:
    body = CLEAN + 'profile = "custom"\nhost = "mail.example.org"\nport = 465\ntls = "ssl"'
    assert found(settings(body)) == []


def test_no_tls(settings: Load) -> None:
    s = settings(CLEAN + 'tls = "none"')
    assert found(s) == [(E, "no-tls")]
    assert "530 5.7.57" in one(s, "no-tls").why


def test_no_tls_with_auth_is_a_warning_only_for_localhost(settings: Load) -> None:
    local = settings(CLEAN + 'profile = "custom"\nhost = "localhost"\ntls = "none"')
    assert found(local) == [(W, "no-tls")]
    remote = settings(CLEAN + 'profile = "custom"\nhost = "mail.example.org"\ntls = "none"')
    assert found(remote) == [(E, "no-tls")]
    assert "in clear" in one(remote, "no-tls").why


def test_no_tls_without_auth_is_fine_for_a_custom_server(settings: Load) -> None:
    s = settings('profile = "custom"\nhost = "mail.example.org"\ntls = "none"\nauth = "none"\n')
    assert found(s) == []


@pytest.mark.parametrize("version", ["1.0", "1.1", "TLSv1.1"])
def test_tls_too_old_is_an_error_for_microsoft(settings: Load, version: str) -> None:
    s = settings(CLEAN + f'tls_min_version = "{version}"')
    assert found(s) == [(E, "tls-too-old")]
    assert "421 4.7.66" in one(s, "tls-too-old").why


def test_tls_too_old_is_a_warning_for_a_custom_server(settings: Load) -> None:
    body = CLEAN + 'profile = "custom"\nhost = "mail.example.org"\ntls_min_version = "1.0"'
    assert found(settings(body)) == [(W, "tls-too-old")]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_modern_tls_versions_are_fine(settings: Load, version: str) -> None:
    assert found(settings(CLEAN + f'tls_min_version = "{version}"')) == []


@pytest.mark.parametrize("host", ["52.96.165.18", "2603:1026:c0b::2", "[2603:1026:c0b::2]"])
def test_host_is_ip(settings: Load, host: str) -> None:
    s = settings(CLEAN + f'host = "{host}"')
    assert found(s) == [(W, "host-is-ip")]
    assert "smtp.office365.com" in one(s, "host-is-ip").fix


def test_host_is_ip_only_matters_for_microsoft(settings: Load) -> None:
    assert found(settings(CLEAN + 'profile = "custom"\nhost = "192.0.2.1"')) == []


# ------------------------------------------------------------------ identity and credentials


def test_no_username(settings: Load) -> None:
    assert found(settings('token_env = "T"')) == [(E, "no-username")]


@pytest.mark.parametrize(
    ("username", "suggested"), [("reports", "reports@"), ("CONTOSO\\\\reports", "reports@")]
)
def test_username_not_upn(settings: Load, username: str, suggested: str) -> None:
    s = settings(f'username = "{username}"\ntoken_env = "T"')
    assert found(s) == [(E, "username-not-upn")]
    assert suggested in one(s, "username-not-upn").fix


def test_username_not_needed_without_auth(settings: Load) -> None:
    body = 'profile = "relay-connector"\nhost = "contoso-com.mail.protection.outlook.com"'
    assert found(settings(body)) == []


def test_no_password(settings: Load) -> None:
    s = settings('username = "reports@contoso.com"\nauth = "login"')
    assert found(s) == [(E, "no-password"), (W, "basic-auth")]


def test_no_password_on_a_custom_server(settings: Load) -> None:
    body = 'profile = "custom"\nhost = "mail.example.org"\nusername = "a@example.org"\n'
    assert found(settings(body + 'auth = "login"')) == [(E, "no-password")]


def test_basic_auth(settings: Load) -> None:
    s = settings('username = "reports@contoso.com"\nauth = "login"\npassword_env = "PW"')
    assert found(s) == [(W, "basic-auth")]
    finding = one(s, "basic-auth")
    assert "550 5.7.30" in finding.why
    assert "xoauth2" in finding.fix


def test_basic_auth_on_hve(settings: Load) -> None:
    body = (
        'profile = "office365-hve"\nusername = "r@contoso.com"\nauth = "login"\npassword_env = "PW"'
    )
    assert found(settings(body)) == [(W, "basic-auth")]


def test_no_token(settings: Load) -> None:
    s = settings('username = "reports@contoso.com"')
    assert found(s) == [(E, "no-token")]
    assert "token_file" in one(s, "no-token").fix


@pytest.mark.parametrize("key", ["token", "token_file"])
def test_token_from_any_source_satisfies_no_token(settings: Load, key: str) -> None:
    s = settings('username = "reports@contoso.com"', **{f"SMTP365_{key.upper()}": "x"})
    assert "no-token" not in {code for _, code in found(s)}


# ------------------------------------------------------------------ where secrets live


def test_password_in_file(settings: Load) -> None:
    s = settings('username = "reports@contoso.com"\nauth = "login"\npassword = "hunter2"')
    assert found(s) == [(W, "basic-auth"), (W, "password-in-file")]
    assert "hunter2" not in repr(check(s))


def test_password_from_environment_is_not_in_file(settings: Load) -> None:
    s = settings('username = "reports@contoso.com"\nauth = "login"', SMTP365_PASSWORD="hunter2")
    assert found(s) == [(W, "basic-auth")]


def test_token_in_file(settings: Load) -> None:
    s = settings('username = "reports@contoso.com"\ntoken = "eyJ0eXAi"')
    assert found(s) == [(W, "token-in-file")]
    assert "eyJ0eXAi" not in repr(check(s))


def test_token_from_environment_is_not_in_file(settings: Load) -> None:
    s = settings('username = "reports@contoso.com"', SMTP365_TOKEN="eyJ0eXAi")
    assert found(s) == []


def test_secret_in_another_account_is_not_reported(tmp_path: Path) -> None:
    path = tmp_path / "smtp365.toml"
    path.write_text(
        """
[accounts.a]
username = "a@contoso.com"
token_env = "T"
[accounts.b]
username = "b@contoso.com"
token = "eyJ0eXAi"
""",
        encoding="utf-8",
    )
    s = load(path, env={"HOME": str(tmp_path)})
    assert found(s, "a") == []
    assert found(s, "b") == [(W, "token-in-file")]


@pytest.mark.parametrize("kind", ["password", "token"])
def test_secret_file_readable_by_others(settings: Load, tmp_path: Path, kind: str) -> None:
    secret = tmp_path / f"{kind}.txt"
    secret.write_text("s3cret\n", encoding="utf-8")
    auth = 'auth = "login"\n' if kind == "password" else ""
    body = f'username = "a@contoso.com"\n{auth}{kind}_file = "{secret}"'
    expected_basic = [(W, "basic-auth")] if kind == "password" else []

    secret.chmod(0o644)
    s = settings(body)
    assert found(s) == [*expected_basic, (W, f"{kind}-file-readable")]
    assert one(s, f"{kind}-file-readable").fix == f"chmod 600 {secret}"

    secret.chmod(0o640)
    assert found(settings(body)) == [*expected_basic, (W, f"{kind}-file-readable")]

    secret.chmod(0o600)
    assert found(settings(body)) == expected_basic


# ------------------------------------------------------------------ other settings


def test_ca_file_missing(settings: Load, tmp_path: Path) -> None:
    s = settings(CLEAN + f'ca_file = "{tmp_path / "missing.pem"}"')
    assert found(s) == [(E, "ca-file-missing")]


def test_ca_file_present(settings: Load, tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    assert found(settings(CLEAN + f'ca_file = "{pem}"')) == []


def test_from_not_mailbox(settings: Load) -> None:
    s = settings(CLEAN + 'from_address = "noreply@contoso.com"')
    assert found(s) == [(W, "from-not-mailbox")]
    finding = one(s, "from-not-mailbox")
    assert "5.7.60" in finding.why
    assert "Add-RecipientPermission -Identity noreply@contoso.com" in finding.fix
    assert "-Trustee reports@contoso.com" in finding.fix


def test_from_same_mailbox_in_other_case_is_fine(settings: Load) -> None:
    assert found(settings(CLEAN + 'from_address = "Reports@Contoso.COM"')) == []


# ------------------------------------------------------------------ Direct Send

DIRECT = """
profile = "direct-send"
host = "contoso-com.mail.protection.outlook.com"
"""


def test_direct_send_auth(settings: Load) -> None:
    s = settings(DIRECT + 'auth = "login"\nusername = "a@contoso.com"\npassword_env = "PW"')
    assert found(s) == [(W, "direct-send-auth")]


def test_direct_send_host(settings: Load) -> None:
    s = settings('profile = "direct-send"\nhost = "mx.contoso.com"')
    assert found(s) == [(W, "direct-send-host")]


def test_direct_send_external(settings: Load) -> None:
    s = settings(DIRECT + 'username = "scanner@contoso.com"\nfrom_address = "alerts@fabrikam.com"')
    assert found(s) == [(W, "from-not-mailbox"), (W, "direct-send-external")]


def test_direct_send_same_domain_is_not_external(settings: Load) -> None:
    s = settings(DIRECT + 'username = "scanner@contoso.com"\nfrom_address = "alerts@CONTOSO.com"')
    assert found(s) == [(W, "from-not-mailbox")]


def test_direct_send_without_host_is_an_account_error(settings: Load) -> None:
    s = settings('profile = "direct-send"')
    assert found(s) == [(E, "account")]


# ------------------------------------------------------------------ accounts and output


def test_unknown_account(settings: Load) -> None:
    s = settings(CLEAN)
    findings = check(s, "nope")
    assert [(f.level, f.code) for f in findings] == [(E, "account")]
    assert "'nope'" in findings[0].what
    assert "default" in findings[0].fix


def test_named_account_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "smtp365.toml"
    path.write_text(
        """
default_account = "good"
[accounts.good]
username = "a@contoso.com"
token_env = "T"
[accounts.bad]
username = "b"
token_env = "T"
""",
        encoding="utf-8",
    )
    s = load(path, env={"HOME": str(tmp_path)})
    assert found(s) == []
    assert found(s, "bad") == [(E, "username-not-upn")]


def test_several_mistakes_at_once(settings: Load) -> None:
    body = 'username = "reports"\ntls = "none"\nhost = "52.96.165.18"\ntls_min_version = "1.0"'
    assert found(settings(body)) == [
        (E, "no-tls"),
        (E, "tls-too-old"),
        (W, "host-is-ip"),
        (E, "username-not-upn"),
        (E, "no-token"),
    ]


def test_finding_as_dict(settings: Load) -> None:
    (finding,) = check(settings(CLEAN + 'tls = "ssl"'))
    d = finding.as_dict()
    assert d["level"] == "error"
    assert isinstance(d["level"], str) and type(d["level"]) is str
    assert set(d) == {"level", "code", "what", "why", "fix"}


def test_missing_secret_files_are_errors(tmp_path: Path) -> None:
    from smtp365.config import check, load

    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[accounts.default]\nusername = "a@contoso.com"\n'
        f'token_file = "{tmp_path / "missing-token"}"\n'
    )
    codes = [(f.level.value, f.code) for f in check(load(cfg, env={"HOME": str(tmp_path)}))]
    assert ("error", "token-file-missing") in codes


def test_short_username_is_only_a_warning_off_microsoft(tmp_path: Path) -> None:
    from smtp365.config import check, load

    env = {
        "HOME": str(tmp_path),
        "SMTP365_PROFILE": "custom",
        "SMTP365_HOST": "mail.example.org",
        "SMTP365_USERNAME": "bob",
        "SMTP365_TOKEN": "t",
    }
    codes = [(f.level.value, f.code) for f in check(load(env=env))]
    assert codes == [("warning", "username-not-upn")]
