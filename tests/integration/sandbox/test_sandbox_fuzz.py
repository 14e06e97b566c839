"""The sandbox under arbitrary input: hypothesis sends requests to the identity platform's
HTTPS endpoints (any request target, method and header, bytes outside ASCII included; token
requests with any form fields and Basic credentials of any bytes; client assertions whose JOSE
header and claims are any JSON, signed with the registered key or not; the sign-in, device
login, logout and discovery endpoints with any parameters) and, briefly, SMTP sessions of
arbitrary lines, over real sockets to a sandbox on 127.0.0.1 (port 0).

Checked for every request: an answer came (the connection was not closed without one), it is
no 5xx, a JSON body parses and an AADSTS error is written as one. For every SMTP line: a
reply came, in UTF-8 and shaped ``ddd text``, and it is not the ``451 4.7.0`` of an
unexpected exception. For both: nothing logged at ERROR or with a traceback, by the
sandbox's loggers or any other (asyncio's "unhandled exception" included).

The client keeps ``Content-Length`` and ``Transfer-Encoding`` to itself, so that every
request is complete and must be answered (h11 answers bad framing on its own).

The default run tries the inputs written out as examples (the defects that
``test_sandbox_bad_input.py`` pins down) and ``FUZZ_EXAMPLES`` (50) fixed generated ones per
test; with ``FUZZ_SEED`` set, a random search from that seed (replay a failure with the same
seed), e.g. ``FUZZ_SEED=$RANDOM FUZZ_EXAMPLES=2000``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import hypothesis
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smtp365.sandbox import DEFAULT_PUBLIC_APP_ID, LimitSettings, Sandbox, SandboxSettings

from .conftest import FailureLog, StartSandbox, Wire, https_exchange, parse_answer, tls_for

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
SEED = os.environ.get("FUZZ_SEED")  # set: a random search from this seed; unset: fixed

DEFAULTS = SandboxSettings()
TENANT = DEFAULTS.tenant_id
APP_ID = DEFAULTS.default_app_id
ALICE = "alice@contoso.test"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
EXCHANGE_DEFAULT = "https://outlook.office365.com/.default"
TOKEN_PATH = f"/{TENANT}/oauth2/v2.0/token"
NOW = int(time.time())
RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
# Stand-ins for what only the running sandbox knows, replaced before sending.
SECRET, PASSWORD, X5T, X5T256, X5C, AUD = (
    "<secret>",
    "<password>",
    "<x5t>",
    "<x5t#S256>",
    "<x5c>",
    "<aud>",
)


def fuzz(test: Callable[..., None]) -> Callable[..., None]:
    """The hypothesis settings of every test here (see the module's docstring)."""
    test = settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=SEED is None,
        database=None,
    )(test)
    if SEED is not None:
        test = hypothesis.seed(int(SEED))(test)
    return test


@pytest.fixture
def sb(start_sandbox: StartSandbox) -> Sandbox:
    """A sandbox whose limits never answer in place of the command under test."""
    limits = LimitSettings(
        max_connections=1_000_000, messages_per_minute=1_000_000, recipients_per_day=10**9
    )
    return start_sandbox(SandboxSettings(limits=limits))


# ------------------------------------------------------------------- HTTP


