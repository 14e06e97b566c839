from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from smtp365.config import Account, AccountSettings
from smtp365.config.model import resolve


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "test-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def server_context(ca: trustme.CA) -> Callable[..., ssl.SSLContext]:
    def make(*names: str, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*(names or ("localhost", "127.0.0.1"))).configure_cert(ctx)
        if max_version is not None:
            ctx.maximum_version = max_version
        return ctx

    return make


@pytest.fixture
def make_account(ca_file: Path) -> Callable[..., AccountSettings]:
    def make(port: int, **overrides: Any) -> AccountSettings:
        fields: dict[str, Any] = {
            "profile": "custom",
            "host": "localhost",
            "port": port,
            "ca_file": ca_file,
            "username": "alice@contoso.test",
            "auth": "xoauth2",
            "token": "test-token",
            "timeout": 10,
        }
        fields.update(overrides)
        return resolve("test", Account.model_validate(fields), "(test)")

    return make
