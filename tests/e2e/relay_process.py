"""``smtp365 relay`` as a real child process: start, wait for readiness, SIGTERM, kill -9."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import tomllib
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent / "smtp365"
_READY = re.compile(r"relay \S+ ready: (.*?); sending")
_LISTEN = re.compile(r"([0-9a-fA-F.:]+):(\d+) \((\w+)\)")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def write_config(path: Path, accounts: dict[str, dict[str, Any]], relay: dict[str, Any]) -> Path:
    lines = [f"default_account = {toml_value(next(iter(accounts)))}"]
    for name, table in accounts.items():
        lines.append(f"[accounts.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    lines.append("[relay]")
    arrays = {
        k: v for k, v in relay.items() if isinstance(v, list) and v and isinstance(v[0], dict)
    }
    lines += [f"{k} = {toml_value(v)}" for k, v in relay.items() if k not in arrays]
    for key, items in arrays.items():
        for item in items:
            lines.append(f"[[relay.{key}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # fail here, not in the child, on a quoting mistake
    path.write_text(text)
    return path


class RelayProcess:
    """One run of the relay; ``log`` collects its stderr lines."""

    def __init__(self, config: Path, *, cwd: Path, extra: tuple[str, ...] = ()) -> None:
        self.config = config
        self.cwd = cwd
        self.extra = extra
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self.ports: dict[str, int] = {}
        self._ready = asyncio.Event()
        self._line = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 20.0) -> RelayProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP365_")}
        env |= {"HOME": str(self.cwd), "XDG_CONFIG_HOME": str(self.cwd / "xdg")}
        self.proc = await asyncio.create_subprocess_exec(
            str(BIN),
            "relay",
            "--config",
            str(self.config),
            *self.extra,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=self.cwd,
        )
        self._reader = asyncio.create_task(self._read())
        waiter = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        await asyncio.wait({waiter, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        exited.cancel()
        if not self._ready.is_set():
            await self.kill()
            raise AssertionError("the relay did not become ready:\n" + "\n".join(self.log[-30:]))
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.log.append(line)
            self._line.set()
            found = _READY.search(line)
            if found:
                for _host, port, mode in _LISTEN.findall(found.group(1)):
                    self.ports.setdefault(mode, int(port))
                self._ready.set()

    async def wait_for_line(
        self, pattern: str, timeout: float = 20.0, start: int = 0
    ) -> re.Match[str]:
        """The first log line from index ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                self._line.clear()
                for line in self.log[start:]:
                    found = regex.search(line)
                    if found:
                        return found
                await self._line.wait()

    def helpers(self) -> list[int]:
        """The pids of the helper processes (``[relay] processes`` > 1)."""
        assert self.proc is not None
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"smtp365.relay.procs" in cmdline:
                found.append(int(entry.name))
        return found

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    async def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._drain()
        return code

    async def kill(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        await self._drain()

    async def _drain(self) -> None:
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)
            self._reader = None