def request_bytes(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> bytes:
    """A request as sent: ``Host`` unless given, then ``Content-Length`` and ``Connection:
    close``, so that the sandbox answers and closes."""
    if not any(name.lower() == b"host" for name, _ in headers):
        headers = [(b"Host", b"localhost"), *headers]
    headers = [*headers, (b"Content-Length", str(len(body)).encode()), (b"Connection", b"close")]
    lines = [method + b" " + target + b" HTTP/1.1", *(n + b": " + v for n, v in headers)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def form_request(
    target: str, fields: dict[str, str], headers: list[tuple[bytes, bytes]] | None = None
) -> bytes:
    form = (b"Content-Type", b"application/x-www-form-urlencoded")
    return request_bytes(
        b"POST", target.encode(), [form, *(headers or [])], urlencode(fields).encode()
    )


def exchange(sb: Sandbox, failures: FailureLog, data: bytes) -> str:
    """Send one request and check the invariants of the module's docstring. Returns what
    came back: the status, and the AADSTS code of an error (``401 AADSTS7000218``)."""
    received = https_exchange(sb, data)
    answer = parse_answer(received)
    assert answer is not None, f"closed without a response: {received[:300]!r}"
    assert answer.status < 500, (answer.status, answer.body[:500])
    outcome = str(answer.status)
    json_type = answer.headers.get("content-type", "").startswith("application/json")
    if json_type and not data.startswith(b"HEAD "):  # a response to HEAD has no body
        body = json.loads(answer.body)
        if "error_codes" in body:
            assert re.match(r"AADSTS[0-9]+: ", body["error_description"]), body
            outcome += f" AADSTS{body['error_codes'][0]}"
    assert failures.take() == []
    return outcome


def _no_crlf(data: bytes) -> bytes:
    return data.replace(b"\r", b"").replace(b"\n", b"")


SEGMENTS = [
    TENANT,
    "common",
    "organizations",
    "contoso.test",
    "oauth2",
    "v2.0",
    "token",
    "devicecode",
    "authorize",
    "logout",
    "discovery",
    "keys",
    ".well-known",
    "openid-configuration",
    "userrealm",
    "instance",
    "devicelogin",
    "error",
    "",
    "%00",
    "%ff",
    "%2F",
    "[",
    "..",
]
_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
token = st.text(st.sampled_from(_TCHAR), min_size=1, max_size=12)
vchars = st.binary(max_size=40).map(lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E))
segment = st.one_of(
    st.sampled_from(SEGMENTS), st.text(max_size=8).map(lambda t: t.replace("/", ""))
)
query = st.one_of(
    st.just(""),
    st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=4).map(
        lambda d: "?" + urlencode(d)
    ),
    vchars.map(lambda b: "?" + b.decode("ascii")),
)
target = st.one_of(
    st.builds(
        lambda parts, q: ("/" + "/".join(parts) + q).encode("utf-8"),
        st.lists(segment, max_size=5),
        query,
    ),
    vchars.map(lambda b: b or b"/"),
    st.binary(min_size=1, max_size=30).map(lambda b: _no_crlf(b).replace(b" ", b"") or b"*"),
    st.sampled_from(
        [
            b"//[",
            b"*",
            b"http://[/",
            b"https://localhost/common/discovery/keys",
            f"//{TENANT}/v2.0/.well-known/openid-configuration".encode(),
        ]
    ),
)
method = st.one_of(
    st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"]),
    token.map(str.encode),
)
header_value = st.binary(max_size=60).map(_no_crlf)
basic = st.one_of(
    header_value.map(lambda b: b"Basic " + b),
    st.binary(max_size=40).map(lambda b: b"Basic " + base64.b64encode(b)),
    st.builds(
        lambda user, secret: b"Basic " + base64.b64encode(user + b":" + secret),
        st.sampled_from([APP_ID.encode(), DEFAULT_PUBLIC_APP_ID.encode()]) | st.binary(max_size=10),
        st.binary(max_size=20),
    ),
)
FRAMING = {b"content-length", b"transfer-encoding", b"connection"}
header_name = st.one_of(
    st.sampled_from(
        [b"Authorization", b"Content-Type", b"Host", b"Client-Request-Id", b"Accept", b"Expect"]
    ),
    token.map(str.encode),
).filter(lambda name: name.lower() not in FRAMING)
header = st.one_of(
    st.tuples(header_name, header_value),
    st.tuples(st.just(b"Authorization"), basic),
    st.tuples(
        st.just(b"Content-Type"),
        st.sampled_from(
            [
                b"application/x-www-form-urlencoded",
                b"application/x-www-form-urlencoded; charset=latin-1",
                b"text/plain",
                b"application/json",
            ]
        ),
    ),
    st.tuples(
        st.just(b"Host"),
        st.sampled_from([b"localhost", b"127.0.0.1", b"[::1]", b"localhost:1", b"\xff:\xfe"]),
    ),
    st.tuples(st.just(b"Client-Request-Id"), header_value),
)
body = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    st.dictionaries(st.text(max_size=12), st.text(max_size=30), max_size=5).map(
        lambda d: urlencode(d).encode()
    ),
)


