"""A token cache file: per account, mode 0600, locked across processes, optionally encrypted."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from smtp365.errors import AuthError

_MAGIC = b"smtp365-fernet-v1\n"


class CacheFile:
    """Reads and writes a token cache blob atomically under an exclusive ``flock``."""

    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path = path
        self._fernet = (
            Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest())) if key else None
        )

    def __repr__(self) -> str:
        return f"CacheFile({str(self.path)!r}, encrypted={self._fernet is not None})"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the cache's lock (a sibling ``.lock`` file) for a read-modify-write."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(
            self.path.with_suffix(self.path.suffix + ".lock"), os.O_CREAT | os.O_RDWR, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def read(self) -> str | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if data.startswith(_MAGIC):
            if self._fernet is None:
                raise AuthError(
                    f"the token cache {self.path} is encrypted but no cache key is configured",
                    fix="set cache_key_env or cache_key_file, or delete the cache "
                    "(smtp365 auth logout)",
                )
            try:
                data = self._fernet.decrypt(data[len(_MAGIC) :])
            except InvalidToken:
                raise AuthError(
                    f"the token cache {self.path} cannot be decrypted with the configured key",
                    fix="use the key it was written with, or `smtp365 auth logout` to start over",
                ) from None
        return data.decode("utf-8")

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        if self._fernet is not None:
            data = _MAGIC + self._fernet.encrypt(data)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        os.chmod(self.path, 0o600)

    def delete(self) -> bool:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True
