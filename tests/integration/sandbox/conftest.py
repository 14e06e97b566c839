"""Fixtures for the sandbox suite: a shared PKI seed, running sandboxes, a raw SMTP client,
and for the identity platform real MSAL clients, a scripted browser and raw HTTPS requests
(bytes as they are, for malformed input); ``failure_log`` collects what the sandbox must never
log (errors, tracebacks).

The clients here are the standard library (``socket``, ``ssl``, ``smtplib``) and the
unmodified third-party clients Exchange Online and Entra ID are used with (MSAL over
``requests``): the sandbox is the oracle for smtp365's own client, so that client is
never used to test it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import shutil
import smtplib
import socket
import ssl
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import jwt
import msal
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from smtp365.sandbox import (
    DEFAULT_PUBLIC_APP_ID,
    Sandbox,
    SandboxSettings,
    ensure_client_certificate,
    ensure_pki,
)

PKI_FILES = (
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "token-key.pem",
    "client-cert.pem",
    "client-key.pem",
    "client-cert.pfx",
)


@pytest.fixture(scope="session")
def pki_seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generate the RSA keys once per session; each test copies them (they are reused)."""
    seed = tmp_path_factory.mktemp("pki-seed")
    ensure_pki(seed)
    ensure_client_certificate(seed, subject="smtp365 sandbox app")
    return seed


@pytest.fixture
def state_dir(tmp_path: Path, pki_seed: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    for name in PKI_FILES:
        shutil.copy2(pki_seed / name, state / name)
    return state


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


StartSandbox = Callable[..., Sandbox]


@pytest.fixture
def start_sandbox(state_dir: Path) -> Iterator[StartSandbox]:
    """``start_sandbox(settings=None, clock=None, wall_clock=None)``: a sandbox in a thread
    until teardown."""
    with contextlib.ExitStack() as stack:

        def start(
            settings: SandboxSettings | None = None,
            clock: Callable[[], float] | None = None,
            wall_clock: Callable[[], float] | None = None,
        ) -> Sandbox:
            sandbox = Sandbox(state_dir, settings, clock=clock, wall_clock=wall_clock)
            return stack.enter_context(sandbox.run_in_thread())

        yield start


@pytest.fixture
def sandbox(start_sandbox: StartSandbox) -> Sandbox:
    return start_sandbox()


# Exchange's diagnostic tail: "[<host> <UTC time> <session id>]" after a refusal of the SMTP
# front end, "[Hostname=<host>]" after the answers to a submitted message.
TAIL = re.compile(
    r" \[(?:Hostname=(?P<named>[^\] ]+)"
    r"|(?P<host>[^\] ]+) \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<session>[0-9A-F]{16}))\]$"
)


def bare(reply: str) -> str:
    """``reply`` without its diagnostic tail (unchanged when it has none)."""
    return TAIL.sub("", reply)


@dataclass
class Resp:
    code: int
    lines: list[str]
    """Text of each line after the code and separator."""

    @property
    def raw(self) -> str:
        """The last line as sent, e.g. ``250 2.1.0 Sender OK``."""
        return f"{self.code} {self.lines[-1]}"

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def bare(self) -> str:
        """:attr:`raw` without Exchange's diagnostic tail (the tail has its own tests)."""
        return bare(self.raw)


class Wire:
    """A bare SMTP client on a socket: send lines, read replies exactly as sent."""

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()

    def read(self) -> Resp:
        lines: list[str] = []
        while True:
            raw = self.file.readline()
            if not raw:
                raise EOFError("server closed the connection")
            line = raw.decode("utf-8").rstrip("\r\n")
            lines.append(line[4:])
            if line[3:4] != "-":
                return Resp(int(line[:3]), lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str) -> Resp:
        self.send(line.encode("utf-8") + b"\r\n")
        return self.read()

    def ehlo(self, name: str = "client.example") -> Resp:
        return self.cmd(f"EHLO {name}")

    def starttls(self, context: ssl.SSLContext) -> Resp:
        resp = self.cmd("STARTTLS")
        if resp.code == 220:
            self.file.close()
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
            self.file = self.sock.makefile("rb")
        return resp

    def secure(self, context: ssl.SSLContext) -> None:
        """EHLO, STARTTLS, EHLO."""
        assert self.ehlo().code == 250
        assert self.starttls(context).code == 220
        assert self.ehlo().code == 250

    def auth_login(self, user: str, password: str) -> Resp:
        first = self.cmd("AUTH LOGIN")
        if first.code != 334:
            return first
        assert first.raw == "334 VXNlcm5hbWU6"
        second = self.cmd(base64.b64encode(user.encode()).decode())
        if second.code != 334:
            return second
        assert second.raw == "334 UGFzc3dvcmQ6"
        return self.cmd(base64.b64encode(password.encode()).decode())

    def auth_xoauth2(self, user: str, token: str, *, initial: bool = True) -> Resp:
        blob = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        if initial:
            return self.cmd(f"AUTH XOAUTH2 {blob}")
        challenge = self.cmd("AUTH XOAUTH2")
        if challenge.code != 334:
            return challenge
        return self.cmd(blob)

    def send_message(self, mail_from: str, rcpts: list[str], content: bytes) -> Resp:
        """MAIL, RCPT(s), DATA; returns the first failing reply or the final one."""
        resp = self.cmd(f"MAIL FROM:<{mail_from}>")
        if resp.code != 250:
            return resp
        for rcpt in rcpts:
            resp = self.cmd(f"RCPT TO:<{rcpt}>")
            if resp.code != 250:
                return resp
        resp = self.cmd("DATA")
        if resp.code != 354:
            return resp
        self.send(content + b".\r\n")
        return self.read()

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def wire() -> Iterator[Callable[[Sandbox], Wire]]:
    """``wire(sb)``: open a raw connection to ``sb`` (closed at teardown)."""
    opened: list[Wire] = []

    def connect(sb: Sandbox) -> Wire:
        client = Wire(sb.smtp_port)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def tls_for(sb: Sandbox) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(sb.ca_file))


