"""Memory of ``smtp365 relay``: with a large queue, and while receiving one 35 MB message.

Two measurements of the real relay (``smtp365 relay --config FILE`` as a subprocess, state
on disk, nothing leaves 127.0.0.1). Figures are printed, never asserted.

1. **A full queue.** ``-n`` small messages (default 100,000, about 700 bytes each) are put
   straight into a state directory's queue with ``SqliteQueue.enqueue`` (many at once, so
   they share commits; the time is printed). Their sending account points at a closed
   127.0.0.1 port, so every attempt fails with "connection refused" and the message is
   deferred: the relay keeps them all queued and its scheduler claims, tries and defers
   them the whole time. The relay starts on a copy of that directory and on an empty one
   (the baseline), once with ``processes = 1`` and once with the default (0: one per core,
   the extra ones being ``smtp365.relay.procs`` intake helpers). Measured over the main
   process plus its helpers: the start-up peak (the sum of their VmHWM once the relay
   logged "ready" and every helper "serving"), then, for ``--seconds`` from there, RSS and
   PSS (``/proc/PID/smaps_rollup``) sampled every 100 ms and the VmHWM reset at the start
   of that window. Printed: RSS at the start and end of the window, its peaks, the number
   of delivery attempts, and the ratios full/empty.

2. **One 35 MB message.** A relay with ``processes = 1`` forwards to a sink in this script
   (a minimal SMTP server that discards what it gets). One message of ``--message-mib`` MiB
   (default 34; base64 lines of 76 characters, CRLF) is sent with smtplib. The relay's
   VmRSS is sampled every 20 ms, and its VmHWM (exact peak, reset through
   ``/proc/PID/clear_refs`` before the send and again at the 250) is read at the 250 and
   once the relay logged the delivery. Printed: the increase over the RSS before the send,
   during intake (until the 250) and during delivery, in MB and as a multiple of the
   message size: is the message held in memory (more than once) while it is accepted,
   and while it is delivered?

    python bench/relay_memory.py [-n 100000] [--seconds 10] [--message-mib 34]
                                 [--only queue|large] [--dir DIR] [--keep]

``--dir`` (default ``/var/tmp``) must be on a real disk: the queue fsyncs. Every process
the script starts is stopped at exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from relay_vs_postfix import _kb, tree  # the same /proc reading; this directory is on sys.path

from smtp365.models import Envelope
from smtp365.relay.queue.sqlite import SqliteQueue

REPO = Path(__file__).resolve().parent.parent
SMTP365 = Path(sys.executable).parent / "smtp365"
ACCOUNT = "upstream"
SENDER = "scanner@bench.test"
RECIPIENT = "alice@contoso.test"
MB = 1_000_000


# ---------------------------------------------------------------------------------------------
# /proc


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def relay_pids(root: int) -> list[int]:
    """The relay's main process and its descendants that are intake helpers."""
    return [root] + [p for p in tree(root)[1:] if b"smtp365.relay.procs" in _cmdline(p)]


@dataclass
class TreeSample:
    at: float
    rss_kb: int
    pss_kb: int
    procs: int


