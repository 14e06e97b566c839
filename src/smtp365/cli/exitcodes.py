"""Exit codes (sysexits.h), so cron jobs and scripts can tell failures apart."""

from __future__ import annotations

from smtp365.errors import (
    AuthenticationRejected,
    AuthError,
    ConfigError,
    MessageError,
    QueueError,
    Smtp365Error,
    SubmissionRejected,
    TLSError,
    TransportError,
)

OK = 0  # sent (accepted by the server)
USAGE = 64  # EX_USAGE: wrong command-line use
DATAERR = 65  # EX_DATAERR: the message or an address is unusable
NOINPUT = 66  # EX_NOINPUT: an input file is missing or unreadable
UNAVAILABLE = 69  # EX_UNAVAILABLE: the server refused permanently (5xx)
SOFTWARE = 70  # EX_SOFTWARE: an internal error
IOERR = 74  # EX_IOERR: the relay's queue could not be read or written
TEMPFAIL = 75  # EX_TEMPFAIL: try again later (4xx, network, quota window)
PROTOCOL = 76  # EX_PROTOCOL: TLS could not be established safely
NOPERM = 77  # EX_NOPERM: authentication refused or no credentials
CONFIG = 78  # EX_CONFIG: configuration error


def for_error(exc: Smtp365Error) -> int:
    """The exit code for ``exc``; temporary failures are always 75."""
    if isinstance(exc, ConfigError):
        return CONFIG
    if isinstance(exc, MessageError):
        return DATAERR
    if exc.temporary and not isinstance(exc, TLSError):
        return TEMPFAIL
    if isinstance(exc, AuthError | AuthenticationRejected):
        return NOPERM
    if isinstance(exc, SubmissionRejected):
        return UNAVAILABLE
    if isinstance(exc, TLSError):
        return PROTOCOL
    if isinstance(exc, TransportError):
        return TEMPFAIL
    if isinstance(exc, QueueError):
        return IOERR
    if isinstance(exc, ValueError):  # bad input given on the command line (e.g. a domain)
        return USAGE
    return SOFTWARE


TABLE = [
    (OK, "sent: the server accepted the message"),
    (USAGE, "the command line is wrong"),
    (DATAERR, "the message or an address is unusable"),
    (NOINPUT, "an input file is missing or unreadable"),
    (UNAVAILABLE, "the server refused the message permanently (5xx)"),
    (SOFTWARE, "internal error (please report it)"),
    (IOERR, "the relay's queue could not be used (see the message; storage trouble is 75)"),
    (TEMPFAIL, "temporary failure: network, timeout, 4xx, quota window; try again later"),
    (PROTOCOL, "TLS could not be established safely (certificate, STARTTLS missing or tampered)"),
    (NOPERM, "authentication refused or no credentials"),
    (CONFIG, "configuration error (run `smtp365 config check`)"),
]
