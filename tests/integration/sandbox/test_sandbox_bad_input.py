"""Malformed input, one case each: the identity platform answers it as Entra ID would (an
AADSTS error, or a plain 400 for a request that is not HTTP), the SMTP server with Exchange's
5xx syntax replies; neither logs an error or a traceback, neither closes without answering.
``test_sandbox_fuzz.py`` looks for more of the same kind."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest

from smtp365.sandbox import DEFAULT_PUBLIC_APP_ID, Sandbox

from .conftest import FailureLog, HttpAnswer, assertion_claims, https_request, registered_key

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
EXCHANGE_DEFAULT = "https://outlook.office365.com/.default"


@pytest.fixture(autouse=True)
def nothing_logged(failure_log: FailureLog):
    yield
    assert failure_log.take() == []


def aadsts(answer: HttpAnswer) -> tuple[int, str, list[int]]:
    body = answer.json()
    return answer.status, body["error"], body["error_codes"]


# ------------------------------------------------------------------- HTTP


def token_post(sb: Sandbox, form: dict[str, str], **kwargs: Any) -> HttpAnswer:
    return https_request(
        sb, "POST", f"/{sb.settings.tenant_id}/oauth2/v2.0/token", form=form, **kwargs
    )


@pytest.mark.parametrize(
    "credentials",
    [
        b"\xff\xfe",
        b"Zm9v\xe9",
        b"!!!not base64",
        base64.b64encode(b"no colon"),
        base64.b64encode(b"\xff\xfe:\x80"),
    ],
    ids=["latin-1", "base64-and-latin-1", "not-base64", "no-colon", "not-utf-8"],
)
def test_basic_credentials_that_cannot_be_read(sandbox: Sandbox, credentials: bytes) -> None:
    """A Basic header that holds no ``id:secret`` counts as no credential at all, whatever its
    bytes: 401 AADSTS7000218 for a client named in the body, else 400 AADSTS900144."""
    header = [(b"Authorization", b"Basic " + credentials)]
    form = {"grant_type": "client_credentials", "scope": EXCHANGE_DEFAULT}
    named = token_post(
        sandbox, {**form, "client_id": sandbox.settings.default_app_id}, headers=header
    )
    assert aadsts(named) == (401, "invalid_client", [7000218])
    anonymous = token_post(sandbox, form, headers=header)
    assert aadsts(anonymous) == (400, "invalid_request", [900144])
    assert "'client_id'" in anonymous.json()["error_description"]


@pytest.mark.parametrize(
    "target", [b"//[", b"/a]", b"/%zz", b"http://[/", b"http://localhost/[", b"nothing"]
)
def test_request_targets_that_are_no_path_get_400(sandbox: Sandbox, target: bytes) -> None:
    answer = https_request(sandbox, "GET", target)
    assert answer.status == 400
    assert answer.body == b"400 Bad Request\n"


def test_refusals_of_head_requests_have_no_body(sandbox: Sandbox) -> None:
    """The HTTP layer's own 400 and 413 answer HEAD too (h11 refuses a body for it)."""
    assert https_request(sandbox, "HEAD", b"//[").status == 400
    too_big = https_request(sandbox, "HEAD", "/", body=b"x" * (1 << 21))
    assert (too_big.status, too_big.body) == (413, b"")


def test_request_target_forms(sandbox: Sandbox) -> None:
    """``//x`` is a path with an empty segment, not a host; absolute-form is served too."""
    tid = sandbox.settings.tenant_id
    config = "v2.0/.well-known/openid-configuration"
    assert https_request(sandbox, "GET", f"//{tid}/{config}").status == 200
    absolute = f"https://localhost:{sandbox.identity_port}/{tid}/{config}?x=1#fragment"
    assert https_request(sandbox, "GET", absolute).status == 200


def assertion_post(sb: Sandbox, assertion: str) -> HttpAnswer:
    return token_post(
        sb,
        {
            "client_id": sb.settings.default_app_id,
            "grant_type": "client_credentials",
            "scope": EXCHANGE_DEFAULT,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion,
        },
    )


@pytest.mark.parametrize(
    "header",
    [{"x5c": [123]}, {"x5c": "MIIB"}, {"x5c": [None, "MIIB"]}, {"x5t": 5}, {"x5t#S256": ["a"]}],
    ids=["x5c-number", "x5c-string", "x5c-null", "x5t-number", "x5t-s256-list"],
)
def test_assertion_header_of_the_wrong_type_is_malformed(sandbox: Sandbox, header) -> None:
    key, _ = registered_key(sandbox)
    answer = assertion_post(
        sandbox, jwt.encode(assertion_claims(sandbox), key, "RS256", headers=header)
    )
    assert aadsts(answer) == (400, "invalid_request", [50027])
    assert answer.json()["error_description"].startswith(
        "AADSTS50027: JWT token is invalid or malformed. [Reason - "
    )