def test_any_request(sb: Sandbox, failure_log: FailureLog) -> None:
    seen: Counter[str] = Counter()

    @fuzz
    @given(method, target, st.lists(header, max_size=5), body)
    @example(b"GET", b"//[", [], b"")
    @example(
        b"POST",
        TOKEN_PATH.encode(),
        [
            (b"Content-Type", b"application/x-www-form-urlencoded"),
            (b"Authorization", b"Basic \xff\xfe"),
        ],
        b"grant_type=client_credentials&scope=" + EXCHANGE_DEFAULT.encode(),
    )
    def check(m: bytes, t: bytes, headers: list[tuple[bytes, bytes]], b: bytes) -> None:
        seen[exchange(sb, failure_log, request_bytes(m, t, headers, b))] += 1

    check()
    print(dict(seen))
    assert seen["400"] and seen["400 AADSTS900144"]  # the examples'
    assert failure_log.take() == []


# ------------------------------------------------------------ token requests


def text_or(*values: str, max_size: int = 20) -> st.SearchStrategy[str]:
    """One of ``values`` or any text (about as often)."""
    return st.sampled_from(values) | st.text(max_size=max_size)


def mostly(*values: str, max_size: int = 20) -> st.SearchStrategy[str]:
    """One of ``values`` three times in four, else any text: so that most requests get past
    the first checks (tenant, client, grant) to the ones behind them."""
    known, other = st.sampled_from(values), st.text(max_size=max_size)
    return st.integers(0, 3).flatmap(lambda n: known if n else other)


GRANTS = (
    "client_credentials",
    "authorization_code",
    "refresh_token",
    "password",
    "urn:ietf:params:oauth:grant-type:device_code",
    "device_code",
    "implicit",
)
SCOPES = (
    EXCHANGE_DEFAULT,
    "https://graph.microsoft.com/.default",
    "openid profile offline_access https://outlook.office.com/SMTP.Send",
    "SMTP.Send",
    "https://outlook.office365.com/SMTP.SendAsApp",
    "https://contoso.example/.default",
)
token_form = st.fixed_dictionaries(
    {
        "grant_type": mostly(*GRANTS),
        "client_id": mostly(APP_ID, DEFAULT_PUBLIC_APP_ID, APP_ID.upper()),
    },
    optional={
        "client_secret": mostly(SECRET),
        "client_assertion_type": mostly(JWT_BEARER),
        "client_assertion": text_or("a.b.c", "e30.e30.", max_size=60),
        "scope": mostly(*SCOPES),
        "code": st.text(max_size=30),
        "redirect_uri": text_or("http://localhost", "http://localhost:8400/"),
        "code_verifier": st.text(max_size=50),
        "refresh_token": text_or("1.", "1.gAAAAABx", max_size=40),
        "device_code": st.text(max_size=30),
        "username": mostly(ALICE, "shared@contoso.test"),
        "password": mostly(PASSWORD),
        "client_info": text_or("1"),
    },
).flatmap(
    lambda known: st.dictionaries(st.text(max_size=8), st.text(max_size=10), max_size=2).map(
        lambda extra: {**extra, **known}
    )
)
tenant = st.integers(0, 3).flatmap(
    lambda n: st.just(TENANT) if n else text_or("common", "organizations", "contoso.test", "%ff")
)


def resolve(sb: Sandbox, fields: dict[str, str]) -> dict[str, str]:
    """The stand-ins replaced by the running sandbox's secret and password."""
    real = {SECRET: sb.settings.apps[0].client_secret or "", PASSWORD: sb.password(ALICE)}
    return {key: real.get(value, value) for key, value in fields.items()}


PASSWORD_GRANT = {
    "grant_type": "password",
    "client_id": DEFAULT_PUBLIC_APP_ID,
    "username": ALICE,
    "password": PASSWORD,
    "scope": "openid offline_access https://outlook.office.com/SMTP.Send",
}


def test_token_requests(sb: Sandbox, failure_log: FailureLog) -> None:
    seen: Counter[str] = Counter()
    basic_header = st.tuples(st.just(b"Authorization"), basic)

    @fuzz
    @given(tenant, token_form, st.lists(basic_header, max_size=1))
    @example(
        TENANT,
        {"grant_type": "client_credentials", "scope": EXCHANGE_DEFAULT, "client_id": APP_ID},
        [(b"Authorization", b"Basic \xff\xfe")],
    )
    @example(
        TENANT,
        {"grant_type": "client_credentials", "scope": EXCHANGE_DEFAULT},
        [(b"Authorization", b"Basic \xff\xfe")],
    )
    @example(TENANT, PASSWORD_GRANT, [])
    def check(tid: str, fields: dict[str, str], headers: list[tuple[bytes, bytes]]) -> None:
        path = f"/{quote(tid, safe='')}/oauth2/v2.0/token"
        data = form_request(path, resolve(sb, fields), headers)
        seen[exchange(sb, failure_log, data)] += 1

    check()
    print(dict(seen))
    assert seen["200"] and seen["401 AADSTS7000218"] and seen["400 AADSTS900144"]
    assert failure_log.take() == []


