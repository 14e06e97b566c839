from __future__ import annotations

import base64

import pytest

from smtp365.auth import AccessToken, StaticTokenProvider
from smtp365.auth.sasl import login_step, xoauth2


def test_xoauth2_encoding_matches_spec() -> None:
    raw = base64.b64decode(xoauth2("alice@contoso.com", "tok"))
    assert raw == b"user=alice@contoso.com\x01auth=Bearer tok\x01\x01"


@pytest.mark.parametrize("bad", ["a\r\nb", "a\nb", "a\x00b", "a\x01b"])
def test_control_characters_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        xoauth2(bad, "tok")
    with pytest.raises(ValueError):
        xoauth2("alice@contoso.com", bad)
    with pytest.raises(ValueError):
        login_step(bad)


def test_login_step() -> None:
    assert base64.b64decode(login_step("pässword")) == "pässword".encode()


async def test_static_provider_never_shows_token() -> None:
    p = StaticTokenProvider("s3cr3t-token")
    assert "s3cr3t" not in repr(p)
    tok = await p.get_token()
    assert tok.token == "s3cr3t-token"
    assert "s3cr3t" not in repr(tok)
    assert not tok.expires_within(300)
    assert AccessToken("x", expires_at=100.0).expires_within(10, now=95.0)