def legacy_tls_context(ca_file: Path) -> ssl.SSLContext:
    """A client context limited to TLS 1.1 (deprecated: warnings suppressed locally)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def message(
    sender: str = "alice@contoso.test", subject: str = "Hello", body: str = "Hi there."
) -> bytes:
    return (
        f"From: {sender}\r\nTo: someone@example.net\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@client.example>\r\n\r\n{body}\r\n"
    ).encode()


@pytest.fixture
def secured(wire: Callable[[Sandbox], Wire]) -> Callable[[Sandbox], Wire]:
    """``secured(sb)``: a connection after EHLO, STARTTLS, EHLO."""

    def connect(sb: Sandbox) -> Wire:
        client = wire(sb)
        client.secure(tls_for(sb))
        return client

    return connect


@pytest.fixture
def authed(secured: Callable[[Sandbox], Wire]) -> Callable[..., Wire]:
    """``authed(sb, address="alice@contoso.test")``: a TLS session after AUTH LOGIN."""

    def login(sb: Sandbox, address: str = "alice@contoso.test") -> Wire:
        client = secured(sb)
        resp = client.auth_login(address, sb.password(address))
        assert resp.raw == "235 2.7.0 Authentication successful", resp
        return client

    return login


@pytest.fixture
def make_message() -> Callable[..., bytes]:
    """``make_message(sender=..., subject=..., body=...)``: RFC 5322 bytes with CRLF ends."""
    return message


@pytest.fixture
def legacy_tls() -> Callable[[Path], ssl.SSLContext]:
    """``legacy_tls(ca_file)``: a client context limited to TLS 1.1."""
    return legacy_tls_context


@pytest.fixture
def client_tls() -> Callable[[Sandbox], ssl.SSLContext]:
    """``client_tls(sb)``: a client context trusting the sandbox's CA."""
    return tls_for


# ------------------------------------------------------------ identity platform


