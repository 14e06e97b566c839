"""Claims check, AADSTS explanations and the token cache file (no network)."""

from __future__ import annotations

import base64
import json
import multiprocessing
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from smtp365.auth import aadsts, claims
from smtp365.auth.cache import CacheFile
from smtp365.errors import AuthError


def jwt(payload: dict[str, Any]) -> str:
    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")

    return f"{b64({'alg': 'RS256'})}.{b64(payload)}.sig"


NOW = 1_800_000_000.0
APP_SMTP = {"aud": "https://outlook.office365.com", "roles": ["SMTP.SendAsApp"], "exp": NOW + 600}
USER_SMTP = {
    "aud": "https://outlook.office.com",
    "scp": "SMTP.Send",
    "upn": "a@contoso.com",
    "exp": NOW + 600,
}


def test_good_tokens_pass() -> None:
    assert claims.check(APP_SMTP, "smtp", now=NOW).ok
    r = claims.check(USER_SMTP, "smtp", mailbox="a@contoso.com", now=NOW)
    assert r.ok and not r.app_only and r.permissions == ("SMTP.Send",) and not r.warnings
    graph = {"aud": "https://graph.microsoft.com", "roles": ["Mail.Send"], "exp": NOW + 9}
    assert claims.check(graph, "graph", now=NOW).ok


@pytest.mark.parametrize(
    ("payload", "target", "fragment", "fix_fragment"),
    [
        (
            {**APP_SMTP, "aud": "https://graph.microsoft.com"},
            "smtp",
            "is for Microsoft Graph",
            "outlook.office365.com/.default",
        ),
        (
            {**APP_SMTP, "roles": ["Mail.Send"]},
            "smtp",
            "no SMTP.SendAsApp in its roles",
            "Office 365 Exchange Online > Application > SMTP.SendAsApp",
        ),
        ({**USER_SMTP, "scp": "Mail.Read"}, "smtp", "no SMTP.Send in its scp", "Delegated"),
        ({**APP_SMTP, "exp": NOW - 30}, "smtp", "expired 30 s ago", "fresh token"),
        (APP_SMTP, "graph", "is for Exchange Online (SMTP)", "graph.microsoft.com/.default"),
        ({**APP_SMTP, "aud": "api://something"}, "smtp", "audience is api://something", "scope"),
    ],
)
def test_each_problem_named(
    payload: dict[str, Any], target: claims.Target, fragment: str, fix_fragment: str
) -> None:
    report = claims.check(payload, target, now=NOW)
    assert not report.ok
    assert len(report.keys) == len(report.problems)
    assert set(report.keys) <= {"claims.audience", "claims.permission", "claims.expired"}
    assert any(fragment in what for what, _ in report.problems), report.problems
    assert any(fix_fragment in fix for _, fix in report.problems)


def test_require_raises_auth_error_and_skips_opaque_tokens() -> None:
    bad = jwt({**APP_SMTP, "aud": "https://graph.microsoft.com", "exp": time.time() + 600})
    with pytest.raises(AuthError, match="Microsoft Graph") as info:
        claims.require(bad, "smtp")
    assert info.value.fix
    assert claims.require("EwBwA8l6BAAU-opaque-token", "smtp") is None


def test_other_user_token_warns_about_full_access() -> None:
    r = claims.check(USER_SMTP, "smtp", mailbox="shared@contoso.com", now=NOW)
    assert r.ok and "FullAccess" in r.warnings[0]


@pytest.mark.parametrize(
    ("code", "fragment", "relogin"),
    [
        (7000215, "client secret is wrong", False),
        (700016, "no application", False),
        (65001, "not consented", False),
        (700027, "certificate", False),
        (70008, "refresh token expired", True),
        (50173, "revoked", True),
        (50076, "multi-factor", True),
        (53003, "Conditional Access", False),
        (70043, "sign-in frequency", True),
    ],
)
def test_aadsts_codes_explained(code: int, fragment: str, relogin: bool) -> None:
    result = {
        "error": "invalid_client",
        "error_description": f"AADSTS{code}: Something. Trace ID: x",
        "error_codes": [code],
    }
    what, fix, temporary, needs_login = aadsts.explain(result)
    assert f"AADSTS{code}" in what and fragment in what
    assert fix and needs_login is relogin and not temporary
    # The code is also found in the description alone.
    assert aadsts.code_of({"error_description": f"AADSTS{code}: x"}) == code


def test_unknown_and_oauth_errors() -> None:
    what, fix, _, _ = aadsts.explain({"error": "weird", "error_description": "AADSTS1: no"})
    assert "weird" in what and "login.microsoftonline.com/error" in fix
    what, _, temporary, _ = aadsts.explain({"error": "authorization_pending"})
    assert temporary and "not finished" in what


def test_cache_file_is_private_and_atomic(tmp_path: Path) -> None:
    cache = CacheFile(tmp_path / "sub" / "acct.json")
    assert cache.read() is None
    with cache.locked():
        cache.write('{"AccessToken": {}}')
    mode = stat.S_IMODE(cache.path.stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(cache.path.parent.stat().st_mode) == 0o700
    assert cache.read() == '{"AccessToken": {}}'
    assert not list(cache.path.parent.glob(".*.tmp"))
    assert cache.delete() and not cache.delete()


def test_encrypted_cache(tmp_path: Path) -> None:
    path = tmp_path / "enc.json"
    CacheFile(path, key="k1").write('{"secret": "refresh-token-value"}')
    assert b"refresh-token-value" not in path.read_bytes()
    assert CacheFile(path, key="k1").read() == '{"secret": "refresh-token-value"}'
    with pytest.raises(AuthError, match="cannot be decrypted"):
        CacheFile(path, key="other").read()
    with pytest.raises(AuthError, match="no cache key"):
        CacheFile(path).read()
    assert "k1" not in repr(CacheFile(path, key="k1"))


def _increment(path: str, n: int) -> None:
    cache = CacheFile(Path(path))
    for _ in range(n):
        with cache.locked():
            value = int(cache.read() or "0")
            cache.write(str(value + 1))


def test_lock_serialises_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "counter.json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_increment, args=(path, 50)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert CacheFile(Path(path)).read() == "150"
