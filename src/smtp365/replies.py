"""The Exchange Online reply catalogue: what each server reply means and how to fix it.

Entries are matched on the enhanced status code (exact or a range) plus, where
one enhanced code covers several causes, a fragment of the reply text. Order
matters: the first entry that matches wins, so the specific ``5.7.139``
variants stand before the generic one.

A reply to ``AUTH`` can mean different things for different mechanisms: ``535 5.7.3``
after XOAUTH2 is a token the server would not take, after LOGIN a password it would not
take. Such rows name their ``mechanisms``; :func:`lookup` given the mechanism that was
used skips the rows of the others.

``temporary`` is the truth for retry decisions, not the reply class: the
catalogue knows the traps (``554 5.2.0 SubmissionQuotaExceeded`` is a 5xx that
clears in hours; ``432 4.3.2`` means "use fewer connections"). ``action`` tells
a relay *how* to retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from smtp365.models import Reply


class Action(StrEnum):
    """How a sender should react to a reply."""

    FIX = "fix"  # permanent: nothing changes until someone fixes the cause
    RETRY = "retry"  # temporary: back off and try again
    FEWER_CONNECTIONS = "fewer-connections"  # temporary: close connections, then retry
    PAUSE_MAILBOX = "pause-mailbox"  # temporary: the mailbox's quota window must free up
    PAUSE_LONG = "pause-long"  # temporary but long: mailbox blocked after repeated errors


def _ver(code: str) -> tuple[int, int, int]:
    a, b, c = code.split(".")
    return int(a), int(b), int(c)


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """One row of the catalogue."""

    key: str
    codes: tuple[int, ...]  # basic reply codes this row is seen with; empty = any
    enhanced: tuple[str, str]  # inclusive range of enhanced codes, e.g. ("5.2.251", "5.2.255")
    fragments: tuple[str, ...]  # any of these (case-insensitive) must occur; empty = any text
    meaning: str
    fix: str
    temporary: bool
    action: Action
    mechanisms: tuple[str, ...] = ()  # lower-case AUTH mechanisms this row explains; empty = any

    def matches(self, reply: Reply, *, mechanism: str | None = None) -> bool:
        if self.codes and reply.code not in self.codes:
            return False
        if mechanism is not None and self.mechanisms and mechanism.lower() not in self.mechanisms:
            return False
        if not reply.enhanced:
            # Some servers drop ENHANCEDSTATUSCODES; fall back to the text alone
            # for rows that name a distinctive fragment.
            if not self.fragments:
                return False
        else:
            try:
                got = _ver(reply.enhanced)
            except ValueError:
                return False
            if not (_ver(self.enhanced[0]) <= got <= _ver(self.enhanced[1])):
                return False
        text = reply.text.lower()
        return not self.fragments or any(f in text for f in self.fragments)


def _row(
    key: str,
    enhanced: str | tuple[str, str],
    meaning: str,
    fix: str,
    *,
    temporary: bool = False,
    action: Action | None = None,
    codes: Sequence[int] = (),
    fragments: Sequence[str] = (),
    mechanisms: Sequence[str] = (),
) -> CatalogueEntry:
    rng = (enhanced, enhanced) if isinstance(enhanced, str) else enhanced
    return CatalogueEntry(
        key=key,
        codes=tuple(codes),
        enhanced=rng,
        fragments=tuple(f.lower() for f in fragments),
        meaning=meaning,
        fix=fix,
        temporary=temporary,
        action=action or (Action.RETRY if temporary else Action.FIX),
        mechanisms=tuple(m.lower() for m in mechanisms),
    )


CATALOGUE: tuple[CatalogueEntry, ...] = (
    _row(
        "smtp-auth-disabled-tenant",
        "5.7.139",
        "SMTP AUTH is disabled for the whole tenant",
        "an Exchange admin runs `Set-TransportConfig -SmtpClientAuthenticationDisabled $false`, "
        "or enables it for this mailbox only with "
        "`Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false`",
        codes=(535,),
        fragments=("disabled for the tenant",),
    ),
    _row(
        "smtp-auth-disabled-mailbox",
        "5.7.139",
        "SMTP AUTH is disabled for this mailbox",
        "an Exchange admin runs "
        "`Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false`",
        codes=(535,),
        fragments=("disabled for the mailbox",),
    ),
    _row(
        "basic-auth-disabled",
        "5.7.139",
        "Basic authentication (username + password) is blocked for this tenant",
        'switch the account to OAuth2: `auth = "xoauth2"` (see docs/authentication.md)',
        codes=(535,),
        fragments=("basic authentication is disabled",),
    ),
    _row(
        "security-defaults",
        "5.7.139",
        "the tenant's security defaults block legacy authentication",
        "use OAuth2 (XOAUTH2), or replace security defaults with Conditional Access policies",
        codes=(535,),
        fragments=("security defaults",),
    ),
    _row(
        "conditional-access",
        "5.7.139",
        "a Conditional Access policy blocked this sign-in",
        "adjust the Conditional Access policy or exclude this account/app from it",
        codes=(535,),
        fragments=("did not meet the criteria",),
    ),
    _row(
        "bad-password",
        "5.7.139",
        "the username or password is wrong",
        "check the credentials: the username is the mailbox's full address (UPN)",
        codes=(535,),
        fragments=("credentials were incorrect",),
    ),
    _row(
        "auth-policy",
        "5.7.139",
        "Exchange Online refused the sign-in by policy",
        "read the rest of the reply; check SMTP AUTH is enabled for the tenant and the mailbox",
        codes=(535,),
    ),
    # Without a mechanism (a caller that cannot tell) 535 5.7.3 reads as the OAuth2 row,
    # the mechanism Exchange Online is heading for.
    _row(
        "xoauth2-rejected",
        "5.7.3",
        "the credentials were refused: for OAuth2 usually a bad or expired token, a token for the "
        "wrong audience or scope, the app's service principal not registered in Exchange, or no "
        "permission on the mailbox",
        "check the token claims (`aud` https://outlook.office365.com, `scp` SMTP.Send or `roles` "
        "SMTP.SendAsApp, `exp`); register the app with `New-ServicePrincipal -AppId <app id> "
        "-ObjectId <enterprise application object id>` and grant it "
        "`Add-MailboxPermission -Identity <mailbox> -User <service principal id> "
        "-AccessRights FullAccess`",
        codes=(535,),
        mechanisms=("xoauth2",),
    ),
    _row(
        "password-rejected",
        "5.7.3",
        "the username and password were refused (Basic authentication, AUTH LOGIN): usually a "
        "wrong password or username, SMTP AUTH disabled for the mailbox or the tenant, Basic "
        "authentication blocked (security defaults, Conditional Access, or the tenant's policy), "
        "or an account with multi-factor authentication, which needs an app password",
        "check the password and that the username is the mailbox's full address (UPN); an "
        "Exchange admin checks SMTP AUTH is on for the mailbox "
        "(`Set-CASMailbox -Identity <mailbox> -SmtpClientAuthenticationDisabled $false`) and "
        "that security defaults or Conditional Access do not block legacy authentication; with "
        "multi-factor authentication use an app password. Basic authentication is being "
        'retired: switching the account to OAuth2 (`auth = "xoauth2"`, see '
        "docs/authentication.md) ends all of these",
        codes=(535,),
        mechanisms=("login", "plain"),
    ),
    _row(
        "not-authenticated",
        "5.7.57",
        "MAIL FROM was sent before a successful AUTH (no credentials, no TLS, or no EHLO after "
        "STARTTLS)",
        "configure authentication (XOAUTH2 or LOGIN) and STARTTLS for this account",
        codes=(530,),
    ),
    _row(
        "basic-auth-retired",
        "5.7.30",
        "Basic authentication is no longer supported for client submission",
        'switch the account to OAuth2: `auth = "xoauth2"` (see docs/authentication.md)',
    ),
    _row(
        "tls-too-old",
        "4.7.66",
        "TLS 1.0 and 1.1 are refused; TLS 1.2 or newer is required",
        'use TLS 1.2+ (`tls_min_version = "1.2"`); on an old device, relay through `smtp365 relay`',
        action=Action.FIX,
        codes=(421,),
    ),
    _row(
        "send-as-denied-mail",
        "5.7.60",
        "the envelope sender or From is not the authenticated mailbox, and the mailbox has no "
        "SendAs permission for it",
        "send as the mailbox itself, grant SendAs with `Add-RecipientPermission -Identity <sender> "
        "-Trustee <mailbox> -AccessRights SendAs`, or route this sender to its own account",
    ),
    _row(
        "sender-throttled",
        ("5.2.251", "5.2.255"),
        "the mailbox is blocked for a while after repeated errors (SendAs, invalid recipients, "
        "too many recipients)",
        "fix the cause of the repeated errors, then wait for the block to lift",
        temporary=True,
        action=Action.PAUSE_LONG,
        fragments=("throttled",),
    ),
    _row(
        "send-as-denied-data",
        ("5.2.0", "5.2.252"),
        "the From / envelope sender is not the authenticated mailbox, and the mailbox has no "
        "SendAs permission for it",
        "send as the mailbox itself, grant SendAs with `Add-RecipientPermission -Identity <sender> "
        "-Trustee <mailbox> -AccessRights SendAs`, or route this sender to its own account",
        fragments=("sendasdenied",),
    ),
    _row(
        "sender-rejected",
        ("5.1.0", "5.7.255"),
        "the server does not let this account send as this sender (the send-as problem: "
        "Postfix's `Sender address rejected: not owned by user`, Exchange Server's `Client does "
        "not have permissions to send as this sender`); it may answer at RCPT, not at MAIL",
        "send as the signed-in mailbox itself (or rewrite the sender to it: `rewrite_sender` in "
        "the relay), or have the server's administrator allow this sender for the account",
        codes=(550, 553, 554),
        fragments=(
            "sender address rejected",
            "not owned by user",
            "permissions to send as this sender",
            "not allowed to send as",
        ),
    ),
    _row(
        "concurrent-connections",
        "4.3.2",
        "more than 3 concurrent connections for this mailbox",
        "keep at most 3 connections per mailbox and retry",
        temporary=True,
        action=Action.FEWER_CONNECTIONS,
        fragments=("concurrent connections", "sender thread limit"),
    ),
    _row(
        "recipient-quota",
        "5.2.0",
        "the mailbox reached its 10,000 recipients per 24 hours",
        "wait until the rolling 24-hour window frees up, or spread the load over more mailboxes",
        temporary=True,
        action=Action.PAUSE_MAILBOX,
        fragments=("submissionquotaexceeded",),
    ),
    _row(
        "sender-mailbox-full",
        "5.2.2",
        "the sending mailbox is full (Sent Items counts)",
        "free space in the mailbox or set a retention policy on Sent Items",
        fragments=("mailbox full", "quotaexceeded"),
    ),
    _row(
        "bad-outbound-sender",
        "5.1.8",
        "the account is restricted from sending, usually after outbound spam",
        "release it in the Restricted entities page of the Microsoft Defender portal and check "
        "the account for compromise",
    ),
    _row(
        "tenant-threshold",
        "5.7.705",
        "the tenant's outbound mail is blocked after exceeding a threshold",
        "contact Microsoft support",
    ),
    _row(
        "ip-not-accepted",
        "5.7.708",
        "traffic from this IP is not accepted (low reputation or a new tenant)",
        "contact Microsoft support",
    ),
    _row(
        "unregistered-domain",
        "5.7.750",
        "the sending domain is not verified in the tenant",
        "add and verify the domain in the Microsoft 365 admin center",
    ),
    _row(
        "access-denied-retry",
        ("4.7.500", "4.7.699"),
        "Exchange Online is throttling or graylisting this sender",
        "retry later",
        temporary=True,
    ),
    _row(
        "relay-denied-connector",
        "5.7.64",
        "no inbound connector matched this connection",
        "fix the connector's public IP or certificate name so it matches this sender",
    ),
    _row(
        "direct-send-disabled",
        "5.7.68",
        "the tenant does not accept Direct Send",
        "use SMTP AUTH client submission (profile `office365`) or a relay connector",
    ),
    _row(
        "unable-to-relay",
        "5.7.1",
        "anonymous mail to a foreign domain was refused",
        "authenticate (profile `office365`) or set up a relay connector",
        fragments=("unable to relay", "relay access denied"),
    ),
    _row(
        "relay-access-denied",
        "5.4.1",
        "anonymous mail to a foreign domain was refused",
        "authenticate (profile `office365`) or set up a relay connector",
        fragments=("relay access denied",),
    ),
    _row(
        "banned-ip",
        ("5.7.606", "5.7.649"),
        "the sending IP address is on Microsoft's block list",
        "request delisting at the Office 365 Anti-Spam IP Delist Portal",
    ),
    _row(
        "auth-before-tls",
        "5.7.4",
        "AUTH was sent before STARTTLS, or with a mechanism the server does not offer",
        "use STARTTLS on port 587 and AUTH LOGIN or XOAUTH2 only after the second EHLO",
        codes=(504,),
    ),
    _row(
        "hello-first",
        "5.5.2",
        "a command came before EHLO (EHLO must be sent again after STARTTLS)",
        "send EHLO again after STARTTLS",
        codes=(503,),
    ),
)


def lookup(reply: Reply, *, mechanism: str | None = None) -> CatalogueEntry | None:
    """The first catalogue entry that explains ``reply``, or ``None``.

    ``mechanism``: for a reply to ``AUTH``, the mechanism that was used (``"xoauth2"``,
    ``"login"``), so that the explanation is the one for those credentials."""
    for entry in CATALOGUE:
        if entry.matches(reply, mechanism=mechanism):
            return entry
    return None


def by_key(key: str) -> CatalogueEntry:
    """The entry with this ``key`` (raises ``KeyError`` for an unknown key)."""
    for entry in CATALOGUE:
        if entry.key == key:
            return entry
    raise KeyError(key)
