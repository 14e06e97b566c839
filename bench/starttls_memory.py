"""Memory the relay's listener keeps per session: STARTTLS next to plain and implicit TLS.

For each mode (``starttls``, ``plain``, ``tls``) a fresh server process runs a real
:class:`~smtp365.relay.listener.RelayListener` on 127.0.0.1 port 0 (a throwaway trustme
certificate, an empty users file, a SQLite queue in a temp dir) on the loop the relay runs
on (uvloop unless ``--loop asyncio``), with the relay's garbage-collector settings
(``settle_gc`` once it listens). A client process it starts drives ``-n`` sessions,
``--concurrency`` at once: connect, EHLO, STARTTLS + handshake, EHLO, QUIT (plain: no
STARTTLS; tls: the handshake at connect). Only the server process is measured.

At each checkpoint, once the client's batch is done and the server's sessions have closed
(plus the 2 s a closing TLS session may wait), the server prints its VmRSS, the growth per
session since the trace checkpoint (default session 5,000), the RelaySMTP / SSLProtocol /
SSL transport objects still alive (``gc.get_objects``, no collection) and its open-session
count. tracemalloc is started at the trace checkpoint, so the end snapshot compared with the
one taken there shows the allocation sites of everything made since and still alive
(``--top`` lines). tracemalloc's own memory is printed, and taken off the RSS growth. At the
end a full ``gc.collect()``: RSS and the objects left after it, and what refers to one
surviving session, if any.

    python bench/starttls_memory.py [-n 50000] [--quick] [--modes starttls,plain,tls]
                                    [--concurrency 16] [--loop uvloop|asyncio]
                                    [--trace-at 5000] [--no-tracemalloc] [--top 12]

``N`` in the environment sets ``-n``. Figures are printed, never asserted. Every process the
script starts is stopped at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODES = ("starttls", "plain", "tls")
HOSTNAME = "relay.bench"
MB = 1_000_000
# Objects counted at each checkpoint, by their type's qualified name.
WATCHED = (
    "RelaySMTP",
    "SSLProtocol",
    "_SSLProtocolTransport",
    "SSLObject",
    "TCPTransport",  # uvloop's
    "_SelectorSocketTransport",  # asyncio's
    "StreamReader",
    "Task",
)


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def live_objects() -> dict[str, int]:
    """Live gc-tracked objects of the watched types (the frozen start-up ones excluded)."""
    counts: Counter[str] = Counter()
    watched = set(WATCHED)
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        if name in watched:
            counts[name] += 1
    return {name: counts.get(name, 0) for name in WATCHED}


# ---------------------------------------------------------------------------------------------
# client process


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        if line[3:4] != b"-":
            return line


async def _session(port: int, mode: str, ctx: ssl.SSLContext) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1",
        port,
        ssl=ctx if mode == "tls" else None,
        server_hostname=HOSTNAME if mode == "tls" else None,
    )
    try:
        if not (await _reply(reader)).startswith(b"220"):
            raise ConnectionError("no greeting")
        writer.write(b"EHLO client.bench\r\n")
        await _reply(reader)
        if mode == "starttls":
            writer.write(b"STARTTLS\r\n")
            if not (await _reply(reader)).startswith(b"220"):
                raise ConnectionError("STARTTLS refused")
            await writer.start_tls(ctx, server_hostname=HOSTNAME)
            writer.write(b"EHLO client.bench\r\n")
            await _reply(reader)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _batch(port: int, mode: str, ctx: ssl.SSLContext, n: int, concurrency: int) -> int:
    left = n
    errors = 0

    async def worker() -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            try:
                await asyncio.wait_for(_session(port, mode, ctx), 30)
            except (OSError, EOFError, ssl.SSLError, TimeoutError):
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


async def client_main(port: int, mode: str, ca: Path, concurrency: int) -> None:
    """Reads a session count per line on stdin, runs them, answers ``done ERRORS SECONDS``."""
    ctx = ssl.create_default_context(cafile=str(ca))
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.strip() or line.strip() == "quit":
            return
        start = time.monotonic()
        errors = await _batch(port, mode, ctx, int(line), concurrency)
        print(f"done {errors} {time.monotonic() - start:.3f}", flush=True)


# ---------------------------------------------------------------------------------------------
# server process


@dataclass
class Checkpoint:
    sessions: int
    seconds: float
    rss_kb: int
    open_sessions: int
    errors: int
    objects: dict[str, int]
    tracemalloc_kb: int = 0


@dataclass
class Result:
    mode: str
    loop: str
    n: int
    concurrency: int
    trace_at: int
    checkpoints: list[Checkpoint] = field(default_factory=list)
    after_collect_rss_kb: int = 0
    after_collect_objects: dict[str, int] = field(default_factory=dict)
    collected: int = 0
    top: list[str] = field(default_factory=list)
    referrers: list[str] = field(default_factory=list)


def checkpoints(n: int, trace_at: int) -> list[int]:
    marks = {min(1000, n), min(trace_at, n), n}
    step = max(1, n // 10)
    marks.update(range(step, n, step))
    return sorted(m for m in marks if m > 0)


def _referrers(obj: object, frames: set[int]) -> list[str]:
    """What holds ``obj``, two levels up (frames of this function excluded)."""
    lines: list[str] = []
    for ref in gc.get_referrers(obj):
        if id(ref) in frames:
            continue
        desc = type(ref).__qualname__
        if isinstance(ref, dict):
            owners = [type(o).__qualname__ for o in gc.get_referrers(ref) if id(o) not in frames]
            desc += f" (held by {', '.join(sorted(set(owners))[:6]) or 'nothing'})"
        lines.append(desc)
    return sorted(lines)


def _print_row(cp: Checkpoint, base: Checkpoint | None) -> None:
    per = ""
    if base is not None and cp.sessions > base.sessions:
        grown = (cp.rss_kb - base.rss_kb) - (cp.tracemalloc_kb - base.tracemalloc_kb)
        per = f"{grown * 1024 / (cp.sessions - base.sessions):8.0f}"
    objs = " ".join(f"{cp.objects[k]:>6}" for k in ("RelaySMTP", "SSLProtocol", "StreamReader"))
    print(
        f"  {cp.sessions:>7} {cp.seconds:7.1f} {cp.rss_kb / 1000:8.1f} {per:>8}"
        f" {cp.tracemalloc_kb / 1000:7.1f} {cp.open_sessions:>5} {cp.errors:>6}  {objs}",
        flush=True,
    )


async def serve(args: argparse.Namespace, work: Path) -> Result:
    import trustme

    from smtp365.relay.listener import CLOSE_TIMEOUT, ListenerConfig, RelayListener
    from smtp365.relay.policy import RelayPolicy
    from smtp365.relay.queue.sqlite import SqliteQueue
    from smtp365.relay.service import settle_gc
    from smtp365.relay.users import UserDB

    ca = trustme.CA()
    cert = ca.issue_cert(HOSTNAME, "127.0.0.1")
    cert_file, key_file, ca_file = work / "cert.pem", work / "key.pem", work / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    queue = await SqliteQueue.open(work / "queue")
    config = ListenerConfig(
        host="127.0.0.1",
        port=0,
        mode=args.mode,
        hostname=HOSTNAME,
        cert_file=cert_file,
        key_file=key_file,
    )
    listener = RelayListener(
        config, queue=queue, policy=RelayPolicy(()), users=UserDB(work / "users.json")
    )
    await listener.start()
    settle_gc()  # what `smtp365 relay` does once it is ready
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    result = Result(args.mode, loop_name, args.n, args.concurrency, args.trace_at)
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client",
        str(listener.port),
        args.mode,
        str(ca_file),
        str(args.concurrency),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert client.stdin is not None and client.stdout is not None
    print(
        f"\n{args.mode}: {args.n} sessions, {args.concurrency} at once, loop {loop_name},"
        f" server pid {os.getpid()}\n"
        f"  {'session':>7} {'s':>7} {'RSS MB':>8} {'B/sess':>8} {'tm MB':>7} {'open':>5}"
        f" {'errors':>6}  {'RelaySMTP':>6} {'SSLProtocol':>6} {'StreamReader':>6}",
        flush=True,
    )
    start = time.monotonic()
    done = errors = 0
    base: Checkpoint | None = None
    snapshot: tracemalloc.Snapshot | None = None
    try:
        for mark in checkpoints(args.n, args.trace_at):
            client.stdin.write(f"{mark - done}\n".encode())
            await client.stdin.drain()
            answer = (await client.stdout.readline()).split()
            if not answer or answer[0] != b"done":
                raise RuntimeError(f"the client process stopped ({answer!r})")
            errors += int(answer[1])
            done = mark
            # Let the sessions close on the server (a TLS one may wait CLOSE_TIMEOUT).
            deadline = time.monotonic() + args.settle
            while listener.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(CLOSE_TIMEOUT + 0.2)
            traced = tracemalloc.get_tracemalloc_memory() // 1024 if snapshot else 0
            cp = Checkpoint(
                mark,
                time.monotonic() - start,
                rss_kb(),
                listener.sessions,
                errors,
                live_objects(),
                traced,
            )
            result.checkpoints.append(cp)
            _print_row(cp, base)
            if mark == min(args.trace_at, args.n) and base is None:
                base = cp
                if args.tracemalloc:
                    tracemalloc.start(args.frames)
                    snapshot = tracemalloc.take_snapshot()
                    base.tracemalloc_kb = tracemalloc.get_tracemalloc_memory() // 1024
        if snapshot is not None:
            end = tracemalloc.take_snapshot()
            tracemalloc.stop()
            filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
            stats = end.filter_traces(filters).compare_to(snapshot.filter_traces(filters), "lineno")
            since = args.n - args.trace_at
            for stat in stats[: args.top]:
                frame = stat.traceback[0]
                path = frame.filename
                for marker in ("site-packages/", "/src/", "/lib/python3"):
                    if marker in path:
                        path = path.split(marker, 1)[1]
                        break
                result.top.append(
                    f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+8d} blocks"
                    f" ({stat.size_diff / max(since, 1):6.0f} B/sess)  {path}:{frame.lineno}"
                )
        result.collected = gc.collect()
        result.after_collect_rss_kb = rss_kb()
        result.after_collect_objects = live_objects()
        survivors = [o for o in gc.get_objects() if type(o).__qualname__ == "RelaySMTP"]
        if survivors:
            frames = {id(survivors), id(sys._getframe())}
            result.referrers = _referrers(survivors[0], frames)
        del survivors
    finally:
        with contextlib.suppress(Exception):
            client.stdin.write(b"quit\n")
            await client.stdin.drain()
        try:
            await asyncio.wait_for(client.wait(), 10)
        except TimeoutError:
            client.kill()
            await client.wait()
        await listener.stop()
        await queue.close()
    return result


def report(result: Result) -> None:
    print("  tracemalloc, allocations since the trace checkpoint still alive at the end:")
    for line in result.top or ["(tracemalloc off)"]:
        print(f"    {line}")
    objs = result.after_collect_objects
    print(
        f"  after gc.collect() ({result.collected} unreachable objects found):"
        f" RSS {result.after_collect_rss_kb / 1000:.1f} MB, "
        + ", ".join(f"{k} {v}" for k, v in objs.items() if v)
    )
    if result.referrers:
        print("  one surviving RelaySMTP is referred to by: " + "; ".join(result.referrers))


def summary(results: list[Result]) -> None:
    print("\nsummary (server process; growth per session from the trace checkpoint to the end,")
    print("         tracemalloc's own memory taken off)")
    print(
        f"  {'mode':<9} {'loop':<8} {'sessions':>8} {'sess/s':>7} {'RSS start':>9}"
        f" {'RSS end':>8} {'B/session':>9} {'RelaySMTP left':>14} {'after gc':>8} {'errors':>6}"
    )
    for r in results:
        first = r.checkpoints[0]
        base = next(c for c in r.checkpoints if c.sessions >= min(r.trace_at, r.n))
        last = r.checkpoints[-1]
        grown = (last.rss_kb - base.rss_kb) - (last.tracemalloc_kb - base.tracemalloc_kb)
        per = grown * 1024 / max(1, last.sessions - base.sessions)
        rate = last.sessions / last.seconds  # checkpoint pauses included
        print(
            f"  {r.mode:<9} {r.loop:<8} {last.sessions:>8} {rate:>7.0f}"
            f" {first.rss_kb / 1000:>8.1f}M {last.rss_kb / 1000:>7.1f}M {per:>9.0f}"
            f" {last.objects['RelaySMTP']:>14} {r.after_collect_objects['RelaySMTP']:>8}"
            f" {last.errors:>6}"
        )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        port, mode, ca, concurrency = sys.argv[2:6]
        from smtp365.relay.loop import run

        run(client_main(int(port), mode, Path(ca), int(concurrency)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=int(os.environ.get("N", "50000")))
    parser.add_argument("--quick", action="store_true", help="3,000 sessions, trace at 1,000")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--trace-at", type=int, default=5000)
    parser.add_argument("--no-tracemalloc", dest="tracemalloc", action="store_false")
    parser.add_argument("--frames", type=int, default=1, help="tracemalloc frames per trace")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--settle", type=float, default=5.0, help="max wait for open sessions")
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n, args.trace_at = 3000, 1000
    if args.serve:
        from smtp365.relay.loop import run

        args.mode = args.serve
        with tempfile.TemporaryDirectory(prefix="smtp365-bench-") as tmp:
            result = run(serve(args, Path(tmp)), args.loop)
        report(result)
        Path(args.json).write_text(json.dumps(asdict(result)))
        return 0

    results: list[Result] = []
    passed = [a for a in sys.argv[1:] if a != "--quick"]
    if args.quick:
        passed += ["-n", str(args.n), "--trace-at", str(args.trace_at)]
    with tempfile.TemporaryDirectory(prefix="smtp365-bench-") as tmp:
        for mode in args.modes.split(","):
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, __file__, *passed, "--serve", mode, "--json", str(out)]
            proc = subprocess.Popen(cmd, start_new_session=True)
            try:
                code = proc.wait()
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                raise
            if code != 0:
                print(f"{mode}: the server process exited with {code}", file=sys.stderr)
                return 1
            data: dict[str, Any] = json.loads(out.read_text())
            data["checkpoints"] = [Checkpoint(**c) for c in data["checkpoints"]]
            results.append(Result(**data))
    summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
