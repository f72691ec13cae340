"""`vast-mcp runs`: the runs of this state directory, from the ledger (list, show one, cancel, fetch)."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import anyio

from .config import Settings, state_dir
from .errors import VastMCPError
from .ledger import Ledger, LedgerInstance, account_scope, ledger_path
from .runcodec import receipt_of
from .runstore import RunRecord, RunStore
from .service import Service
from .supervisor import cancel_run, fetch_run
from .vast.client import VastClient
from .vast.limits import scaled_limits
from .workflow import RunBook

FETCH_BOUND_S = 4 * 3600.0


def _utc(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def format_runs(runs: list[RunRecord]) -> str:
    if not runs:
        return "No runs recorded."
    header = ("RUN", "STATE", "STARTED (UTC)", "INSTANCE", "RESULTS", "DETAIL")
    rows = [header]
    for r in runs:
        detail = " ".join(r.detail.split())
        rows.append(
            (
                r.id,
                r.state,
                _utc(r.started_at),
                str(r.instance_id) if r.instance_id is not None else "-",
                r.results_dir or "-",
                detail if len(detail) <= 60 else detail[:59] + "…",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def format_run(rec: RunRecord, rows: dict[int, LedgerInstance]) -> str:
    lines = [
        f"run {rec.id}: {rec.state} ({rec.phase}) {rec.detail}".rstrip(),
        f"  started {_utc(rec.started_at)} UTC, finished {_utc(rec.finished_at)}",
        f"  approved: up to ${rec.approval['ceiling_dph']:.3f}/hr for {rec.spec['max_runtime_h']:g} h on up to "
        f"{rec.spec['max_tries']} machine(s), by {rec.approval['approved_by']}",
        f"  job {rec.job_id or '-'}; results to {rec.results_dir or '-'}",
    ]
    now = time.time()
    for m in rec.machines:
        row = rows.get(m.instance_row) if m.instance_row is not None else None
        state = row.state.value if row is not None else "destroyed" if m.destroyed else "not created"
        cost = f", {row.hours(now):.3f} h, ${row.accrued(now):.4f}" if row is not None else ""
        why = f": {m.reason}" if m.reason else ""
        lines.append(
            f"  machine {m.number}: {m.gpu} ${m.dph:.3f}/hr, instance {m.instance_id}{cost}, {m.outcome}, {state}{why}"
        )
    receipt = receipt_of(rec)
    if receipt is not None:
        lines.append(
            f"  receipt: {receipt.outcome}, ${receipt.total_cost_usd:.4f}, exit code {receipt.exit_code}, "
            f"{receipt.result_files} result file(s) in {receipt.results_dir or '-'}"
            + (f"; {receipt.error}" if receipt.error else "")
        )
    return "\n".join(lines)


def runs(action: str, run_id: str | None) -> int:
    """`vast-mcp runs [list|show ID|cancel ID|fetch ID]`."""
    if action in ("list", "show"):
        return _read_only(action, run_id)
    if run_id is None:
        raise VastMCPError(f"`vast-mcp runs {action}` needs a run id; `vast-mcp runs` lists them.")
    settings = Settings.from_env()
    if action == "cancel":
        return anyio.run(_cancel, settings, run_id)
    return anyio.run(_fetch, settings, run_id)


def _read_only(action: str, run_id: str | None) -> int:
    path = ledger_path(state_dir())
    if not path.exists():
        print(f"No ledger at {path}: nothing has run from this machine yet.")
        return 0

    async def read() -> str:
        async with await Ledger.open(path) as ledger:
            store = RunStore(ledger)
            if action == "list":
                found = await ledger.run_in(
                    lambda conn: [r[0] for r in conn.execute("SELECT id FROM runs ORDER BY started_at DESC LIMIT 50")]
                )
                return format_runs([r for r in [await store.get(i) for i in found] if r is not None])
            assert run_id is not None
            rec = await store.get(run_id)
            if rec is None:
                raise VastMCPError(f"No run {run_id!r} in {path}. `vast-mcp runs` lists the runs.")
            rows = {m.instance_row: await ledger.instance(m.instance_row) for m in rec.machines if m.instance_row}
            return format_run(rec, rows)

    print(anyio.run(read))
    return 0


async def _cancel(settings: Settings, run_id: str) -> int:
    async with (
        VastClient(settings.api_key, settings.vast_url, limits=scaled_limits(settings.api_pacing)) as client,
        await Ledger.open(ledger_path(settings.state_dir)) as ledger,
    ):
        store = RunStore(ledger)
        rec = await store.get(run_id)
        if rec is None or rec.scope != account_scope(settings.vast_url, settings.api_key):
            raise VastMCPError(
                f"No run {run_id!r} on this account in this state directory. `vast-mcp runs` lists them."
            )
        report = await cancel_run(client, ledger, store, run_id)
    print(f"vast-mcp runs cancel {run_id}: {report.summary()}", flush=True)
    return 1 if report.failed else 0


async def _fetch(settings: Settings, run_id: str) -> int:
    async with Service.open(settings) as service:
        async with anyio.create_task_group() as tg:
            tg.start_soon(service.heartbeat_forever)
            book = RunBook(service, tg)
            run = await fetch_run(book, run_id)
            started = time.monotonic()
            with anyio.move_on_after(FETCH_BOUND_S):
                while not run.done.is_set():
                    with anyio.move_on_after(10):
                        await run.changed().wait()
                    print(f"{time.monotonic() - started:5.0f} s  {run.phase}: {run.detail}", flush=True)
            view = await book.view(run)
            tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await service.teardown(inline_s=60.0)
    print(view.summary(), flush=True)
    return 0 if view.status == "succeeded" else 1
