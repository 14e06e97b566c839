"""Doctor checks from configuration to a test message: config, AUTH mechanisms, token,
AUTH, send-as probe, test send."""

from __future__ import annotations

from email.utils import formatdate, make_msgid
from typing import Any

from smtp365.auth import aadsts, claims, provider_for
from smtp365.config import AuthMethod, Flow, Level, TLSMode
from smtp365.config.check import check_account
from smtp365.doctor.model import Check, CheckResult, DoctorContext, Status, result
from smtp365.errors import AuthError, Smtp365Error, SubmissionRejected
from smtp365.models import Envelope, Submission
from smtp365.transport import SmtpTransport


def _rejection(check: Check, exc: SubmissionRejected, **kw: Any) -> CheckResult:
    entry = exc.entry
    return result(
        check,
        Status.WARN if exc.temporary else Status.FAIL,
        f"{exc.code} {exc.enhanced} {exc.text}".replace("  ", " "),
        why=entry.meaning if entry else "the server refused; the reply is not in the catalogue",
        fix=exc.fix,
        catalogue=entry.key if entry else None,
        data={
            "code": exc.code,
            "enhanced": exc.enhanced,
            "stage": exc.stage,
            "temporary": exc.temporary,
        },
        **kw,
    )


class ConfigCheck:
    id = "config"
    title = "Configuration"
    requires: tuple[str, ...] = ()

    async def run(self, ctx: DoctorContext) -> CheckResult:
        findings = ctx.facts.get("config_findings")
        if findings is None:
            findings = check_account(ctx.account)
        data = {"findings": [f.as_dict() for f in findings]}
        errors = [f for f in findings if f.level is Level.ERROR]
        worst = errors or [f for f in findings if f.level is Level.WARNING]
        if worst:
            first = worst[0]
            more = f" (+{len(findings) - 1} more)" if len(findings) > 1 else ""
            return result(
                self,
                Status.FAIL if errors else Status.WARN,
                first.what + more,
                why=first.why,
                fix=first.fix,
                catalogue=first.code,
                data=data,
            )
        a = ctx.account
        return result(
            self,
            Status.PASS,
            f"{a.profile.value}: {a.host}:{a.port}, tls {a.tls.value}, auth {a.auth.value}"
            + (f" ({a.flow.value})" if a.auth is AuthMethod.XOAUTH2 else ""),
            data=data,
        )


class AuthMechanismsCheck:
    id = "smtp.auth_mechanisms"
    title = "AUTH mechanisms after TLS"
    requires: tuple[str, ...] = ("tls.handshake",)

    async def run(self, ctx: DoctorContext) -> CheckResult:
        a = ctx.account
        if a.auth is AuthMethod.NONE:
            return result(self, Status.PASS, "not needed: the account does not authenticate")
        mechs = [m.upper() for m in ctx.facts.get("mechanisms", [])]
        wanted = "XOAUTH2" if a.auth is AuthMethod.XOAUTH2 else "LOGIN"
        seen = " ".join(mechs) or "none"
        if not mechs:
            return result(
                self,
                Status.FAIL,
                "the server offers no AUTH inside TLS",
                why="without AUTH the mailbox cannot sign in (530 5.7.57 follows)",
                fix="check host and port (smtp.office365.com:587); on Exchange Online, AUTH "
                "is always offered after STARTTLS",
            )
        if wanted not in mechs:
            return result(
                self,
                Status.FAIL,
                f"AUTH {wanted} is not offered (offered: {seen})",
                why=f"auth = {a.auth.value!r} needs AUTH {wanted}",
                fix="Exchange Online offers LOGIN and XOAUTH2; another server may need "
                'auth = "login" or "xoauth2" accordingly',
                data={"mechanisms": mechs},
            )
        return result(self, Status.PASS, f"AUTH {seen}", data={"mechanisms": mechs})


class TokenCheck:
    id = "token"
    title = "OAuth2 token and claims"
    requires: tuple[str, ...] = ()

    async def run(self, ctx: DoctorContext) -> CheckResult:
        a = ctx.account
        if a.auth is not AuthMethod.XOAUTH2:
            return result(self, Status.SKIP, f"auth = {a.auth.value!r}: no token needed")
        try:
            provider = provider_for(a, target="smtp")
            token = await provider.get_token()
        except AuthError as exc:
            code = aadsts.code_of({"error_description": exc.what})
            key = exc.key if isinstance(exc, claims.ClaimsError) else None
            return result(
                self,
                Status.FAIL,
                exc.what,
                fix=exc.fix,
                catalogue=key or (f"AADSTS{code}" if code else None),
                why="without a token XOAUTH2 cannot sign in",
            )
        except Smtp365Error as exc:
            return result(self, Status.FAIL, exc.what, fix=exc.fix)
        ctx.facts["token_provider"] = provider
        payload = claims.decode(token.token)
        if payload is None:
            return result(
                self,
                Status.WARN,
                f"an opaque (non-JWT) token from {a.flow.value}",
                why="its audience and permissions cannot be checked here",
            )
        report = claims.check(payload, "smtp", mailbox=a.username)
        data = {"flow": a.flow.value, **report.summary()}
        kind = "roles" if report.app_only else "scp"
        seen = f"aud {report.audience}, {kind} {', '.join(report.permissions) or '-'}"
        if report.problems:
            what, fix = report.problems[0]
            return result(
                self,
                Status.FAIL,
                f"{what} ({seen})",
                fix=fix,
                data=data,
                catalogue=report.keys[0],
                why="Exchange Online would answer 535 5.7.3",
            )
        if report.warnings:
            return result(self, Status.WARN, report.warnings[0], data=data)
        via = "static token" if a.flow is Flow.STATIC else f"{a.flow.value} via MSAL"
        return result(self, Status.PASS, f"{seen} ({via})", data=data)


