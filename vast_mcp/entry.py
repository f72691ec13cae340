"""What the `vast-mcp` sub-commands run (kept apart from argument parsing so each imports only what it needs)."""

from __future__ import annotations

import logging
import os
import sys
import time

import anyio

from .config import Settings
from .ledger import Ledger, account_scope, format_ledger, ledger_path
from .reaper import ReapReport, reap_dead_sessions, reap_session
from .vast.client import VastClient


def _logging() -> None:
    # stdout belongs to the MCP protocol; every log line goes to stderr.
    level = os.environ.get("VAST_MCP_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(*, http: bool = False, port: int = 8765) -> int:
    """`vast-mcp serve`: the MCP server on stdio (ends with its client) or streamable HTTP on loopback."""
    _logging()
    settings = Settings.from_env()
    from .lifecycle import run_until_client_leaves
    from .server import build_server

    server = build_server(settings)
    if http:
        server.run("streamable-http", host="127.0.0.1", port=port)
        return 0
    reason = anyio.run(run_until_client_leaves, server.run_stdio_async)
    logging.getLogger("vast_mcp").info("server stopped: %s", reason)
    return 0


def reap(*, session_id: str | None, within: float) -> int:
    """`vast-mcp reap`: destroy (and confirm) what dead sessions, or the named session, left behind."""
    _logging()
    settings = Settings.from_env()

    async def run() -> ReapReport:
        async with (
            VastClient(settings.api_key, settings.vast_url, budget=within) as client,
            await Ledger.open(ledger_path(settings.state_dir)) as ledger,
        ):
            report = ReapReport()
            if session_id is not None:
                await ledger.adopt_session(session_id)
                report.merge(await reap_session(client, ledger, session_id, within=within))
                if not await ledger.to_destroy(session_id):
                    await ledger.end_session(session_id)
            scope = account_scope(settings.vast_url, settings.api_key)
            report.merge(await reap_dead_sessions(client, ledger, scope, within=within))
            return report

    report = anyio.run(run)
    print(f"vast-mcp reap: {report.summary()}", flush=True)
    return 1 if report.failed else 0


def ledger(*, live_only: bool) -> int:
    """`vast-mcp ledger`: what is tracked, with cost (reads the state directory only; no API key needed)."""
    state = os.environ.get("VAST_MCP_STATE_DIR")
    from pathlib import Path

    from .config import default_state_dir

    path = ledger_path(Path(state).expanduser() if state else default_state_dir())
    if not path.exists():
        print(f"No ledger at {path}: nothing has been rented from this machine yet.")
        return 0

    async def run() -> str:
        async with await Ledger.open(path) as book:
            return format_ledger(await book.all_instances(include_done=not live_only), now=time.time())

    print(anyio.run(run))
    return 0
