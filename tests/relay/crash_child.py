"""Child process of test_queue_crash: enqueue forever; print ``<queue id> <index>`` once each
enqueue has returned (that is the moment the listener would say 250)."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys

from smtp365.models import Envelope
from smtp365.relay.queue.sqlite import SqliteQueue

ENVELOPE = Envelope("device@printer.test", ("alice@contoso.test",))
CONCURRENCY = 4


def content(index: int) -> bytes:
    """Deterministic per index: inline and spooled sizes, bare CR/LF, 8-bit bytes."""
    size = 150_000 + index % 7 * 1000 if index % 3 == 0 else 500 + index * 7919 % 20_000
    head = f"Message-ID: <{index}@crash.test>\r\nSubject: \u00e9 {index}\r\n\r\n".encode()
    pattern = bytes((index * 31 + i) % 256 for i in range(251)) + b"\r\n.\r\n\n\r"
    body = pattern * (size // len(pattern) + 1)
    return head + body[: max(size - len(head), 0)]


async def main(root: str, start: int) -> None:
    queue = await SqliteQueue.open(root)
    counter = itertools.count(start)

    async def sender() -> None:
        while True:
            index = next(counter)
            data = content(index)
            if index % 4 == 1:  # the listener's way: a file in incoming/, moved in
                path = queue.incoming_dir / f"session-{index}.eml"
                path.write_bytes(data)
                qid = await queue.enqueue(ENVELOPE, path, message_id=f"<{index}@crash.test>")
            else:
                qid = await queue.enqueue(ENVELOPE, data, message_id=f"<{index}@crash.test>")
            os.write(1, f"{qid} {index}\n".encode())

    await asyncio.gather(*(sender() for _ in range(CONCURRENCY)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
