"""The event loop the relay's processes run on.

uvloop (libuv) where it is installed — a dependency on Linux and macOS — because receiving
mail is CPU work in the event loop: with it a 10 KB message costs about a fifth less CPU
(``bench/relay_vs_postfix.sh``, ``event_loop`` row). ``[relay] event_loop = "asyncio"``
runs the standard loop (asyncio's debug mode, or a platform without uvloop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

__all__ = ["EventLoop", "loop_factory", "run"]

log = logging.getLogger("smtp365.relay")

T = TypeVar("T")
EventLoop = Literal["uvloop", "asyncio"]


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for ``asyncio.Runner``; ``None`` means asyncio's own loop."""
    if kind == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed: running on asyncio's event loop")
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], kind: EventLoop = "uvloop") -> T:
    """``asyncio.run(main)`` on the loop ``kind`` names."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)
