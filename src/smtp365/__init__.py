"""smtp365: send mail through Microsoft 365 / Exchange Online, and learn why when it fails.

The public surface is what this module exports; everything else is private.
"""

from smtp365.client import Mailer, SyncMailer, build_message, send, send_sync
from smtp365.errors import (
    AuthenticationRejected,
    AuthError,
    ConfigError,
    ConnectError,
    MessageError,
    ProtocolError,
    Smtp365Error,
    StartTLSInjection,
    StartTLSUnavailable,
    SubmissionRejected,
    TLSError,
    TLSModeMismatch,
    TransportError,
    TransportTimeout,
)
from smtp365.models import DeliveryOutcome, Envelope, Reply, Submission

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "AuthenticationRejected",
    "ConfigError",
    "ConnectError",
    "DeliveryOutcome",
    "Envelope",
    "Mailer",
    "MessageError",
    "ProtocolError",
    "Reply",
    "Smtp365Error",
    "StartTLSInjection",
    "StartTLSUnavailable",
    "Submission",
    "SubmissionRejected",
    "SyncMailer",
    "TLSError",
    "TLSModeMismatch",
    "TransportError",
    "TransportTimeout",
    "__version__",
    "build_message",
    "send",
    "send_sync",
]
