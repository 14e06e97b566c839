"""How long `smtp365 doctor` takes: a healthy full run, and a port that drops packets.

    python bench/doctor_time.py [--runs 5] [--timeout 3]

The sandbox runs in its own process. The "dropped packets" port is a listening socket
whose accept queue is full, so the kernel drops further SYNs: exactly what a firewall that
silently eats port 587 looks like. The doctor must report it right at its timeout, never hang.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from smtp365 import sandbox
from smtp365.config import load
from smtp365.doctor import run_doctor


def _serve(state_dir: str, ready: Any) -> None:
    sandbox.run(Path(state_dir), None, on_ready=lambda _: ready.set())


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts no new connection: SYNs are dropped."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the (tiny) accept queue; later SYNs get no answer
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    try:
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


def _config(tmp: Path, text: str) -> Path:
    path = tmp / f"cfg-{time.monotonic_ns()}.toml"
    path.write_text(text)
    return path


async def main(runs: int, timeout: float) -> None:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        ready = multiprocessing.Event()
        proc = multiprocessing.Process(target=_serve, args=(tmp_s, ready), daemon=True)
        proc.start()
        try:
            if not ready.wait(30):
                raise SystemExit("sandbox did not start")
            info = sandbox.read_info(tmp)
            app = next(a for a in info["apps"] if not a["public_client"])
            os.environ["BENCH_SECRET"] = app["client_secret"]
            healthy = _config(
                tmp,
                "\n".join(
                    [
                        "[accounts.default]",
                        'profile = "custom"',
                        'host = "localhost"',
                        f"port = {info['smtp']['port']}",
                        f"ca_file = {json.dumps(info['ca_file'])}",
                        'username = "alice@contoso.test"',
                        'auth = "xoauth2"',
                        f"tenant = {json.dumps(info['tenant_id'])}",
                        f"client_id = {json.dumps(app['app_id'])}",
                        'client_secret_env = "BENCH_SECRET"',
                        f'authority_host = "https://localhost:{info["identity"]["port"]}"',
                        f"token_cache = {json.dumps(str(tmp / 'cache.json'))}",
                    ]
                )
                + "\n",
            )
            settings = load(healthy, env={"HOME": tmp_s})
            times = []
            for _ in range(runs):  # later runs reuse the cached token
                t0 = time.perf_counter()
                report = await run_doctor(settings, dns=False, timeout=timeout)
                times.append(time.perf_counter() - t0)
                if not report.ok:
                    raise SystemExit(report.to_markdown())
            with black_hole() as port:
                dropped = load(
                    _config(
                        tmp,
                        "\n".join(
                            [
                                "[accounts.default]",
                                'profile = "custom"',
                                'host = "127.0.0.1"',
                                f"port = {port}",
                                'username = "alice@contoso.test"',
                                'token = "x"',
                            ]
                        )
                        + "\n",
                    ),
                    env={"HOME": tmp_s},
                )
                t0 = time.perf_counter()
                report = await run_doctor(dropped, dns=False, timeout=timeout)
                total = time.perf_counter() - t0
            tcp = report.get("tcp.connect")
        finally:
            proc.terminate()
            proc.join(10)
    print(f"doctor_time: sandbox in its own process on 127.0.0.1; timeout {timeout:g} s")
    print(
        f"healthy full run (config..send-as, {runs} runs): first {times[0]:.3f} s, "
        f"median {statistics.median(times):.3f} s, max {max(times):.3f} s"
    )
    print(
        f"dropped-packet port: tcp.connect {tcp.status.value} after "
        f"{tcp.elapsed_ms / 1000:.3f} s (timeout {timeout:g} s), whole run {total:.3f} s"
    )
    print(f"  -> reported at {tcp.elapsed_ms / 1000 / timeout:.2f}x the timeout")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.timeout))
