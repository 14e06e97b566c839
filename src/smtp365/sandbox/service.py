"""The sandbox's life cycle, its ``sandbox.json`` and the helpers a CLI calls.

``sandbox.json`` (version 1), written atomically at start and rewritten with
``"running": false`` at stop::

    {"version": 1, "running": true, "pid": 1234, "started_at": "...Z", "stopped_at": null,
     "smtp": {"host": "127.0.0.1", "port": 2525, "hostname": "<banner name>",
              "starttls": true},
     "ca_file": "/abs/state/ca.pem", "tenant_id": "...",
     "token": {"issuer": "...", "audience": "https://outlook.office365.com", "kid": "...",
               "app_id": "<demo app id>", "key_file": "/abs/state/token-key.pem",
               "how": "smtp365 sandbox token --state-dir /abs/state --mailbox ADDRESS"},
     "identity": {"authority": "https://localhost:PORT/<tenant id>", "host": "127.0.0.1",
                  "port": PORT, "tenant_id": "...", "openid_configuration": "...",
                  "token_endpoint": "...", "devicelogin_url": "https://localhost:PORT/devicelogin",
                  "ca_file": "/abs/state/ca.pem"}  (null when identity_enabled is false),
     "apps": [{"app_id", "display_name", "client_secret" (null for public clients), "object_id",
               "public_client", "redirect_uris", "certificates": ["/abs/cert.pem", ...],
               "certificate_file", "private_key_file", "pfx_file", "thumbprint",
               "thumbprint_sha256" (the generated credential, else null),
               "app_permissions", "delegated_permissions"}],
     "mailboxes": [{"address", "display_name", "password" (null for shared), "shared",
                    "smtp_auth_enabled" (effective), "basic_auth_enabled", "send_as",
                    "full_access", "allowed_apps"}],
     "limits": {...}, "send_as_check": "data",
     "messages_dir": "/abs/state/messages", "index_file": "/abs/state/messages/index.jsonl"}

The file holds passwords: it is created with mode 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import json
import logging
import os
import signal
import ssl
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from .faults import Faults
from .httpserver import HttpServer
from .identity import IdentityPlatform
from .pki import CLIENT_CERT_NAME, ClientCertificate, Pki, ensure_client_certificate, ensure_pki
from .settings import AppSettings, SandboxSettings, resolve_secrets
from .smtp import ExchangeSMTP, ServerContext
from .state import Stats, Usage
from .store import MessageStore
from .tokens import TokenIssuer

__all__ = [
    "INFO_FILE",
    "Sandbox",
    "SandboxError",
    "identity_tls_context",
    "list_messages",
    "mint_token",
    "read_info",
    "run",
    "server_tls_context",
]

INFO_FILE = "sandbox.json"
log = logging.getLogger("smtp365.sandbox")
_Listening = TypeVar("_Listening")
MESSAGES_DIR = "messages"
INFO_VERSION = 1


class SandboxError(Exception):
    """The sandbox (or its state directory) cannot do what was asked."""


def server_tls_context(pki: Pki) -> ssl.SSLContext:
    """TLS for STARTTLS. Accepts TLS 1.0/1.1 handshakes so they can be refused in SMTP
    (``421 4.7.66``), as Exchange Online does."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def identity_tls_context(pki: Pki) -> ssl.SSLContext:
    """TLS for the identity platform: 1.2 or later, as login.microsoftonline.com requires."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


class Sandbox:
    """A local Exchange Online look-alike.

    ``async with Sandbox(tmp_path) as sb:`` listens on ``sb.smtp_host:sb.smtp_port``
    (port 0 = any free port) with STARTTLS under ``sb.ca_file``, and serves the identity
    platform (an Entra ID look-alike for MSAL) over HTTPS at ``sb.authority``. The state
    directory, PKI, secrets, client certificates and token issuer are ready right after
    construction; the listeners only between :meth:`start` and :meth:`stop`. ``clock``
    (monotonic seconds) drives the per-mailbox rate and recipient windows; ``wall_clock``
    (epoch seconds) the identity platform's lifetimes and expiries.
    """

    def __init__(
        self,
        state_dir: Path,
        settings: SandboxSettings | None = None,
        *,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.pki = ensure_pki(self.state_dir)
        self.settings = resolve_secrets(settings or SandboxSettings(), self.state_dir)
        self.ca_file = self.pki.ca_file
        self.issuer = TokenIssuer(
            self.state_dir,
            tenant_id=self.settings.tenant_id,
            issuer=self.settings.issuer,
            default_app_id=self.settings.default_app_id,
            audience=self.settings.token_audience,
        )
        self.client_certificates = self._ensure_client_certificates()
        """Generated certificate credentials by app id (apps whose ``certificates`` was unset)."""
        self.store = MessageStore(self.state_dir / MESSAGES_DIR)
        self.faults = Faults(self.settings.faults)
        self.stats = Stats()
        self.usage = Usage(clock or time.monotonic)
        self.identity = IdentityPlatform(self.settings, self.issuer, now=wall_clock or time.time)
        """The Entra ID look-alike: ``approve_device_code``, ``revoke_refresh_tokens``, stats."""
        self.info_file = self.state_dir / INFO_FILE
        self.smtp_host = self.settings.smtp_host
        self.smtp_port = 0
        self.identity_port = 0
        self._server: asyncio.Server | None = None
        self._http: HttpServer | None = None
        self._ctx: ServerContext | None = None
        self._started_at = ""

    def _ensure_client_certificates(self) -> dict[str, ClientCertificate]:
        made: dict[str, ClientCertificate] = {}
        for app in self.settings.apps:
            if app.certificates is not None:
                continue
            if app.public_client:
                app.certificates = []
                continue
            first = app.app_id == self.settings.default_app_id
            name = CLIENT_CERT_NAME if first else f"client-{app.app_id.lower()}"
            cert = ensure_client_certificate(self.state_dir, name, subject=app.display_name)
            app.certificates = [str(cert.cert_file)]
            made[app.app_id] = cert
        return made

    @property
    def authority(self) -> str:
        """MSAL's ``authority``: ``https://localhost:{identity_port}/{tenant_id}``."""
        return self.identity.authority

    # ----------------------------------------------------------- life cycle

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            raise SandboxError("the sandbox is already running")
        loop = asyncio.get_running_loop()
        ctx = ServerContext(
            settings=self.settings,
            issuer=self.issuer,
            store=self.store,
            faults=self.faults,
            stats=self.stats,
            usage=self.usage,
            tls_context=server_tls_context(self.pki),
        )
        self.store.dir.mkdir(parents=True, exist_ok=True)
        smtp_before, identity_before = self._previous_ports()

        async def listen_smtp(port: int) -> asyncio.Server:
            return await loop.create_server(
                lambda: ExchangeSMTP(ctx), self.settings.smtp_host, port
            )

        server = await _bind(listen_smtp, self.settings.smtp_port, smtp_before, "SMTP")
        if self.settings.identity_enabled:

            async def listen_identity(port: int) -> HttpServer:
                http = HttpServer(
                    self.identity.handle,
                    host=self.settings.smtp_host,
                    port=port,
                    ssl_context=identity_tls_context(self.pki),
                )
                await http.start()
                return http

            try:
                http = await _bind(
                    listen_identity, self.settings.identity_port, identity_before, "identity"
                )
            except BaseException:
                server.close()
                await server.wait_closed()
                raise
            self._http = http
            self.identity_port = self.identity.port = http.port
        self._server = server
        self._ctx = ctx
        self.smtp_port = int(server.sockets[0].getsockname()[1])
        self._started_at = _utcnow()
        _write_json(self.info_file, self.info(running=True))

    def _previous_ports(self) -> tuple[int, int]:
        """The SMTP and identity ports of this state directory's last run (0: none), so a
        restarted sandbox keeps the addresses its users configured (the OAuth authority
        host carries the identity port)."""
        try:
            data = json.loads(self.info_file.read_text("utf-8"))
            smtp = int(data.get("smtp", {}).get("port") or 0)
            identity = int((data.get("identity") or {}).get("port") or 0)
        except (OSError, ValueError, TypeError, AttributeError):
            return 0, 0
        valid = range(1, 65536)
        return (smtp if smtp in valid else 0), (identity if identity in valid else 0)

    async def stop(self) -> None:
        server, ctx = self._server, self._ctx
        if server is None or ctx is None:
            return
        self._server = None
        http, self._http = self._http, None
        if http is not None:
            await http.stop()
        server.close()
        protocols = list(ctx.protocols)
        tasks = [p._handler_coroutine for p in protocols if p._handler_coroutine is not None]
        for proto in protocols:
            proto.abort()
        await server.wait_closed()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        # Let the aborted transports deliver connection_lost before the loop may close.
        await asyncio.sleep(0)
        _write_json(self.info_file, self.info(running=False))

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.contextmanager
    def run_in_thread(self, *, timeout: float = 10.0) -> Iterator[Sandbox]:
        """Run on a private event loop in a background thread (for synchronous tests)."""
        started = threading.Event()
        errors: list[BaseException] = []
        holder: dict[str, Any] = {}

        async def main() -> None:
            stopper = asyncio.Event()
            holder["loop"] = asyncio.get_running_loop()
            holder["stop"] = stopper
            try:
                await self.start()
            except BaseException as exc:
                errors.append(exc)
                started.set()
                return
            started.set()
            try:
                await stopper.wait()
            finally:
                await self.stop()

        def target() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # surfaced to the caller below
                errors.append(exc)
                started.set()

        thread = threading.Thread(target=target, name="smtp365-sandbox", daemon=True)
        thread.start()
        if not started.wait(timeout):
            raise SandboxError("the sandbox did not start in time")
        if errors:
            thread.join(timeout)
            raise errors[0]
        try:
            yield self
        finally:
            loop: asyncio.AbstractEventLoop = holder["loop"]
            stopper: asyncio.Event = holder["stop"]
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stopper.set)
            thread.join(timeout)

    # -------------------------------------------------------------- helpers

    def issue_token(
        self,
        mailbox: str | None = None,
        *,
        app_only: bool = False,
        lifetime: int = 3600,
        audience: str | None = None,
        scopes: Sequence[str] | None = None,
        app_id: str | None = None,
    ) -> str:
        """Mint a token. Delegated tokens are for ``mailbox``; app-only tokens name no
        user (``mailbox`` is ignored): ``user=`` picks the mailbox at AUTH time."""
        return self.issuer.issue(
            None if app_only else mailbox,
            app_only=app_only,
            app_id=app_id,
            lifetime=lifetime,
            audience=audience,
            scopes=scopes,
        )

    def password(self, mailbox: str) -> str:
        mbx = self.settings.mailbox(mailbox)
        if mbx is None or mbx.password is None:
            raise SandboxError(f"{mailbox} is not a mailbox with a password")
        return mbx.password

    def info(self, *, running: bool | None = None) -> dict[str, Any]:
        """The content of ``sandbox.json``."""
        settings = self.settings
        is_running = self.running if running is None else running
        return {
            "version": INFO_VERSION,
            "running": is_running,
            "pid": os.getpid(),
            "started_at": self._started_at or None,
            "stopped_at": None if is_running else _utcnow(),
            "smtp": {
                "host": self.smtp_host,
                "port": self.smtp_port,
                "hostname": settings.hostname,
                "starttls": True,
            },
            "ca_file": str(self.ca_file),
            "tenant_id": settings.tenant_id,
            "token": {
                "issuer": self.issuer.issuer,
                "audience": self.issuer.audience,
                "kid": self.issuer.kid,
                "app_id": settings.default_app_id,
                "key_file": str(self.issuer.key_file),
                "how": (f"smtp365 sandbox token --state-dir {self.state_dir} --mailbox ADDRESS"),
            },
            "identity": self._identity_info(),
            "apps": [self._app_info(app) for app in settings.apps],
            "mailboxes": [
                {
                    "address": mbx.address,
                    "display_name": mbx.display_name,
                    "password": None if mbx.shared else mbx.password,
                    "shared": mbx.shared,
                    "smtp_auth_enabled": settings.smtp_auth_effective(mbx),
                    "basic_auth_enabled": mbx.basic_auth_enabled,
                    "send_as": list(mbx.send_as),
                    "full_access": list(mbx.full_access),
                    "allowed_apps": settings.apps_for(mbx),
                }
                for mbx in settings.mailboxes
            ],
            "limits": settings.limits.model_dump(),
            "send_as_check": settings.send_as_check,
            "messages_dir": str(self.store.dir),
            "index_file": str(self.store.index_file),
        }

    def _identity_info(self) -> dict[str, Any] | None:
        if not self.settings.identity_enabled:
            return None
        identity = self.identity
        return {
            "authority": identity.authority,
            "host": self.settings.smtp_host,
            "port": self.identity_port,
            "tenant_id": self.settings.tenant_id,
            "openid_configuration": identity.openid_configuration_url,
            "token_endpoint": identity.token_endpoint,
            "devicelogin_url": identity.devicelogin_url,
            "ca_file": str(self.ca_file),
        }

    def _app_info(self, app: AppSettings) -> dict[str, Any]:
        made = self.client_certificates.get(app.app_id)
        return {
            "app_id": app.app_id,
            "display_name": app.display_name,
            "client_secret": app.client_secret,
            "object_id": app.object_id,
            "public_client": app.public_client,
            "redirect_uris": list(app.redirect_uris),
            "certificates": [str(Path(c).resolve()) for c in app.certificates or []],
            "certificate_file": str(made.cert_file) if made else None,
            "private_key_file": str(made.key_file) if made else None,
            "pfx_file": str(made.pfx_file) if made else None,
            "thumbprint": made.thumbprint if made else None,
            "thumbprint_sha256": made.thumbprint_sha256 if made else None,
            "app_permissions": list(app.app_permissions),
            "delegated_permissions": list(app.delegated_permissions),
        }


