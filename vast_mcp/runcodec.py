"""A run as the ledger keeps it, and back: what lets another process (the supervisor, a later session) follow a
run with the same engine (`workflow.RunBook`) that started it.

Secret values never reach the ledger: the spec keeps their names only. The approval keeps the first quote and
the ceiling the user agreed to, so a failover after a take-over is held to the same limits.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, cast, get_args

from .bids import BidTerms
from .checkpoints import DEFAULT_CHECKPOINT_EVERY_S
from .consent import Quote
from .ledger import Ledger
from .multinode import Group
from .results import RunBrief, RunPhase, RunReceipt, RunStatus, RunView
from .runstore import MachineRecord, RunRecord, RunStore
from .service import Service
from .vast.query import OfferFilters
from .workflow import RESULTS_FOLDER, Run, RunPlan, RunSpec, _Try

_STATES = {"running": "running", "waiting": "waiting", "succeeded": "succeeded", "failed": "failed"}


def spec_data(spec: RunSpec) -> dict[str, Any]:
    return {
        "command": spec.command,
        "image": spec.image,
        "template_hash": spec.template_hash,
        "filters": spec.filters.model_dump(mode="json", exclude_unset=True),  # what was set: defaults stay defaults
        "query": spec.query,
        "disk_gb": spec.disk_gb,
        "max_runtime_h": spec.max_runtime_h,
        "budget_dph": spec.budget_dph,
        "uploads": list(spec.uploads),
        "remote_dir": spec.remote_dir,
        "exclude": list(spec.exclude),
        "setup": list(spec.setup),
        "env": dict(spec.env),
        "secret_names": sorted(spec.secrets),
        "results": list(spec.results),
        "results_dir": spec.results_dir,
        "keep_on_failure": spec.keep_on_failure,
        "ready_timeout_s": spec.ready_timeout_s,
        "max_tries": spec.max_tries,
        "checkpoint_dir": spec.checkpoint_dir,
        "checkpoint_every_s": spec.checkpoint_every_s,
        "interruptible": spec.interruptible,
        "bid_margin": spec.bid_margin,
        "nodes": spec.nodes,
    }


def spec_of(data: dict[str, Any]) -> RunSpec:
    """The spec back; secrets come back as names with empty values (`RunBook._can_go_on` knows what that means)."""
    return RunSpec(
        command=data["command"],
        image=data["image"],
        template_hash=data["template_hash"],
        filters=OfferFilters(**data["filters"]),
        query=data["query"],
        disk_gb=data["disk_gb"],
        max_runtime_h=data["max_runtime_h"],
        budget_dph=data["budget_dph"],
        uploads=tuple(data["uploads"]),
        remote_dir=data["remote_dir"],
        exclude=tuple(data["exclude"]),
        setup=tuple(data["setup"]),
        env=dict(data["env"]),
        secrets={name: "" for name in data.get("secret_names", [])},
        results=tuple(data["results"]),
        results_dir=data["results_dir"],
        keep_on_failure=data["keep_on_failure"],
        ready_timeout_s=data["ready_timeout_s"],
        max_tries=data["max_tries"],
        # Runs saved before checkpoints and bids existed have none.
        checkpoint_dir=data.get("checkpoint_dir"),
        checkpoint_every_s=data.get("checkpoint_every_s", DEFAULT_CHECKPOINT_EVERY_S),
        interruptible=data.get("interruptible", False),
        bid_margin=data.get("bid_margin", 0.0),
        nodes=data.get("nodes", 1),
    )


def _wall(run: Run, mono: float | None) -> float | None:
    """A monotonic time of this process as wall-clock time (what another process can read)."""
    return None if mono is None else time.time() - (time.monotonic() - mono)


async def record_of(run: Run, service: Service, *, reported: bool) -> RunRecord:
    machines = []
    for t in run.tries:
        row = await service.own(t.instance_id) if t.instance_id is not None else None
        machines.append(
            MachineRecord(
                number=t.number,
                offer_id=t.offer_id,
                machine_id=t.machine_id,
                gpu=t.gpu,
                dph=t.dph,
                instance_id=t.instance_id,
                instance_row=row.row_id if row is not None else None,
                outcome=t.outcome,
                reason=t.reason,
                destroyed=t.destroyed,
                kept=t.kept,
            )
        )
    receipt = None
    if run.receipt is not None:
        receipt = {**run.receipt.model_dump(mode="json"), "log_tail": run.receipt.log_tail}
    results_dir = None
    if run.spec.results:
        if run.results_path is None:
            raw = run.spec.results_dir or f"{RESULTS_FOLDER}/{run.id}"
            run.results_path = service.local_path(raw, must_exist=False)
        results_dir = str(run.results_path)
    grant = run.grant
    return RunRecord(
        id=run.id,
        scope=service.scope,
        session_id=service.session_id,
        origin_session=run.origin_session or service.session_id,
        state="recovering" if run.status == "running" and run.recovering else _STATES.get(run.status, "cancelled"),
        phase=run.phase,
        detail=run.detail,
        spec=spec_data(run.spec),
        approval={
            "quote": dataclasses.asdict(grant.quote),
            "approved_by": grant.approved_by,
            "ceiling_dph": grant.ceiling_dph,
            "ceiling_why": grant.ceiling_why,
        },
        job_id=run.job_id,
        instance_id=run.instance_id,
        exit_code=run.exit_code,
        results_dir=results_dir,
        receipt=receipt,
        log_tail=run.log_tail(),
        job_started_at=_wall(run, run.job_started),
        reported=reported and not run.detached,
        waiting_since=run.waiting_since,
        started_at=run.started_wall,
        finished_at=_wall(run, run.finished_at),
        machines=tuple(machines),
        group=run.group.record() if run.group is not None else None,
    )


def quote_of(data: dict[str, Any]) -> Quote:
    fields = {f.name for f in dataclasses.fields(Quote)}
    values = {k: v for k, v in data.items() if k in fields}
    values["env_names"] = tuple(values.get("env_names", ()))
    if isinstance(values.get("bid"), dict):  # `dataclasses.asdict` flattened the bid terms too
        values["bid"] = BidTerms(**values["bid"])
    return Quote(**values)


def run_of(rec: RunRecord, service: Service, *, fetch: bool = False) -> Run:
    """A run to resume in `service`'s session, which must have adopted it (`RunStore.adopt`)."""
    approval = rec.approval
    quote = quote_of(approval["quote"])
    grant = service.approvals.recorded(quote, approval["approved_by"], approval["ceiling_dph"], approval["ceiling_why"])
    spec = spec_of(rec.spec)
    if rec.results_dir:
        service.run_folders.append(Path(rec.results_dir))
    now_wall, now_mono = time.time(), time.monotonic()
    run = Run(
        id=rec.id,
        plan=RunPlan(spec, quote, grant.ceiling_dph, grant.ceiling_why),
        grant=grant,
        started_at=now_mono - (now_wall - rec.started_at),
        started_wall=rec.started_at,
        origin_session=rec.origin_session,
        resumed=True,
        fetch=fetch,
        instance_id=rec.instance_id,
        job_id=rec.job_id,
        waiting_since=rec.waiting_since,
        results_path=Path(rec.results_dir) if rec.results_dir else None,
    )
    if rec.job_started_at is not None:
        run.job_started = now_mono - (now_wall - rec.job_started_at)
    run.tries = [_try_of(m) for m in rec.machines]
    if rec.group is not None:
        run.group = Group.of(rec.group, run.tries)
    return run