class AuthCheck:
    id = "smtp.auth"
    title = "SMTP AUTH"
    requires: tuple[str, ...] = ("smtp.auth_mechanisms",)

    async def run(self, ctx: DoctorContext) -> CheckResult:
        a = ctx.account
        if a.auth is AuthMethod.XOAUTH2 and "token_provider" not in ctx.facts:
            return result(self, Status.SKIP, "skipped: depends on token")
        transport = SmtpTransport(a, token_provider=ctx.facts.get("token_provider"))
        try:
            await transport.connect()
        except SubmissionRejected as exc:
            await transport.close()
            return _rejection(self, exc)
        except Smtp365Error as exc:
            await transport.close()
            return result(self, Status.FAIL, exc.what, fix=exc.fix)
        ctx.facts["transport"] = transport
        how = a.auth.value.upper() if a.auth is not AuthMethod.NONE else "no AUTH"
        tls = transport.tls_version or ("none" if a.tls is TLSMode.NONE else "?")
        return result(self, Status.PASS, f"signed in as {a.username} with {how} over {tls}")


class SendAsCheck:
    id = "smtp.send_as"
    title = "Send-as probe (MAIL FROM + RCPT TO, then RSET)"
    requires: tuple[str, ...] = ("smtp.auth",)

    async def run(self, ctx: DoctorContext) -> CheckResult:
        a = ctx.account
        transport: SmtpTransport | None = ctx.facts.get("transport")
        if transport is None:
            return result(self, Status.SKIP, "skipped: not signed in (see smtp.auth)")
        sender = a.sender or a.username or ""
        rcpt = ctx.send_test or a.username or sender
        try:
            mail, rcpt_reply = await transport.probe(sender, rcpt)
        except SubmissionRejected as exc:
            return _rejection(self, exc)
        data = {"mail_from": str(mail), "rcpt_to": str(rcpt_reply), "sender": sender}
        if a.username and sender.lower() != a.username.lower():
            return result(
                self,
                Status.WARN,
                f"MAIL FROM:<{sender}> accepted ({mail}), but that does not prove SendAs",
                why="Exchange Online checks SendAs after the data (554 5.2.252 SendAsDenied); "
                f"{sender} is not the mailbox {a.username}",
                fix=f"run with --send-test ADDRESS to settle it, and grant SendAs if needed: "
                f"Add-RecipientPermission -Identity {sender} -Trustee {a.username} "
                "-AccessRights SendAs",
                data=data,
            )
        return result(
            self, Status.PASS, f"MAIL FROM:<{sender}> and RCPT TO:<{rcpt}> accepted", data=data
        )


class SendTestCheck:
    id = "smtp.send_test"
    title = "Test message"
    requires: tuple[str, ...] = ("smtp.auth",)

    async def run(self, ctx: DoctorContext) -> CheckResult:
        if not ctx.send_test:
            return result(self, Status.SKIP, "not requested (use --send-test ADDRESS)")
        a = ctx.account
        transport: SmtpTransport | None = ctx.facts.get("transport")
        if transport is None:
            return result(self, Status.SKIP, "skipped: not signed in (see smtp.auth)")
        sender = a.sender or a.username or ""
        domain = sender.rpartition("@")[2] or "smtp365.local"
        msgid = make_msgid(domain=domain)
        body = (
            f"From: {sender}\r\nTo: {ctx.send_test}\r\nSubject: smtp365 doctor test message\r\n"
            f"Message-ID: {msgid}\r\nDate: {formatdate(localtime=True)}\r\n\r\n"
            "This is a test message sent by `smtp365 doctor`.\r\n"
        )
        sub = Submission(Envelope(sender, (ctx.send_test,)), body.encode(), message_id=msgid)
        try:
            outcome = await transport.submit(sub)
        except SubmissionRejected as exc:
            return _rejection(self, exc)
        return result(
            self,
            Status.PASS,
            f"accepted: {outcome.reply}",
            data={
                "message_id": msgid,
                "reply": str(outcome.reply),
                "upstream_id": outcome.upstream_id,
            },
        )


def auth_checks() -> list[Check]:
    return [AuthMechanismsCheck(), TokenCheck(), AuthCheck(), SendAsCheck(), SendTestCheck()]
