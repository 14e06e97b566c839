"""Durable enqueues/second of the relay queue: bodies as spool files vs SQLite blobs.

Every enqueue is durable when it returns (fsync'd data, fsync'd directory entry or WAL
commit), exactly as the relay does before answering 250. Storage modes of
``SqliteQueue`` compared in one run, on fresh queues:

* spool   every body a file in spool/ (``inline_max=-1``)
* blob    every body a row in the bodies table (``inline_max`` = 1 GiB)
* hybrid  the default: blobs up to 64 KiB, spool files above

for 10 KB and 1 MB bodies, one enqueue at a time (one SMTP session) and 16 at once
(overlapping sessions, which share commits), then a size sweep to find where the two lines
cross. Figures are printed, never asserted.

    python bench/queue_store.py [--dir DIR] [--scale 1.0]

``--dir`` must be on the disk the relay will use (a tmpfs makes fsync free and the figures
meaningless).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from smtp365.models import Envelope
from smtp365.relay.queue.sqlite import DEFAULT_INLINE_MAX, SqliteQueue

ENVELOPE = Envelope("scanner@printer.test", ("alice@contoso.test",))
MODES = {"spool": -1, "blob": 1 << 30, "hybrid": DEFAULT_INLINE_MAX}


async def enqueue_rate(
    directory: str | None, inline_max: int, body: bytes, n: int, concurrency: int
) -> float:
    with tempfile.TemporaryDirectory(dir=directory, prefix="smtp365-bench-") as tmp:
        queue = await SqliteQueue.open(tmp, inline_max=inline_max)
        try:
            await queue.enqueue(ENVELOPE, body)  # warm up: schema, threads
            per_task = max(n // concurrency, 1)

            async def session() -> None:
                for _ in range(per_task):
                    await queue.enqueue(ENVELOPE, body)

            start = time.perf_counter()
            await asyncio.gather(*(session() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
        finally:
            await queue.close()
        return per_task * concurrency / elapsed


def body_of(size: int) -> bytes:
    return os.urandom(size)


async def main(directory: str | None, scale: float) -> None:
    print(
        f"durable enqueues/s, queue in {directory or tempfile.gettempdir()}, {os.cpu_count()} CPUs"
    )
    print(f"{'body':>8} {'sessions':>8} {'spool':>9} {'blob':>9} {'hybrid':>9} {'spool/blob':>11}")
    for size, n in ((10_000, 1500), (1_000_000, 120)):
        body = body_of(size)
        for concurrency in (1, 16):
            count = max(int(n * scale), concurrency)
            rates = {
                mode: await enqueue_rate(directory, limit, body, count, concurrency)
                for mode, limit in MODES.items()
            }
            print(
                f"{_size(size):>8} {concurrency:>8}"
                + "".join(f" {rates[m]:>9,.0f}" for m in MODES)
                + f" {rates['spool'] / rates['blob']:>11.2f}"
            )
    print("\nsize sweep, one session: where spool files start to beat blobs")
    print(f"{'body':>8} {'spool':>9} {'blob':>9} {'spool/blob':>11}")
    for size in (32_000, 64_000, 128_000, 256_000, 512_000):
        body = body_of(size)
        count = max(int(300 * scale), 10)
        spool = await enqueue_rate(directory, MODES["spool"], body, count, 1)
        blob = await enqueue_rate(directory, MODES["blob"], body, count, 1)
        print(f"{_size(size):>8} {spool:>9,.0f} {blob:>9,.0f} {spool / blob:>11.2f}")


def _size(size: int) -> str:
    return f"{size // 1_000_000} MB" if size >= 1_000_000 else f"{size // 1000} KB"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="where to create the queues (default: the temp dir)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    args = parser.parse_args()
    asyncio.run(main(args.dir, args.scale))
