"""A minimal durable SMTP server: aiosmtpd, each message written to its own file and fsync'd
before the 250. It forwards nothing. It is the floor that `bench/relay_vs_postfix.sh
--baseline-aiosmtpd` measures next to Postfix: what plain asyncio SMTP plus one fsync per
message costs on this machine, with no queue database and no delivery.

    python bench/aiosmtpd_fsync_server.py --port 2600 --spool /tmp/spool

Runs in the foreground until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP


class FsyncHandler:
    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.seq = itertools.count(1)

    def _store(self, name: str, data: bytes) -> None:
        fd = os.open(self.spool / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        content = envelope.original_content or envelope.content
        data = content if isinstance(content, bytes) else content.encode()
        # the fsync runs in a thread so that parallel sessions wait on the disk in parallel,
        # as Postfix's cleanup processes do
        await asyncio.to_thread(self._store, f"{os.getpid()}.{next(self.seq)}", data)
        return "250 2.0.0 Ok: stored"


async def serve(host: str, port: int, spool: Path) -> None:
    spool.mkdir(parents=True, exist_ok=True)
    handler = FsyncHandler(spool)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="baseline.bench", decode_data=False), host, port
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spool", type=Path, required=True, help="one file per message")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.spool))


if __name__ == "__main__":
    main()
