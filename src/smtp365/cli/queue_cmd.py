"""``smtp365 queue list|show|retry|hold|release|delete|stats``: the relay's queue.

The commands open the queue the relay uses (``<state_dir>/queue``) next to a running relay:
SQLite serialises the writes, and the queue's recovery only runs when nobody else has it
open, so a ``list`` never takes leases away from the relay's workers. A running relay picks
up a ``retry`` or ``release`` within a second (its scheduler polls the queue).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from smtp365.cli import exitcodes
from smtp365.cli.output import clean, die, fail, print_json, say, tell
from smtp365.cli.send import ConfigOpt
from smtp365.config import load
from smtp365.errors import QueueError, Smtp365Error
from smtp365.relay.queue import LogEntry, QueuedMessage, QueueStats, State
from smtp365.relay.queue.sqlite import SqliteQueue

__all__ = ["app"]

T = TypeVar("T")

app = typer.Typer(
    help="Look into the relay's queue and delivery log; retry, hold, release or delete messages.",
    no_args_is_help=True,
)

PENDING = (State.QUEUED, State.ACTIVE, State.DEFERRED, State.HELD)

StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        "-d",
        help="the relay's state directory; the queue is DIR/queue (default: the relay's "
        "state_dir setting, else $XDG_STATE_HOME/smtp365/relay)",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="one JSON document on stdout")]
IdArg = Annotated[str, typer.Argument(metavar="ID", help="a queue id, as `queue list` shows")]

_REASON_WIDTH = 80
_ADDRESS_WIDTH = 40


# ---------------------------------------------------------------------------- plumbing


@dataclass(frozen=True, slots=True)
class _Where:
    config: Path | None
    state_dir: Path
    root: Path
    as_json: bool


class _OpenFailed(Exception):
    def __init__(self, error: QueueError) -> None:
        super().__init__(str(error))
        self.error = error


def _where(config: Path | None, state_dir: Path | None, as_json: bool) -> _Where:
    """Find the queue; never create one (a typo in --state-dir must not look empty)."""
    if state_dir is None:
        try:
            settings = load(config)
        except Smtp365Error as exc:
            fail(exc, as_json=as_json)
        state_dir = settings.relay.resolved_state_dir(settings.state_home)
    state_dir = state_dir.expanduser()
    root = state_dir / "queue"
    if not (root / "queue.db").is_file():
        fail(
            QueueError(
                f"no relay queue in {state_dir}",
                fix="start the relay first (smtp365 relay) or pass --state-dir "
                "(the relay's state_dir)",
                temporary=False,
            ),
            as_json=as_json,
            code=exitcodes.NOINPUT,
        )
    return _Where(config, state_dir, root, as_json)


def _run(where: _Where, action: Callable[[SqliteQueue], Awaitable[T]]) -> T:
    """Open the queue, run ``action`` on it, close the queue whatever happens.

    A queue that cannot be opened exits 66 (75 when temporary); an unknown id or a move
    the message's state forbids exits 65.
    """

    async def main() -> T:
        try:
            queue = await SqliteQueue.open(where.root, io_threads=1)
        except QueueError as exc:
            raise _OpenFailed(exc) from exc
        try:
            return await action(queue)
        finally:
            await queue.close()

    try:
        return asyncio.run(main())
    except _OpenFailed as exc:
        fail(exc.error, as_json=where.as_json, code=exitcodes.NOINPUT)
    except QueueError as exc:
        fail(exc, as_json=where.as_json, code=exitcodes.DATAERR)
    except Smtp365Error as exc:
        fail(exc, as_json=where.as_json)


def _unknown(queue_id: str, history: list[LogEntry]) -> QueueError:
    what = f"no message {queue_id!r} in the queue"
    if history:
        last = history[-1]
        what += f" (last event: {last.event} at {_time(last.at)})"
    return QueueError(
        what,
        fix="list the queue with `smtp365 queue list --all`",
        temporary=False,
    )


def _normal_id(queue_id: str) -> str:
    return queue_id.strip().upper()  # ids are Crockford base32: case does not matter


# ---------------------------------------------------------------------------- formatting


def _time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _span(seconds: float) -> str:
    s = round(abs(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def _relative(at: float, now: float) -> str:
    if abs(at - now) < 0.5:
        return "now"
    return f"in {_span(at - now)}" if at > now else f"{_span(now - at)} ago"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())  # replies can hold CR/LF
    return text if len(text) <= width else text[: width - 3] + "..."


def _sender(msg: QueuedMessage) -> str:
    return msg.sender or "<>"


def _recipients(msg: QueuedMessage) -> str:
    first = msg.recipients[0] if msg.recipients else "-"
    more = len(msg.recipients) - 1
    return f"{first} +{more}" if more > 0 else first


def _note(msg: QueuedMessage, now: float) -> str:
    """What the message waits for, and why (the list's last column)."""
    reason = msg.last_reason
    if msg.state in (State.QUEUED, State.DEFERRED):
        due = (
            "due now"
            if msg.next_attempt_at <= now
            else f"next {_relative(msg.next_attempt_at, now)}"
        )
        head = due
    elif msg.state is State.ACTIVE:
        lease = f", lease {_relative(msg.lease_until, now)}" if msg.lease_until else ""
        head = f"delivering{lease}"
    elif msg.state is State.HELD:
        head = "held"
    else:
        finished = msg.finished_at if msg.finished_at is not None else msg.received_at
        head = f"{msg.state} {_relative(finished, now)}"
    return _cut(f"{head}: {reason}" if reason else head, _REASON_WIDTH)


def _message_json(msg: QueuedMessage, now: float) -> dict[str, Any]:
    return {
        "id": msg.id,
        "state": msg.state.value,
        "attempts": msg.attempts,
        "sender": msg.sender,
        "recipients": list(msg.recipients),
        "size": msg.size,
        "received_at": msg.received_at,
        "age": round(max(now - msg.received_at, 0.0), 3),
        "next_attempt_at": msg.next_attempt_at,
        "lease_until": msg.lease_until,
        "finished_at": msg.finished_at,
        "last_reason": msg.last_reason,
        "account": msg.account,
        "client": msg.client,
        "message_id": msg.message_id,
        "content_path": str(msg.content_path) if msg.content_path else None,
    }


def _entry_json(entry: LogEntry) -> dict[str, Any]:
    return {
        "at": entry.at,
        "event": entry.event.value,
        "attempt": entry.attempt,
        "detail": entry.detail,
        "duration": entry.duration,
    }


def _header_section(data: bytes) -> str:
    """The header lines of a stored message (everything before the first empty line)."""
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if data.startswith((b"\r\n", b"\n")):
        return ""
    head = data[: min(ends)] if ends else data
    return head.decode("utf-8", "replace")


def _print_table(rows: list[list[str]], right: frozenset[int] = frozenset()) -> None:
    rows = [[clean(cell) for cell in row] for row in rows]  # as shown, for the widths
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        say("  ".join(cells).rstrip())


# ---------------------------------------------------------------------------- list


@app.command("list")
def list_cmd(
    state: Annotated[
        list[State] | None,
        typer.Option(
            "--state",
            "-s",
            help="only messages in this state (repeat for several)",
            case_sensitive=False,
        ),
    ] = None,
    all_states: Annotated[
        bool,
        typer.Option("--all", "-a", help="also the delivery log (delivered and failed)"),
    ] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", min=1, help="at most N messages")
    ] = None,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List messages, oldest first (default: the undelivered: queued/active/deferred/held)."""
    where = _where(config, state_dir, as_json)
    wanted: tuple[State, ...] | None = PENDING  # None: every state
    if state:
        wanted = tuple(dict.fromkeys(state))
    elif all_states:
        wanted = None

    async def action(queue: SqliteQueue) -> list[QueuedMessage]:
        if wanted is None:
            return await queue.list(limit=limit)
        found: list[QueuedMessage] = []
        for one in wanted:
            found += await queue.list(one, limit=limit)
        found.sort(key=lambda m: m.id)
        return found[:limit] if limit is not None else found

    messages = _run(where, action)
    now = time.time()
    if as_json:
        print_json(
            {
                "queue": str(where.root),
                "states": [s.value for s in (wanted or State)],
                "messages": [_message_json(m, now) for m in messages],
            }
        )
        return
    if not messages:
        what = "messages" if wanted is None else "/".join(s.value for s in wanted) + " messages"
        say(f"no {what} in {where.root}")
        return
    rows = [["ID", "STATE", "ATT", "AGE", "SIZE", "SENDER", "RECIPIENTS", "NEXT / LAST REASON"]]
    for msg in messages:
        rows.append(
            [
                msg.id,
                msg.state.value,
                str(msg.attempts),
                _span(now - msg.received_at),
                _size(msg.size),
                _cut(_sender(msg), _ADDRESS_WIDTH),
                _cut(_recipients(msg), _ADDRESS_WIDTH),
                _note(msg, now),
            ]
        )
    _print_table(rows, right=frozenset({2, 3, 4}))
    if limit is not None and len(messages) == limit:
        say(f"(first {limit} shown; raise --limit for more)")


# ---------------------------------------------------------------------------- show


@app.command("show")
def show(
    queue_id: IdArg,
    content: Annotated[
        bool, typer.Option("--content", help="also print the stored message's header lines")
    ] = False,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one message: every field, and its history (attempts, replies, operator acts)."""
    where = _where(config, state_dir, as_json)
    queue_id = _normal_id(queue_id)

    async def action(queue: SqliteQueue) -> tuple[QueuedMessage, list[LogEntry], str | None]:
        msg = await queue.get(queue_id)
        history = await queue.history(queue_id)
        if msg is None:
            raise _unknown(queue_id, history)
        headers: str | None = None
        if content:
            try:
                headers = _header_section(await queue.read(queue_id))
            except QueueError as exc:
                if exc.temporary:
                    raise
                headers = None  # delivered (its content goes at once) or deleted meanwhile
        return msg, history, headers

    msg, history, headers = _run(where, action)
    now = time.time()
    if as_json:
        data = _message_json(msg, now)
        data["history"] = [_entry_json(e) for e in history]
        if content:
            data["headers"] = headers
        print_json(data)
        return
    fields: list[tuple[str, str]] = [
        ("id", msg.id),
        ("state", msg.state.value),
        ("attempts", str(msg.attempts)),
        ("sender", f"<{msg.sender}>"),
        ("recipients", ", ".join(msg.recipients)),
        ("size", f"{_size(msg.size)} ({msg.size} bytes)"),
        ("received", f"{_time(msg.received_at)} ({_relative(msg.received_at, now)})"),
    ]
    if msg.state in (State.QUEUED, State.DEFERRED):
        fields.append(
            (
                "next attempt",
                f"{_time(msg.next_attempt_at)} ({_relative(msg.next_attempt_at, now)})",
            )
        )
    if msg.lease_until is not None:
        fields.append(
            ("lease until", f"{_time(msg.lease_until)} ({_relative(msg.lease_until, now)})")
        )
    if msg.finished_at is not None:
        fields.append(
            (msg.state.value, f"{_time(msg.finished_at)} ({_relative(msg.finished_at, now)})")
        )
    stored = (
        f"spool file {msg.content_path}"
        if msg.content_path
        else "gone (delivered)"
        if msg.state is State.DELIVERED
        else "in queue.db"
    )
    fields += [
        ("last reason", msg.last_reason or "-"),
        ("account", msg.account or "- (chosen at delivery)"),
        ("client", msg.client or "-"),
        ("message-id", msg.message_id or "-"),
        ("content", stored),
    ]
    for key, value in fields:
        say(f"{key:13} {value}")
    say("history:" if history else "history:     (none yet)")
    for entry in history:
        took = f"{entry.duration:.1f}s" if entry.duration is not None else ""
        line = f"  {_time(entry.at)}  {entry.event.value:9}  attempt {entry.attempt:<3} {took:>7}"
        say(f"{line}  {entry.detail}".rstrip())
    if content:
        if headers is None:
            say("headers:      (the content is gone)")
        else:
            say("headers:")
            for header in headers.splitlines():
                say(f"  | {header}")


# ---------------------------------------------------------------------------- operator acts


def _lifetime(config: Path | None) -> float | None:
    try:
        return load(config).relay.max_queue_lifetime
    except Smtp365Error:
        return None


def _expiry_warning(msg: QueuedMessage, lifetime: float | None, now: float) -> str | None:
    """A failed message older than the queue lifetime fails again at once when retried."""
    if msg.state is not State.FAILED or lifetime is None or now - msg.received_at < lifetime:
        return None
    return (
        f"{msg.id} is older than the relay's max_queue_lifetime ({_span(lifetime)}): "
        "the relay will fail it again on its next attempt (and bounce it again); "
        "raise [relay] max_queue_lifetime first to give it more time"
    )


def _act(
    where: _Where,
    queue_id: str,
    action: str,
    op: Callable[[SqliteQueue, str], Awaitable[None]],
    *,
    lifetime: float | None = None,
) -> None:
    """One operator act on one message; prints the message as it was and as it is now."""

    async def run(queue: SqliteQueue) -> tuple[QueuedMessage | None, QueuedMessage | None]:
        before = await queue.get(queue_id)
        await op(queue, queue_id)  # raises for an unknown id or a forbidden move
        return before, await queue.get(queue_id)

    before, after = _run(where, run)
    now = time.time()
    warnings: list[str] = []
    if action == "retried" and before is not None:
        warning = _expiry_warning(before, lifetime, now)
        if warning:
            warnings.append(warning)
    if where.as_json:
        shown = after if after is not None else before
        print_json(
            {
                "ok": True,
                "action": action,
                "id": queue_id,
                "was": before.state.value if before else None,
                "message": _message_json(shown, now) if shown else None,
                "warnings": warnings,
            }
        )
        return
    for warning in warnings:
        tell(("smtp365: warning:", "yellow"), f" {warning}")
    if action == "deleted" and before is not None:
        say(
            f"deleted {before.id} ({before.state}, {before.attempts} attempt(s), "
            f"{_size(before.size)}, from <{before.sender}> to {_recipients(before)}, "
            f"received {_relative(before.received_at, now)})"
        )
        return
    was = before.state.value if before else "?"
    now_state = after.state.value if after else "?"
    if action == "held" and was == State.HELD:
        say(f"{queue_id} was already held")
        return
    due = " and due now" if after and after.state in (State.QUEUED, State.DEFERRED) else ""
    say(f"{action} {queue_id}: {was} -> {now_state}{due}")


async def _retry(queue: SqliteQueue, queue_id: str) -> None:
    await queue.retry(queue_id)


async def _hold(queue: SqliteQueue, queue_id: str) -> None:
    await queue.hold(queue_id)


async def _release(queue: SqliteQueue, queue_id: str) -> None:
    await queue.release(queue_id)


async def _delete(queue: SqliteQueue, queue_id: str) -> None:
    await queue.delete(queue_id)


@app.command("retry")
def retry(
    queue_id: Annotated[
        str | None,
        typer.Argument(metavar="ID", help="a deferred, queued or failed message"),
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="every deferred message (not failed ones)")
    ] = False,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a message due now (a failed one goes back to the queue, its content kept)."""
    if (queue_id is None) == (not every):
        die("name one message ID, or --all (not both)", fix="smtp365 queue retry --help")
    where = _where(config, state_dir, as_json)
    if queue_id is not None:
        queue_id = _normal_id(queue_id)
        _act(where, queue_id, "retried", _retry, lifetime=_lifetime(config))
        return

    async def action(queue: SqliteQueue) -> tuple[list[str], list[tuple[str, str]]]:
        done: list[str] = []
        skipped: list[tuple[str, str]] = []
        for msg in await queue.list(State.DEFERRED):
            try:
                await queue.retry(msg.id)
            except QueueError as exc:  # claimed, held or deleted since the listing
                if exc.temporary:
                    raise
                skipped.append((msg.id, exc.what))
            else:
                done.append(msg.id)
        return done, skipped

    done, skipped = _run(where, action)
    if as_json:
        print_json(
            {
                "ok": True,
                "action": "retried",
                "ids": done,
                "skipped": [{"id": i, "reason": r} for i, r in skipped],
            }
        )
        return
    for queue_id in done:
        say(f"retried {queue_id}")
    for queue_id, reason in skipped:
        say(f"skipped {queue_id}: {reason}")
    if not done and not skipped:
        say(f"no deferred messages in {where.root}")
    else:
        say(f"{len(done)} deferred message(s) due now")


@app.command("hold")
def hold(
    queue_id: IdArg,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a message from being delivered until `release` (an attempt under way finishes)."""
    where = _where(config, state_dir, as_json)
    _act(where, _normal_id(queue_id), "held", _hold)


@app.command("release")
def release(
    queue_id: IdArg,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Let a held message go: it is due now."""
    where = _where(config, state_dir, as_json)
    _act(where, _normal_id(queue_id), "released", _release)


@app.command("delete")
def delete(
    queue_id: IdArg,
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a message and its content, whatever its state (no bounce is sent)."""
    where = _where(config, state_dir, as_json)
    _act(where, _normal_id(queue_id), "deleted", _delete)


# ---------------------------------------------------------------------------- stats


@app.command("stats")
def stats(
    config: ConfigOpt = None,
    state_dir: StateDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Messages per state, the bytes still to deliver, and the oldest waiting message."""
    where = _where(config, state_dir, as_json)

    async def action(queue: SqliteQueue) -> QueueStats:
        return await queue.stats()

    result = _run(where, action)
    now = time.time()
    oldest = result.oldest_pending_at
    age = round(max(now - oldest, 0.0), 3) if oldest is not None else None
    if as_json:
        print_json(
            {
                "queue": str(where.root),
                "counts": {s.value: result[s] for s in State},
                "pending": result.pending,
                "pending_bytes": result.pending_bytes,
                "oldest_pending_at": oldest,
                "oldest_pending_age": age,
            }
        )
        return
    say(f"queue      {where.root}")
    for s in State:
        say(f"{s.value:10} {result[s]:>6}")
    line = f"pending    {result.pending:>6} message(s), {_size(result.pending_bytes)}"
    if oldest is not None:
        line += f"; oldest received {_time(oldest)} ({_span(now - oldest)} ago)"
    say(line)
