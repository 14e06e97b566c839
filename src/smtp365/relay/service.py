"""The relay as one running service: listeners → intake → queue → scheduler → workers → bounces.

:class:`RelayService` builds every part from :class:`~smtp365.config.Settings` (its
``[relay]`` table and its accounts), starts them, and stops them in the order that loses
nothing: first stop accepting connections and let open sessions finish (a message gets its
``250`` only once durable), then let deliveries in progress finish, then close the queue.
Whatever is not finished within the grace period stays in the queue, leased or deferred,
and goes out after the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from smtp365.config import AccountSettings, Settings
from smtp365.config.relay import ListenerSettings, RelayConfig
from smtp365.errors import ConfigError
from smtp365.models import Envelope
from smtp365.relay import logs
from smtp365.relay.backoff import Backoff
from smtp365.relay.clients import ClientTable
from smtp365.relay.dsn import Bouncer
from smtp365.relay.intake import ClientInfo, Intake, Route
from smtp365.relay.listener import Limits, ListenerConfig, RelayListener
from smtp365.relay.listener import bind as listener_bind
from smtp365.relay.policy import NetworkRule, RelayPolicy
from smtp365.relay.procs import IntakeProcesses
from smtp365.relay.queue.sqlite import SqliteQueue
from smtp365.relay.ratelimit import Limits as Budget
from smtp365.relay.ratelimit import RateLimiter
from smtp365.relay.scheduler import Scheduler, make_router
from smtp365.relay.tlscert import self_signed
from smtp365.relay.users import UserDB, sender_allowed
from smtp365.relay.worker import Clock, DeliveryPolicy, SystemClock, TransportFactory, Worker

__all__ = ["RelayService", "accounts_of", "settle_gc"]

log = logging.getLogger("smtp365.relay")

PURGE_EVERY = 3600.0  # seconds between delivery-log purges


def accounts_of(settings: Settings) -> dict[str, AccountSettings]:
    """Every account of the file, resolved (the implicit default one when there are none)."""
    if not settings.accounts:
        return {"default": settings.account()}
    return {name: settings.account(name) for name in settings.accounts}


class RelayService:
    """Build with settings, then ``await start()`` / ``await stop()``, or ``await run()``.

    ``clock`` (wall and monotonic time, sleeping) drives the queue, the budgets, the
    scheduler and the log purge; tests move a fake one."""

    def __init__(
        self,
        settings: Settings,
        *,
        state_dir: Path | None = None,
        transport_factory: TransportFactory | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.config: RelayConfig = settings.relay
        self.state_dir = (
            state_dir or self.config.resolved_state_dir(settings.state_home)
        ).expanduser()
        self.hostname = self.config.hostname or socket.getfqdn()
        self.accounts = accounts_of(settings)
        self.default_account = self.config.account or settings.default_account
        if self.default_account not in self.accounts:
            self.default_account = next(iter(self.accounts))
            if self.config.account:
                raise _unknown_account("relay.account", self.config.account, self.accounts)
        self.postmaster = self.config.postmaster or self.default_account
        if self.postmaster not in self.accounts:
            raise _unknown_account("relay.postmaster", self.postmaster, self.accounts)
        for i, route in enumerate(self.config.routes):
            if route.account not in self.accounts:
                raise _unknown_account(f"relay.routes[{i}].account", route.account, self.accounts)
        self._factory = transport_factory
        self.queue: SqliteQueue | None = None
        self.listeners: list[RelayListener] = []
        self.scheduler: Scheduler | None = None
        self.worker: Worker | None = None
        self.helpers: IntakeProcesses | None = None
        self._sockets: list[list[socket.socket]] = []
        self._clients: list[ClientTable] = []  # per listener, shared with the helpers
        self._purger: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._started = False

    # ----------------------------------------------------------------- routing

    def route(self, client: ClientInfo, envelope: Envelope) -> Route:
        """The first ``[[relay.routes]]`` entry that matches, else the default account."""
        network = client.network if client.user is None else None
        for rule in self.config.routes:
            if rule.sender is not None and not sender_allowed([rule.sender], envelope.sender):
                continue
            if rule.client is not None and rule.client.lower() not in {
                (client.user or "").lower(),
                (network or "").lower(),
            }:
                continue
            account = self.accounts[rule.account]
            rewrite = (account.sender or account.username) if rule.rewrite_sender else None
            return Route(rule.account, rewrite)
        return Route(self.default_account)

    def budget(self, mailbox: str) -> Budget:
        b = self.config.budget
        return Budget(
            messages_per_window=b.messages_per_minute,
            message_window=b.minute,
            recipients_per_window=b.recipients_per_day,
            recipient_window=b.day,
            max_connections=b.connections,
        )

    # --------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.queue = queue = await SqliteQueue.open(self.state_dir / "queue", clock=self.clock.time)
        try:
            await self._start_parts(queue)
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start_parts(self, queue: SqliteQueue) -> None:
        cfg = self.config
        if queue.recovery is not None and queue.recovery.changed:
            log.warning("queue recovered after an unclean stop: %s", queue.recovery)
        postmaster = self.accounts[self.postmaster]
        bouncer = Bouncer(
            queue,
            account=self.postmaster,
            from_address=postmaster.sender or postmaster.username or f"postmaster@{self.hostname}",
            reporting_mta=self.hostname,
            clock=self.clock.time,
        )
        self.worker = Worker(
            queue,
            self.accounts,
            limiter=RateLimiter(self.budget, clock=self.clock.monotonic),
            clock=self.clock,
            backoff=Backoff(
                base=cfg.retry_base, cap=cfg.retry_max, max_lifetime=cfg.max_queue_lifetime
            ),
            policy=DeliveryPolicy(max_recipients_per_message=cfg.budget.max_recipients_per_message),
            on_failed=bouncer,
            transport_factory=self._factory,
        )
        await self._restore_budgets(queue, self.worker.limiter)
        self.scheduler = Scheduler(
            queue,
            self.worker,
            make_router(default=self.default_account),
            max_inflight=cfg.max_inflight,
        )
        scheduler = self.scheduler
        users = await self._start_listeners(
            queue,
            on_enqueued=lambda _id: scheduler.wake(),
            sockets=self._bind_for_helpers(),
            clients=self._clients,
        )
        if self._sockets:
            self.helpers = IntakeProcesses(
                self._process_count() - 1,
                settings=self.settings.model_dump(mode="json"),
                state_dir=self.state_dir,
                sockets=self._sockets,
                clients=self._clients,
                on_enqueued=scheduler.wake,
                log_setup=logs.current(),
            )
            await self.helpers.start()
        scheduler.start()
        self._purger = asyncio.create_task(self._purge_loop(), name="smtp365-relay-purge")
        log.info(
            "relay %s ready: %s; %d process(es); sending through %s; %d local user(s); queue %s",
            self.hostname,
            ", ".join(
                f"{lst.config.host}:{lst.port} ({lst.config.mode})" for lst in self.listeners
            ),
            1 + (self.helpers.count if self.helpers is not None else 0),
            self.default_account,
            len(users),
            queue.root,
        )

    def _ledger_window(self) -> float:
        """How far back the budgets look: the longer of their two windows."""
        return max(self.config.budget.day, self.config.budget.minute)

    async def _restore_budgets(self, queue: SqliteQueue, limiter: RateLimiter) -> None:
        """Hand what the mailboxes sent and how they were paused before this start (the
        queue's ledger) to the budgets, wall-clock times turned into the limiter's clock."""
        wall, mono = self.clock.time(), self.clock.monotonic()
        ledger = await queue.ledger(wall - self._ledger_window())
        for sent in ledger.sent:
            limiter.record(sent.mailbox, mono - (wall - min(sent.at, wall)), sent.recipients)
        paused: set[str] = set()
        for pause in ledger.pauses:
            if pause.until > wall:
                limiter.pause(pause.mailbox, mono + (pause.until - wall), pause.reason)
                paused.add(pause.mailbox)
        if ledger.sent:
            log.info(
                "budgets: %d earlier submission(s) of %d mailbox(es) still count",
                len(ledger.sent),
                len({sent.mailbox for sent in ledger.sent}),
            )
        for mailbox in sorted(paused):
            until = limiter.paused_until(mailbox) or mono
            log.warning(
                "budgets: %s stays paused for %.0f s: %s",
                mailbox,
                until - mono,
                limiter.state(mailbox).pause_reason,
            )

    def _process_count(self) -> int:
        return self.config.processes or os.cpu_count() or 1

    def _bind_for_helpers(self) -> list[list[socket.socket]]:
        """With more than one process, the listening sockets they will share (and the
        tables counting each client address over all of them)."""
        if self._process_count() < 2:
            return []
        for item in self.config.listeners:
            self._sockets.append(listener_bind(item.host, item.port))
            self._clients.append(ClientTable.shared())
        return self._sockets

    async def _start_listeners(
        self,
        queue: SqliteQueue,
        *,
        on_enqueued: Callable[[str], None],
        sockets: Sequence[Sequence[socket.socket]] = (),
        clients: Sequence[ClientTable] = (),
    ) -> UserDB:
        cfg = self.config
        users = UserDB(cfg.users_file or self.state_dir / "users.json")
        policy = RelayPolicy(
            NetworkRule.parse(n.cidr, n.senders, name=n.name or n.cidr) for n in cfg.networks
        )
        intake = Intake(queue, hostname=self.hostname, router=self.route, on_enqueued=on_enqueued)
        for i, item in enumerate(cfg.listeners):
            listener = RelayListener(
                self._listener_config(item),
                queue=queue,
                policy=policy,
                users=users,
                intake=intake,
                clients=clients[i] if clients else None,
            )
            await listener.start(sockets[i] if sockets else ())
            self.listeners.append(listener)
        return users

    async def run_intake(
        self,
        sockets: Sequence[Sequence[socket.socket]],
        notify: socket.socket,
        *,
        index: int,
        clients: Sequence[ClientTable] = (),
    ) -> None:
        """A helper process (:mod:`smtp365.relay.procs`): receive on the inherited
        ``sockets`` into the shared queue until SIGTERM, or until the main process is gone."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        notify.setblocking(False)
        orphaned = False

        def parent_readable() -> None:
            nonlocal orphaned
            with contextlib.suppress(BlockingIOError, InterruptedError):
                if not notify.recv(1):
                    orphaned = True
                    loop.remove_reader(notify.fileno())
                    self._stop.set()

        def enqueued(_id: str) -> None:
            with contextlib.suppress(OSError):  # a full pipe: the scheduler polls anyway
                notify.send(b"\x01")

        loop.add_reader(notify.fileno(), parent_readable)
        self.queue = queue = await SqliteQueue.open(self.state_dir / "queue")
        try:
            await self._start_listeners(
                queue, on_enqueued=enqueued, sockets=sockets, clients=clients
            )
            log.info("intake process %d (pid %d) serving", index, os.getpid())
            settle_gc()
            await self._stop.wait()
        finally:
            await self.stop(grace=0 if orphaned else None)
            loop.remove_reader(notify.fileno())
            notify.close()

    def _listener_config(self, item: ListenerSettings) -> ListenerConfig:
        cert, key = item.cert_file, item.key_file
        if item.mode != "plain" and (cert is None or key is None):
            if (cert is None) != (key is None):
                raise ConfigError(
                    f"listener {item.host}:{item.port} has only one of cert_file and key_file",
                    fix="set both, or neither (a self-signed pair is then made)",
                )
            cert, key = self_signed(self.state_dir / "tls", self.hostname)
        return ListenerConfig(
            host=item.host,
            port=item.port,
            mode=item.mode,
            hostname=self.hostname,
            cert_file=cert,
            key_file=key,
            limits=Limits(
                max_message_size=item.max_message_size,
                max_recipients=item.max_recipients,
                session_timeout=item.session_timeout,
                auth_attempts=item.auth_attempts,
                auth_failures_per_ip=item.auth_failures_per_minute,
                max_connections_per_client=item.max_connections_per_client,
            ),
            bare_newline=item.bare_newline,
            plain_auth_networks=frozenset(item.plain_auth_networks),
        )

    async def _purge_loop(self) -> None:
        assert self.queue is not None
        keep = self.config.delivery_log_days * 86_400.0
        while True:
            try:
                removed = await self.queue.purge_log(
                    keep, now=self.clock.time(), keep_ledger=self._ledger_window()
                )
                if removed:
                    log.info(
                        "delivery log: purged %d entries older than %g days",
                        removed,
                        self.config.delivery_log_days,
                    )
            except Exception:
                log.exception("purging the delivery log failed")
            await self.clock.sleep(PURGE_EVERY)

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (signal handlers call this)."""
        self._stop.set()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, finish sessions and deliveries within ``grace``, close the queue."""
        grace = self.config.grace if grace is None else grace
        helpers, self.helpers = self.helpers, None
        scheduler, self.scheduler = self.scheduler, None
        # Sessions and deliveries finish side by side, within the same grace.
        await asyncio.gather(
            *(lst.stop(grace) for lst in self.listeners),
            *([helpers.stop(grace)] if helpers is not None else []),
            *([scheduler.stop(grace)] if scheduler is not None else []),
        )
        self.listeners = []
        for group in self._sockets:
            for sock in group:
                sock.close()
        self._sockets = []
        for table in self._clients:
            table.close()
        self._clients = []
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
            self._purger = None
        if self.queue is not None:
            await self.queue.close()
            self.queue = None
        log.info("relay stopped")

    async def run(self, on_ready: Callable[[RelayService], None] | None = None) -> None:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), stop gracefully."""
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        try:
            await self.start()
            if on_ready is not None:
                on_ready(self)
            await self._stop.wait()
        finally:
            await self.stop()
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s: stopping (grace %g s)", sig.name, self.config.grace)
        self._stop.set()

    async def __aenter__(self) -> RelayService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def settle_gc() -> None:
    """For a process that runs the relay and nothing else, once it has started: everything
    built so far lives as long as the process, so move it out of the garbage collector's
    way, and collect the young generation less often (a session makes many short-lived
    objects, few cycles). Process-wide, so the entry points call it, not the service."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _unknown_account(key: str, name: str, accounts: dict[str, AccountSettings]) -> ConfigError:
    known = ", ".join(sorted(accounts))
    return ConfigError(
        f"{key} names the account {name!r}, which is not defined (accounts: {known})",
        fix=f"add an [accounts.{name}] table or use one of: {known}",
    )
