"""Per client address: open connections and recent AUTH failures, counted once for all the
relay's processes.

With ``processes = 2`` a client's connections land on either process (the kernel picks),
so counters kept per process would let an address have twice ``max_connections_per_client``
connections and twice ``auth_failures_per_minute`` guesses. The main process therefore
makes one table per listener in shared memory (a ``memfd``) and its intake processes
inherit it, as they inherit the listening sockets.

The table is a fixed open-addressing hash table of :data:`ClientTable.SLOTS` slots. A slot
holds a 16-byte key (a hash of the address), the number of open connections and a ring of
the times of the last :data:`ClientTable.RING` failed AUTHs. A slot whose address has no
connection and no failure in the last minute is reused for another address; keys are never
cleared, so probe chains stay intact. Every operation runs under an ``fcntl`` lock on the
whole table (record locks are per process, which is what is wanted here; inside one process
the operations never yield to the event loop). Pages are touched only as slots are used.

If more than :data:`ClientTable.PROBE` busy addresses collide, a new address goes
uncounted (logged once): per-address limits cannot stop someone holding thousands of
addresses anyway; the listener's other limits and fail2ban do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterator

__all__ = ["ClientTable"]

log = logging.getLogger("smtp365.relay.listener")

_HEAD = struct.Struct("<16siI")  # key, open connections, next ring position
_EMPTY = bytes(16)
_NEVER = float("-inf")


class ClientTable:
    """Connections and AUTH failures per client address (see the module docstring)."""

    SLOTS = 8192
    PROBE = 64
    RING = 32  # the most failures per minute an address can be held to
    WINDOW = 60.0
    _RING = struct.Struct(f"<{RING}d")
    _SLOT = _HEAD.size + _RING.size

    def __init__(
        self, fd: int | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """A private table, or the shared one behind ``fd`` (see :meth:`shared`)."""
        self._fd = fd
        size = self.size()
        self._map = mmap.mmap(-1, size) if fd is None else mmap.mmap(fd, size)
        self._clock = clock
        self._warned = False

    @classmethod
    def shared(cls) -> ClientTable:
        """A table in shared memory; pass :meth:`fileno` to the processes that share it."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("smtp365-clients", os.MFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            with tempfile.TemporaryFile() as f:
                fd = os.dup(f.fileno())
        try:
            os.ftruncate(fd, cls.size())
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def size(cls) -> int:
        """Bytes of shared memory (touched only as slots are used)."""
        return cls.SLOTS * cls._SLOT

    def fileno(self) -> int | None:
        return self._fd

    def close(self) -> None:
        """Release the table. A session still closing after this counts nothing."""
        self._map.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ---------------------------------------------------------------- counting

    def connect(self, ip: str) -> int:
        """Count a new connection from ``ip``; returns its open connections, this one included
        (0 if the address could not be tracked)."""
        with self._locked():
            slot = self._slot(ip, create=True)
            if slot is None:
                return 0
            key, conns, pos = _HEAD.unpack_from(self._map, slot)
            _HEAD.pack_into(self._map, slot, key, conns + 1, pos)
            return int(conns + 1)

    def disconnect(self, ip: str) -> None:
        with self._locked():
            slot = self._slot(ip, create=False)
            if slot is not None:
                key, conns, pos = _HEAD.unpack_from(self._map, slot)
                _HEAD.pack_into(self._map, slot, key, max(0, conns - 1), pos)

    def connections(self, ip: str) -> int:
        with self._locked():
            slot = self._slot(ip, create=False)
            return 0 if slot is None else int(_HEAD.unpack_from(self._map, slot)[1])

    def auth_failures(self, ip: str) -> int:
        """Failed AUTHs from ``ip`` in the last minute, over all processes."""
        with self._locked():
            slot = self._slot(ip, create=False)
            return 0 if slot is None else self._recent(slot, self._clock())

    def add_auth_failure(self, ip: str) -> int:
        """Record a failed AUTH; returns the failures of ``ip`` in the last minute."""
        now = self._clock()
        with self._locked():
            slot = self._slot(ip, create=True)
            if slot is None:
                return 1
            key, conns, pos = _HEAD.unpack_from(self._map, slot)
            struct.pack_into("<d", self._map, slot + _HEAD.size + 8 * pos, now)
            _HEAD.pack_into(self._map, slot, key, conns, (pos + 1) % self.RING)
            return self._recent(slot, now)

    # ---------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._fd is None:  # private to this process, or closed
            yield
            return
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _recent(self, slot: int, now: float) -> int:
        since = now - self.WINDOW
        return sum(1 for t in self._RING.unpack_from(self._map, slot + _HEAD.size) if t > since)

    def _idle(self, slot: int, now: float) -> bool:
        return _HEAD.unpack_from(self._map, slot)[1] <= 0 and self._recent(slot, now) == 0

    def _slot(self, ip: str, *, create: bool) -> int | None:
        """The offset of ``ip``'s slot; with ``create``, claim one (an unused or idle slot
        in its probe window) if it has none."""
        if self._map.closed:
            return None
        key = hashlib.blake2b(ip.encode("utf-8", "replace"), digest_size=16).digest()
        start = int.from_bytes(key[:4], "little") % self.SLOTS
        mm = self._map
        free: int | None = None
        now = self._clock()
        for i in range(self.PROBE):
            slot = ((start + i) % self.SLOTS) * self._SLOT
            found = mm[slot : slot + 16]
            if found == key:
                return slot
            if found == _EMPTY:  # never used: the chain ends here
                if free is None:
                    free = slot
                break
            if create and free is None and self._idle(slot, now):
                free = slot
        if not create:
            return None
        if free is None:
            if not self._warned:
                self._warned = True
                log.warning(
                    "client table: %d busy addresses collide; new ones go uncounted", self.PROBE
                )
            return None
        _HEAD.pack_into(mm, free, key, 0, 0)
        self._RING.pack_into(mm, free + _HEAD.size, *([_NEVER] * self.RING))
        return free
