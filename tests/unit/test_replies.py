"""Every row of exchange-online.md §6 maps to the right catalogue entry and retry class."""

from __future__ import annotations

import pytest

from smtp365 import replies
from smtp365.errors import SubmissionRejected
from smtp365.models import Reply
from smtp365.replies import Action

# (reply line as seen on the wire, expected key, temporary, action)
CASES = [
    (
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        "Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
        "smtp-auth-disabled-tenant",
        False,
        Action.FIX,
    ),
    (
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the "
        "Mailbox. Visit https://aka.ms/smtp_auth_disabled for more information.",
        "smtp-auth-disabled-mailbox",
        False,
        Action.FIX,
    ),
    (
        "535 5.7.139 Authentication unsuccessful, basic authentication is disabled.",
        "basic-auth-disabled",
        False,
        Action.FIX,
    ),
    (
        "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security "
        "defaults policy. Contact your administrator.",
        "security-defaults",
        False,
        Action.FIX,
    ),
    (
        "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be "
        "authenticated successfully. Contact your administrator.",
        "conditional-access",
        False,
        Action.FIX,
    ),
    (
        "535 5.7.139 Authentication unsuccessful, the user credentials were incorrect.",
        "bad-password",
        False,
        Action.FIX,
    ),
    ("535 5.7.139 Authentication unsuccessful, something new.", "auth-policy", False, Action.FIX),
    (
        "535 5.7.3 Authentication unsuccessful [SY5P282CA0097.AUSP282.PROD.OUTLOOK.COM]",
        "xoauth2-rejected",
        False,
        Action.FIX,
    ),
    ("530 5.7.57 Client not authenticated to send mail", "not-authenticated", False, Action.FIX),
    (
        "530 5.7.57 Client not authenticated to send anonymous mail during MAIL FROM",
        "not-authenticated",
        False,
        Action.FIX,
    ),
    (
        "550 5.7.30 Basic authentication is not supported for Client Submission.",
        "basic-auth-retired",
        False,
        Action.FIX,
    ),
    (
        "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade/update your client to "
        "support TLS 1.2. Visit https://aka.ms/smtp_auth_tls.",
        "tls-too-old",
        False,
        Action.FIX,
    ),
    (
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
        "send-as-denied-mail",
        False,
        Action.FIX,
    ),
    (
        "554 5.2.252 SendAsDenied; info@contoso.com not allowed to send as noreply@contoso.com; "
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
        "send-as-denied-data",
        False,
        Action.FIX,
    ),
    (
        "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
        "send-as-denied-data",
        False,
        Action.FIX,
    ),
    (
        "550 5.2.252 Sender throttled due to continuous send as denied errors",
        "sender-throttled",
        True,
        Action.PAUSE_LONG,
    ),
    (
        "550 5.2.254 Sender throttled due to continuous invalid recipients errors",
        "sender-throttled",
        True,
        Action.PAUSE_LONG,
    ),
    (
        "432 4.3.2 Concurrent connections limit exceeded.",
        "concurrent-connections",
        True,
        Action.FEWER_CONNECTIONS,
    ),
    (
        "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        "concurrent-connections",
        True,
        Action.FEWER_CONNECTIONS,
    ),
    (
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to "
        "process message due to a permanent exception",
        "recipient-quota",
        True,
        Action.PAUSE_MAILBOX,
    ),
    (
        "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException",
        "sender-mailbox-full",
        False,
        Action.FIX,
    ),
    ("550 5.1.8 Access denied, bad outbound sender", "bad-outbound-sender", False, Action.FIX),
    (
        "550 5.7.705 Access denied, tenant has exceeded threshold",
        "tenant-threshold",
        False,
        Action.FIX,
    ),
    (
        "550 5.7.708 Access denied, traffic not accepted from this IP",
        "ip-not-accepted",
        False,
        Action.FIX,
    ),
    (
        "550 5.7.750 Service unavailable. Client blocked from sending from unregistered domains",
        "unregistered-domain",
        False,
        Action.FIX,
    ),
    (
        "451 4.7.500 Access denied, please try again later",
        "access-denied-retry",
        True,
        Action.RETRY,
    ),
    (
        "451 4.7.699 Access denied, please try again later",
        "access-denied-retry",
        True,
        Action.RETRY,
    ),
    (
        "550 5.7.64 TenantAttribution; Relay Access Denied",
        "relay-denied-connector",
        False,
        Action.FIX,
    ),
    (
        "550 5.7.68 TenantInboundAttribution; Direct Send not allowed for this organization",
        "direct-send-disabled",
        False,
        Action.FIX,
    ),
    ("550 5.7.1 Unable to relay", "unable-to-relay", False, Action.FIX),
    ("550 5.4.1 Relay Access Denied", "relay-access-denied", False, Action.FIX),
    ("550 5.7.606 Access denied, banned sending IP [203.0.113.7]", "banned-ip", False, Action.FIX),
    ("550 5.7.649 Access denied, banned sending IP [203.0.113.7]", "banned-ip", False, Action.FIX),
    (
        "504 5.7.4 Unrecognized authentication type [SY5P282CA0097.PROD.OUTLOOK.COM]",
        "auth-before-tls",
        False,
        Action.FIX,
    ),
    ("503 5.5.2 Send hello first", "hello-first", False, Action.FIX),
    (
        "553 5.7.1 <scan@printer.local>: Sender address rejected: not owned by user alice",
        "sender-rejected",
        False,
        Action.FIX,
    ),
    (
        "550 5.7.1 Client does not have permissions to send as this sender",
        "sender-rejected",
        False,
        Action.FIX,
    ),
]


