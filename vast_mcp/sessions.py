"""MCP sessions and the server sessions behind them: one `Service` (quotes, approvals, instances, ledger session,
runs) per MCP client, opened on first use and torn down when that client goes away.

Over stdio a process serves one client, so there is one session, ended with the process. Over HTTP each MCP
session (the `Mcp-Session-Id` the SDK hands a client at its handshake) gets its own, torn down when the client
deletes its session, when it has been idle past `VAST_MCP_HTTP_IDLE_S`, or when the server stops: one client can
neither see nor use another's quotes or instances.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus

from .config import Settings
from .errors import VastMCPError
from .service import Service
from .supervisor import START_NOTICES_S, ensure_supervisor, session_start
from .workflow import RunBook

log = logging.getLogger("vast_mcp.sessions")

STDIO_KEY = "stdio"
IDLE_CHECK_S = 5.0


@dataclass
class SessionState:
    """One client's state: the service that rents, and its server-side runs."""

    service: Service
    runs: RunBook
    last_seen: float = field(default_factory=time.monotonic)
    close: anyio.Event = field(default_factory=anyio.Event)
    closed: anyio.Event = field(default_factory=anyio.Event)


async def _host_session(
    settings: Settings, *, sweep: bool, task_status: TaskStatus[SessionState] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Open one session, serve it until told to close, then stop its runs and destroy what it rented."""
    state: SessionState | None = None
    try:
        async with Service.open(settings) as service, anyio.create_task_group() as tg:
            tg.start_soon(service.heartbeat_forever)
            tg.start_soon(service.enforce_limits_forever)
            if sweep:
                tg.start_soon(service.sweep_forever)
            book = RunBook(service, tg)
            state = SessionState(service, book)
            with anyio.move_on_after(START_NOTICES_S):
                try:
                    await session_start(service)  # runs that ended, or wait, while nobody was connected
                except VastMCPError as exc:
                    log.warning("looking at earlier runs failed: %s", exc)
            task_status.started(state)
            try:
                await state.close.wait()
            finally:
                with anyio.CancelScope(shield=True):
                    # Runs stop first, so teardown is the only one destroying; approved runs in progress are left
                    # to the supervisor, and teardown leaves their instances alone.
                    left = await book.detach()
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    if left:
                        await anyio.to_thread.run_sync(ensure_supervisor, settings)
                        log.warning(
                            "session %s ended: run(s) %s go on under the supervisor",
                            service.session_id,
                            ", ".join(r.id for r in left),
                        )
                    report = await service.teardown()
                    if report.destroyed or report.failed:
                        log.warning("session %s ended: %s", service.session_id, report.summary())
    finally:
        if state is not None:
            state.closed.set()


class Sessions:
    """The sessions of one server process, by MCP session key."""

    def __init__(self, settings: Settings, tg: TaskGroup, *, idle_s: float | None) -> None:
        self.settings = settings
        self._tg = tg
        self._idle_s = idle_s
        self._states: dict[str, SessionState] = {}
        self._lock = anyio.Lock()

    async def get(self, key: str) -> SessionState:
        """The session for `key`, opened on first use. The first session also sweeps up after dead servers."""
        async with self._lock:
            state = self._states.get(key)
            if state is None:
                state = await self._tg.start(self._run, key, not self._states)
                self._states[key] = state
        state.last_seen = time.monotonic()
        return state

    async def _run(self, key: str, sweep: bool, task_status: TaskStatus[SessionState]) -> None:
        try:
            await _host_session(self.settings, sweep=sweep, task_status=task_status)
        finally:
            self._states.pop(key, None)

    async def end(self, key: str) -> None:
        """Tear down the session for `key` (its client left), and wait until that is done or handed off."""
        state = self._states.get(key)
        if state is not None:
            state.close.set()
            await state.closed.wait()

    async def end_all(self) -> None:
        for state in list(self._states.values()):
            state.close.set()
        for state in list(self._states.values()):
            await state.closed.wait()

    async def end_idle_forever(self) -> None:
        """End sessions whose client has been silent past the idle limit (HTTP has no disconnect signal)."""
        if self._idle_s is None:
            return
        while True:
            await anyio.sleep(min(IDLE_CHECK_S, self._idle_s / 2))
            now = time.monotonic()
            for key, state in list(self._states.items()):
                if now - state.last_seen > self._idle_s and not state.runs.active():
                    log.warning("MCP session %s idle for %.0f s: ending it", key, now - state.last_seen)
                    state.close.set()

    def keys(self) -> list[str]:
        return list(self._states)


SessionOf = Callable[[], Awaitable[SessionState]]