# -------------------------------------------------------- client assertions

json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.sampled_from([1e300, -1e300, 10**400])
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


def often(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> Any:
    """``usual`` three times in four, else ``other``."""
    return st.integers(0, 3).flatmap(lambda n: usual if n else other)


moment = often(
    st.integers(-1000, 1000).map(lambda d: NOW + d),
    st.sampled_from([1e300, -1e300, float("nan"), float("inf"), 10**400, 0, True, "now"])
    | json_value,
)
# Mostly a header that names the registered key (so that the claims are checked), now and
# then one of any JSON members.
key_id = st.sampled_from(
    [{"x5t": X5T}, {"x5t#S256": X5T256}, {"x5c": [X5C]}, {"x5c": [X5C, 5]}, {"x5c": [123]}, {}]
)
named_key = st.builds(
    lambda alg, kid, extra: {"alg": alg, **kid, **extra},
    st.sampled_from(RSA_ALGS),
    key_id,
    often(
        st.just({}),
        st.dictionaries(st.sampled_from(["typ", "kid", "x5t", "x5c"]), json_value, max_size=1),
    ),
)
any_header = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from([*RSA_ALGS, "none", "HS256", "ES256"]) | json_value,
        "typ": st.just("JWT") | json_value,
        "x5t": st.just(X5T) | json_value,
        "x5t#S256": st.just(X5T256) | json_value,
        "x5c": st.sampled_from([[X5C], [123], []]) | json_value,
        "kid": json_value,
    },
)
jose_header = often(named_key, any_header)
VALID_CLAIMS: dict[str, Any] = {
    "aud": AUD,
    "iss": APP_ID,
    "sub": APP_ID,
    "exp": NOW + 600,
    "nbf": NOW,
    "iat": NOW,
}
CLAIM_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "aud": often(
        st.sampled_from([AUD, [AUD, "x"], "https://login.microsoftonline.com/x"]), json_value
    ),
    "iss": often(st.sampled_from([APP_ID, APP_ID.upper(), DEFAULT_PUBLIC_APP_ID]), json_value),
    "sub": often(st.sampled_from([APP_ID, DEFAULT_PUBLIC_APP_ID]), json_value),
    "exp": moment,
    "nbf": moment,
    "iat": moment,
    "jti": json_value,
}
# Valid claims with one or two changed or left out, now and then any.
change = st.sampled_from(list(CLAIM_VALUES)).flatmap(
    lambda name: st.tuples(st.just(name), CLAIM_VALUES[name])
)
near_valid = st.builds(
    lambda changed, dropped: {
        k: v for k, v in {**VALID_CLAIMS, **dict(changed)}.items() if k not in dropped
    },
    st.lists(change, max_size=2),
    often(st.just(set()), st.sets(st.sampled_from(list(VALID_CLAIMS)), max_size=1)),
)
claims = often(near_valid, st.fixed_dictionaries({}, optional=CLAIM_VALUES))
signature = st.one_of(st.sampled_from(["sign", "sign-rs256", "none"]), st.binary(max_size=64))


