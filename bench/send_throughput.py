"""Messages/second and latency: one reused connection vs a new connection per message.

Runs against the sandbox (real TLS, real XOAUTH2, real aiosmtpd) in its own process, both modes
in one invocation, so the ratio between them is meaningful on a noisy machine even when the
absolute figures are not.

    python bench/send_throughput.py [-n 300]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

from smtp365 import Mailer, sandbox
from smtp365.config import Account
from smtp365.config.model import resolve
from smtp365.sandbox import SandboxSettings
from smtp365.sandbox.settings import LimitSettings

MAILBOX = "alice@contoso.test"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _serve(state_dir: str, ready: Any) -> None:
    limits = LimitSettings(
        messages_per_minute=10**9, recipients_per_day=10**9, max_connections=10**6
    )
    sandbox.run(Path(state_dir), SandboxSettings(limits=limits), on_ready=lambda _: ready.set())


async def run(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ready = multiprocessing.Event()
        server = multiprocessing.Process(target=_serve, args=(tmp, ready), daemon=True)
        server.start()
        try:
            if not ready.wait(30):
                raise SystemExit("the sandbox did not start")
            info = sandbox.read_info(Path(tmp))
            account = resolve(
                "bench",
                Account.model_validate(
                    {
                        "profile": "custom",
                        "host": "localhost",
                        "port": info["smtp"]["port"],
                        "ca_file": info["ca_file"],
                        "username": MAILBOX,
                        "auth": "xoauth2",
                        "token": sandbox.mint_token(Path(tmp), MAILBOX),
                    }
                ),
                "(bench)",
            )
            body = "x" * 2000

            async def reused() -> list[float]:
                lat = []
                async with Mailer(account) as m:
                    await m.send(to="warm@example.net", text=body)  # connection set up
                    for i in range(n):
                        t0 = time.perf_counter()
                        await m.send(to="r@example.net", subject=f"r{i}", text=body)
                        lat.append(time.perf_counter() - t0)
                return lat

            async def fresh() -> list[float]:
                lat = []
                for i in range(n):
                    t0 = time.perf_counter()
                    async with Mailer(account) as m:
                        await m.send(to="f@example.net", subject=f"f{i}", text=body)
                    lat.append(time.perf_counter() - t0)
                return lat

            results = {}
            for name, fn in (("reused connection", reused), ("new connection/msg", fresh)):
                t0 = time.perf_counter()
                lat = await fn()
                wall = time.perf_counter() - t0
                results[name] = (n / wall, _pct(lat, 0.5) * 1000, _pct(lat, 0.99) * 1000)
        finally:
            server.terminate()
            server.join(10)

    print(
        f"send_throughput: {n} messages of ~2 KB per mode; sandbox in its own process on "
        "127.0.0.1; STARTTLS + XOAUTH2"
    )
    print(f"{'mode':22} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (rate, p50, p99) in results.items():
        print(f"{name:22} {rate:8.1f} {p50:8.2f} {p99:8.2f}")
    (r_rate, r50, _), (f_rate, f50, _) = results.values()
    print(
        f"ratio reused/new: throughput x{r_rate / f_rate:.2f}, p50 latency x{f50 / r50:.2f} lower"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300, help="messages per mode")
    asyncio.run(run(parser.parse_args().n))


if __name__ == "__main__":
    main()