def sample_tree(root: int) -> TreeSample:
    pids = relay_pids(root)
    rss = sum(_kb(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return TreeSample(time.monotonic(), rss, pss, len(pids))


def reset_hwm(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Samples in a thread every ``interval`` seconds until stopped."""

    def __init__(self, root: int, interval: float, *, tree: bool) -> None:
        self.root = root
        self.interval = interval
        self.tree = tree
        self.samples: list[TreeSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def take(self) -> TreeSample:
        if self.tree:
            s = sample_tree(self.root)
        else:
            s = TreeSample(time.monotonic(), _kb(f"/proc/{self.root}/status", "VmRSS:"), 0, 1)
        if s.rss_kb:  # 0: the process is gone
            self.samples.append(s)
        return s

    def _loop(self) -> None:
        while True:
            self.take()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> list[TreeSample]:
        return [s for s in self.samples if start <= s.at <= end]


# ---------------------------------------------------------------------------------------------
# the relay


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(work: Path, *, upstream_port: int, processes: int) -> tuple[Path, int]:
    """A relay config in ``work`` (state in work/state); returns it and the listener port."""
    port = free_port()
    config = work / "relay.toml"
    config.write_text(
        f"""default_account = "{ACCOUNT}"

[accounts.{ACCOUNT}]
profile = "custom"
host = "127.0.0.1"
port = {upstream_port}
tls = "none"
auth = "none"

[relay]
state_dir = "{work / "state"}"
hostname = "relay.bench"
processes = {processes}

[[relay.listeners]]
host = "127.0.0.1"
port = {port}
mode = "plain"

[[relay.networks]]
cidr = "127.0.0.0/8"

[relay.budget]
messages_per_minute = 100000000
recipients_per_day = 1000000000
connections = 20
"""
    )
    return config, port


class Relay:
    """``smtp365 relay --config FILE`` in its own session, its output in ``log``."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log_path = log
        self.started = time.monotonic()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(SMTP365), "relay", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only; we stop it
            )
        self.pid = self.proc.pid
        self.helpers: set[int] = set()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, pattern: str, timeout: float, *, count: int = 1) -> float:
        """Seconds since launch until ``pattern`` (a regex) is in the log ``count`` times."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(regex.findall(self.log_text())) >= count:
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                raise RuntimeError(f"the relay exited ({self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.02)
        raise RuntimeError(f"no {pattern!r} in the relay's log within {timeout:.0f} s")

    def remember_helpers(self) -> None:
        self.helpers.update(p for p in relay_pids(self.pid) if p != self.pid)

    def tail(self, lines: int = 8) -> str:
        return "\n".join("    " + line for line in self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM, then SIGKILL after ``timeout``; returns the seconds the stop took."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.remember_helpers()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"  the relay did not stop within {timeout:.0f} s: SIGKILL", flush=True)
                self.proc.kill()
                self.proc.wait()
        for pid in self.helpers:  # they die with the main process (PDEATHSIG); make sure
            if b"smtp365.relay.procs" in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return time.monotonic() - started


@contextlib.contextmanager
def running(config: Path, log: Path) -> Iterator[Relay]:
    relay = Relay(config, log)
    try:
        yield relay
    finally:
        relay.stop()


def log_levels(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for match in re.finditer(r"^\S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s", text, re.M):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    counts["Traceback"] = text.count("Traceback")
    return counts


def notable_lines(text: str, limit: int = 6) -> list[str]:
    """Warnings and errors, the same message (ids and numbers masked) shown once."""
    seen: dict[str, int] = {}
    first: dict[str, str] = {}
    for line in text.splitlines():
        if not re.match(r"^\S+ (WARNING|ERROR|CRITICAL)\s", line) and "Traceback" not in line:
            continue
        key = re.sub(r"[0-9A-HJKMNP-TV-Z]{26}|\d+(\.\d+)?", "#", line.split(" ", 1)[-1])
        seen[key] = seen.get(key, 0) + 1
        first.setdefault(key, line)
    return [f"{n:>7} x {first[k][:300]}" for k, n in list(seen.items())[:limit]]


# ---------------------------------------------------------------------------------------------
# 1. a full queue


def small_message(i: int) -> bytes:
    return (
        f"From: Scanner <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        f"Subject: scan {i}\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        f"Message-ID: <bench-{i}@bench.test>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n" + f"Page {i} of the scan, a short text body of a few lines.\r\n" * 8
    ).encode()


async def fill(queue_dir: Path, n: int, batch: int = 2000) -> float:
    """Enqueue n messages; returns the seconds it took (every one durable)."""
    queue = await SqliteQueue.open(queue_dir)
    envelope = Envelope(SENDER, (RECIPIENT,))
    try:
        started = time.perf_counter()
        for first in range(0, n, batch):
            await asyncio.gather(
                *(
                    queue.enqueue(
                        envelope,
                        small_message(i),
                        message_id=f"<bench-{i}@bench.test>",
                        account=ACCOUNT,
                        client="127.0.0.1",
                    )
                    for i in range(first, min(n, first + batch))
                )
            )
        return time.perf_counter() - started
    finally:
        await queue.close()


def queue_summary(db: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(messages by state, log entries by event) of a stopped relay's queue."""
    if not db.exists():
        return {}, {}
    conn = sqlite3.connect(db)
    try:
        states = dict(conn.execute("SELECT state, count(*) FROM messages GROUP BY state"))
        events = dict(conn.execute("SELECT event, count(*) FROM log GROUP BY event"))
    finally:
        conn.close()
    return states, events


@dataclass
class QueueRun:
    processes: int
    queued: int
    ready_s: float = 0.0  # launch to "ready" (and every helper "serving")
    procs: int = 0
    start_hwm_kb: int = 0  # VmHWM summed over the processes at ready: start-up peak
    window_hwm_kb: int = 0  # the same, reset at ready, read at the end of the window
    ready_rss_kb: int = 0  # at the start of the window
    end_rss_kb: int = 0  # at its end
    peak_rss_kb: int = 0  # peaks over the window
    peak_pss_kb: int = 0
    stop_s: float = 0.0
    states: dict[str, int] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    levels: dict[str, int] = field(default_factory=dict)
    notable: list[str] = field(default_factory=list)


def queue_run(
    work: Path, template: Path | None, processes: int, n: int, seconds: float
) -> QueueRun:
    closed = free_port()  # nothing listens there: every delivery attempt is refused
    config, _ = write_config(work, upstream_port=closed, processes=processes)
    if template is not None:
        shutil.copytree(template, work / "state")
    run = QueueRun(processes, n if template is not None else 0)
    helpers = (processes or os.cpu_count() or 1) - 1
    with running(config, work / "relay.log") as relay, Sampler(relay.pid, 0.1, tree=True) as s:
        relay.wait_for(r" ready: ", 120)
        if helpers:
            relay.wait_for(r"intake process \d+ \(pid \d+\) serving", 60, count=helpers)
        run.ready_s = time.monotonic() - relay.started
        ready = s.take()
        pids = relay_pids(relay.pid)
        relay.remember_helpers()
        run.start_hwm_kb = sum(_kb(f"/proc/{p}/status", "VmHWM:") for p in pids)
        for pid in pids:
            reset_hwm(pid)
        time.sleep(seconds)
        end = s.take()
        run.window_hwm_kb = sum(_kb(f"/proc/{p}/status", "VmHWM:") for p in relay_pids(relay.pid))
        window = s.between(ready.at, end.at)
        run.procs = max(x.procs for x in window)
        run.ready_rss_kb, run.end_rss_kb = ready.rss_kb, end.rss_kb
        run.peak_rss_kb = max(x.rss_kb for x in window)
        run.peak_pss_kb = max(x.pss_kb for x in window)
        run.stop_s = relay.stop()
    text = relay.log_text()
    run.levels = log_levels(text)
    run.notable = notable_lines(text)
    run.states, run.events = queue_summary(work / "state" / "queue" / "queue.db")
    return run


def part_queue(base: Path, n: int, seconds: float) -> None:
    print(f"== 1. relay memory with {n:,} messages queued (upstream: a closed port)")
    template = base / "template"
    took = asyncio.run(fill(template / "queue", n))
    db_mb = sum(f.stat().st_size for f in (template / "queue").iterdir() if f.is_file()) / MB
    print(f"filled the queue: {n:,} messages in {took:.1f} s ({n / took:,.0f}/s), {db_mb:.0f} MB")
    runs: list[QueueRun] = []
    for processes in (1, 0):
        for full in (False, True):
            work = base / f"queue-p{processes}-{'full' if full else 'empty'}"
            work.mkdir()
            label = f"processes = {processes}, {f'{n:,} queued' if full else 'empty queue'}"
            print(f"  {label}: running {seconds:g} s after ready ...", flush=True)
            run = queue_run(work, template if full else None, processes, n, seconds)
            runs.append(run)
            deferred = run.events.get("deferred", 0)
            print(
                f"    ready after {run.ready_s:.1f} s; {deferred:,} attempts deferred"
                f" ({deferred / seconds:,.0f}/s); stop took {run.stop_s:.1f} s;"
                f" log lines {run.levels}"
            )
            if full:
                print(f"    queue after the run: {run.states}")
            for line in run.notable:
                print(f"    {line}")
    print()
    print(
        "main process + intake helpers (RSS counts shared pages once per process).\n"
        "start-up: VmHWM summed over the processes at ready (the exact peak of each).\n"
        f"window, {seconds:g} s after ready: RSS at its start and end; peak RSS and PSS sampled"
        " every 100 ms;\nVmHWM summed over the processes (reset at ready)"
    )
    print(
        f"{'processes':>9} {'queued':>8} {'procs':>5} {'ready s':>7} {'attempts':>8}"
        f" {'start-up':>10} {'RSS@ready':>10} {'RSS@end':>10}"
        f" {'peak RSS':>10} {'peak PSS':>10} {'VmHWM':>10}"
    )
    for r in runs:
        print(
            f"{r.processes:>9} {r.queued:>8,} {r.procs:>5} {r.ready_s:>7.1f}"
            f" {r.events.get('deferred', 0):>8,}"
            f" {_mb(r.start_hwm_kb):>10} {_mb(r.ready_rss_kb):>10} {_mb(r.end_rss_kb):>10}"
            f" {_mb(r.peak_rss_kb):>10} {_mb(r.peak_pss_kb):>10} {_mb(r.window_hwm_kb):>10}"
        )
    for i in (0, 2):
        empty, loaded = runs[i], runs[i + 1]
        print(
            f"processes = {empty.processes}, {n:,} queued / empty queue, window peaks:"
            f" RSS {loaded.peak_rss_kb / empty.peak_rss_kb:.2f}x"
            f" ({(loaded.peak_rss_kb - empty.peak_rss_kb) / 1024:+.1f} MiB),"
            f" PSS {loaded.peak_pss_kb / empty.peak_pss_kb:.2f}x"
            f" ({(loaded.peak_pss_kb - empty.peak_pss_kb) / 1024:+.1f} MiB);"
            f" start-up VmHWM {loaded.start_hwm_kb / empty.start_hwm_kb:.2f}x"
        )


def _mb(kb: int) -> str:
    return f"{kb / 1024:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# 2. one large message


class Sink:
    """A minimal SMTP server on 127.0.0.1 (a thread per connection) that discards messages."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.messages: list[tuple[float, int]] = []  # (monotonic time of the ".", bytes)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()

        def fill() -> bool:
            chunk = conn.recv(1 << 20)
            buf.extend(chunk)
            return bool(chunk)

        def line() -> bytes | None:
            while (end := buf.find(b"\r\n")) < 0:
                if len(buf) > 4096 or not fill():
                    return None
            out = bytes(buf[: end + 2])
            del buf[: end + 2]
            return out

        def data() -> int:
            """Read up to <CRLF>.<CRLF>; returns the size of the message (dot-stuffed)."""
            size = 0
            tail = b"\r\n"  # the terminator may be the very first line
            while True:
                if buf:
                    window = tail + bytes(buf)
                    end = window.find(b"\r\n.\r\n")
                    if end >= 0:
                        used = end + 5 - len(tail)  # bytes of buf up to the terminator's end
                        del buf[:used]
                        return size + used - 3
                    size += len(buf)
                    tail = window[-4:]
                    buf.clear()
                if not fill():
                    raise OSError("closed during DATA")

        try:
            conn.sendall(b"220 sink.bench ESMTP\r\n")
            while (cmd := line()) is not None:
                verb = cmd[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-sink.bench\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    size = data()
                    self.messages.append((time.monotonic(), size))
                    conn.sendall(b"250 2.0.0 Ok: discarded\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    conn.sendall(b"250 2.0.0 Ok\r\n")
                else:
                    conn.sendall(b"502 5.5.2 Not implemented\r\n")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._accept.join()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)


def large_message(size: int) -> bytes:
    """About ``size`` bytes: a MIME message with a base64 attachment, 76-character lines."""
    head = (
        f"From: Scanner <{SENDER}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        "Subject: a large scan\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        "Message-ID: <bench-large@bench.test>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n'
        "\r\n"
        "--b\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        "The scan is attached.\r\n"
        "--b\r\n"
        'Content-Type: application/pdf; name="scan.pdf"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
    ).encode()
    tail = b"--b--\r\n"
    raw = (size - len(head) - len(tail)) * 57 // 78
    body = base64.encodebytes(os.urandom(raw)).replace(b"\n", b"\r\n")
    return head + body + tail


def part_large(base: Path, mib: float) -> None:
    size = int(mib * 1024 * 1024)
    message = large_message(size)
    print(
        f"== 2. one {len(message) / MB:.1f} MB message ({mib:g} MiB) through intake and delivery,"
        " processes = 1"
    )
    work = base / "large"
    work.mkdir()
    sink = Sink()
    try:
        config, port = write_config(work, upstream_port=sink.port, processes=1)
        with running(config, work / "relay.log") as relay:
            relay.wait_for(r" ready: ", 120)
            time.sleep(2.0)  # let the scheduler's first claims and the start-up settle
            pid = relay.pid
            hwm_before = _kb(f"/proc/{pid}/status", "VmHWM:")
            can_reset = reset_hwm(pid)
            with Sampler(pid, 0.02, tree=False) as sampler:
                time.sleep(0.5)
                before = sampler.take().rss_kb
                t_send = time.monotonic()
                with smtplib.SMTP("127.0.0.1", port, timeout=300) as client:
                    client.ehlo("bench.test")
                    client.mail(SENDER, [f"SIZE={len(message)}"])
                    client.rcpt(RECIPIENT)
                    code, reply = client.data(message)
                    t_250 = time.monotonic()
                    hwm_intake = _kb(f"/proc/{pid}/status", "VmHWM:")
                    reset_hwm(pid)
                if code != 250:
                    raise RuntimeError(f"the relay answered {code} {reply!r}")
                queue_id = reply.decode().rsplit(" ", 1)[-1]
                relay.wait_for(rf"delivered {queue_id}", 300)
                t_done = time.monotonic()
                hwm_delivery = _kb(f"/proc/{pid}/status", "VmHWM:")
                time.sleep(2.0)
                after = sampler.take().rss_kb
            relay.stop()
            text = relay.log_text()
    finally:
        sink.close()

    intake = sampler.between(t_send, t_250)
    delivery = sampler.between(t_250, t_done)
    peak_intake = max(s.rss_kb for s in intake)
    peak_delivery = max(s.rss_kb for s in delivery) if delivery else 0
    got = sink.messages[-1][1] if sink.messages else 0

    def share(kb: int) -> str:
        return f"{kb * 1024 / MB:7.1f} MB = {kb * 1024 / len(message):5.2f}x the message"

    print(f"intake (send to 250):  {t_250 - t_send:5.2f} s; sink got {got:,} bytes")
    print(f"delivery (250 to log): {t_done - t_250:5.2f} s")
    print(f"RSS before the send:   {_mb(before)} (VmHWM so far {_mb(hwm_before)})")
    print(f"increase over the RSS before the send, sampled every 20 ms ({len(intake)} samples")
    print(f"  during intake, {len(delivery)} during delivery):")
    print(f"  intake   peak RSS {share(peak_intake - before)}")
    print(f"  delivery peak RSS {share(peak_delivery - before)}")
    if can_reset:
        print("VmHWM (exact peak; reset before the send and at the 250):")
        print(f"  intake   {share(hwm_intake - before)}   (delivery may have begun at the 250)")
        print(f"  delivery {share(hwm_delivery - before)}")
    else:
        print(
            f"VmHWM could not be reset; at the 250 {_mb(hwm_intake)},"
            f" at the end {_mb(hwm_delivery)}"
        )
    print(f"RSS 2 s after delivery: {_mb(after)} ({(after - before) / 1024:+.1f} MiB)")
    for line in notable_lines(text):
        print(f"  {line}")


# ---------------------------------------------------------------------------------------------


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="messages queued (default 100000)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="sample this long after ready (default 10)"
    )
    parser.add_argument(
        "--message-mib", type=float, default=34.0, help="size of the large message (default 34)"
    )
    parser.add_argument("--only", choices=("queue", "large"), help="run one part only")
    parser.add_argument("--dir", default="/var/tmp", help="where to make the work directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if not SMTP365.exists():
        print(f"no {SMTP365}: install the project in this virtualenv", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupted)
    base = Path(tempfile.mkdtemp(prefix="smtp365-relay-memory-", dir=args.dir))
    print(f"work directory {base}; {os.cpu_count()} CPUs; relay {SMTP365}")
    try:
        if args.only in (None, "queue"):
            part_queue(base, args.n, args.seconds)
        if args.only is None:
            print()
        if args.only in (None, "large"):
            part_large(base, args.message_mib)
    except KeyboardInterrupt:
        print("\ninterrupted; the relay was stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
