"""Load settings: TOML file < ``SMTP365_*`` environment variables < CLI flags.

This package is the only place in smtp365 that reads the environment.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from smtp365.config.model import Account, Settings
from smtp365.errors import ConfigError

ENV_PREFIX = "SMTP365_"
SECRET_KINDS = ("password", "token", "client_secret")
FILE_NAME = "smtp365.toml"
# Environment variables that are not account keys.
_GLOBAL_ENV = {"SMTP365_CONFIG", "SMTP365_ACCOUNT"}


def default_paths(env: Mapping[str, str]) -> list[Path]:
    """Where a config file is looked for when none is named: ./smtp365.toml, then XDG."""
    xdg = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")) / ".config")
    return [Path.cwd() / FILE_NAME, Path(xdg).expanduser() / "smtp365" / FILE_NAME]


def _state_home(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")) / ".local" / "state")
    return Path(base).expanduser() / "smtp365"


def find_config(path: str | Path | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read: ``path``, else ``$SMTP365_CONFIG``, else the default places."""
    named = path or env.get("SMTP365_CONFIG")
    if named:
        p = Path(named).expanduser()
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist",
                fix="create it (see docs/configuration.md) or drop --config / SMTP365_CONFIG",
            )
        return p
    for candidate in default_paths(env):
        if candidate.is_file():
            return candidate
    return None


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    keys = set(Account.model_fields)
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _GLOBAL_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in keys and value.strip():  # an empty variable means "unset" (CA_FILE= is not ".")
            out[key] = value
    return out


def _explain(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (see docs/configuration.md for the keys)"
        lines.append(f"{where}: {msg}")
    return ConfigError(
        f"{source} is not valid: " + "; ".join(lines),
        fix="correct the keys named above (docs/configuration.md lists every key)",
    )


def load(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    account: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the settings.

    ``account`` (or ``$SMTP365_ACCOUNT``) picks the account that environment
    variables (``SMTP365_HOST``, ``SMTP365_USERNAME``...) and ``overrides``
    (CLI flags, ``None`` values ignored) apply to; it becomes the default.
    """
    env = os.environ if env is None else env
    file = find_config(path, env)
    data: dict[str, Any] = {}
    source = "(no config file)"
    if file is not None:
        source = str(file)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"{file} is not valid TOML: {exc}", fix="fix the syntax at the position named"
            ) from None
        except OSError as exc:
            raise ConfigError(f"cannot read {file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"{file} is not UTF-8 text", fix="save the config file as UTF-8 (TOML requires it)"
            ) from None
    try:
        accounts = data.get("accounts") or {}
        inline = {
            name: [k for k in SECRET_KINDS if isinstance(acc, dict) and k in acc]
            for name, acc in (accounts.items() if isinstance(accounts, dict) else ())
        }
        settings = Settings.model_validate(
            {**data, "source": source, "inline_secrets": inline, "state_home": _state_home(env)}
        )
    except ValidationError as exc:
        raise _explain(exc, source) from None

    chosen = account or env.get("SMTP365_ACCOUNT") or settings.default_account
    layered = {
        **_env_overrides(env),
        **{k: v for k, v in (overrides or {}).items() if v is not None},
    }
    if account or env.get("SMTP365_ACCOUNT") or layered:
        base = settings.accounts.get(chosen)
        if base is None and settings.accounts:
            # An account the file does not define is an error (never a silent new
            # account built from variables); only without file accounts may the
            # environment and flags define one completely.
            settings.account(chosen)  # raises a ConfigError naming the known accounts
        below = base.model_dump(exclude_unset=True) if base else {}
        for kind in (*SECRET_KINDS, "cache_key"):
            # A secret source set at a higher layer replaces every source below it.
            if any(k in layered for k in (kind, f"{kind}_env", f"{kind}_file")):
                for k in (kind, f"{kind}_env", f"{kind}_file"):
                    below.pop(k, None)
        merged = {**below, **layered}
        try:
            new_account = Account.model_validate(merged)
        except ValidationError as exc:
            raise _explain(exc, f"account {chosen!r} (file + SMTP365_* + flags)") from None
        settings = settings.model_copy(
            update={
                "accounts": {**settings.accounts, chosen: new_account},
                "default_account": chosen,
            }
        )
    return settings


def has_display(env: Mapping[str, str] | None = None) -> bool:
    """Whether a browser can be opened here (a desktop session), for `auth login`."""
    import sys

    env = os.environ if env is None else env
    return sys.platform in ("darwin", "win32") or bool(
        env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")
    )
