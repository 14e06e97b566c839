"""Queue ids: 26-character ULID-style strings (Crockford base32).

48 bits of milliseconds since the epoch followed by 80 random bits, so ids sort by
arrival time as plain strings, are unique across processes sharing a queue, and are
safe in file names and log lines. Within one generator they are strictly increasing,
even when the clock stands still or steps back (the ULID "monotonic" rule).
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_RANDOM_MAX = (1 << _RANDOM_BITS) - 1
ID_PATTERN = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")


def encode(value: int) -> str:
    """Encode a 128-bit integer as 26 Crockford base32 characters."""
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def is_queue_id(text: str) -> bool:
    """Whether ``text`` looks like an id this module makes (guards paths built from ids)."""
    return ID_PATTERN.match(text) is not None


class IdGenerator:
    """Makes strictly increasing ids from ``clock`` (seconds since the epoch)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_random = 0

    def __call__(self) -> str:
        with self._lock:
            ms = max(int(self._clock() * 1000), 0)
            if ms <= self._last_ms:
                ms = self._last_ms
                random = self._last_random + 1
                if random > _RANDOM_MAX:
                    ms += 1
                    random = secrets.randbits(_RANDOM_BITS - 1)
            else:
                # Leave headroom so increments within one millisecond never overflow.
                random = secrets.randbits(_RANDOM_BITS - 1)
            self._last_ms, self._last_random = ms, random
            return encode((ms << _RANDOM_BITS) | random)