def _reply(line: str) -> Reply:
    code, _, rest = line.partition(" ")
    return Reply.parse(int(code), rest)


@pytest.mark.parametrize(("line", "key", "temporary", "action"), CASES)
def test_catalogue_row(line: str, key: str, temporary: bool, action: Action) -> None:
    entry = replies.lookup(_reply(line))
    assert entry is not None, line
    assert entry.key == key
    assert entry.temporary is temporary
    assert entry.action is action
    assert entry.meaning and entry.fix


# (reply line, the mechanism AUTH used, expected key): one reply, explained per mechanism
MECHANISM_CASES = [
    ("535 5.7.3 Authentication unsuccessful [SY5P282CA0097.PROD.OUTLOOK.COM]", m, key)
    for m, key in (
        ("xoauth2", "xoauth2-rejected"),
        ("XOAUTH2", "xoauth2-rejected"),
        ("login", "password-rejected"),
        ("plain", "password-rejected"),
    )
] + [
    (line, m, key)
    for line, key, _, _ in CASES
    if line.startswith("535 5.7.139")
    for m in ("login", "xoauth2")
]


@pytest.mark.parametrize(("line", "mechanism", "key"), MECHANISM_CASES)
def test_auth_replies_follow_the_mechanism(line: str, mechanism: str, key: str) -> None:
    entry = replies.lookup(_reply(line), mechanism=mechanism)
    assert entry is not None and entry.key == key
    assert not entry.temporary and entry.action is Action.FIX


def test_a_refused_password_is_not_explained_as_a_token() -> None:
    reply = _reply("535 5.7.3 Authentication unsuccessful")
    password = replies.lookup(reply, mechanism="login")
    token = replies.lookup(reply, mechanism="xoauth2")
    assert password is not None and token is not None
    assert "password" in password.meaning and "Basic authentication" in password.meaning
    assert "token" not in password.meaning + password.fix
    assert "New-ServicePrincipal" not in password.fix and "app password" in password.fix
    assert "token" in token.meaning and "password" not in token.meaning + token.fix


def test_every_entry_is_reachable() -> None:
    covered = {key for _, key, _, _ in CASES} | {key for _, _, key in MECHANISM_CASES}
    assert covered == {e.key for e in replies.CATALOGUE}


def test_unknown_reply_has_no_entry() -> None:
    assert replies.lookup(Reply.parse(550, "5.1.1 User unknown")) is None


def test_quota_trap_is_temporary_despite_5xx() -> None:
    reply = _reply("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException")
    err = SubmissionRejected(
        code=reply.code,
        enhanced=reply.enhanced,
        text=reply.text,
        stage="data",
        entry=replies.lookup(reply),
    )
    assert err.temporary is True
    assert "10,000 recipients" in str(err)


def test_unknown_4xx_is_temporary_unknown_5xx_is_not() -> None:
    t = SubmissionRejected(code=451, enhanced="4.4.1", text="whatever", stage="mail")
    p = SubmissionRejected(code=550, enhanced="5.1.1", text="whatever", stage="rcpt")
    assert t.temporary and not p.temporary


def test_reply_parse_multiline_and_missing_enhanced() -> None:
    r = Reply.parse(250, "2.0.0 OK <id@x>\n2.0.0 [Hostname=SY5P]")
    assert (r.code, r.enhanced, r.text) == (250, "2.0.0", "OK <id@x> [Hostname=SY5P]")
    bare = Reply.parse(554, "SendAsDenied; x not allowed")
    assert bare.enhanced == "" and replies.lookup(bare) is not None
    assert str(Reply.parse(221, "2.0.0 Bye")) == "221 2.0.0 Bye"


def test_by_key() -> None:
    assert replies.by_key("tls-too-old").enhanced == ("4.7.66", "4.7.66")
    with pytest.raises(KeyError):
        replies.by_key("nope")
