from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent / "smtp365"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


Run = Callable[..., Awaitable[Result]]


@pytest.fixture
def run_cli(tmp_path: Path) -> Run:
    """Run the installed ``smtp365`` console script as a subprocess (no shell)."""

    async def run(
        *args: str,
        stdin: bytes = b"",
        env: dict[str, str] | None = None,
        program: Path = BIN,
        timeout: float = 30,
    ) -> Result:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP365_")} | {
            "HOME": str(tmp_path),
            "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
            "COLUMNS": "200",
        }
        full_env |= env or {}
        proc = await asyncio.create_subprocess_exec(
            str(program),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
            cwd=tmp_path,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return Result(proc.returncode, out.decode(), err.decode())

    return run