def test_assertion_times_beyond_any_date(sandbox: Sandbox) -> None:
    """Signed times of 1e300 or -1e300 seconds: out of the valid range, written as the last or
    first moment a date can hold; an expiry that far off is merely far off."""
    key, thumb = registered_key(sandbox)

    def post(**claims: object) -> HttpAnswer:
        token = jwt.encode(
            assertion_claims(sandbox, **claims), key, "RS256", headers={"x5t": thumb}
        )
        return assertion_post(sandbox, token)

    future = post(nbf=1e300, exp=1e300)
    assert aadsts(future) == (401, "invalid_client", [700024])
    assert (
        "assertion valid from 9999-12-31T23:59:59.0000000Z, expiry time of assertion "
        "9999-12-31T23:59:59.0000000Z." in future.json()["error_description"]
    )
    past = post(nbf=-1e300, exp=-1e300)
    assert aadsts(past) == (401, "invalid_client", [700024])
    assert (
        "expiry time of assertion 0001-01-01T00:00:00.0000000Z."
        in (past.json()["error_description"])
    )
    assert post(exp=1e300).status == 200
    assert post(exp=10**400).status == 200


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": float("nan")},
        {"exp": float("inf")},
        {"nbf": float("-inf")},
        {"exp": True},
        {"nbf": "now"},
        {"exp": None},
    ],
    ids=["exp-nan", "exp-inf", "nbf-minus-inf", "exp-bool", "nbf-text", "exp-null"],
)
def test_assertion_times_that_are_no_numbers_are_malformed(sandbox: Sandbox, claims) -> None:
    key, thumb = registered_key(sandbox)
    token = jwt.encode(assertion_claims(sandbox, **claims), key, "RS256", headers={"x5t": thumb})
    assert aadsts(assertion_post(sandbox, token)) == (400, "invalid_request", [50027])


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "http://localhost:é/",
        "http://localhost:1\x0b/",
        "http://localhost:1 x/",
        "http://localhost:99999/",
        "http://localhost:8400\x7f/",
    ],
    ids=["non-ascii", "control", "space", "port-too-big", "delete"],
)
def test_redirect_uris_that_are_no_uri(sandbox: Sandbox, redirect_uri: str) -> None:
    """Entra ID ignores the port of a loopback redirect URI, but it must be a port: anything
    else is no registered redirect URI (AADSTS50011), never a broken Location header."""
    tid = sandbox.settings.tenant_id
    query = urlencode(
        {
            "client_id": DEFAULT_PUBLIC_APP_ID,
            "response_type": "code",
            "redirect_uri": redirect_uri,
            "scope": "openid",
            "prompt": "none",  # answered by a redirect to the app
        }
    )
    answer = https_request(sandbox, "GET", f"/{tid}/oauth2/v2.0/authorize?{query}")
    assert answer.status == 400
    assert b"AADSTS50011: The redirect URI" in answer.body
    logout = urlencode({"post_logout_redirect_uri": redirect_uri})
    signed_out = https_request(sandbox, "GET", f"/{tid}/oauth2/v2.0/logout?{logout}")
    assert signed_out.status == 200 and "location" not in signed_out.headers


def test_instance_discovery_of_a_malformed_endpoint(sandbox: Sandbox) -> None:
    query = urlencode({"authorization_endpoint": "https://[/common/oauth2/v2.0/authorize"})
    answer = https_request(sandbox, "GET", f"/common/discovery/instance?{query}")
    assert aadsts(answer) == (400, "invalid_instance", [50049])
    assert answer.json()["error_description"].startswith(
        "AADSTS50049: Unknown or invalid instance."
    )


def test_error_lookup_takes_ascii_digits_only(sandbox: Sandbox) -> None:
    page = https_request(sandbox, "GET", "/error?code=%C2%B2")
    assert b"unknown error code" in page.body
    assert b"AADSTS50049" in https_request(sandbox, "GET", "/error?code=50049").body


# ------------------------------------------------------------------- SMTP


def test_mail_from_cut_short(sandbox: Sandbox, authed) -> None:
    client = authed(sandbox)
    for line in ("MAIL FROM:<", "MAIL FROM:<a.@[\t", "MAIL FROM:<<"):
        assert client.cmd(line).raw == "501 5.1.7 Invalid address", line
    assert client.cmd("MAIL FROM:<alice@contoso.test>").raw == "250 2.1.0 Sender OK"