class Signer:
    """Builds assertions from their parts with the sandbox's registered certificate."""

    def __init__(self, sb: Sandbox) -> None:
        cert = sb.client_certificates[APP_ID]
        self.key: Any = serialization.load_pem_private_key(cert.key_file.read_bytes(), None)
        parsed = x509.load_pem_x509_certificate(cert.cert_file.read_bytes())
        der = parsed.public_bytes(serialization.Encoding.DER)
        self.real = {
            X5T: _b64u(parsed.fingerprint(hashes.SHA1())),
            X5T256: _b64u(parsed.fingerprint(hashes.SHA256())),
            X5C: base64.b64encode(der).decode(),
            AUD: sb.identity.token_endpoint,
        }

    def _fill(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.real.get(value, value)
        if isinstance(value, list):
            return [self._fill(v) for v in value]
        return value

    def assertion(self, header: dict[str, Any], payload: dict[str, Any], how: str | bytes) -> str:
        """``how``: ``sign`` (with the header's RSA algorithm, else RS256), ``sign-rs256``,
        ``none`` (no signature) or the signature's bytes."""
        head = _b64u(json.dumps({k: self._fill(v) for k, v in header.items()}).encode())
        body = _b64u(json.dumps({k: self._fill(v) for k, v in payload.items()}).encode())
        signing_input = f"{head}.{body}".encode()
        if isinstance(how, bytes):
            sig = how
        elif how == "none":
            sig = b""
        else:
            alg = header.get("alg")
            name = alg if how == "sign" and isinstance(alg, str) and alg in RSA_ALGS else "RS256"
            sig = jwt.get_algorithm_by_name(name).sign(signing_input, self.key)
        return f"{head}.{body}.{_b64u(sig)}"


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_client_assertions(sb: Sandbox, failure_log: FailureLog) -> None:
    signer = Signer(sb)
    seen: Counter[str] = Counter()
    thumb = {"alg": "RS256", "x5t": X5T}

    @fuzz
    @given(jose_header, claims, signature, st.sampled_from([APP_ID] * 3 + [DEFAULT_PUBLIC_APP_ID]))
    @example(thumb, VALID_CLAIMS, "sign", APP_ID)
    @example({"alg": "RS256", "x5c": [123]}, VALID_CLAIMS, "sign", APP_ID)
    @example(thumb, {**VALID_CLAIMS, "nbf": 1e300, "exp": 1e300}, "sign", APP_ID)
    @example(thumb, {**VALID_CLAIMS, "exp": float("nan")}, "sign", APP_ID)
    def check(header: dict[str, Any], payload: dict[str, Any], how: str | bytes, app: str) -> None:
        fields = {
            "client_id": app,
            "grant_type": "client_credentials",
            "scope": EXCHANGE_DEFAULT,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": signer.assertion(header, payload, how),
        }
        seen[exchange(sb, failure_log, form_request(TOKEN_PATH, fields))] += 1

    check()
    print(dict(seen))
    assert seen["200"] and seen["400 AADSTS50027"] and seen["401 AADSTS700024"]
    assert failure_log.take() == []


# ------------------------------------------------- sign-in, device login, discovery

REDIRECTS = (
    "http://localhost",
    "http://localhost:8400/",
    "http://127.0.0.1:1/",
    "http://localhost:é/",
    "http://localhost:1 x/",
    "https://evil.example/",
)
page_params = st.fixed_dictionaries(
    {"client_id": mostly(APP_ID, DEFAULT_PUBLIC_APP_ID)},
    optional={
        "response_type": text_or("code", "token"),
        "redirect_uri": text_or(*REDIRECTS),
        "post_logout_redirect_uri": text_or(*REDIRECTS),
        "scope": text_or(*SCOPES),
        "state": st.text(max_size=20),
        "response_mode": text_or("query", "fragment", "form_post"),
        "code_challenge": text_or("x" * 43, "x" * 129),
        "code_challenge_method": text_or("S256", "plain"),
        "prompt": text_or("none", "login"),
        "login": text_or(ALICE, "shared@contoso.test", "nobody@contoso.test"),
        "passwd": text_or(PASSWORD),
        "otc": st.text(max_size=12),
        "action": text_or("cancel"),
        "authorization_endpoint": text_or(
            f"https://localhost/{TENANT}/oauth2/v2.0/authorize", "https://[/x"
        ),
        "code": st.text(max_size=12),
        "nonce": st.text(max_size=12),
        "login_hint": st.text(max_size=12),
    },
)
PAGES = (
    f"/{TENANT}/oauth2/v2.0/authorize",
    f"/{TENANT}/oauth2/v2.0/devicecode",
    f"/{TENANT}/oauth2/v2.0/logout",
    "/devicelogin",
    "/common/discovery/instance",
    "/common/userrealm/alice@contoso.test",
    "/error",
)
SIGN_IN = {
    "client_id": DEFAULT_PUBLIC_APP_ID,
    "response_type": "code",
    "redirect_uri": "http://localhost:8400/",
    "scope": "openid",
}


def test_pages_and_discovery(sb: Sandbox, failure_log: FailureLog) -> None:
    seen: Counter[str] = Counter()

    @fuzz
    @given(st.sampled_from(PAGES), st.booleans(), page_params)
    @example(PAGES[0], False, {**SIGN_IN, "redirect_uri": "http://localhost:é/", "prompt": "none"})
    @example(PAGES[0], True, {**SIGN_IN, "login": ALICE, "passwd": PASSWORD})
    @example(PAGES[0], True, {**SIGN_IN, "login": ALICE, "passwd": "wrong"})
    @example(PAGES[4], False, {"authorization_endpoint": "https://[/x"})
    def check(page: str, post: bool, params: dict[str, str]) -> None:
        fields = resolve(sb, params)
        if post:
            data = form_request(page, fields)
        else:
            data = request_bytes(b"GET", f"{page}?{urlencode(fields)}".encode(), [], b"")
        seen[exchange(sb, failure_log, data)] += 1

    check()
    print(dict(seen))
    assert seen["302"] and seen["400 AADSTS50049"]
    assert failure_log.take() == []


# ------------------------------------------------------------------- SMTP

Step = tuple[bytes, bytes | None]
"""A command line (without CRLF), and the raw bytes sent right after it (a BDAT chunk)."""

COMMANDS: list[Step] = [
    (line, None)
    for line in (
        b"EHLO fuzz.example",
        b"HELO fuzz",
        b"MAIL FROM:<alice@contoso.test>",
        b"MAIL FROM:<alice@contoso.test> SMTPUTF8 BODY=8BITMIME SIZE=100 RET=HDRS ENVID=x",
        b"MAIL FROM:<>",
        b"RCPT TO:<someone@example.net>",
        b"RCPT TO:<x@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@example.net",
        b"DATA",
        b"RSET",
        b"NOOP",
        b"VRFY x",
        b"EXPN x",
        b"HELP",
        b"AUTH LOGIN",
        b"AUTH XOAUTH2",
        b"AUTH PLAIN",
        b"*",
        b"STARTTLS",
    )
] + [(b"BDAT 5", b"hello"), (b"BDAT 7 LAST", b"Subj: x"), (b"BDAT 0 LAST", b"")]
_BDAT = re.compile(rb"(?i)\s*BDAT")


def _no_lf(data: bytes) -> bytes:
    return data.replace(b"\n", b"")


def _takes_chunk(arg: bytes) -> bool:
    """Whether the sandbox would read a chunk after ``BDAT <arg>`` (its size is digits)."""
    parts = arg.strip().decode("utf-8", "surrogateescape").split()
    return bool(parts) and re.fullmatch("[0-9]+", parts[0]) is not None


# Lines of any bytes, but a BDAT's chunk follows it: BDAT only as written out, or with an
# argument that is no size.
line = st.binary(max_size=80).map(_no_lf).filter(lambda b: not _BDAT.match(b))
argument = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(
        lambda b, rest: b"<" + b + b">" + rest, st.binary(max_size=20), st.binary(max_size=20)
    ),
).map(_no_lf)
command_with_argument = st.one_of(
    st.builds(
        bytes.__add__,
        st.sampled_from(
            [
                b"MAIL FROM:",
                b"RCPT TO:",
                b"MAIL FROM:<alice@contoso.test> ",
                b"RCPT TO:<someone@example.net> ",
                b"EHLO ",
                b"HELO ",
                b"AUTH ",
                b"AUTH LOGIN ",
                b"AUTH XOAUTH2 ",
                b"VRFY ",
                b"DATA ",
            ]
        ),
        argument,
    ),
    argument.filter(lambda arg: not _takes_chunk(arg)).map(lambda arg: b"BDAT " + arg),
)
step = st.one_of(
    st.sampled_from(COMMANDS),
    line.map(lambda b: (b, None)),
    command_with_argument.map(lambda b: (b, None)),
)
MAIL: Step = (b"MAIL FROM:<alice@contoso.test>", None)
RCPT: Step = (b"RCPT TO:<someone@example.net>", None)
# A transaction with one of its commands replaced by anything, or anything inserted.
transaction = st.builds(
    lambda steps, at, other, replace: [
        *steps[:at],
        other,
        *steps[at + replace :],
    ],
    st.sampled_from(
        [
            [MAIL, RCPT, (b"DATA", None)],
            [MAIL, RCPT, RCPT, (b"BDAT 7 LAST", b"Subj: x")],
            [MAIL, RCPT, (b"BDAT 5", b"hello"), (b"BDAT 0 LAST", b"")],
        ]
    ),
    st.integers(0, 3),
    step,
    st.booleans(),
)
session = st.lists(st.one_of(step.map(lambda s: [s]), transaction), max_size=5).map(
    lambda groups: [s for group in groups for s in group]
)
MESSAGE = b"From: alice@contoso.test\r\nSubject: fuzz\r\n\r\nHi.\r\n.\r\n"
# A reply that ends the session: QUIT's, a 421, too many unrecognized commands.
CLOSING = re.compile(r"221 |421 |502 5\.5\.1 Too many")
REPLY = re.compile(r"[2-5][0-9][0-9]( .*)?")


