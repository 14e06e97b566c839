"""``smtp365 send`` and the classic ``sendmail`` interface."""

from __future__ import annotations

import asyncio
import sys
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Annotated, Any

import typer

from smtp365.cli import exitcodes
from smtp365.cli.output import clean, die, fail, print_json, say
from smtp365.client import Mailer, build_message
from smtp365.config import load
from smtp365.errors import ConfigError, MessageError, Smtp365Error
from smtp365.models import DeliveryOutcome

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="config file (default: $SMTP365_CONFIG, ./smtp365.toml)"),
]
AccountOpt = Annotated[
    str | None, typer.Option("--account", "-a", help="account name from the config file")
]
HostOpt = Annotated[str | None, typer.Option("--host", help="override the account's host")]
PortOpt = Annotated[int | None, typer.Option("--port", help="override the account's port")]
UserOpt = Annotated[
    str | None, typer.Option("--username", "-u", help="override the account's mailbox (UPN)")
]


def flag_overrides(host: str | None, port: int | None, username: str | None) -> dict[str, Any]:
    """CLI flags as the top configuration layer (None: not given)."""
    return {"host": host, "port": port, "username": username}


def _read(path: str, what: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        die(f"cannot read {what} {path}: {exc.strerror or exc}", code=exitcodes.NOINPUT)


def parse_message(data: bytes) -> EmailMessage:
    msg = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(msg, EmailMessage)
    return msg


def deliver(
    message: EmailMessage,
    *,
    config: Path | None,
    account: str | None,
    envelope_from: str | None = None,
    recipients: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> DeliveryOutcome:
    async def run() -> DeliveryOutcome:
        settings = load(config, account=account, overrides=overrides)
        async with Mailer(settings.account(), settings=settings) as mailer:
            return await mailer.send(message, envelope_from=envelope_from, recipients=recipients)

    return asyncio.run(run())


def send(
    to: Annotated[list[str] | None, typer.Option("--to", help="recipient (repeatable)")] = None,
    cc: Annotated[list[str] | None, typer.Option("--cc", help="Cc recipient (repeatable)")] = None,
    bcc: Annotated[
        list[str] | None, typer.Option("--bcc", help="Bcc recipient, not shown (repeatable)")
    ] = None,
    reply_to: Annotated[str | None, typer.Option("--reply-to")] = None,
    sender: Annotated[
        str | None, typer.Option("--from", help="From address (default: the account's)")
    ] = None,
    subject: Annotated[str, typer.Option("--subject", "-s")] = "",
    body: Annotated[str | None, typer.Option("--body", "-b", help="plain-text body")] = None,
    body_file: Annotated[
        str | None, typer.Option("--body-file", help="plain-text body from a file, - for stdin")
    ] = None,
    html_file: Annotated[str | None, typer.Option("--html-file", help="HTML body file")] = None,
    attach: Annotated[
        list[Path] | None, typer.Option("--attach", help="attach a file (repeatable)")
    ] = None,
    eml: Annotated[
        str | None,
        typer.Option("--eml", help="send a ready RFC 5322 message from a file, - for stdin"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    config: ConfigOpt = None,
    account: AccountOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    username: UserOpt = None,
) -> None:
    """Send one message (plain fields, or a ready .eml file with --eml)."""
    try:
        if eml is not None:
            if body is not None or body_file or html_file or attach:
                die("--eml sends a complete message: drop --body/--body-file/--html-file/--attach")
            message = parse_message(_read(eml, "message"))
            for name, values in (("To", to), ("Cc", cc), ("Bcc", bcc)):
                if values:
                    del message[name]
                    message[name] = ", ".join(values)
            if sender:
                del message["From"]
                message["From"] = sender
            if subject:
                del message["Subject"]
                message["Subject"] = subject
        else:
            if not (to or cc or bcc):
                die("no recipients", fix="add --to ADDRESS (or --cc / --bcc)")
            text = body
            if body_file is not None:
                text = _read(body_file, "body file").decode("utf-8", errors="replace")
            html = _read(html_file, "HTML file").decode("utf-8") if html_file else None
            message = build_message(
                sender=sender,
                to=to,
                cc=cc,
                bcc=bcc,
                reply_to=reply_to,
                subject=subject,
                text=text,
                html=html,
                attachments=attach or (),
            )
        outcome = deliver(
            message,
            config=config,
            account=account,
            overrides=flag_overrides(host, port, username),
        )
    except (ValueError, UnicodeError) as exc:  # a header or file the email package refuses
        fail(
            MessageError(
                f"the message cannot be built: {exc}",
                fix="header values are single lines without CR/LF; text files must be UTF-8",
            ),
            as_json=as_json,
        )
    except Smtp365Error as exc:
        fail(exc, as_json=as_json)
    report(outcome, as_json=as_json)


def report(outcome: DeliveryOutcome, *, as_json: bool) -> None:
    if as_json:
        print_json(
            {
                "ok": True,
                "message_id": outcome.message_id,
                "accepted": list(outcome.accepted),
                "refused": {r: str(reply) for r, reply in outcome.refused.items()},
                "reply": str(outcome.reply),
                "elapsed_s": round(outcome.elapsed, 4),
            }
        )
        return
    n = len(outcome.accepted)
    say(f"sent {outcome.message_id} to {n} recipient{'s' if n != 1 else ''}: {outcome.reply}")
    for rcpt, reply in outcome.refused.items():
        say(("refused", "yellow"), f" {rcpt}: {reply}")


SENDMAIL_USAGE = "usage: sendmail [-t] [-i] [-f sender] [-F fullname] [--] [recipient ...]"


def sendmail_main(argv: list[str]) -> int:
    """The classic ``sendmail`` command line: message on stdin, recipients as arguments.

    Supported: ``-t`` (recipients from To/Cc/Bcc, added to any given as
    arguments), ``-i``/``-oi`` (a lone "." does not end the message), ``-f``/``-r``
    (envelope sender), ``-F`` (full name for a missing From). Accepted and
    ignored, as Postfix does: ``-o*``, ``-B``, ``-N``, ``-R``, ``-V``, ``-v``,
    ``-bm``, ``-od*``, ``-oe*``. Returns a sysexits code.
    """
    extract = False
    dot_ends = True
    sender: str | None = None
    fullname: str | None = None
    config: str | None = None
    account: str | None = None
    recipients: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            recipients.extend(args)
            break
        if not arg.startswith("-") or arg == "-":
            recipients.append(arg)
            continue

        def value(flag: str, arg: str = arg) -> str:
            rest = arg[len(flag) :]
            if rest:
                return rest
            if not args:
                raise _Usage(f"{flag} needs a value")
            return args.pop(0)

        try:
            if arg == "-t":
                extract = True
            elif arg in ("-i", "-oi"):
                dot_ends = False
            elif arg.startswith("-f") or arg.startswith("-r"):
                sender = value(arg[:2])
            elif arg.startswith("-F"):
                fullname = value("-F")
            elif arg.startswith("--config"):
                config = arg.partition("=")[2] or value("--config")
            elif arg.startswith("--account"):
                account = arg.partition("=")[2] or value("--account")
            elif arg[:2] in ("-B", "-N", "-R", "-V", "-L", "-X", "-C") and len(arg) == 2:
                value(arg[:2])  # option with a separate value: ignored
            elif arg.startswith(("-o", "-B", "-N", "-R", "-V", "-v", "-bm", "-od", "-oe", "-L")):
                pass
            else:
                raise _Usage(f"unsupported option {arg}")
        except _Usage as exc:
            sys.stderr.write(f"sendmail: {clean(exc)}\n{SENDMAIL_USAGE}\n")
            return exitcodes.USAGE

    data = sys.stdin.buffer.read()
    if dot_ends:
        lines = data.splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.rstrip(b"\r\n") == b".":
                data = b"".join(lines[:i])
                break
    message = parse_message(data)
    if message["From"] is None and fullname and sender:
        message["From"] = f"{fullname} <{sender}>"
    if extract:
        from email.utils import getaddresses

        fields = [str(v) for name in ("To", "Cc", "Bcc") for v in (message.get_all(name) or [])]
        recipients = recipients + [a for _, a in getaddresses(fields) if a]
    if not recipients:
        sys.stderr.write(
            "sendmail: no recipients: give addresses as arguments, or -t to read To/Cc/Bcc\n"
        )
        return exitcodes.USAGE
    try:
        outcome = deliver(
            message,
            config=Path(config) if config else None,
            account=account,
            envelope_from=sender,
            recipients=recipients,
        )
    except ConfigError as exc:
        sys.stderr.write(f"sendmail: {clean(exc, multiline=True)}\n")
        return exitcodes.CONFIG
    except Smtp365Error as exc:
        sys.stderr.write(f"sendmail: {clean(exc, multiline=True)}\n")
        return exitcodes.for_error(exc)
    if outcome.refused:
        for rcpt, reply in outcome.refused.items():
            sys.stderr.write(f"sendmail: {clean(f'{rcpt}: {reply}')}\n")
        return exitcodes.UNAVAILABLE
    return exitcodes.OK


class _Usage(Exception):
    pass


def sendmail(
    ctx: typer.Context,
) -> None:
    """The classic sendmail interface: message on stdin (-t, -i, -f, recipients as arguments)."""
    raise typer.Exit(sendmail_main(list(ctx.args)))