@pytest.mark.parametrize(
    "sender", [b"<x\xff@contoso.com>", b"<x\xff@contoso.com> SMTPUTF8", b"<\xc3@contoso.com>"]
)
def test_sender_that_is_not_utf8(sandbox: Sandbox, authed, sender: bytes) -> None:
    client = authed(sandbox)
    client.send(b"MAIL FROM:" + sender + b"\r\n")
    assert client.read().raw == "501 5.1.7 Invalid address"


@pytest.mark.parametrize("params", [b"", b" SMTPUTF8"], ids=["ascii", "smtputf8"])
def test_recipient_that_is_not_utf8(sandbox: Sandbox, authed, params: bytes) -> None:
    client = authed(sandbox)
    client.send(b"MAIL FROM:<alice@contoso.test>" + params + b"\r\n")
    assert client.read().raw == "250 2.1.0 Sender OK"
    client.send(b"RCPT TO:<\xff\xfe@contoso.com>\r\n")
    assert client.read().raw == "501 5.1.3 Invalid address"
    assert client.cmd("RCPT TO:<someone@example.net>").raw == "250 2.1.5 Recipient OK"


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<alice@contoso.test> X\xff=1",
        b"MAIL FROM:<alice@contoso.test> \xc3\x9f=1",
        b"MAIL FROM:<alice@contoso.test> ENVID=\xff",
        b"MAIL FROM:<alice@contoso.test> SIZE=\xc2\xb2",
        b"MAIL FROM:<alice@contoso.test> SIZE=1_000",
    ],
    ids=["keyword-latin-1", "keyword-sharp-s", "envid-latin-1", "size-superscript", "size-1_000"],
)
def test_mail_parameters_that_are_no_parameters(sandbox: Sandbox, authed, line: bytes) -> None:
    client = authed(sandbox)
    client.send(line + b"\r\n")
    assert client.read().bare == "501 5.5.4 Invalid arguments"


def test_rcpt_parameter_that_is_not_utf8(sandbox: Sandbox, authed) -> None:
    client = authed(sandbox)
    assert client.cmd("MAIL FROM:<alice@contoso.test>").raw == "250 2.1.0 Sender OK"
    client.send(b"RCPT TO:<someone@example.net> ORCPT=rfc822;\xff\r\n")
    assert client.read().bare == "501 5.5.4 Invalid arguments"


@pytest.mark.parametrize("size", ["²6", "٣", "1_0", "+5", " "], ids=repr)
def test_bdat_size_is_ascii_digits(sandbox: Sandbox, authed, size: str) -> None:
    client = authed(sandbox)
    assert client.cmd("MAIL FROM:<alice@contoso.test>").raw == "250 2.1.0 Sender OK"
    assert client.cmd("RCPT TO:<someone@example.net>").raw == "250 2.1.5 Recipient OK"
    assert client.cmd(f"BDAT {size}").bare == "501 5.5.4 Invalid arguments"
    assert client.cmd("NOOP").raw == "250 2.0.0 OK"


@pytest.mark.parametrize("mechanism", ["XOAUTH2", "LOGIN"])
def test_auth_response_over_64_kib(sandbox: Sandbox, secured, mechanism: str) -> None:
    client = secured(sandbox)
    assert client.cmd(f"AUTH {mechanism}").code == 334
    client.send(b"A" * 70_000 + b"\r\n")
    assert client.read().raw == "500 5.5.6 Authentication Exchange line is too long"
    assert client.cmd("NOOP").raw == "250 2.0.0 OK"
    assert (
        client.auth_login("alice@contoso.test", sandbox.password("alice@contoso.test")).code == 235
    )


def test_command_line_over_64_kib(sandbox: Sandbox, secured) -> None:
    client = secured(sandbox)
    assert client.cmd("AUTH XOAUTH2 " + "A" * 70_000).raw == "500 5.5.2 Line too long"
    assert client.cmd("NOOP").raw == "250 2.0.0 OK"


@pytest.mark.parametrize(
    ("line", "quoted"),
    [
        (b"FROB", "FROB"),
        (b"frob now", "FROB"),  # the command word, as aiosmtpd hands it over
        (b"\xff\xfe", "unknown"),
        (b"", "unknown"),
        (b"MAIL\xff FROM:<a@b>", "unknown"),
        (b"X" * 100, "X" * 64 + "..."),
    ],
    ids=["word", "with-argument", "binary", "empty", "binary-verb", "long"],
)
def test_unrecognized_commands(sandbox: Sandbox, secured, line: bytes, quoted: str) -> None:
    client = secured(sandbox)
    client.send(line + b"\r\n")
    reply = client.read()
    assert reply.bare == f"500 5.3.3 Unrecognized command '{quoted}'"
    assert reply.raw != reply.bare  # with Exchange's diagnostic tail
    assert client.cmd("NOOP").raw == "250 2.0.0 OK"
