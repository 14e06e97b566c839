"""Transports: how a :class:`~smtp365.models.Submission` reaches Exchange Online."""

from __future__ import annotations

from typing import Protocol

from smtp365.models import DeliveryOutcome, Submission
from smtp365.transport.smtp import SmtpTransport, check_address, make_tls_context


class Transport(Protocol):
    """Submits messages; raises only smtp365 errors."""

    async def submit(self, submission: Submission) -> DeliveryOutcome: ...

    async def close(self) -> None: ...


__all__ = ["SmtpTransport", "Transport", "check_address", "make_tls_context"]
