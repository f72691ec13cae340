"""Noticing that the client went away, however it goes, and handing teardown to a process that outlives us.

A stdio host closes stdin, waits about 2 s, sends SIGTERM, waits 2 s more and sends SIGKILL; some hosts never
close anything and simply die. So the server ends its session on stdin EOF, on SIGTERM/SIGHUP/SIGINT, and when
its parent process disappears, and it spawns a detached `vast-mcp reap --session` for whatever it could not
destroy in time.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable

import anyio

from .config import Settings

log = logging.getLogger("vast_mcp.lifecycle")

PARENT_POLL_S = 0.5
EXIT_WAIT_S = 120.0  # longest a departed client's server waits for its session to close before exiting anyway

SESSION_CLOSED = threading.Event()
"""Set once the server's session has released everything: its teardown is done, or handed to a reaper."""


def _exit_once_closed(why: str) -> None:
    """End the process once the session is closed (runs in a daemon thread).

    After a signal or the parent's death nobody may ever close our stdin, and the SDK reads stdin in a worker
    thread that cancellation cannot interrupt: without this the server would linger, torn down but alive,
    until someone happens to close the pipe.
    """
    SESSION_CLOSED.wait(EXIT_WAIT_S)
    log.info("server stopped: %s", why)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(0)


def spawn_reaper(settings: Settings, session_id: str) -> int:
    """Start `vast-mcp reap --session ID` in its own session (so the host's kill of our process group misses it).

    The key reaches it through its environment, never its command line, where `ps` would show it.
    """
    env = dict(os.environ)
    env["VAST_API_KEY"] = settings.api_key.reveal()
    env["VAST_URL"] = settings.vast_url
    env["VAST_MCP_STATE_DIR"] = str(settings.state_dir)
    log_path = settings.state_dir / "reaper.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vast_mcp", "reap", "--session", session_id],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    log.warning("handed teardown of session %s to reaper process %d", session_id, proc.pid)
    return proc.pid


async def watch_signals(on_exit: Callable[[str], None]) -> None:
    """Turn SIGTERM, SIGHUP and SIGINT into an orderly end (Python's default SIGTERM would skip all cleanup)."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as signals:
        async for signum in signals:
            on_exit(signal.Signals(signum).name)
            return


async def watch_parent(on_exit: Callable[[str], None], parent: int | None = None) -> None:
    """End when the process that started us dies: we get re-parented, and nobody will ever close our stdin."""
    parent = os.getppid() if parent is None else parent
    while True:
        await anyio.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            on_exit(f"parent process {parent} exited")
            return


async def run_until_client_leaves(serve: Callable[[], Awaitable[None]]) -> str:
    """Run `serve` (which returns on stdin EOF) until it returns or the client goes away some other way.

    Returns why it ended. Cancelling `serve` lets the server's lifespan run its teardown.
    """
    reason = "stdin closed"
    async with anyio.create_task_group() as tg:

        def leave(why: str) -> None:
            nonlocal reason
            reason = why
            log.warning("client gone (%s): ending the session", why)
            tg.cancel_scope.cancel()
            threading.Thread(target=_exit_once_closed, args=(why,), name="exit-once-closed", daemon=True).start()

        tg.start_soon(watch_signals, leave)
        tg.start_soon(watch_parent, leave)
        await serve()
        tg.cancel_scope.cancel()
    return reason