class FakeWallClock:
    """Epoch seconds the test moves by hand (the identity platform's ``wall_clock``)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def wall_clock() -> FakeWallClock:
    return FakeWallClock()


@pytest.fixture
def https() -> Iterator[Callable[[Sandbox], requests.Session]]:
    """``https(sb)``: a requests session trusting only the sandbox CA (closed at teardown).

    ``trust_env = False`` matters: with ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` set,
    requests would let the environment override ``verify`` (reference §9).
    """
    sessions: list[requests.Session] = []

    def make(sb: Sandbox) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        session.verify = str(sb.ca_file)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        session.close()


@pytest.fixture
def cca(https: Callable[[Sandbox], requests.Session]) -> Callable[..., Any]:
    """``cca(sb, credential=None, app_id=None, authority=None)``: a real MSAL confidential client.

    ``credential`` defaults to the app's client secret.
    """

    def make(
        sb: Sandbox,
        credential: Any = None,
        *,
        app_id: str | None = None,
        authority: str | None = None,
        **kwargs: Any,
    ) -> msal.ConfidentialClientApplication:
        app = sb.settings.app(app_id) if app_id else sb.settings.apps[0]
        assert app is not None
        return msal.ConfidentialClientApplication(
            app.app_id,
            client_credential=app.client_secret if credential is None else credential,
            authority=authority or sb.authority,
            instance_discovery=False,
            http_client=https(sb),
            **kwargs,
        )

    return make


@pytest.fixture
def pca(https: Callable[[Sandbox], requests.Session]) -> Callable[..., Any]:
    """``pca(sb, app_id=DEFAULT_PUBLIC_APP_ID, authority=None)``: a real MSAL public client."""

    def make(
        sb: Sandbox,
        *,
        app_id: str = DEFAULT_PUBLIC_APP_ID,
        authority: str | None = None,
        **kwargs: Any,
    ) -> msal.PublicClientApplication:
        return msal.PublicClientApplication(
            app_id,
            authority=authority or sb.authority,
            instance_discovery=False,
            http_client=https(sb),
            **kwargs,
        )

    return make


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified (the SMTP server does the verifying)."""
    return dict(jwt.decode(token, options={"verify_signature": False}))


def xoauth2_send(sb: Sandbox, user: str, token: str, sender: str | None = None) -> tuple[int, str]:
    """STARTTLS, ``AUTH XOAUTH2`` as ``user`` with smtplib, and a message when accepted.

    Returns the AUTH reply (code, text).
    """
    blob = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
    with smtplib.SMTP("127.0.0.1", sb.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=tls_for(sb))
        smtp.ehlo()
        code, text = smtp.docmd("AUTH", f"XOAUTH2 {blob}")
        if code == 235:
            frm = sender or user
            smtp.sendmail(frm, ["someone@example.net"], message(frm, "via XOAUTH2"))
    return code, text.decode()


@dataclass
class Form:
    action: str
    method: str
    fields: dict[str, str]


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self.error_code = ""
        self._in_error = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(attr.get("action", ""), attr.get("method", "get"), {}))
        elif tag == "input" and self.forms and attr.get("name"):
            self.forms[-1].fields[attr["name"]] = attr.get("value", "")
        if attr.get("id") == "error-code":
            self._in_error = True

    def handle_endtag(self, tag: str) -> None:
        self._in_error = False

    def handle_data(self, data: str) -> None:
        if self._in_error:
            self.error_code += data


@dataclass
class Page:
    status: int
    text: str
    forms: list[Form]
    error_code: str
    """Text of the ``id="error-code"`` element: ``AADSTS50126: ...`` or empty."""


def parse_page(response: requests.Response) -> Page:
    parser = _PageParser()
    parser.feed(response.text)
    return Page(response.status_code, response.text, parser.forms, parser.error_code)


@dataclass
class SignIn:
    """What the browser ended with: the app's ``auth_response``, or a page."""

    auth_response: dict[str, str] | None
    page: Page | None
    location: str | None = None


class Browser:
    """Acts as the user's browser for ``/authorize``: no JavaScript, no cookies needed."""

    def __init__(self, session: requests.Session) -> None:
        self.session = session

    def open(self, url: str) -> requests.Response:
        return self.session.get(url, allow_redirects=False)

    def sign_in(self, auth_uri: str, username: str, password: str) -> SignIn:
        first = self.open(auth_uri)
        if first.status_code == 302:
            return self._answer(first)
        page = parse_page(first)
        if not page.forms:
            return SignIn(None, page)
        form = page.forms[0]
        fields = dict(form.fields)
        fields.update(login=username, passwd=password)
        second = self.session.post(
            urljoin(first.url, form.action), data=fields, allow_redirects=False
        )
        return self._answer(second)

    def _answer(self, response: requests.Response) -> SignIn:
        if response.status_code == 302:
            location = response.headers["Location"]
            parts = urlsplit(location)
            raw = parts.fragment if parts.fragment else parts.query
            return SignIn(dict(parse_qsl(raw, keep_blank_values=True)), None, location)
        page = parse_page(response)
        for form in page.forms:
            if "code" in form.fields or "error" in form.fields:  # response_mode=form_post
                return SignIn(dict(form.fields), page, form.action)
        return SignIn(None, page)


@pytest.fixture
def browser(https: Callable[[Sandbox], requests.Session]) -> Callable[[Sandbox], Browser]:
    """``browser(sb)``: a :class:`Browser` trusting the sandbox CA."""
    return lambda sb: Browser(https(sb))


# ------------------------------------------------------------------ bad input


class FailureLog(logging.Handler):
    """Collects what the sandbox must never log: errors, and any record with a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)

    def take(self) -> list[str]:
        """The collected records as text (tracebacks included), and forget them."""
        formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
        found, self.records = self.records, []
        return [formatter.format(record) for record in found]


@pytest.fixture
def failure_log() -> Iterator[FailureLog]:
    """A :class:`FailureLog` on the root logger; ``smtp365`` logs at INFO meanwhile, so a
    traceback logged below WARNING is seen too."""
    handler = FailureLog()
    root = logging.getLogger()
    ours = logging.getLogger("smtp365")
    level = ours.level
    root.addHandler(handler)
    ours.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        ours.setLevel(level)
        root.removeHandler(handler)


def https_exchange(sb: Sandbox, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data`` as is over TLS to the identity platform; all it answers until it closes."""
    with (
        socket.create_connection(("127.0.0.1", sb.identity_port), timeout=timeout) as raw,
        tls_for(sb).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(data)
        received = bytearray()
        while True:
            try:
                block = tls.recv(65536)
            except (ConnectionResetError, ssl.SSLEOFError):
                break
            if not block:
                break
            received += block
        return bytes(received)


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    """Lower-case names; latin-1 text."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_answer(data: bytes) -> HttpAnswer | None:
    """The final response in ``data`` (interim 1xx skipped); ``None`` when there is none."""
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return None
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdecimal():
            return None
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            data = rest
            continue
        length = int(headers.get("content-length", "0"))
        return HttpAnswer(status, headers, rest[:length])
    return None


def request_bytes(
    method: str,
    target: str | bytes,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    form: dict[str, str] | None = None,
) -> bytes:
    """An HTTP/1.1 request, with ``Host`` unless given, ``Content-Length`` and ``Connection:
    close``; ``form`` is sent url-encoded."""
    given = list(headers or [])
    if form is not None:
        body = urlencode(form).encode()
        given.append((b"Content-Type", b"application/x-www-form-urlencoded"))
    if not any(name.lower() == b"host" for name, _ in given):
        given.insert(0, (b"Host", b"localhost"))
    given += [(b"Content-Length", str(len(body)).encode()), (b"Connection", b"close")]
    raw_target = target.encode() if isinstance(target, str) else target
    lines = [method.encode() + b" " + raw_target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in given]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def https_request(sb: Sandbox, method: str, target: str | bytes, **kwargs: Any) -> HttpAnswer:
    """:func:`request_bytes` sent by :func:`https_exchange`; fails when nothing came back."""
    data = https_exchange(sb, request_bytes(method, target, **kwargs))
    answer = parse_answer(data)
    assert answer is not None, f"no response: {data[:200]!r}"
    return answer


def registered_key(sb: Sandbox) -> tuple[Any, str]:
    """The default app's generated signing key and its certificate's x5t thumbprint."""
    cert = sb.client_certificates[sb.settings.default_app_id]
    key = serialization.load_pem_private_key(cert.key_file.read_bytes(), password=None)
    sha1 = x509.load_pem_x509_certificate(cert.cert_file.read_bytes()).fingerprint(hashes.SHA1())
    return key, base64.urlsafe_b64encode(sha1).rstrip(b"=").decode()


def assertion_claims(sb: Sandbox, **overrides: object) -> dict[str, object]:
    """The claims of a valid client assertion for the default app (``overrides`` replace them)."""
    now = int(time.time())
    app_id = sb.settings.default_app_id
    claims: dict[str, object] = {
        "aud": sb.identity.token_endpoint,
        "iss": app_id,
        "sub": app_id,
        "jti": str(uuid.uuid4()),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return claims
