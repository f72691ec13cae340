"""The supervisor: the process on the user's machine that finishes approved runs whose client went away.

`vast-mcp supervise` runs one per state directory (a lock file says which), detached from the server like the
reaper, so neither the host's kill of the server's process group nor a SIGKILL of the server reaches it. The
first `run_job` of a server starts it; it then watches the ledger for runs whose owning session ended (the
client left: `RunBook.detach`) or died (SIGKILL, crash: its process is gone), takes each over (its instances
move to the supervisor's session) and follows it with the same engine that started it (`workflow.RunBook`): to
the end of the job, the results into the declared folder, the instance destroyed, the receipt in the ledger,
within what the user approved (max runtime, $/hr ceiling, number of machines). It keeps the instances'
heartbeats fresh while it does, sweeps what dead sessions left, and exits once no run is left to watch.

Each session start also looks here (`session_start`): runs that ended while nobody was connected are told, runs
whose results wait on a stopped instance are told with what that costs per day, such instances left past
`VAST_MCP_STOPPED_KEEP_DAYS` are destroyed, and a supervisor is started if a run needs one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import anyio

from .config import Settings
from .errors import VastMCPError
from .ledger import DEFAULT_LEASE_S, Ledger, LedgerInstance
from .reaper import ReapReport, reap_rows
from .runcodec import run_of
from .runstore import RunRecord, RunStore
from .service import Service
from .vast.client import VastClient
from .workflow import Run, RunBook

log = logging.getLogger("vast_mcp.supervisor")

LOCK_NAME = "supervisor.lock"
POLL_S = 1.0  # how often the ledger is read for runs to take over
IDLE_EXIT_S = 10.0  # with no run left to watch for this long, the supervisor exits
START_NOTICES_S = 10.0  # bound on what a session start spends on runs before its first answer
DAY_S = 86400.0


# --- one supervisor per state directory ------------------------------------------------------------------------


def _lock_path(state_dir: Path) -> Path:
    return state_dir / LOCK_NAME


def _try_lock(state_dir: Path) -> IO[bytes] | None:
    """The lock file, held (until closed), or None when another process holds it."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(_lock_path(state_dir), "ab")  # noqa: SIM115 - held for the process's life by the caller
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def supervisor_running(state_dir: Path) -> bool:
    handle = _try_lock(state_dir)
    if handle is None:
        return True
    handle.close()
    return False


def ensure_supervisor(settings: Settings) -> int | None:
    """Start `vast-mcp supervise` for this state directory unless one runs; its pid when started.

    Like the reaper it runs in its own session, its key in its environment (never its command line), and it
    gets every setting that decides where results land and how instances are watched."""
    if supervisor_running(settings.state_dir):
        return None
    env = dict(os.environ)
    env.update(
        VAST_API_KEY=settings.api_key.reveal(),
        VAST_URL=settings.vast_url,
        VAST_MCP_STATE_DIR=str(settings.state_dir),
        VAST_MCP_ROOTS=os.pathsep.join(str(r) for r in settings.roots),
        VAST_MCP_LEASE_S="none" if settings.lease_s is None else str(settings.lease_s),
        VAST_MCP_API_PACING=str(settings.api_pacing),
        VAST_MCP_STOPPED_KEEP_DAYS=str(settings.stopped_keep_days),
    )
    if settings.ssh_key_path is not None:
        env["VAST_MCP_SSH_KEY"] = str(settings.ssh_key_path)
    with open(settings.state_dir / "supervisor.log", "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vast_mcp", "supervise"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=env,
            start_new_session=True,
            close_fds=True,
            cwd=str(settings.roots[0]) if settings.roots else None,
        )
    log.info("started supervisor process %d", proc.pid)
    return proc.pid


def supervise(settings: Settings) -> int:
    """`vast-mcp supervise`: follow the runs whose client went away until none is left (exit 0 at once when
    another supervisor already runs for this state directory)."""
    handle = _try_lock(settings.state_dir)
    if handle is None:
        print("vast-mcp supervise: another supervisor runs for this state directory", flush=True)
        return 0
    with handle:
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        anyio.run(_supervise, settings)
    return 0


async def _supervise(settings: Settings) -> None:
    async with Service.open(settings) as service:
        # The runs it takes over were approved, each within its own session's spend cap; its own session's spend
        # is theirs, so that cap is not counted again here.
        service.session_cap = None
        lease = settings.lease_s or DEFAULT_LEASE_S
        async with anyio.create_task_group() as tg:
            tg.start_soon(service.heartbeat_forever)
            tg.start_soon(service.enforce_limits_forever)
            tg.start_soon(service.sweep_forever)
            book = RunBook(service, tg)
            book.supervised = True
            idle_since = time.monotonic()
            while True:
                try:
                    for rec in await book.store.adoptable(service.scope, lease_s=lease, besides=service.session_id):
                        adopted = await book.store.adopt(rec.id, service.session_id, from_session=rec.session_id)
                        if adopted is not None:
                            log.warning("run %s: its session %s is gone; following it here", rec.id, rec.session_id)
                            book.resume(run_of(adopted, service))
                    watching = book.active() or bool(await book.store.unfinished(service.scope))
                except VastMCPError as exc:
                    log.warning("reading the ledger failed (retried in %.0f s): %s", POLL_S, exc)
                    watching = True
                if watching:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > IDLE_EXIT_S:
                    break
                await anyio.sleep(POLL_S)
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            report = await service.teardown(inline_s=60.0)
        log.warning("supervisor done: %s", report.summary())