def smtp_session(sb: Sandbox, start: str, steps: list[Step]) -> list[str]:
    """One session from ``start`` (``plain``, ``tls``: after EHLO, STARTTLS, EHLO; ``auth``:
    then AUTH LOGIN as alice): every line must get a reply, none the 451 of an unexpected
    exception."""
    client = Wire(sb.smtp_port)
    replies: list[str] = []
    try:
        if start != "plain":
            client.secure(tls_for(sb))
        if start == "auth":
            assert client.auth_login(ALICE, sb.password(ALICE)).code == 235
        for command, chunk in [*steps, (b"QUIT", None)]:
            client.send(command + b"\r\n" + (chunk or b""))
            reply = read_reply(client, command)
            if reply.startswith("354"):  # DATA: send a message, read its answer
                client.send(MESSAGE)
                reply = read_reply(client, b"<message>")
            elif reply.startswith("220 2.0.0"):  # STARTTLS: the handshake comes next
                client.file.close()
                client.sock = tls_for(sb).wrap_socket(client.sock, server_hostname="localhost")
                client.file = client.sock.makefile("rb")
            replies.append(reply)
            if CLOSING.match(reply):
                break
    finally:
        client.close()
    return replies


def read_reply(client: Wire, command: bytes) -> str:
    try:
        resp = client.read()
    except EOFError:
        raise AssertionError(f"closed without a reply to {command[:80]!r}") from None
    except UnicodeDecodeError as exc:
        raise AssertionError(f"a reply to {command[:80]!r} is not UTF-8: {exc}") from None
    text = resp.raw
    assert REPLY.fullmatch(text), (command[:80], text)
    assert not text.startswith("451 4.7.0"), (command[:80], text)
    return text


