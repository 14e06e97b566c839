"""Helpers for bench/relay_vs_postfix.sh: free ports, SMTP readiness, one measured load run
(smtp-source against a server, smtp-sink counting what it forwards, the server's process tree
sampled from /proc), and the final table. Standard library only; run by the shell driver.

    python bench/relay_vs_postfix.py ports 3
    python bench/relay_vs_postfix.py wait-smtp --port 2525 --timeout 30 --pid 1234
    python bench/relay_vs_postfix.py cpu-busy --seconds 2
    python bench/relay_vs_postfix.py tree 1234
    python bench/relay_vs_postfix.py run --server postfix --sessions 10 ... --out results.jsonl
    python bench/relay_vs_postfix.py table results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SENDER = "bench@source.bench"
RECIPIENT = "rcpt@sink.bench"


# ---------------------------------------------------------------------------------------------
# ports and readiness


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_smtp(port: int, timeout: float, pid: int | None) -> str | None:
    """None once a connection to the port gets a 220 greeting, else why not."""
    deadline = time.monotonic() + timeout
    last = "nothing tried"
    while time.monotonic() < deadline:
        if pid is not None and not alive(pid):
            return f"process {pid} exited before the port greeted"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                greeting = s.recv(512).decode("ascii", "replace")
                if greeting.startswith("220"):
                    s.sendall(b"QUIT\r\n")
                    return None
                last = f"greeting {greeting.strip()!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    return f"no 220 on 127.0.0.1:{port} within {timeout:.0f}s ({last})"


def cpu_busy(seconds: float) -> float:
    """Percent of all CPUs busy over the next `seconds` (other load skews the figures)."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    total0, idle0 = read()
    time.sleep(seconds)
    total1, idle1 = read()
    total = max(1, total1 - total0)
    return 100.0 * (1 - (idle1 - idle0) / total)


# ---------------------------------------------------------------------------------------------
# the server's process tree


def _ppids() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def tree(root: int) -> list[int]:
    """root and all its descendants that exist now."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in found or not os.path.exists(f"/proc/{pid}"):
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_seconds(root: int) -> float:
    """CPU time (user + system, including reaped children) of root's process tree."""
    ticks = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    rss_kb: int
    pss_kb: int
    procs: int


def sample(root: int) -> Sample:
    pids = tree(root)
    rss = sum(_kb(f"/proc/{p}/status", "VmRSS:") for p in pids)
    pss = sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return Sample(rss, pss, len(pids))


@dataclass
class Sampler:
    root: int
    interval: float = 0.1
    peak_rss_kb: int = 0
    peak_pss_kb: int = 0
    peak_procs: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def take(self) -> Sample:
        s = sample(self.root)
        self.peak_rss_kb = max(self.peak_rss_kb, s.rss_kb)
        self.peak_pss_kb = max(self.peak_pss_kb, s.pss_kb)
        self.peak_procs = max(self.peak_procs, s.procs)
        self.samples += 1
        return s

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.take()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.take()


# ---------------------------------------------------------------------------------------------
# the sink's counter (smtp-sink -c: "... mesg=N" each time a "." is received)

_MESG = re.compile(rb"mesg=(\d+)")


def sink_count(log: Path | None) -> int:
    if log is None:
        return 0
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 512))
            found = _MESG.findall(f.read())
    except OSError:
        return 0
    return int(found[-1]) if found else 0


def wait_sink(log: Path | None, target: int, deadline: float) -> tuple[int, float | None]:
    """(count, monotonic time it reached target, or None on timeout)."""
    while True:
        count = sink_count(log)
        if count >= target:
            return count, time.monotonic()
        if time.monotonic() >= deadline:
            return count, None
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# one run


def source_cmd(args: argparse.Namespace, messages: int) -> list[str]:
    cmd = [args.source]
    if args.reuse:
        cmd.append("-d")
    cmd += ["-s", str(args.sessions), "-m", str(messages), "-l", str(args.size)]
    cmd += ["-f", SENDER, "-t", RECIPIENT, "-M", "source.bench", f"127.0.0.1:{args.port}"]
    return cmd


