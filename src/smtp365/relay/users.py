"""Local relay users: argon2 password hashes and the envelope senders each may use.

The file (JSON, mode 0600, written atomically: temporary file, fsync, rename, fsync of the
directory) looks like::

    {"version": 1,
     "users": {"scanner": {"hash": "$argon2id$...", "senders": ["scanner@example.com",
                                                                 "*@printers.example.com"]}}}

Passwords never appear in the file, in logs or in ``repr()``; :meth:`UserDB.verify` is
constant-time through argon2 (an unknown user is checked against a dummy hash so that the
time taken does not reveal which users exist).

A running relay sees changes at once: :meth:`UserDB.verify` first looks at the file (one
``stat``: inode, size, modification time) and reads it again when it changed, so
``smtp365 relay passwd`` (another process) takes effect at the next AUTH, in each of the
relay's processes. A file that cannot be read or parsed then lets nobody in (logged once
per change) until it is fixed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from smtp365.errors import ConfigError

__all__ = ["RelayUser", "UserDB", "sender_allowed"]

_VERSION = 1

log = logging.getLogger("smtp365.relay.users")

_Stamp = tuple[int, int, int] | None  # (inode, size, mtime_ns) of the file read; None: none


def sender_allowed(rules: Iterable[str], address: str) -> bool:
    """Whether ``address`` (a reverse path without brackets; ``""`` for ``<>``) matches one of
    ``rules``: an exact address, ``*@domain``, ``*`` (any sender) or ``<>`` (the null sender).
    Comparison is case-insensitive."""
    if address == "":
        return "<>" in rules
    addr = address.lower()
    _, at, domain = addr.rpartition("@")
    for rule in rules:
        r = rule.strip().lower()
        if r == "*" or r == addr:
            return True
        if at and r.startswith("*@") and r[2:] == domain:
            return True
    return False


@dataclass(frozen=True, slots=True)
class RelayUser:
    name: str
    password_hash: str  # argon2 encoded hash (never a password)
    senders: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"RelayUser(name={self.name!r}, senders={self.senders!r})"

    def may_send_as(self, address: str) -> bool:
        return sender_allowed(self.senders, address)


def _stamp_of(path: Path) -> _Stamp:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def _check_name(user: str) -> None:
    if not user or len(user) > 256 or any(c in user for c in "\x00\r\n") or user != user.strip():
        raise ConfigError(f"invalid relay user name {user!r}")


class UserDB:
    """The users file. :meth:`add`/:meth:`remove` rewrite it atomically; :meth:`verify`
    reads it again whenever it changed on disk (:meth:`refresh`)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.path = Path(path)
        self._hasher = hasher or PasswordHasher()
        self._lock = threading.Lock()
        self._users: dict[str, RelayUser] = {}
        self._stamp: _Stamp = None
        self._dummy_hash = ""  # made at the first verify: hashing takes argon2's 64 MiB
        self.reload()

    def __repr__(self) -> str:
        return f"UserDB({str(self.path)!r}, {len(self._users)} users)"

    # ------------------------------------------------------------------ file

    def refresh(self) -> bool:
        """Read the file again if it changed since it was read (another process ran
        ``smtp365 relay passwd``); returns whether it did. Never raises: a file that cannot
        be read lets nobody in until it is fixed."""
        stamp = _stamp_of(self.path)
        if stamp == self._stamp:
            return False
        with self._lock:
            if _stamp_of(self.path) == self._stamp:
                return False
            try:
                self.reload()
            except ConfigError as exc:
                self._users = {}
                self._stamp = stamp  # logged once per change of the file
                log.error("relay users file unusable, no AUTH succeeds until fixed: %s", exc)
                return True
        log.info("relay users file %s changed: %d user(s)", self.path, len(self._users))
        return True

    def reload(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self._users = {}
            self._stamp = None
            return
        except OSError as exc:
            raise ConfigError(f"cannot read the relay users file {self.path}: {exc}") from exc
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            mode = info.st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(
                    f"the relay users file {self.path} is readable by others "
                    f"(mode {stat.S_IMODE(mode):04o})",
                    fix=f"chmod 600 {self.path}",
                )
            raw = fh.read()
        try:
            doc = json.loads(raw)
            users = {
                name: RelayUser(
                    name=name,
                    password_hash=str(entry["hash"]),
                    senders=tuple(str(s) for s in entry.get("senders", ())),
                )
                for name, entry in doc["users"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"the relay users file {self.path} is damaged: {exc}") from exc
        self._users = users
        self._stamp = (info.st_ino, info.st_size, info.st_mtime_ns)

    def _save(self, users: dict[str, RelayUser]) -> None:
        doc = {
            "version": _VERSION,
            "users": {
                u.name: {"hash": u.password_hash, "senders": list(u.senders)}
                for u in sorted(users.values(), key=lambda u: u.name)
            },
        }
        data = json.dumps(doc, indent=1).encode() + b"\n"
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{self.path.name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        self._stamp = _stamp_of(self.path)  # our own change: nothing to read again
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # ------------------------------------------------------------------ API

    def add(self, user: str, password: str, senders: Iterable[str] = ()) -> RelayUser:
        """Create ``user`` or replace their password and senders; saved before returning."""
        _check_name(user)
        if not password:
            raise ConfigError("a relay user needs a non-empty password")
        entry = RelayUser(user, self._hasher.hash(password), tuple(senders))
        with self._lock:
            users = dict(self._users)
            users[user] = entry
            self._save(users)
            self._users = users
        return entry

    def remove(self, user: str) -> bool:
        with self._lock:
            if user not in self._users:
                return False
            users = dict(self._users)
            del users[user]
            self._save(users)
            self._users = users
        return True

    def get(self, user: str) -> RelayUser | None:
        return self._users.get(user)

    def names(self) -> list[str]:
        return sorted(self._users)

    def __len__(self) -> int:
        return len(self._users)

    def verify(self, user: str, password: str) -> bool:
        """Whether ``password`` is ``user``'s, by the file as it is now (:meth:`refresh`).
        CPU-bound (argon2) and reads the disk: call it off the event loop."""
        self.refresh()
        if not self._dummy_hash:
            with self._lock:
                if not self._dummy_hash:
                    self._dummy_hash = self._hasher.hash("smtp365-dummy-password")
        entry = self._users.get(user)
        encoded = entry.password_hash if entry is not None else self._dummy_hash
        try:
            ok = self._hasher.verify(encoded, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return bool(ok) and entry is not None