def test_smtp_sessions(sb: Sandbox, failure_log: FailureLog) -> None:
    @fuzz
    @given(st.sampled_from(["plain", "tls", "auth", "auth"]), session)
    @example("auth", [(b"MAIL FROM:<", None)])
    @example("auth", [MAIL, RCPT, ("BDAT ²6".encode(), None)])
    @example("auth", [(b"MAIL FROM:<x\xff@contoso.com>", None)])
    @example("auth", [(b"MAIL FROM:<x\xff@contoso.com> SMTPUTF8", None)])
    @example("auth", [MAIL, (b"RCPT TO:<\xff\xfe@contoso.com>", None)])
    @example(
        "auth",
        [
            (b"MAIL FROM:<alice@contoso.test> SMTPUTF8", None),
            (b"RCPT TO:<\xff\xfe@contoso.com>", None),
        ],
    )
    @example("tls", [(b"AUTH XOAUTH2", None), (b"A" * 70_000, None)])
    @example(
        "tls",
        [(b"AUTH LOGIN", None), (b"A" * 70_000, None), (b"AUTH XOAUTH2 " + b"A" * 70_000, None)],
    )
    @example("auth", [MAIL, RCPT, (b"DATA", None), MAIL, RCPT, (b"BDAT 7 LAST", b"Subj: x")])
    def check(start: str, steps: list[Step]) -> None:
        seen.update(reply[:9] for reply in smtp_session(sb, start, steps))
        assert failure_log.take() == []

    seen: Counter[str] = Counter()
    check()
    print(dict(seen))
    assert seen["250 2.0.0"] and seen["501 5.1.7"] and seen["500 5.5.6"]  # the examples'
    assert failure_log.take() == []
