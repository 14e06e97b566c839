"""The configuration loader and model: where the file is found, layering, profiles, secrets.

Every ``load()`` gets an explicit ``env={...}`` (with HOME inside tmp_path) and the working
directory is an empty temporary one, so the machine's own environment and files never leak in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from smtp365.config import (
    PROFILES,
    Account,
    AccountSettings,
    AuthMethod,
    Profile,
    Settings,
    TLSMode,
    load,
)
from smtp365.config.loader import default_paths, find_config
from smtp365.errors import ConfigError

SECRET_PASSWORD = "pw-Zq8vK2sX"
SECRET_TOKEN = "tok-Yp4wN7rM"

Write = Callable[..., Path]


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run every test in an empty directory: a stray ./smtp365.toml must not be picked up."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A minimal, fake environment: HOME inside tmp_path and nothing else."""
    home = tmp_path / "home"
    home.mkdir()
    return {"HOME": str(home)}


@pytest.fixture
def write(tmp_path: Path) -> Write:
    def _write(text: str, name: str = "conf/smtp365.toml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return _write


# ------------------------------------------------------------------ finding the file

ONE_ACCOUNT = """
default_account = "reports"
[accounts.reports]
username = "reports@contoso.com"
token_env = "REPORTS_TOKEN"
"""


def test_explicit_path(write: Write, env: dict[str, str]) -> None:
    path = write(ONE_ACCOUNT)
    settings = load(path, env=env)
    assert settings.source == str(path)
    assert settings.default_account == "reports"
    assert settings.account().username == "reports@contoso.com"


def test_explicit_path_as_str(write: Write, env: dict[str, str]) -> None:
    path = write(ONE_ACCOUNT)
    assert load(str(path), env=env).account().username == "reports@contoso.com"


def test_smtp365_config_variable(write: Write, env: dict[str, str]) -> None:
    path = write(ONE_ACCOUNT)
    settings = load(env={**env, "SMTP365_CONFIG": str(path)})
    assert settings.source == str(path)
    assert settings.account().name == "reports"


def test_explicit_path_beats_smtp365_config(write: Write, env: dict[str, str]) -> None:
    named = write(ONE_ACCOUNT, "named.toml")
    other = write('default_account = "other"\n[accounts.other]\n', "other.toml")
    settings = load(named, env={**env, "SMTP365_CONFIG": str(other)})
    assert settings.source == str(named)


def test_file_in_current_directory(empty_cwd: Path, env: dict[str, str]) -> None:
    (empty_cwd / "smtp365.toml").write_text(ONE_ACCOUNT, encoding="utf-8")
    settings = load(env=env)
    assert Path(settings.source) == empty_cwd / "smtp365.toml"
    assert settings.account().username == "reports@contoso.com"


def test_file_in_xdg_config_home(tmp_path: Path, write: Write, env: dict[str, str]) -> None:
    path = write(ONE_ACCOUNT, "xdg/smtp365/smtp365.toml")
    settings = load(env={**env, "XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert Path(settings.source) == path


def test_xdg_defaults_to_home_dot_config(write: Write, env: dict[str, str]) -> None:
    path = write(ONE_ACCOUNT, "home/.config/smtp365/smtp365.toml")
    assert Path(load(env=env).source) == path


def test_current_directory_beats_xdg(
    tmp_path: Path, empty_cwd: Path, write: Write, env: dict[str, str]
) -> None:
    write('default_account = "xdg"\n[accounts.xdg]\n', "xdg/smtp365/smtp365.toml")
    (empty_cwd / "smtp365.toml").write_text(ONE_ACCOUNT, encoding="utf-8")
    settings = load(env={**env, "XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert Path(settings.source) == empty_cwd / "smtp365.toml"


def test_default_paths_order(tmp_path: Path, empty_cwd: Path) -> None:
    assert default_paths({"XDG_CONFIG_HOME": str(tmp_path / "x")}) == [
        empty_cwd / "smtp365.toml",
        tmp_path / "x" / "smtp365" / "smtp365.toml",
    ]


def test_no_file_anywhere_gives_the_office365_default(env: dict[str, str]) -> None:
    assert find_config(None, env) is None
    settings = load(env=env)
    assert settings.source == "(no config file)"
    assert settings.accounts == {}
    acc = settings.account()
    assert acc.name == "default"
    assert (acc.profile, acc.host, acc.port) == (Profile.OFFICE365, "smtp.office365.com", 587)


@pytest.mark.parametrize("how", ["path", "variable"])
def test_named_file_missing(tmp_path: Path, env: dict[str, str], how: str) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        if how == "path":
            load(missing, env=env)
        else:
            load(env={**env, "SMTP365_CONFIG": str(missing)})
    assert "does not exist" in info.value.what
    assert str(missing) in info.value.what
    assert info.value.fix


# ------------------------------------------------------------------ layering

LAYERED = """
default_account = "main"
[accounts.main]
username = "main@contoso.com"
host = "file.example.com"
port = 2525
timeout = 30
token_env = "MAIN_TOKEN"

[accounts.other]
username = "other@contoso.com"
host = "other.example.com"
"""


def test_file_values_when_nothing_overrides(write: Write, env: dict[str, str]) -> None:
    acc = load(write(LAYERED), env=env).account()
    assert (acc.host, acc.port, acc.timeout) == ("file.example.com", 2525, 30.0)


def test_environment_beats_file(write: Write, env: dict[str, str]) -> None:
    settings = load(
        write(LAYERED), env={**env, "SMTP365_HOST": "env.example.com", "SMTP365_PORT": "2626"}
    )
    acc = settings.account()
    assert (acc.host, acc.port) == ("env.example.com", 2626)
    assert acc.timeout == 30.0  # untouched keys keep the file's value
    assert acc.username == "main@contoso.com"
    assert acc.raw.token_env == "MAIN_TOKEN"


def test_an_empty_variable_means_unset(write: Write, env: dict[str, str]) -> None:
    settings = load(
        write(LAYERED),
        env={**env, "SMTP365_CA_FILE": "", "SMTP365_HOST": " ", "SMTP365_ACCOUNT": ""},
    )
    acc = settings.account()
    assert acc.ca_file is None  # not the path "."
    assert acc.host == "file.example.com"


def test_overrides_beat_environment_and_none_is_ignored(write: Write, env: dict[str, str]) -> None:
    settings = load(
        write(LAYERED),
        env={**env, "SMTP365_HOST": "env.example.com", "SMTP365_PORT": "2626"},
        overrides={"host": "flag.example.com", "port": None, "username": None},
    )
    acc = settings.account()
    assert acc.host == "flag.example.com"  # flag > env
    assert acc.port == 2626  # None flag: env value stays
    assert acc.username == "main@contoso.com"  # None flag: file value stays


def test_overrides_alone(write: Write, env: dict[str, str]) -> None:
    acc = load(write(LAYERED), env=env, overrides={"timeout": 5}).account()
    assert acc.timeout == 5.0
    assert acc.host == "file.example.com"


def test_only_none_overrides_change_nothing(write: Write, env: dict[str, str]) -> None:
    path = write(LAYERED)
    assert load(path, env=env, overrides={"host": None}) == load(path, env=env)


def test_environment_applies_only_to_the_chosen_account(write: Write, env: dict[str, str]) -> None:
    settings = load(write(LAYERED), env={**env, "SMTP365_HOST": "env.example.com"})
    assert settings.account("main").host == "env.example.com"
    assert settings.account("other").host == "other.example.com"


def test_every_account_key_has_a_variable(env: dict[str, str], tmp_path: Path) -> None:
    values = {
        "profile": "custom",
        "host": "mail.example.org",
        "port": "2525",
        "tls": "implicit",
        "tls_min_version": "1.3",
        "ca_file": str(tmp_path / "ca.pem"),
        "username": "bob@example.org",
        "from_address": "alerts@example.org",
        "auth": "login",
        "password": SECRET_PASSWORD,
        "password_env": "BOB_PW",
        "password_file": str(tmp_path / "pw"),
        "token": SECRET_TOKEN,
        "token_env": "BOB_TOKEN",
        "token_file": str(tmp_path / "tok"),
        "timeout": "12.5",
        "ehlo_name": "client.example.org",
        "flow": "device-code",
        "tenant": "contoso.onmicrosoft.com",
        "client_id": "11111111-2222-3333-4444-555555555555",
        "client_secret": "cs",
        "client_secret_env": "BOB_CS",
        "client_secret_file": str(tmp_path / "cs"),
        "certificate_file": str(tmp_path / "cert.pem"),
        "private_key_file": str(tmp_path / "key.pem"),
        "authority_host": "https://login.microsoftonline.us",
        "token_cache": str(tmp_path / "cache.json"),
        "cache_key_env": "BOB_CACHE_KEY",
        "cache_key_file": str(tmp_path / "cache.key"),
        "refresh_window": "30",
    }
    assert set(values) == set(Account.model_fields)
    variables = {f"SMTP365_{key.upper()}": value for key, value in values.items()}
    raw = load(env={**env, **variables}).account().raw
    assert raw.profile is Profile.CUSTOM
    assert raw.port == 2525
    assert raw.tls is TLSMode.IMPLICIT
    assert raw.auth is AuthMethod.LOGIN
    assert raw.timeout == 12.5
    assert raw.ca_file == tmp_path / "ca.pem"
    assert raw.password is not None and raw.password.get_secret_value() == SECRET_PASSWORD
    assert raw.token is not None and raw.token.get_secret_value() == SECRET_TOKEN
    for key in ("host", "username", "from_address", "password_env", "token_env", "ehlo_name"):
        assert getattr(raw, key) == values[key]


def test_unrelated_smtp365_variables_are_ignored(env: dict[str, str]) -> None:
    settings = load(env={**env, "SMTP365_NOT_A_KEY": "x", "SMTP365_DEFAULT_ACCOUNT": "y"})
    assert settings.accounts == {}
    assert settings.default_account == "default"


def test_bad_value_from_environment_names_the_key(write: Write, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(LAYERED), env={**env, "SMTP365_PORT": "not-a-port"})
    assert "port" in info.value.what
    assert "'main'" in info.value.what
    assert info.value.fix


def test_unknown_override_key(write: Write, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(LAYERED), env=env, overrides={"hots": "x"})
    assert "hots" in info.value.what
    assert "unknown key" in info.value.what


# ------------------------------------------------------------------ choosing the account

THREE_ACCOUNTS = """
default_account = "alpha"
[accounts.alpha]
username = "alpha@contoso.com"
[accounts.beta]
username = "beta@contoso.com"
[accounts.gamma]
username = "gamma@contoso.com"
"""


def test_default_account_from_file(write: Write, env: dict[str, str]) -> None:
    assert load(write(THREE_ACCOUNTS), env=env).account().name == "alpha"


def test_smtp365_account_selects(write: Write, env: dict[str, str]) -> None:
    settings = load(write(THREE_ACCOUNTS), env={**env, "SMTP365_ACCOUNT": "beta"})
    assert settings.default_account == "beta"
    assert settings.account().username == "beta@contoso.com"


def test_account_argument_selects_and_beats_smtp365_account(
    write: Write, env: dict[str, str]
) -> None:
    settings = load(write(THREE_ACCOUNTS), env={**env, "SMTP365_ACCOUNT": "beta"}, account="gamma")
    assert settings.default_account == "gamma"
    assert settings.account().username == "gamma@contoso.com"


def test_environment_follows_the_selected_account(write: Write, env: dict[str, str]) -> None:
    settings = load(
        write(THREE_ACCOUNTS),
        env={**env, "SMTP365_ACCOUNT": "beta", "SMTP365_FROM_ADDRESS": "x@contoso.com"},
    )
    assert settings.account("beta").from_address == "x@contoso.com"
    assert settings.account("alpha").from_address is None


def test_account_by_name(write: Write, env: dict[str, str]) -> None:
    settings = load(write(THREE_ACCOUNTS), env=env)
    assert settings.account("gamma").username == "gamma@contoso.com"


@pytest.mark.parametrize("how", ["argument", "variable", "lookup"])
def test_unknown_account_names_the_known_ones(write: Write, env: dict[str, str], how: str) -> None:
    path = write(THREE_ACCOUNTS)
    with pytest.raises(ConfigError) as info:
        if how == "argument":
            load(path, env=env, account="delta")
        elif how == "variable":
            load(path, env={**env, "SMTP365_ACCOUNT": "delta"})
        else:
            load(path, env=env).account("delta")
    assert "'delta'" in info.value.what
    assert "alpha, beta, gamma" in info.value.what
    assert "alpha, beta, gamma" in info.value.fix
    assert "[accounts.delta]" in info.value.fix


def test_default_account_missing_from_file(write: Write, env: dict[str, str]) -> None:
    settings = load(write('default_account = "zeta"\n[accounts.alpha]\n'), env=env)
    with pytest.raises(ConfigError) as info:
        settings.account()
    assert "'zeta'" in info.value.what
    assert "alpha" in info.value.what


def test_account_defined_by_the_environment_alone(env: dict[str, str]) -> None:
    settings = load(
        env={**env, "SMTP365_ACCOUNT": "ci", "SMTP365_USERNAME": "ci@contoso.com"},
    )
    acc = settings.account()
    assert (acc.name, acc.username, acc.host) == ("ci", "ci@contoso.com", "smtp.office365.com")


# ------------------------------------------------------------------ invalid files


def test_unknown_key_in_account(write: Write, env: dict[str, str]) -> None:
    path = write('[accounts.default]\nusername = "a@contoso.com"\npasword = "x"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env=env)
    assert "accounts.default.pasword" in info.value.what
    assert "unknown key" in info.value.what
    assert str(path) in info.value.what
    assert info.value.fix


def test_unknown_top_level_key(write: Write, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(write('default_acount = "x"\n'), env=env)
    assert "default_acount" in info.value.what
    assert "unknown key" in info.value.what


def test_bad_toml(write: Write, env: dict[str, str]) -> None:
    path = write('[accounts.default]\nusername = "unterminated\n')
    with pytest.raises(ConfigError) as info:
        load(path, env=env)
    assert "not valid TOML" in info.value.what
    assert str(path) in info.value.what
    assert info.value.fix


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("port = 0", "port"),
        ("port = 70000", "port"),
        ('port = "smtp"', "port"),
        ("timeout = 0", "timeout"),
        ('profile = "office"', "profile"),
        ('auth = "plain"', "auth"),
        ('tls = "maybe"', "tls"),
    ],
)
def test_invalid_values_name_the_key(
    write: Write, env: dict[str, str], line: str, key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(f'[accounts.default]\nhost = "h.example"\n{line}\n'), env=env)
    assert f"accounts.default.{key}" in info.value.what


@pytest.mark.parametrize("value", ["[1]", '"x"', "3"])
def test_accounts_must_be_a_table(write: Write, env: dict[str, str], value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(f"accounts = {value}\n"), env=env)
    assert "accounts" in info.value.what


# ------------------------------------------------------------------ profiles


@pytest.mark.parametrize(
    ("profile", "host", "port", "tls", "auth"),
    [
        ("office365", "smtp.office365.com", 587, TLSMode.STARTTLS, AuthMethod.XOAUTH2),
        ("office365-hve", "smtp.hve.mx.microsoft", 587, TLSMode.STARTTLS, AuthMethod.XOAUTH2),
        ("direct-send", None, 25, TLSMode.STARTTLS, AuthMethod.NONE),
        ("relay-connector", None, 25, TLSMode.STARTTLS, AuthMethod.NONE),
        ("custom", None, 587, TLSMode.STARTTLS, AuthMethod.XOAUTH2),
    ],
)
def test_profile_defaults(
    write: Write,
    env: dict[str, str],
    profile: str,
    host: str | None,
    port: int,
    tls: TLSMode,
    auth: AuthMethod,
) -> None:
    defaults = PROFILES[Profile(profile)]
    assert (defaults.host, defaults.port, defaults.tls, defaults.auth) == (host, port, tls, auth)
    text = f'[accounts.default]\nprofile = "{profile}"\n'
    if host is None:
        text += 'host = "contoso-com.mail.protection.outlook.com"\n'
    acc = load(write(text), env=env).account()
    assert acc.profile is Profile(profile)
    assert acc.host == (host or "contoso-com.mail.protection.outlook.com")
    assert (acc.port, acc.tls, acc.auth) == (port, tls, auth)
    assert acc.tls_min_version == "1.2"
    assert acc.timeout == 60.0


def test_office365_is_the_default_profile(write: Write, env: dict[str, str]) -> None:
    acc = load(write("[accounts.default]\n"), env=env).account()
    assert acc.profile is Profile.OFFICE365
    assert (acc.host, acc.port, acc.tls, acc.auth) == (
        "smtp.office365.com",
        587,
        TLSMode.STARTTLS,
        AuthMethod.XOAUTH2,
    )


def test_every_profile_has_defaults() -> None:
    assert set(PROFILES) == set(Profile)


@pytest.mark.parametrize("profile", ["direct-send", "relay-connector"])
def test_mx_profiles_require_a_host(write: Write, env: dict[str, str], profile: str) -> None:
    settings = load(write(f'[accounts.default]\nprofile = "{profile}"\n'), env=env)
    with pytest.raises(ConfigError) as info:
        settings.account()
    assert "no host" in info.value.what
    assert profile in info.value.what
    assert "mail.protection.outlook.com" in info.value.fix


def test_custom_requires_a_host(write: Write, env: dict[str, str]) -> None:
    settings = load(write('[accounts.default]\nprofile = "custom"\n'), env=env)
    with pytest.raises(ConfigError) as info:
        settings.account()
    assert "no host" in info.value.what
    assert "host =" in info.value.fix


def test_explicit_keys_beat_profile_defaults(write: Write, env: dict[str, str]) -> None:
    text = """
[accounts.default]
profile = "direct-send"
host = "contoso-com.mail.protection.outlook.com"
port = 2525
tls = "none"
auth = "login"
"""
    acc = load(write(text), env=env).account()
    assert (acc.port, acc.tls, acc.auth) == (2525, TLSMode.NONE, AuthMethod.LOGIN)


def test_sender_is_from_address_else_username(write: Write, env: dict[str, str]) -> None:
    text = """
[accounts.a]
username = "box@contoso.com"
[accounts.b]
username = "box@contoso.com"
from_address = "alerts@contoso.com"
"""
    settings = load(write(text), env=env)
    assert settings.account("a").sender == "box@contoso.com"
    assert settings.account("b").sender == "alerts@contoso.com"


# ------------------------------------------------------------------ TLS settings


@pytest.mark.parametrize("value", ["ssl", "SSL", "tls", "implicit-tls", "smtps", "implicit"])
def test_implicit_tls_aliases(write: Write, env: dict[str, str], value: str) -> None:
    acc = load(write(f'[accounts.default]\ntls = "{value}"\n'), env=env).account()
    assert acc.tls is TLSMode.IMPLICIT


def test_tls_alias_from_environment(env: dict[str, str]) -> None:
    assert load(env={**env, "SMTP365_TLS": "ssl"}).account().tls is TLSMode.IMPLICIT


@pytest.mark.parametrize(
    ("value", "mode"), [("starttls", TLSMode.STARTTLS), ("none", TLSMode.NONE)]
)
def test_other_tls_modes(write: Write, env: dict[str, str], value: str, mode: TLSMode) -> None:
    assert load(write(f'[accounts.default]\ntls = "{value}"\n'), env=env).account().tls is mode


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("TLSv1.2", "1.2"),
        ("tlsv1.3", "1.3"),
        ("TLS1.2", "1.2"),
        ("1.3", "1.3"),
        (" 1.2 ", "1.2"),
        ("1.0", "1.0"),
        ("1.1", "1.1"),
    ],
)
def test_tls_min_version_parsing(
    write: Write, env: dict[str, str], value: str, expected: str
) -> None:
    acc = load(write(f'[accounts.default]\ntls_min_version = "{value}"\n'), env=env).account()
    assert acc.tls_min_version == expected


def test_tls_min_version_from_environment(env: dict[str, str]) -> None:
    assert load(env={**env, "SMTP365_TLS_MIN_VERSION": "TLSv1.3"}).account().tls_min_version == (
        "1.3"
    )


@pytest.mark.parametrize("value", ["1.4", "SSLv3", "TLSv1.2.1", "latest", ""])
def test_tls_min_version_bad_value(write: Write, env: dict[str, str], value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(f'[accounts.default]\ntls_min_version = "{value}"\n'), env=env)
    assert "accounts.default.tls_min_version" in info.value.what
    assert "1.0, 1.1, 1.2, 1.3" in info.value.what


def test_tls_min_version_as_toml_float(write: Write, env: dict[str, str]) -> None:
    acc = load(write("[accounts.default]\ntls_min_version = 1.3\n"), env=env).account()
    assert acc.tls_min_version == "1.3"


# ------------------------------------------------------------------ secrets


def _login_account(write: Write, env: dict[str, str], secret_line: str) -> AccountSettings:
    text = f'[accounts.default]\nusername = "a@contoso.com"\nauth = "login"\n{secret_line}\n'
    return load(write(text), env=env).account()


def test_inline_password(write: Write, env: dict[str, str]) -> None:
    acc = _login_account(write, env, f'password = "{SECRET_PASSWORD}"')
    assert acc.password_value() == SECRET_PASSWORD
    assert acc.has_secret("password")
    assert not acc.has_secret("token")


def test_inline_token(write: Write, env: dict[str, str]) -> None:
    acc = load(write(f'[accounts.default]\ntoken = "{SECRET_TOKEN}"\n'), env=env).account()
    assert acc.token_value() == SECRET_TOKEN
    assert acc.has_secret("token")


def test_password_env(write: Write, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # password_env / token_env are read from the process environment when the secret is
    # needed, not from the ``env`` mapping given to load().
    monkeypatch.setenv("SMTP365_TEST_PW", SECRET_PASSWORD)
    acc = _login_account(write, env, 'password_env = "SMTP365_TEST_PW"')
    assert acc.password_value() == SECRET_PASSWORD


def test_token_env(write: Write, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP365_TEST_TOKEN", SECRET_TOKEN)
    acc = load(write('[accounts.default]\ntoken_env = "SMTP365_TEST_TOKEN"\n'), env=env).account()
    assert acc.token_value() == SECRET_TOKEN


@pytest.mark.parametrize("kind", ["password", "token"])
def test_secret_env_not_set(
    write: Write, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.delenv("SMTP365_TEST_UNSET", raising=False)
    acc = load(write(f'[accounts.default]\n{kind}_env = "SMTP365_TEST_UNSET"\n'), env=env).account()
    with pytest.raises(ConfigError) as info:
        acc.password_value() if kind == "password" else acc.token_value()
    assert "$SMTP365_TEST_UNSET" in info.value.what
    assert "not set" in info.value.what
    assert info.value.fix == "export SMTP365_TEST_UNSET=... before running smtp365"


def test_secret_env_set_but_empty(
    write: Write, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP365_TEST_EMPTY", "")
    acc = _login_account(write, env, 'password_env = "SMTP365_TEST_EMPTY"')
    with pytest.raises(ConfigError) as info:
        acc.password_value()
    assert info.value.fix


@pytest.mark.parametrize("content", ["s3cret\n", "s3cret\r\n", "s3cret", "  s3cret \n\n"])
def test_password_file_strips_whitespace(
    tmp_path: Path, write: Write, env: dict[str, str], content: str
) -> None:
    secret = tmp_path / "pw"
    secret.write_text(content, encoding="utf-8")
    acc = _login_account(write, env, f'password_file = "{secret}"')
    assert acc.password_value() == "s3cret"


def test_token_file(tmp_path: Path, write: Write, env: dict[str, str]) -> None:
    secret = tmp_path / "token"
    secret.write_text(SECRET_TOKEN + "\n", encoding="utf-8")
    acc = load(write(f'[accounts.default]\ntoken_file = "{secret}"\n'), env=env).account()
    assert acc.token_value() == SECRET_TOKEN


def test_secret_file_with_tilde(
    tmp_path: Path, write: Write, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = Path(env["HOME"])
    (home / "token").write_text(SECRET_TOKEN + "\n", encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))  # expanduser() uses the process environment
    acc = load(write('[accounts.default]\ntoken_file = "~/token"\n'), env=env).account()
    assert acc.token_value() == SECRET_TOKEN


@pytest.mark.parametrize("kind", ["password", "token"])
def test_secret_file_missing(tmp_path: Path, write: Write, env: dict[str, str], kind: str) -> None:
    missing = tmp_path / "no-such-secret"
    acc = load(write(f'[accounts.default]\n{kind}_file = "{missing}"\n'), env=env).account()
    with pytest.raises(ConfigError) as info:
        acc.password_value() if kind == "password" else acc.token_value()
    assert f"cannot read {kind}_file {missing}" in info.value.what
    assert str(missing) in info.value.fix


def test_secret_file_empty_is_an_error(tmp_path: Path, write: Write, env: dict[str, str]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    acc = _login_account(write, env, f'password_file = "{empty}"')
    with pytest.raises(ConfigError) as info:
        acc.password_value()
    assert "is empty" in info.value.what


def test_secret_file_empty_has_a_fix(tmp_path: Path, write: Write, env: dict[str, str]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    acc = _login_account(write, env, f'password_file = "{empty}"')
    with pytest.raises(ConfigError) as info:
        acc.password_value()
    assert info.value.fix


@pytest.mark.parametrize("kind", ["password", "token"])
def test_no_secret_at_all(write: Write, env: dict[str, str], kind: str) -> None:
    acc = _login_account(write, env, "")
    assert not acc.has_secret(kind)
    with pytest.raises(ConfigError) as info:
        acc.password_value() if kind == "password" else acc.token_value()
    assert f"has no {kind}" in info.value.what
    assert f"{kind}_env" in info.value.fix
    assert f"SMTP365_{kind.upper()}" in info.value.fix


def test_secrets_from_smtp365_variables(env: dict[str, str]) -> None:
    acc = load(
        env={**env, "SMTP365_PASSWORD": SECRET_PASSWORD, "SMTP365_TOKEN": SECRET_TOKEN}
    ).account()
    assert acc.password_value() == SECRET_PASSWORD
    assert acc.token_value() == SECRET_TOKEN


def test_smtp365_password_beats_inline_password(write: Write, env: dict[str, str]) -> None:
    path = write('[accounts.default]\nauth = "login"\npassword = "from-file"\n')
    acc = load(path, env={**env, "SMTP365_PASSWORD": "from-env"}).account()
    assert acc.password_value() == "from-env"


def test_inline_secret_beats_env_and_file_in_the_same_layer(
    tmp_path: Path, write: Write, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP365_TEST_PW", "from-variable")
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-file-content\n", encoding="utf-8")
    acc = _login_account(
        write,
        env,
        f'password = "inline"\npassword_env = "SMTP365_TEST_PW"\npassword_file = "{pw_file}"',
    )
    assert acc.password_value() == "inline"


def test_higher_layer_secret_source_beats_inline_in_file(
    tmp_path: Path, write: Write, env: dict[str, str]
) -> None:
    pw_file = tmp_path / "pw"
    pw_file.write_text("from-flag\n", encoding="utf-8")
    path = write('[accounts.default]\nauth = "login"\npassword = "from-file"\n')
    acc = load(path, env=env, overrides={"password_file": str(pw_file)}).account()
    assert acc.password_value() == "from-flag"


# ------------------------------------------------------------------ secrets never shown


def _shown(*objects: object) -> str:
    return "\n".join(f"{o!r}\n{o!s}" for o in objects)


def test_repr_and_str_hide_inline_secrets(write: Write, env: dict[str, str]) -> None:
    text = f"""
[accounts.default]
username = "a@contoso.com"
password = "{SECRET_PASSWORD}"
token = "{SECRET_TOKEN}"
"""
    settings = load(write(text), env=env)
    acc = settings.account()
    shown = _shown(settings, settings.accounts["default"], acc, acc.raw)
    shown += settings.model_dump_json() + acc.raw.model_dump_json()
    assert SECRET_PASSWORD not in shown
    assert SECRET_TOKEN not in shown
    assert "a@contoso.com" in shown  # the reprs are not just empty
    # ...and yet the values are there for whoever needs them
    assert acc.password_value() == SECRET_PASSWORD
    assert acc.token_value() == SECRET_TOKEN


def test_repr_and_str_hide_secrets_from_environment(env: dict[str, str]) -> None:
    settings = load(
        env={**env, "SMTP365_PASSWORD": SECRET_PASSWORD, "SMTP365_TOKEN": SECRET_TOKEN},
        account="ci",
    )
    acc = settings.account()
    shown = _shown(settings, settings.accounts["ci"], acc)
    assert SECRET_PASSWORD not in shown
    assert SECRET_TOKEN not in shown


def test_repr_never_contains_secret_file_contents(
    tmp_path: Path, write: Write, env: dict[str, str]
) -> None:
    secret = tmp_path / "token"
    secret.write_text(SECRET_TOKEN, encoding="utf-8")
    settings = load(write(f'[accounts.default]\ntoken_file = "{secret}"\n'), env=env)
    acc = settings.account()
    assert acc.token_value() == SECRET_TOKEN
    assert SECRET_TOKEN not in _shown(settings, acc, acc.raw)


def test_validation_errors_do_not_echo_secrets(write: Write, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(
            write("[accounts.default]\npassword = 12345678\n"),
            env={**env, "SMTP365_TOKEN": SECRET_TOKEN},
        )
    assert "12345678" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        load(env={**env, "SMTP365_TOKEN": SECRET_TOKEN, "SMTP365_PORT": "x"})
    assert SECRET_TOKEN not in str(info.value)


def test_model_built_directly_hides_secrets() -> None:
    account = Account.model_validate({"password": SECRET_PASSWORD, "token": SECRET_TOKEN})
    settings = Settings(accounts={"default": account})
    assert SECRET_PASSWORD not in _shown(account, settings, settings.account())
    assert SECRET_TOKEN not in _shown(account, settings, settings.account())


def test_process_environment_is_not_read_when_env_is_given(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMTP365_HOST", "leak.example.com")
    monkeypatch.setenv("SMTP365_ACCOUNT", "leak")
    settings = load(env=env)
    assert settings.accounts == {}
    assert settings.account().host == "smtp.office365.com"
    assert os.environ["SMTP365_HOST"] == "leak.example.com"


def test_env_never_silently_creates_an_account_beside_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "only-reports.toml"
    cfg.write_text('[accounts.reports]\nusername = "reports@contoso.com"\n')
    env = {"HOME": str(tmp_path), "SMTP365_USERNAME": "x@contoso.com"}
    with pytest.raises(ConfigError, match="reports"):
        load(cfg, env=env)


# ------------------------------------------------------------------ the [relay] table

RELAY_PLAIN_AUTH = (
    ONE_ACCOUNT
    + """
[[relay.networks]]
cidr = "192.168.10.0/24"
name = "printers"

[[relay.networks]]
cidr = "192.168.20.0/24"

[[relay.listeners]]
port = 2525
plain_auth_networks = [{names}]
"""
)


def test_plain_auth_networks_name_allow_listed_networks(write: Write, env: dict[str, str]) -> None:
    text = RELAY_PLAIN_AUTH.format(names='"printers", "192.168.20.0/24"')
    settings = load(write(text), env=env)
    assert settings.relay.listeners[0].plain_auth_networks == ["printers", "192.168.20.0/24"]


def test_plain_auth_for_a_network_that_is_not_allow_listed_is_refused(
    write: Write, env: dict[str, str]
) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(RELAY_PLAIN_AUTH.format(names='"printerz"')), env=env)
    message = str(info.value)
    assert "'printerz'" in message and "printers" in message and "allow-listed" in message