# --- what a session start says and does about runs ------------------------------------------------------------


async def session_start(service: Service) -> None:
    """Tell the new session (its notices) what happened to runs while nobody was connected, destroy stopped run
    instances past the keep limit, and start a supervisor when runs need one."""
    store = RunStore(service.ledger)
    settings = service.settings
    scope = service.scope
    unreported = await store.unreported(scope)
    for rec in unreported:
        where = f"; results in {rec.results_dir}" if rec.results_dir and rec.state == "succeeded" else ""
        service.notices.append(
            f"Run {rec.id} {rec.state} while nobody was connected{where}. run_status run_id='{rec.id}' has its receipt."
        )
    await store.mark_reported([r.id for r in unreported])
    limit = settings.stopped_keep_days * DAY_S
    for rec in await store.waiting(scope):
        since = rec.waiting_since or rec.updated_at
        if time.time() - since >= limit:
            report = await cancel_run(service.client, service.ledger, store, rec.id)
            service.notices.append(
                f"Run {rec.id}: its results waited on a stopped instance for over {settings.stopped_keep_days:g} "
                f"day(s) (VAST_MCP_STOPPED_KEEP_DAYS) and were destroyed with it ({report.summary()})."
            )
            continue
        service.notices.append(await waiting_words(service, rec))
    if settings.supervise and await store.unfinished(scope):
        await anyio.to_thread.run_sync(ensure_supervisor, settings)


async def waiting_words(service: Service, rec: RunRecord) -> str:
    """What waits for the user, what it costs per day, and how to fetch or destroy it."""
    per_day = ""
    if rec.instance_id is not None:
        with contextlib.suppress(VastMCPError):
            inst = await service.client.show_instance(rec.instance_id)
            if inst is not None and inst.storage_total_cost is not None:
                per_day = f", costing ${inst.storage_total_cost * 24:.2f}/day for its disk"
    return (
        f"Run {rec.id}: the job ended while nobody was connected; its results wait on stopped instance "
        f"{rec.instance_id}{per_day}. run_status run_id='{rec.id}' action='fetch' starts it, downloads the results "
        f"to {rec.results_dir} and destroys it; action='destroy' destroys it without fetching."
    )


# --- cancel, fetch -------------------------------------------------------------------------------------------


async def run_rows(ledger: Ledger, rec: RunRecord) -> list[LedgerInstance]:
    rows = []
    for m in rec.machines:
        if m.instance_row is not None:
            row = await ledger.instance(m.instance_row)
            if row.is_live:
                rows.append(row)
    return rows


async def cancel_run(client: VastClient, ledger: Ledger, store: RunStore, run_id: str) -> ReapReport:
    """End a run now, wherever it is followed: marked cancelled (its owner stops following it) and every instance
    it rented destroyed at once, confirmed."""
    rec = await store.request_cancel(run_id)
    if rec is None:
        raise VastMCPError(f"No run {run_id!r} in the ledger. `vast-mcp runs` lists the runs.")
    report = await reap_rows(client, ledger, await run_rows(ledger, rec), within=120.0)
    overlay = (rec.group or {}).get("overlay")
    if overlay:
        # A multi-node run's private network goes with its machines (it costs nothing, but would stay listed).
        with anyio.move_on_after(30), contextlib.suppress(VastMCPError):
            await client.delete_overlay(str(overlay))
    return report


async def fetch_run(book: RunBook, run_id: str) -> Run:
    """Start the stopped instance of a waiting run, download its results, destroy it: in this session."""
    service = book.service
    rec = await book.store.get(run_id)
    if rec is None or rec.scope != service.scope:
        raise VastMCPError(f"No run {run_id!r} on this account. Call run_status without run_id to list runs.")
    if rec.state != "waiting":
        raise VastMCPError(
            f"Run {run_id} is {rec.state}: only a run whose results wait on a stopped instance can be fetched."
        )
    adopted = await book.store.adopt(run_id, service.session_id, from_session=rec.session_id)
    if adopted is None:
        raise VastMCPError(f"Run {run_id} was taken over by another process just now; call run_status again.")
    return book.resume(run_of(adopted, service, fetch=True))
