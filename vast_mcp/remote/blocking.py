"""Blocking work (local file I/O) in threads the caller can walk away from.

A read of a local path can block for good: a FIFO without a writer, a hung network mount. The task that waits for
such work must still end when its call is cancelled (its bound, the client leaving), and the process must still be
able to exit, so that teardown destroys what the session rented. Each piece of work gets its own daemon thread;
a cancelled caller stops waiting for it at once, and the thread ends whenever its blocking call does (or with the
process).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

T = TypeVar("T")


async def in_thread(work: Callable[[], T], *, name: str = "vast-mcp file work") -> T:
    """`work()` in a daemon thread; cancelling the caller abandons the thread instead of waiting for it."""
    token = anyio.lowlevel.current_token()
    done = anyio.Event()
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # handed to the awaiting task, which re-raises it
            outcome.append((False, exc))
        with contextlib.suppress(Exception):  # the event loop is gone: nobody waits any more
            anyio.from_thread.run_sync(done.set, token=token)

    threading.Thread(target=run, name=name, daemon=True).start()
    await done.wait()
    ok, value = outcome[0]
    if not ok:
        assert isinstance(value, BaseException)
        raise value
    return value  # type: ignore[return-value]