def run(
    state_dir: Path,
    settings: SandboxSettings | None = None,
    *,
    on_ready: Callable[[Sandbox], None] | None = None,
) -> None:
    """Run the sandbox in the foreground until SIGTERM or SIGINT."""

    async def main() -> None:
        async with Sandbox(state_dir, settings) as sandbox:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            handled = (signal.SIGINT, signal.SIGTERM)
            for sig in handled:
                loop.add_signal_handler(sig, stop.set)
            try:
                if on_ready is not None:
                    on_ready(sandbox)
                await stop.wait()
            finally:
                for sig in handled:
                    loop.remove_signal_handler(sig)

    asyncio.run(main())


async def _bind(
    listen: Callable[[int], Awaitable[_Listening]], configured: int, previous: int, what: str
) -> _Listening:
    """``listen`` on the configured port; with none configured (0), on the port of the last
    run when it is free, else on any free port (with a warning: configurations written for
    the old port must change)."""
    if configured or not previous:
        return await listen(configured)
    try:
        return await listen(previous)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
    log.warning(
        "the %s port %d of the sandbox's last run is in use: it listens on another one now "
        "(set smtp_port / identity_port in the sandbox settings to keep one for good)",
        what,
        previous,
    )
    return await listen(0)


def read_info(state_dir: Path) -> dict[str, Any]:
    """``sandbox.json`` of ``state_dir`` (also after the sandbox stopped: ``running`` says).

    ``running`` is reported ``False`` when the recorded process no longer exists.
    """
    path = Path(state_dir).resolve() / INFO_FILE
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise SandboxError(
            f"no sandbox in {path.parent}: start one with `smtp365 sandbox run`"
        ) from None
    except ValueError as exc:
        raise SandboxError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != INFO_VERSION:
        raise SandboxError(f"{path}: unsupported sandbox.json version")
    if data.get("running") and not _pid_alive(int(data.get("pid", 0))):
        data["running"] = False
    return data


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mint_token(
    state_dir: Path,
    mailbox: str | None,
    *,
    app_only: bool = False,
    lifetime: int = 3600,
    app_id: str | None = None,
) -> str:
    """Mint a token with the persisted key, from any process (see ``sandbox.json``).

    Delegated tokens only for mailboxes that can sign in (not shared ones).
    """
    info = read_info(state_dir)
    token_info = info["token"]
    issuer = TokenIssuer(
        Path(state_dir),
        tenant_id=info["tenant_id"],
        issuer=token_info["issuer"],
        default_app_id=token_info["app_id"],
        audience=token_info["audience"],
    )
    if app_only:
        return issuer.issue(None, app_only=True, app_id=app_id, lifetime=lifetime)
    if not mailbox:
        raise SandboxError("a delegated token needs --mailbox")
    wanted = mailbox.lower()
    for mbx in info["mailboxes"]:
        if mbx["address"].lower() == wanted:
            if mbx.get("shared"):
                raise SandboxError(
                    f"{mailbox} is a shared mailbox and cannot sign in: use a user with "
                    "full access to it, or an app-only token"
                )
            return issuer.issue(mbx["address"], app_id=app_id, lifetime=lifetime)
    raise SandboxError(f"{mailbox} is not a mailbox of this sandbox")


def list_messages(state_dir: Path) -> list[dict[str, Any]]:
    """Index entries of the captured mail of ``state_dir``, oldest first."""
    store = MessageStore(Path(state_dir).resolve() / MESSAGES_DIR)
    return [entry.to_dict() for entry in store.list()]