def run_source(args: argparse.Namespace, messages: int, log: Any) -> tuple[int, float]:
    started = time.monotonic()
    try:
        rc = subprocess.run(
            source_cmd(args, messages),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=args.timeout,
            check=False,
        ).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    return rc, time.monotonic() - started


def run(args: argparse.Namespace) -> int:
    sink_log = Path(args.sink_log) if args.sink_log else None
    result: dict[str, Any] = {
        "server": args.server,
        "sessions": args.sessions,
        "n": args.n,
        "size": args.size,
        "reuse": args.reuse,
        "forwards": sink_log is not None,
        "error": None,
    }
    sampler = Sampler(args.root_pid)
    idle = sampler.take()
    result["idle_rss_kb"] = idle.rss_kb
    sampler.start()
    with open(args.log, "a") as log:
        if args.warmup:
            rc, _ = run_source(args, args.warmup, log)
            if rc != 0:
                result["error"] = f"warm-up smtp-source exited {rc} (see {args.log})"
            elif sink_log is not None:
                count, at = wait_sink(sink_log, args.warmup, time.monotonic() + args.timeout)
                if at is None:
                    result["error"] = f"warm-up: sink got {count}/{args.warmup}"
            time.sleep(0.5)
        if result["error"] is None:
            base = sink_count(sink_log)
            cpu0 = cpu_seconds(args.root_pid)
            t0 = time.monotonic()
            rc, accepted_s = run_source(args, args.n, log)
            if rc != 0:
                result["error"] = f"smtp-source exited {rc} (see {args.log})"
            else:
                result["accepted_s"] = accepted_s
                result["accepted_rate"] = args.n / accepted_s
                if sink_log is not None:
                    count, at = wait_sink(sink_log, base + args.n, t0 + args.timeout)
                    result["e2e_received"] = count - base
                    if at is None:
                        result["error"] = f"sink got {count - base}/{args.n} in {args.timeout}s"
                    else:
                        result["e2e_s"] = at - t0
                        result["e2e_rate"] = args.n / (at - t0)
                # Receiving and (where it forwards) delivering, over the server's processes.
                result["cpu_ms"] = (cpu_seconds(args.root_pid) - cpu0) * 1000 / args.n
    sampler.stop()
    result["peak_rss_kb"] = sampler.peak_rss_kb
    result["peak_pss_kb"] = sampler.peak_pss_kb
    result["peak_procs"] = sampler.peak_procs
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"  {args.server:<13} sessions={args.sessions:<3} {_line(result)}", flush=True)
    return 0 if result["error"] is None else 1


