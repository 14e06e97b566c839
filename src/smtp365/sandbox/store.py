"""Captured mail: one ``.eml`` per accepted message plus a JSON-lines index.

Layout under ``messages_dir``: ``<id>.eml`` (written to a temporary name, then
renamed) and ``index.jsonl`` (one JSON object per line, appended with a single
``write`` after the ``.eml`` exists). Another process may read while the
sandbox writes: readers skip an unfinished last line and entries whose file is
gone (after :meth:`MessageStore.clear`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MessageStore", "StoredMessage"]

INDEX_FILE = "index.jsonl"


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One index entry."""

    id: str
    received_at: str
    """ISO 8601, UTC."""
    mailbox: str
    """The authenticated mailbox."""
    mechanism: str
    """``LOGIN`` or ``XOAUTH2``."""
    mail_from: str
    rcpt_tos: list[str]
    message_id: str
    """The ``Message-ID`` header (``""`` when absent)."""
    subject: str
    size: int
    tls_version: str
    smtp_id: str
    """The id quoted in the ``250 2.0.0 OK <...>`` reply."""
    path: str
    """Absolute path of the ``.eml`` file."""
    app_id: str = ""
    """For XOAUTH2: the token's ``appid``."""
    body: str = "7BIT"
    """``BODY=`` of MAIL FROM (``7BIT``, ``8BITMIME``, ``BINARYMIME``)."""
    smtputf8: bool = False
    chunking: bool = False
    """Sent with BDAT instead of DATA."""
    dsn: dict[str, Any] = field(default_factory=dict)
    """``ret``/``envid`` from MAIL FROM, ``notify``/``orcpt`` per recipient."""

    def read_bytes(self) -> bytes:
        return Path(self.path).read_bytes()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoredMessage:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class MessageStore:
    """Read and write the captured mail of one state directory."""

    def __init__(self, messages_dir: Path) -> None:
        self.dir = Path(messages_dir).resolve()
        self.index_file = self.dir / INDEX_FILE
        self._lock = threading.Lock()

    def add(
        self,
        content: bytes,
        *,
        mailbox: str,
        mechanism: str,
        mail_from: str,
        rcpt_tos: Sequence[str],
        message_id: str,
        subject: str,
        tls_version: str,
        smtp_id: str,
        app_id: str = "",
        body: str = "7BIT",
        smtputf8: bool = False,
        chunking: bool = False,
        dsn: Mapping[str, Any] | None = None,
        received_at: dt.datetime | None = None,
    ) -> StoredMessage:
        """Write the message, then its index line; returns the entry."""
        when = received_at or dt.datetime.now(dt.UTC)
        msg_id = f"{when.strftime('%Y%m%dT%H%M%S%f')}-{secrets.token_hex(4)}"
        path = self.dir / f"{msg_id}.eml"
        entry = StoredMessage(
            id=msg_id,
            received_at=when.isoformat().replace("+00:00", "Z"),
            mailbox=mailbox,
            mechanism=mechanism,
            mail_from=mail_from,
            rcpt_tos=list(rcpt_tos),
            message_id=message_id,
            subject=subject,
            size=len(content),
            tls_version=tls_version,
            smtp_id=smtp_id,
            path=str(path),
            app_id=app_id,
            body=body,
            smtputf8=smtputf8,
            chunking=chunking,
            dsn=dict(dsn or {}),
        )
        line = (json.dumps(entry.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{msg_id}.tmp"
            with tmp.open("wb") as fh:
                fh.write(content)
            os.replace(tmp, path)
            fd = os.open(self.index_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return entry

    def list(self) -> list[StoredMessage]:
        """All captured messages, oldest first."""
        try:
            raw = self.index_file.read_bytes()
        except FileNotFoundError:
            return []
        found: list[StoredMessage] = []
        for chunk in raw.split(b"\n")[:-1]:  # the part after the last newline is unfinished
            try:
                entry = StoredMessage.from_dict(json.loads(chunk))
            except (ValueError, TypeError):
                continue
            if Path(entry.path).exists():
                found.append(entry)
        return found

    def get(self, msg_id: str) -> StoredMessage:
        """The entry with ``msg_id``; ``KeyError`` if unknown."""
        for entry in self.list():
            if entry.id == msg_id:
                return entry
        raise KeyError(msg_id)

    def content(self, msg_id: str) -> bytes:
        return self.get(msg_id).read_bytes()

    def clear(self) -> None:
        """Forget every captured message."""
        with self._lock:
            if not self.dir.exists():
                return
            with self.index_file.open("wb"):
                pass
            for path in self.dir.glob("*.eml"):
                path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.list())