def _try_of(m: MachineRecord) -> _Try:
    return _Try(
        number=m.number,
        offer_id=m.offer_id,
        machine_id=m.machine_id,
        gpu=m.gpu,
        dph=m.dph,
        instance_id=m.instance_id,
        outcome=m.outcome,
        reason=m.reason,
        destroyed=m.destroyed,
        kept=m.kept,
    )


def receipt_of(rec: RunRecord) -> RunReceipt | None:
    if rec.receipt is None:
        return None
    data = dict(rec.receipt)
    tail = str(data.pop("log_tail", ""))
    return RunReceipt(**data).with_log_tail(tail)


_VIEW_STATUS: dict[str, RunStatus] = {
    "running": "running",
    "recovering": "recovering",
    "waiting": "waiting",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}


async def _cost(ledger: Ledger, rec: RunRecord) -> float:
    now = time.time()
    total = 0.0
    for m in rec.machines:
        if m.instance_row is not None:
            total += (await ledger.instance(m.instance_row)).accrued(now)
    return total


async def stored_view(service: Service, rec: RunRecord) -> RunView:
    """A run of an earlier session (or one the supervisor follows), as the ledger has it."""
    from .supervisor import waiting_words

    end = rec.finished_at or time.time()
    return RunView(
        status=_VIEW_STATUS.get(rec.state, "failed"),
        run_id=rec.id,
        phase=cast(RunPhase, rec.phase) if rec.phase in get_args(RunPhase) else None,
        detail=rec.detail
        if rec.state != "running" or rec.session_id == service.session_id
        else f"followed by another process (session {rec.session_id}): {rec.detail}",
        elapsed_s=round(end - rec.started_at, 1),
        cost_usd=round(await _cost(service.ledger, rec), 6),
        instance_id=rec.instance_id,
        job_id=rec.job_id,
        tries=[_try_of(m).view() for m in rec.machines],
        receipt=receipt_of(rec),
        message=await waiting_words(service, rec) if rec.state == "waiting" else None,
    )


async def recent_view(service: Service, store: RunStore, limit: int = 10) -> RunView:
    """The account's recent runs from this machine, with what happened while nobody was connected."""
    runs = [
        RunBrief(
            run_id=rec.id,
            status=rec.state,
            started_at=round(rec.started_at, 1),
            detail=rec.detail[:200],
            instance_id=rec.instance_id,
            cost_usd=round(await _cost(service.ledger, rec), 6),
            results_dir=rec.results_dir,
        )
        for rec in await store.recent(service.scope, limit)
    ]
    return RunView(status="listed", runs=runs, notices=list(service.notices))
