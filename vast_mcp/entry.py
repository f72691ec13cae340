"""What the `vast-mcp` sub-commands run (kept apart from argument parsing so each imports only what it needs)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import anyio

from .config import Settings, allowed_roots, find_api_key, state_dir, vast_url
from .consent import Caps
from .errors import VastMCPError
from .ledger import Ledger, account_scope, format_ledger, ledger_path
from .reaper import ReapReport, reap_dead_sessions, reap_session
from .remote.keys import load_client_key
from .vast.client import VastClient
from .vast.limits import scaled_limits


def _logging() -> None:
    # stdout belongs to the MCP protocol; every log line goes to stderr.
    level = os.environ.get("VAST_MCP_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The SSH and HTTP libraries log every channel and request at INFO, and asyncssh logs command lines at DEBUG
    # (where a secret typed into a command would show): ours say what matters.
    for noisy in ("asyncssh", "httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def serve(*, http: bool = False, port: int = 8765) -> int:
    """`vast-mcp serve`: the MCP server on stdio (ends with its client) or streamable HTTP on loopback."""
    _logging()
    settings = Settings.from_env()
    from .lifecycle import run_until_client_leaves
    from .server import build_server

    if http:
        from .config import http_token_from_env
        from .http import serve_http

        anyio.run(lambda: serve_http(settings, port=port, token=http_token_from_env()))
        return 0
    server = build_server(settings)
    reason = anyio.run(run_until_client_leaves, server.run_stdio_async)
    logging.getLogger("vast_mcp").info("server stopped: %s", reason)
    return 0


def reap(*, session_id: str | None, within: float) -> int:
    """`vast-mcp reap`: destroy (and confirm) what dead sessions, or the named session, left behind."""
    _logging()
    settings = Settings.from_env()

    async def run() -> ReapReport:
        async with (
            VastClient(
                settings.api_key, settings.vast_url, budget=within, limits=scaled_limits(settings.api_pacing)
            ) as client,
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


def supervise() -> int:
    """`vast-mcp supervise`: follow the runs whose client went away, until none is left."""
    _logging()
    from .supervisor import supervise as run_supervisor

    return run_supervisor(Settings.from_env())


def ledger(*, live_only: bool) -> int:
    """`vast-mcp ledger`: what is tracked, with cost (reads the state directory only; no API key needed)."""
    path = ledger_path(state_dir())
    if not path.exists():
        print(f"No ledger at {path}: nothing has been rented from this machine yet.")
        return 0

    async def run() -> str:
        async with await Ledger.open(path) as book:
            return format_ledger(await book.all_instances(include_done=not live_only), now=time.time())

    print(anyio.run(run))
    return 0


def doctor() -> int:
    """`vast-mcp doctor`: check the key, the API, the SSH key registration and the state directory; say how to fix."""
    problems = 0

    def report(ok: bool, what: str, fix: str = "") -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"[{'ok' if ok else 'FAIL'}] {what}" + ("" if ok or not fix else f"\n       fix: {fix}"), flush=True)

    found = find_api_key()
    report(
        found is not None,
        f"API key: {'found in ' + found[1] if found else 'not found'}",
        "set VAST_API_KEY (or run `vastai set api-key KEY`); create a key at https://cloud.vast.ai/manage-keys/",
    )
    url = vast_url()
    folder = state_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = folder / ".doctor"
        probe.write_text("ok")
        probe.unlink()
        report(True, f"state directory {folder} is writable")
    except OSError as exc:
        report(False, f"state directory {folder} is not writable ({exc})", "set VAST_MCP_STATE_DIR to a folder")
    report(True, f"local folders for uploads/downloads: {', '.join(str(r) for r in allowed_roots())}")
    try:
        caps = Caps.from_env()
        report(
            True,
            f"caps: max $/hr {caps.max_dph or 'none'}, session ${caps.max_session_usd or 'none'}, "
            f"{caps.max_instances or 'no'} instance cap, auto-approve "
            + (f"≤ ${caps.auto_approve_dph}/hr" if caps.auto_approve_dph is not None else "never"),
        )
    except VastMCPError as exc:
        report(False, f"caps: {exc}")
    if found is None:
        return 1

    configured = os.environ.get("VAST_MCP_SSH_KEY")
    key_path = Path(configured).expanduser() if configured else None

    async def remote_checks() -> None:
        key = await load_client_key(folder, key_path)
        report(True, f"SSH key {key.path} ({key.fingerprint})")
        async with VastClient(found[0], url, budget=15) as client:
            try:
                user = await client.current_user()
            except VastMCPError as exc:
                report(False, f"Vast API at {url}: {exc}", "check VAST_URL and the network")
                return
            balance = user.credit if user.credit is not None else user.balance
            report(True, f"Vast API at {url}: key accepted (account {user.email or user.id}, credit {balance})")
            keys = await client.list_ssh_keys()
            ours = key.public_line.split()[1]
            registered = any(len(k.text.split()) > 1 and k.text.split()[1] == ours for k in keys)
            report(
                True,
                "SSH key registered on the account"
                if registered
                else "SSH key not registered on the account yet (the server registers it before the first rent)",
            )
            report(True, f"{len(await client.list_instances())} instance(s) on the account now")

    anyio.run(remote_checks)
    print("all good" if not problems else f"{problems} problem(s) found", flush=True)
    return 1 if problems else 0