def _line(r: dict[str, Any]) -> str:
    parts = []
    if "accepted_rate" in r:
        parts.append(f"accepted {r['accepted_rate']:.1f} msg/s")
    if "e2e_rate" in r:
        parts.append(f"end-to-end {r['e2e_rate']:.1f} msg/s")
    if "cpu_ms" in r:
        parts.append(f"CPU {r['cpu_ms']:.2f} ms/msg")
    parts.append(f"peak RSS {r['peak_rss_kb'] / 1024:.1f} MiB in {r['peak_procs']} procs")
    if r["error"]:
        parts.append(f"ERROR: {r['error']}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# the table


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def table(path: Path, skipped: list[str]) -> int:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        print("no results")
        return 1
    first = rows[0]
    mode = "same connection for all (-d)" if first["reuse"] else "one connection per message"
    print()
    print(
        f"smtp-source: N={first['n']} messages of {first['size']} bytes per run, {mode}; "
        "forwarding to smtp-sink"
    )
    head = (
        f"{'server':<13} {'sessions':>8} {'accepted msg/s':>15} {'end-to-end msg/s':>17} "
        f"{'CPU ms/msg':>11} {'peak RSS MiB':>13} {'peak PSS MiB':>13} {'procs':>6}"
    )
    print(head)
    print("-" * len(head))
    by: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        by[(r["server"], r["sessions"])] = r
        e2e = _fmt(r.get("e2e_rate")) if r["forwards"] else "n/a (no fwd)"
        print(
            f"{r['server']:<13} {r['sessions']:>8} {_fmt(r.get('accepted_rate')):>15} "
            f"{e2e:>17} {_fmt(r.get('cpu_ms'), 2):>11} "
            f"{r['peak_rss_kb'] / 1024:>13.1f} {r['peak_pss_kb'] / 1024:>13.1f} "
            f"{r['peak_procs']:>6}" + (f"  ERROR: {r['error']}" if r["error"] else "")
        )
    for name in skipped:
        print(f"{name:<13} skipped")
    servers = list(dict.fromkeys(r["server"] for r in rows))
    for other in (s for s in servers if s != "postfix"):
        if "postfix" not in servers:
            break
        print()
        print(f"ratios {other}/postfix")
        print(
            f"{'sessions':>8} {'accepted':>9} {'end-to-end':>11} {'CPU/msg':>8} "
            f"{'peak RSS':>9} {'peak PSS':>9}"
        )
        for sessions in sorted({r["sessions"] for r in rows}):
            a, p = by.get((other, sessions)), by.get(("postfix", sessions))
            if a is None or p is None:
                continue
            print(
                f"{sessions:>8} {_ratio(a.get('accepted_rate'), p.get('accepted_rate')):>9} "
                f"{_ratio(a.get('e2e_rate'), p.get('e2e_rate')):>11} "
                f"{_ratio(a.get('cpu_ms'), p.get('cpu_ms')):>8} "
                f"{_ratio(a['peak_rss_kb'], p['peak_rss_kb']):>9} "
                f"{_ratio(a['peak_pss_kb'], p['peak_pss_kb']):>9}"
            )
    return 0 if all(r["error"] is None for r in rows) else 1


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ports", help="print COUNT free TCP ports on 127.0.0.1")
    p.add_argument("count", type=int)
    p = sub.add_parser("wait-smtp", help="wait for a 220 greeting")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=30)
    p.add_argument("--pid", type=int, help="give up when this process exits")
    p = sub.add_parser("cpu-busy", help="percent of CPU busy over a few seconds")
    p.add_argument("--seconds", type=float, default=2)
    p = sub.add_parser("tree", help="print PID and its descendants")
    p.add_argument("pid", type=int)
    p = sub.add_parser("run", help="one measured run")
    p.add_argument("--server", required=True)
    p.add_argument("--sessions", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--size", type=int, default=10240)
    p.add_argument("--reuse", action="store_true", help="smtp-source -d")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source", required=True, help="smtp-source binary (or wrapper)")
    p.add_argument("--root-pid", type=int, required=True, help="the server's top process")
    p.add_argument("--sink-log", help="smtp-sink -c output; none: the server does not forward")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--log", required=True, help="smtp-source output")
    p.add_argument("--out", required=True, help="JSON lines, appended")
    p = sub.add_parser("table", help="print the table and ratios")
    p.add_argument("results", type=Path)
    p.add_argument("--skipped", action="append", default=[])
    args = parser.parse_args()

    if args.cmd == "ports":
        print(" ".join(map(str, free_ports(args.count))))
        return 0
    if args.cmd == "wait-smtp":
        why = wait_smtp(args.port, args.timeout, args.pid)
        if why:
            print(why, file=sys.stderr)
        return 0 if why is None else 1
    if args.cmd == "cpu-busy":
        busy = cpu_busy(args.seconds)
        note = "  (other load: figures will be low and noisy)" if busy > 15 else ""
        print(f"{busy:.0f}% of the CPUs busy over {args.seconds:.0f}s before the runs{note}")
        return 0
    if args.cmd == "tree":
        print(" ".join(map(str, tree(args.pid))))
        return 0
    if args.cmd == "run":
        return run(args)
    return table(args.results, args.skipped)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
