"""`run_job`: the whole workflow in one server-side run, as a careful operator would do it by hand.

search → consent → create → ready → upload → job (setup first) → watch → download → destroy → receipt.

A run lives in a task of the server session's task group, so it goes on after the `run_job` call returns and is
cancelled when the session ends; the session's teardown then destroys its instance like any other in the ledger.
Everything that rents goes through `Service` (caps, ledger, price re-check). The user approves a ceiling, not one
machine: up to `ceiling_dph` $/hr for up to `max_runtime_h` hours on up to `max_tries` machines, one after the
other, and every failover offer is re-quoted and checked against that ceiling before it is rented.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from .approval import ApprovedBy, Grant, request_digest
from .checkpoints import DEFAULT_CHECKPOINT_EVERY_S, LOCAL_FOLDER, CheckpointMirror, check_folder, keep_synced
from .checkpoints import script_lines as checkpoint_lines
from .consent import Quote
from .deadman import FETCHED_COMMAND, run_marker_command
from .errors import (
    AuthError,
    CapExceededError,
    ConsentError,
    OfferUnavailableError,
    RemoteError,
    TransferError,
    VastAPIError,
    VastMCPError,
)
from .framing import DATA_BUDGET, RESULT_CAP, json_size, shown_size, visible
from .ledger import LedgerInstance
from .multinode import Group, group_question, plan_group, run_group
from .pages import FIT_ROUNDS
from .remote.transfer import remote_path_word
from .results import (
    ReadyResult,
    RunApprovalView,
    RunPhase,
    RunReceipt,
    RunStatus,
    RunTry,
    RunView,
    watchdog_warning,
)
from .runstore import RunStore
from .service import CreateRequest, Progress, Service, quote_view
from .sweep import plan_sweep, sweep_question
from .vast.query import OfferFilters

log = logging.getLogger("vast_mcp.workflow")

MAX_TRIES = 3
LOG_KEEP_BYTES = 64 * 1024  # job log kept per run for run_status; older output stays in the file on the instance
LOG_TAIL_BYTES = 4 * 1024  # end of the log shown in the receipt
READ_MAX_BYTES = 16 * 1024  # log returned by one run_status call
PULL_MAX_S = 1800.0  # a boot that keeps making progress (a big image pulling) is given up on only after this
WAIT_READY_CHUNK_S = 30.0  # one Service.wait_ready call; the run's status is refreshed between calls
TAIL_WAIT_S = 20.0  # the instance holds a tail request this long waiting for output
# A run that may lose its machine mid-job reads the log more often: what a lost machine printed since the last
# read is lost with it.
RECOVERING_TAIL_WAIT_S = 2.0
TAIL_SPACING_S = 2.0  # each tail also reads the instance from Vast, whose show-instance route allows ~1 call / 2 s
WATCH_FAILURES = 6  # consecutive failed log reads before the instance is declared unreachable
TRANSFER_BOUND_S = 3600.0
LOG_NOTE_S = 5.0  # bound on fetching an instance's log to explain a failure
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?Z?\s*")
CANCEL_WAIT_S = 0.3  # what session teardown grants runs to stop before it destroys their instances
RESULTS_FOLDER = "vast-results"
SAVE_EVERY_S = 1.0  # a run is saved to the ledger at most this often (and at least this often it checks for a cancel)


@dataclass(frozen=True)
class RunSpec:
    """What the caller asked to run; everything but secret values is bound into the approval's digest."""

    command: str
    image: str | None
    template_hash: str | None
    filters: OfferFilters
    query: str
    disk_gb: float
    max_runtime_h: float
    budget_dph: float | None
    uploads: tuple[str, ...] = ()
    remote_dir: str = "~"
    exclude: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict)
    results: tuple[str, ...] = ()
    results_dir: str | None = None
    keep_on_failure: bool = False
    ready_timeout_s: float = 300.0
    max_tries: int = MAX_TRIES
    checkpoint_dir: str | None = None  # mirrored while the job runs, restored onto the next machine (checkpoints.py)
    checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S
    interruptible: bool = False  # bid instead of renting on demand (bids.py)
    bid_margin: float = 0.0  # fraction above the offer's minimum bid; the server's setting, shown to the user
    nodes: int = 1  # above 1: one torchrun job across that many machines of one cluster (`multinode.py`)
    sweep: tuple[str, ...] = ()  # one run per entry, all at once, with $SWEEP_ARG set (`sweep.py`)

    @property
    def recovers(self) -> bool:
        """Whether a machine lost mid-job is replaced: with a checkpoint to resume from, or when the user chose
        interruptible machines, which are stopped by design (without a checkpoint the job starts over)."""
        return self.checkpoint_dir is not None or self.interruptible

    @property
    def moves_data(self) -> bool:
        """Whether the job uploads or downloads: then offers with direct ports rank first (the proxy is slower)."""
        return bool(self.uploads or self.results)

    def request(self, offer_id: int) -> CreateRequest:
        return CreateRequest(
            offer_id=offer_id,
            disk_gb=self.disk_gb,
            max_runtime_h=self.max_runtime_h,
            image=self.image,
            template_hash=self.template_hash,
            bid_margin=self.bid_margin if self.interruptible else None,
        )

    def digest(self) -> str:
        """What an approval of this run covers: every argument, secrets by name only."""
        data = {
            "command": self.command,
            "image": self.image,
            "template_hash": self.template_hash,
            "filters": self.filters.model_dump(mode="json"),
            "query": self.query,
            "disk_gb": self.disk_gb,
            "max_runtime_h": self.max_runtime_h,
            "budget_dph": self.budget_dph,
            "uploads": self.uploads,
            "remote_dir": self.remote_dir,
            "exclude": self.exclude,
            "setup": self.setup,
            "env": dict(self.env),
            "secret_names": sorted(self.secrets),
            "results": self.results,
            "results_dir": self.results_dir,
            "keep_on_failure": self.keep_on_failure,
            "ready_timeout_s": self.ready_timeout_s,
            "max_tries": self.max_tries,
            "checkpoint_dir": self.checkpoint_dir,
            "checkpoint_every_s": self.checkpoint_every_s,
            "interruptible": self.interruptible,
            "bid_margin": self.bid_margin if self.interruptible else None,
        }
        if self.nodes > 1:
            data["nodes"] = self.nodes
        if self.sweep:
            data["sweep"] = self.sweep
        return request_digest(["run", data])

    def script(self, *, resume: bool = False) -> str:
        """The background job: go to the working folder, run the setup (stopping at the first failure), then
        the command itself, so setup output lands in the same log and its failure in the exit code."""
        folder = remote_path_word(self.remote_dir)
        lines = [f"mkdir -p {folder} && cd {folder} || exit 126"]
        if self.checkpoint_dir is not None:
            lines += checkpoint_lines(self.remote_checkpoint(), resume=resume)
        if self.setup:
            lines += ["set -e", *self.setup, "set +e"]
        lines.append(self.command)
        return "\n".join(lines) + "\n"

    def remote_results(self) -> list[str]:
        """Result paths as the download understands them; relative ones start in the job's working folder."""
        base = self.remote_dir.rstrip("/") or "/"
        return [p if p.startswith(("/", "~")) else f"{base}/{p}" for p in self.results]

    def remote_checkpoint(self) -> str:
        """The checkpoint folder as the transfers understand it (relative to the job's working folder)."""
        assert self.checkpoint_dir is not None
        path, base = self.checkpoint_dir.rstrip("/"), self.remote_dir.rstrip("/") or "/"
        return path if path.startswith(("/", "~")) else f"{base}/{path.removeprefix('./')}"


@dataclass(frozen=True)
class RunPlan:
    """A run ready for the user's approval: the first machine's quote and the ceiling every try must respect."""

    spec: RunSpec
    quote: Quote
    ceiling_dph: float
    ceiling_why: str
    raise_cap_to: float | None = None  # the session spend cap this run needs, asked of the user

    def question(self, cap_words: str = "") -> str:
        """What the user approves. Built from the quote and the spec only, so asking twice asks the same thing."""
        if self.spec.nodes > 1:
            return group_question(self, cap_words)
        if self.spec.sweep:
            return sweep_question(self, cap_words)
        q = self.quote
        tries = self.spec.max_tries
        lost = " or is lost or stopped while the job runs" if self.spec.recovers else ""
        failover = (
            f" If that machine does not start (no boot, SSH never answers){lost}, it is destroyed at once and up to "
            f"{tries - 1} other machine(s) may be tried, one at a time, each at no more than "
            f"${self.ceiling_dph:.3f}/hr ({self.ceiling_why})."
            if tries > 1
            else ""
        )
        if self.spec.recovers and tries > 1:
            failover += (
                f" The job then resumes from its last checkpoint ({self.spec.checkpoint_dir}, fetched every "
                f"{self.spec.checkpoint_every_s:g} s)"
                if self.spec.checkpoint_dir is not None
                else " The job then starts over (it declared no checkpoint folder)"
            ) + ", within what is left of the max runtime."
        kept = (
            f" If the job fails, that instance is KEPT for debugging: it goes on billing ${self.ceiling_dph:.3f}/hr "
            "at most, with no end date, until someone destroys it."
            if self.spec.keep_on_failure
            else ""
        )
        spec = self.spec
        command = spec.command if len(spec.command) <= 200 else spec.command[:200] + "…"
        job = f" The job runs `{command}`"
        if spec.setup:
            job += f" after {len(spec.setup)} setup command(s)"
        if spec.env or spec.secrets:
            job += f", with environment variables {', '.join(sorted({*spec.env, *spec.secrets}))}"
        job += "."
        return (
            f"Run a job: {q.describe()}{job}{failover} Approving allows up to ${self.ceiling_dph:.3f}/hr for up to "
            f"{self.spec.max_runtime_h:g} h (at most ${self.ceiling_dph * self.spec.max_runtime_h:,.2f} for the job, "
            f"plus a few minutes of any machine that fails to start). The instance is destroyed when the job ends."
            f"{kept} If this conversation ends first, the run goes on under a supervisor on this computer; if that is "
            "gone too and the results cannot be fetched, the instance is stopped, billing only its disk, until you "
            f"fetch or destroy them.{cap_words}"
        )

    def view(self, approved_by: ApprovedBy | None, *, with_id: bool = False) -> RunApprovalView:
        return RunApprovalView(
            approved_by=approved_by,
            quote=quote_view(self.quote, with_id=with_id),
            ceiling_dph=round(self.ceiling_dph, 6),
            max_tries=self.spec.max_tries,
            max_runtime_hours=self.spec.max_runtime_h,
            text=self.question(),
        )


async def plan_run(service: Service, spec: RunSpec, *, allow_cap_raise: bool = False) -> RunPlan:
    """Check the local paths, find the cheapest matching offers and quote the best one (caps checked; the
    session's spend cap may be one the user is asked to raise, with `allow_cap_raise`)."""
    if spec.nodes > 1:
        return await plan_group(service, spec)
    if spec.sweep:
        return await plan_sweep(service, spec)
    for path in spec.uploads:
        service.local_path(path, must_exist=True)
    if spec.results_dir is not None:
        service.local_path(spec.results_dir, must_exist=False)
    if spec.checkpoint_dir is not None:
        check_folder(spec.checkpoint_dir)
    found = await service.search(
        query=spec.query,
        filters=spec.filters,
        disk_gb=spec.disk_gb,
        order="dph",
        limit=spec.max_tries,
        prefer_direct=spec.moves_data,
        offer_type=offer_type(spec),
    )
    if not found.offers:
        budget = f" at or below ${spec.budget_dph:g}/hr" if spec.budget_dph is not None else ""
        raise VastMCPError(
            f"No offer matches these GPU requirements{budget} with {spec.disk_gb:g} GB of disk. Loosen the "
            "requirements (GPU model, VRAM, reliability, countries) or raise max_dph, then call run_job again."
        )
    quote = await service.quote(spec.request(found.offers[0].offer_id), allow_cap_raise=allow_cap_raise)
    raise_to = await service.cap_needed(quote) if allow_cap_raise else None
    if spec.budget_dph is not None:
        ceiling, why = spec.budget_dph, "the budget given for this run"
    else:
        ceiling = max(o.dph for o in found.offers)
        why = "the dearest of the cheapest matching offers; give a budget to allow more"
        if spec.interruptible:
            # Bid offers list their minimum bid; each machine is bid that plus the margin.
            ceiling *= 1.0 + spec.bid_margin
            why = f"the dearest of the cheapest matching offers' minimum bids plus {spec.bid_margin * 100:g}%"
    return RunPlan(spec, quote, max(ceiling, quote.dph), why, raise_to)


def offer_type(spec: RunSpec) -> str:
    return "bid" if spec.interruptible else "on-demand"


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class _Try:
    number: int
    offer_id: int
    machine_id: int | None
    gpu: str
    dph: float
    instance_id: int | None = None
    outcome: str = "starting"
    reason: str | None = None
    destroyed: bool = False
    kept: bool = False
    on_demand_dph: float | None = None  # set for a bid: what the machine costs on demand, for the receipt

    @classmethod
    def of(cls, number: int, quote: Quote) -> _Try:
        """Try `number` of a run, on the quoted offer."""
        on_demand = quote.bid.on_demand_dph if quote.bid is not None else None
        return cls(number, quote.offer_id, quote.machine_id, quote.gpu, quote.dph, on_demand_dph=on_demand)

    def view(self, row: LedgerInstance | None = None, now: float = 0.0) -> RunTry:
        outcome = self.outcome if self.outcome in ("used", "failed", "lost") else "starting"
        return RunTry(
            number=self.number,
            offer_id=self.offer_id,
            machine_id=self.machine_id,
            gpu=self.gpu,
            dph=self.dph,
            instance_id=self.instance_id,
            outcome=outcome,
            reason=self.reason,
            destroyed=self.destroyed,
            kept=self.kept,
            interruptible=self.on_demand_dph is not None,
            seconds=round(row.hours(now) * 3600, 1) if row is not None else None,
            cost_usd=round(row.accrued(now), 6) if row is not None else None,
        )


_SECRETS_GONE = (
    "The session that started this run ended before its job started, and the job needs secret values, which are "
    "never stored. Call run_job again."
)


class _RunFailed(Exception):
    """Ends a run: the message says why, in words for the user."""


@dataclass
class Run:
    id: str
    plan: RunPlan
    grant: Grant
    started_at: float = field(default_factory=time.monotonic)
    status: RunStatus = "running"
    phase: RunPhase = "renting"
    detail: str = ""
    tries: list[_Try] = field(default_factory=list)
    instance_id: int | None = None
    job_id: str | None = None
    job_started: float | None = None
    job_ended: float | None = None
    exit_code: int | None = None
    receipt: RunReceipt | None = None
    finished_at: float | None = None
    warnings: list[str] = field(default_factory=list)  # found before the job started (e.g. no dead-man's switch)
    mirror: CheckpointMirror | None = None  # the checkpoint folder's local copy, when the run declared one
    group: Group | None = None  # a multi-node run's nodes, once it has any
    recoveries: int = 0  # machines replaced after the job had started on them
    recovering: bool = False  # between losing a machine mid-job and the job starting again on the next
    machine_lost: bool = False  # set by the watch: the last problem was the machine, not the job
    first_ends_at: float | None = None  # wall time the first machine's job reached its approved max runtime
    started_wall: float = field(default_factory=time.time)
    origin_session: str = ""  # the session whose user approved the run
    resumed: bool = False  # taken over from the ledger (its session is gone): pick up where it stood
    fetch: bool = False  # resumed to fetch results waiting on a stopped instance: start it first
    detached: bool = False  # its session ended and left it to the supervisor: not cancelled, not destroyed
    waiting_since: float | None = None
    results_path: Path | None = None  # where the results go, once resolved (checked against the roots then)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    _changed: anyio.Event = field(default_factory=anyio.Event)
    _log: bytearray = field(default_factory=bytearray)
    _log_start: int = 0

    @property
    def spec(self) -> RunSpec:
        return self.plan.spec

    @property
    def approved_by(self) -> ApprovedBy:
        return self.grant.approved_by

    @property
    def log_end(self) -> int:
        return self._log_start + len(self._log)

    def elapsed(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started_at

    def touch(self, phase: RunPhase | None = None, detail: str | None = None) -> None:
        """Record progress and wake every run_status waiting on this run."""
        if phase is not None:
            self.phase = phase
        if detail is not None:
            self.detail = detail
        self._changed.set()
        self._changed = anyio.Event()

    def resume_hint(self) -> str:
        """How to go on after the run stopped with a checkpoint kept: another run from the same folders resumes."""
        mirror = self.mirror
        if mirror is None or not mirror.has_checkpoint():
            return ""
        return (
            f" The last checkpoint is in {mirror.local}: call run_job again with the same checkpoint_dir and "
            f"options.local_results_dir={str(mirror.local_root.parent)!r}, and the job resumes from it."
        )

    def note(self, detail: str) -> None:
        self.touch(detail=detail)

    def changed(self) -> anyio.Event:
        """An event set at the run's next change."""
        return self._changed

    def append_log(self, text: str) -> None:
        if not text:
            return
        self._log += text.encode()
        excess = len(self._log) - LOG_KEEP_BYTES
        if excess > 0:
            del self._log[:excess]
            self._log_start += excess
        self.touch()

    def append_output(self, text: str) -> None:
        """The job's output, into the run's log."""
        if self.resumed and self.spec.secrets:
            # The job's secret values are never stored, so this process could not mask them in its output.
            if not self.log_end:
                self.append_log("[the log is not shown: this job has secrets this process cannot mask]\n")
        else:
            self.append_log(text)

    def read_log(self, cursor: int, max_bytes: int) -> tuple[str, int, int, int]:
        """(text, start, next cursor, bytes skipped) from `cursor`, cut on a character boundary."""
        start = min(max(cursor, self._log_start), self.log_end)
        skipped = start - cursor if cursor < self._log_start else 0
        data = bytes(self._log[start - self._log_start : start - self._log_start + max_bytes])
        if start + len(data) < self.log_end:
            data = data[: _whole_characters(data)]
        return data.decode("utf-8", "replace"), start, start + len(data), skipped

    def log_tail(self) -> str:
        return bytes(self._log[-LOG_TAIL_BYTES:]).decode("utf-8", "replace")


def _whole_characters(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 character."""
    lead = len(data)
    while lead > 0 and data[lead - 1] & 0xC0 == 0x80:
        lead -= 1
    if lead == 0 or data[lead - 1] < 0xC0:
        return len(data)
    first = data[lead - 1]
    size = 2 if first < 0xE0 else 3 if first < 0xF0 else 4
    return len(data) if len(data) - (lead - 1) >= size else lead - 1


class RunBook:
    """This session's runs."""

    def __init__(self, service: Service, task_group: TaskGroup) -> None:
        self.service = service
        self._tg = task_group
        self._runs: dict[str, Run] = {}
        self.store = RunStore(service.ledger)
        self.supervised = False  # this book is the supervisor's: what it finishes was not seen by any user yet
        service.run_instances = self.instances

    # --- runs ---------------------------------------------------------------------------------------------------

    def start(self, spec: RunSpec, grant: Grant) -> Run:
        """Start the approved run in the session's task group."""
        plan = RunPlan(spec, grant.quote, grant.ceiling_dph, grant.ceiling_why)
        run = Run(id=f"r-{secrets.token_hex(5)}", plan=plan, grant=grant, origin_session=self.service.session_id)
        self._runs[run.id] = run
        self._tg.start_soon(self._execute, run)
        if self.service.settings.supervise:
            from .supervisor import ensure_supervisor

            # Started now, so the run goes on even if this server is SIGKILLed and nobody runs its teardown.
            self._tg.start_soon(anyio.to_thread.run_sync, ensure_supervisor, self.service.settings)
        return run

    def resume(self, run: Run) -> Run:
        """Follow a run taken over from the ledger (see `runcodec.run_of`), from where it stood."""
        self._runs[run.id] = run
        self._tg.start_soon(self._execute, run)
        return run

    @staticmethod
    def cancel(run: Run, why: str) -> None:
        """Stop following the run now, as cancelled (whoever cancels destroys its instances)."""
        if run.status not in ("running", "waiting"):
            return
        run.status, run.phase, run.detail = "cancelled", "done", why
        run.finished_at = time.monotonic()
        run.scope.cancel()

    def find(self, run_id: str) -> Run | None:
        return self._runs.get(run_id)

    async def detach(self) -> list[Run]:
        """The session ends: runs the supervisor can finish are left to it (saved as running, their instances held),
        the others stop and their instances go with the session. Returns the runs left to the supervisor."""
        left = []
        for run in self._runs.values():
            if run.status == "running" and self.service.settings.supervise and self._can_go_on(run):
                run.detached = True
                run.touch(detail=f"its session ended; the supervisor follows it from {run.phase}")
                left.append(run)
            run.scope.cancel()
        with anyio.move_on_after(CANCEL_WAIT_S, shield=True):
            for run in self._runs.values():
                await run.done.wait()
        return left

    @staticmethod
    def _can_go_on(run: Run) -> bool:
        """Secret values are never stored, so a run whose job still needs them cannot be started by anyone else;
        a multi-node group is taken over only once torchrun runs on every node (forming it is not resumed)."""
        if run.spec.nodes > 1:
            return run.group is not None and run.group.running
        return run.job_id is not None or not run.spec.secrets

    def active(self) -> bool:
        """Whether any run is still going (its client may be silent for hours while it does)."""
        return any(run.status == "running" for run in self._runs.values())

    def instances(self) -> set[int]:
        """Instances that runs in progress use: they end with their run, which fetches results first."""
        return {
            t.instance_id
            for run in self._runs.values()
            if run.status == "running"
            for t in run.tries
            if t.instance_id is not None
        }

    def get(self, run_id: str) -> Run:
        run = self._runs.get(run_id)
        if run is None:
            known = ", ".join(self._runs) or "none"
            raise VastMCPError(
                f"No run {run_id!r} in this session (runs of this session: {known}). Call run_status without "
                "run_id to list the runs of earlier sessions."
            )
        return run

    async def view(
        self, run: Run, cursor: int = 0, max_bytes: int = READ_MAX_BYTES, *, with_approval: bool = False
    ) -> RunView:
        """The run as the agent sees it, with a page of its log from `cursor` that fits one answer escaped (the
        stored log is already masked: every page of it was, before it was stored)."""
        text, start, nxt, skipped = run.read_log(cursor, max_bytes)
        view = await self._view(run, start, nxt, skipped, with_approval)
        # The log page gets what the rest of the answer (state, tries, receipt, its log end) leaves of the cap.
        budget = min(DATA_BUDGET, RESULT_CAP - json_size(view.model_dump(mode="json")) - shown_size(view.summary()))
        budget -= 1024  # the block's own lines, and slack
        for _ in range(FIT_ROUNDS):
            shown = shown_size(text)
            if shown <= budget or nxt - start <= 1:
                break
            max_bytes = max(1, min(nxt - start - 1, int((nxt - start) * budget / shown * 0.9)))
            text, start, nxt, skipped = run.read_log(cursor, max_bytes)
        return (await self._view(run, start, nxt, skipped, with_approval)).with_log(text)

    async def _view(self, run: Run, start: int, nxt: int, skipped: int, with_approval: bool) -> RunView:
        return RunView(
            status="recovering" if run.status == "running" and run.recovering else run.status,
            run_id=run.id,
            phase=run.phase,
            detail=run.detail,
            elapsed_s=round(run.elapsed(), 1),
            cost_usd=round(await self._cost(run), 6),
            instance_id=run.instance_id,
            job_id=run.job_id,
            tries=await self._machines(run),
            approval=run.plan.view(run.approved_by) if with_approval else None,
            cursor=start,
            next_cursor=nxt,
            log_more=nxt < run.log_end,
            log_skipped_bytes=skipped,
            receipt=run.receipt,
            warnings=list(run.warnings),
        )

    async def wait(self, run: Run, cursor: int, wait_s: float, progress: Progress) -> None:
        """Wait up to `wait_s` for the end of the run, or for a full page of new log after `cursor`.

        Phases, tries and new log lines go out as progress notifications meanwhile, not as early answers: every
        answer costs the agent a call and the characters it reads.
        """
        deadline = time.monotonic() + wait_s
        while run.status == "running" and run.log_end - cursor < READ_MAX_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with anyio.move_on_after(min(left, 5.0)):
                await run.changed().wait()
            await progress(run.elapsed(), None, f"run {run.id}: {run.phase} {run.detail}".strip())

    async def _machines(self, run: Run) -> list[RunTry]:
        """Every machine of the run with its time and cost so far, from the ledger."""
        now = time.time()
        out = []
        for t in run.tries:
            row = await self.service.own(t.instance_id) if t.instance_id is not None else None
            out.append(t.view(row, now))
        return out

    async def _cost(self, run: Run) -> float:
        now = time.time()
        total = 0.0
        for t in run.tries:
            if t.instance_id is not None:
                row = await self.service.own(t.instance_id)
                if row is not None:
                    total += row.accrued(now)
        return total

    # --- the workflow -------------------------------------------------------------------------------------------

    async def _execute(self, run: Run) -> None:
        """The run's task. Cancelled only when the session ends: then either the run is left to the supervisor
        (`detach`), or the session's teardown, not the run, destroys what it rented (one destroyer, within the
        host's short shutdown window). The run is saved to the ledger as it goes, and stops when a cancel is asked
        from outside (`vast-mcp runs cancel`)."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_saved, run)
                with run.scope:
                    await self._workflow(run)
                tg.cancel_scope.cancel()
        finally:
            if run.status == "running" and not run.detached:
                run.status, run.phase = "cancelled", "done"
                run.detail = "the session ended before the run finished; its instance is destroyed with the session"
                run.finished_at = time.monotonic()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self._save(run)
            run.done.set()
            run.touch()

    async def _keep_saved(self, run: Run) -> None:
        """Save the run at each change (at most once a second), and stop it when a cancel was asked from outside."""
        while True:
            changed = run.changed()
            await self._save(run)
            while not changed.is_set():  # a run that waits on a long job writes nothing, but still hears a cancel
                try:
                    if await self.store.cancel_requested(run.id):
                        self.cancel(run, "cancelled from outside this session; its instances are destroyed")
                        return
                except VastMCPError as exc:
                    log.warning("run %s: reading the ledger failed: %s", run.id, exc)
                with anyio.move_on_after(SAVE_EVERY_S):
                    await changed.wait()
            await anyio.sleep(SAVE_EVERY_S / 4)  # a burst of changes is one write

    async def _save(self, run: Run) -> None:
        from .runcodec import record_of

        try:
            await self.store.save(await record_of(run, self.service, reported=not self.supervised))
        except Exception as exc:  # a run must not die of its bookkeeping; the next save tries again
            log.warning("run %s could not be saved to the ledger: %s", run.id, exc)

    async def _workflow(self, run: Run) -> None:
        try:
            if run.spec.checkpoint_dir is not None:
                run.mirror = CheckpointMirror(run.spec.remote_checkpoint(), self._results_dir(run) / LOCAL_FOLDER)
            if run.spec.nodes > 1:
                await run_group(self, run)
                return
            if run.resumed:
                resumed = await self._resume_point(run)
                if resumed is None:
                    return  # its results wait on a stopped instance, for the user to fetch
                current = resumed
            else:
                current = await self._rent(run)
            await self._job(run, current)
        except _RunFailed as exc:
            await self._finish(run, "failed", str(exc))
        except VastMCPError as exc:
            # Anything not foreseen still ends the run tidily: the instance goes, the reason is shown.
            log.warning("run %s stopped: %s", run.id, exc)
            await self._finish(run, "failed", str(exc))
        except Exception:
            # A bug must not take the whole session's task group down; the ledger still holds the instance.
            log.exception("run %s failed unexpectedly", run.id)
            await self._finish(run, "failed", "internal error in the run (see the server log)")

    async def _resume_point(self, run: Run) -> _Try | None:
        """Where a run taken over from the ledger stands: the machine to go on with (ready, its job started or not),
        a fresh rent when its machine never got going, or None when the run now waits for the user (its instance
        was stopped by its watchdog, with the results on its disk)."""
        current = run.tries[-1] if run.tries else None
        if current is None or current.instance_id is None or current.destroyed or current.outcome == "failed":
            if run.job_id is not None:
                # Its session ended between the download and the receipt: the job is not run a second time.
                raise _RunFailed(
                    f"The instance that ran job {run.job_id} is gone; whatever was downloaded before its session "
                    "ended is in the results folder."
                )
            if current is not None and current.outcome == "starting":
                current.outcome, current.reason = "failed", "its session ended while it was being rented"
            if not self._can_go_on(run):
                raise _RunFailed(_SECRETS_GONE)
            return await self._rent(run)
        iid = current.instance_id
        inst = await self.service.client.show_instance(iid)
        if inst is None:
            current.destroyed = True
            raise _RunFailed(f"Instance {iid} of this run no longer exists on Vast; what was on its disk is gone.")
        if inst.is_dead:
            if not run.fetch:
                await self._wait_for_user(run, current)
                return None
            row = await self.service.own(iid)
            if row is not None:
                await self.service.ledger.set_keep(row.row_id, False)  # it follows the run again
            run.touch("booting", f"starting stopped instance {iid} to fetch the results")
            await self.service.client.start_instance(iid)
        if run.job_id is None:
            if not self._can_go_on(run):
                raise _RunFailed(_SECRETS_GONE)
            reason = await self._prepare(run, current)
        else:
            reason = await self._await_ready(run, current)
        if reason is None:
            current.outcome = "used"
            run.touch()
            return current
        if run.job_id is not None:
            raise _RunFailed(f"The machine that ran the job cannot be used any more: {reason}.")
        current.outcome, current.reason = "failed", reason
        await self._destroy(run, current)
        return await self._rent(run)

    async def _wait_for_user(self, run: Run, current: _Try) -> None:
        """The run's instance is stopped (its watchdog's doing, nobody being connected): it bills only its disk,
        which holds the results. It waits, kept, until the user fetches or destroys it (or it expires)."""
        assert current.instance_id is not None
        row = await self.service.own(current.instance_id)
        if row is not None:
            # Kept: neither the limit enforcer nor a session's teardown destroys it; `supervisor.session_start`
            # destroys it past VAST_MCP_STOPPED_KEEP_DAYS.
            await self.service.ledger.set_keep(row.row_id, True)
        run.status = "waiting"
        run.waiting_since = time.time()
        run.touch(
            "done",
            f"the job ended while nobody was connected and instance {current.instance_id} was stopped with the "
            "results on its disk",
        )

    async def _mark_instance(self, iid: int, command: str) -> None:
        """Tell the instance's watchdog how the run stands (best effort: without it, it treats it as any instance)."""
        if self.service.settings.lease_s is None:
            return
        with anyio.move_on_after(20):
            try:
                host = await self.service.connected(iid)
                await host.check(command, time_limit=15.0)
            except VastMCPError as exc:
                log.info("instance %s: could not update its watchdog: %s", iid, exc)

    async def _rent(self, run: Run) -> _Try:
        """Rent machines one after the other until one is ready (and has the uploads), within the approval: the
        run's machines in all, those lost mid-job included, are at most `max_tries`, and none is tried twice."""
        spec = run.spec
        excluded_machines = {t.machine_id for t in run.tries if t.machine_id is not None}
        tried_offers = {t.offer_id for t in run.tries}
        grant: Grant | None = run.grant if not run.tries else None
        while (number := len(run.tries) + 1) <= spec.max_tries:
            if grant is None:
                run.touch("renting", f"looking for another offer (machine {number} of {spec.max_tries})")
                grant = await self._next_grant(run, excluded_machines, tried_offers)
            quote = grant.quote
            tried_offers.add(quote.offer_id)
            current = _Try.of(number, quote)
            run.tries.append(current)
            reason = await self._start_machine(run, current, grant)
            grant = None
            if reason is None:
                current.outcome = "used"
                run.touch()
                return current
            current.outcome, current.reason = "failed", reason
            if current.machine_id is not None:
                excluded_machines.add(current.machine_id)
            if current.instance_id is not None:
                await self._destroy(run, current)
            run.touch("renting", f"try {number} failed: {reason}")
        raise _RunFailed(
            f"No machine became usable within the {spec.max_tries} machine(s) the approval allows; each one's reason "
            "is listed under tries. Try other GPU requirements, a higher budget, or later."
        )

    async def _next_grant(self, run: Run, excluded_machines: set[int], tried_offers: set[int]) -> Grant:
        """The next machine within the run's approval (its ceiling), quoted and granted."""
        spec, ceiling = run.spec, run.grant.ceiling_dph
        filters = spec.filters.model_copy(
            update={
                "max_dph": ceiling,
                "exclude_machine_ids": sorted({*(spec.filters.exclude_machine_ids or []), *excluded_machines}),
            }
        )
        found = await self.service.search(
            query=spec.query,
            filters=filters,
            disk_gb=spec.disk_gb,
            order="dph",
            limit=10,
            prefer_direct=spec.moves_data,
            offer_type=offer_type(spec),
        )
        for row in found.offers:
            if row.offer_id in tried_offers or (row.machine_id is not None and row.machine_id in excluded_machines):
                continue
            try:
                quote = await self.service.quote(spec.request(row.offer_id))
            except OfferUnavailableError:
                continue
            grant = self.service.approvals.failover(run.grant, quote)
            if grant is None:
                continue  # its price rose past what the user approved since the search
            return grant
        raise _RunFailed(
            f"No other offer matches within the approved ${ceiling:.3f}/hr after excluding the machines that "
            "failed. Call run_job again with a higher max_dph (the user approves it) or other GPU requirements."
        )

    async def _start_machine(self, run: Run, current: _Try, grant: Grant) -> str | None:
        """Create, wait until usable, upload. None when the machine is ready for the job, else why not."""
        service, spec, quote = self.service, run.spec, grant.quote
        run.touch("renting", f"renting offer {quote.offer_id} ({quote.gpu}, ${quote.dph:.3f}/hr)")
        try:
            created = await service.create(spec.request(quote.offer_id), grant)
        except CapExceededError as exc:
            raise _RunFailed(str(exc)) from None
        except OfferUnavailableError:
            return "the offer was taken by someone else just before renting"
        except ConsentError as exc:
            # The price re-check after create: the instance is already destroyed; record it for the cost.
            row = await self._row_for_quote(quote.quote_id)
            if row is not None and row.instance_id is not None:
                current.instance_id, current.destroyed = row.instance_id, True
            return f"the instance's real price was above the quote ({exc})"
        assert created.instance_id is not None
        current.instance_id = run.instance_id = created.instance_id
        return await self._prepare(run, current)

    async def _prepare(self, run: Run, current: _Try) -> str | None:
        """Wait until the machine is usable, then upload. None when it is ready for the job, else why not."""
        service, spec = self.service, run.spec
        assert current.instance_id is not None
        reason = await self._await_ready(run, current)
        if reason is not None:
            return reason
        if spec.uploads:
            run.touch("uploading", f"uploading {len(spec.uploads)} path(s)")
            try:
                with anyio.fail_after(TRANSFER_BOUND_S):
                    sent = await service.upload(
                        current.instance_id, list(spec.uploads), spec.remote_dir, list(spec.exclude), False
                    )
            except TransferError as exc:
                raise _RunFailed(f"The upload failed: {exc}") from None
            except (RemoteError, VastAPIError, TimeoutError) as exc:
                return f"the upload to this machine failed ({exc or 'no progress within the bound'})"
            run.touch(detail=sent.summary())
        return None

    async def _row_for_quote(self, quote_id: str) -> LedgerInstance | None:
        for row in await self.service.ledger.session_instances(self.service.session_id, include_done=True):
            if row.quote_id == quote_id:
                return row
        return None

    async def _await_ready(self, run: Run, current: _Try) -> str | None:
        """Wait until the machine is usable. `ready_timeout_s` bounds the time without progress, not the boot: a
        big image pulling for minutes moves its status message, and a machine that moves is not given up on
        (up to `PULL_MAX_S` in all). Failed reads of the API are waited out, never taken as a failed machine."""
        assert current.instance_id is not None
        iid, bound = current.instance_id, run.spec.ready_timeout_s
        started = moved = time.monotonic()
        give_up = started + max(bound, PULL_MAX_S)
        last: ReadyResult | None = None
        seen: tuple[str | None, str | None] | None = None

        async def note(done: float, total: float | None, message: str) -> None:
            if message != run.detail:
                run.touch(detail=message)

        run.touch("booting", f"instance {iid} is starting")
        while (left := min(moved + bound, give_up) - time.monotonic()) > 0:
            try:
                last = await self.service.wait_ready(iid, min(left, WAIT_READY_CHUNK_S), note)
            except VastAPIError as exc:
                if isinstance(exc, AuthError):
                    raise
                run.touch(detail=f"instance {iid}: Vast's API failed a read ({exc}); still watching")
                await anyio.sleep(min(5.0, max(0.0, left)))
                continue
            except VastMCPError as exc:
                return f"it could not be checked while starting ({exc})"
            if (last.status, last.status_msg) != seen:
                seen, moved = (last.status, last.status_msg), time.monotonic()
            if last.ready:
                if last.watchdog not in (None, "ok"):
                    warning = f"instance {iid}: {watchdog_warning(last.watchdog or '')}"
                    run.warnings.append(warning)
                    run.touch(detail=f"WARNING: {warning}")
                else:
                    run.touch(detail=last.summary())
                return None
            if last.failed:
                why = f"it failed while starting: {last.status_msg or f'status {last.status}, no message'}"
                return why + await self._log_note(iid, last.status_msg)
        if last is not None and last.status == "running":
            why = f"Vast reported it running, but SSH never accepted our key within {bound:g} s"
        else:
            status = last.status if last is not None and last.status else "scheduling"
            msg = f": {last.status_msg}" if last is not None and last.status_msg else ""
            if time.monotonic() >= give_up:
                why = f"it was still starting after {max(bound, PULL_MAX_S):g} s in all (status {status}{msg})"
            else:
                why = f"it made no progress for {bound:g} s (status {status}{msg})"
        if last is not None and last.ssh_stage:
            why += f"; last SSH failure at the {last.ssh_stage} step: {last.ssh_detail or 'no detail'}"
            if last.diagnosis:
                why += f" ({last.diagnosis})"
        return why + await self._log_note(iid, last.status_msg if last is not None else None)

    async def _log_note(self, instance_id: int, said: str | None) -> str:
        """The last lines of the instance's own log that add to `said` (its status message), to explain a failure;
        empty when Vast has none within a few seconds."""
        text = ""
        with anyio.move_on_after(LOG_NOTE_S):
            try:
                text = await self.service.client.instance_logs(instance_id, tail=20, wait=LOG_NOTE_S - 1)
            except VastMCPError:
                text = ""
        lines = [_TIMESTAMP.sub("", line).strip() for line in text.splitlines()]
        lines = [line for line in lines if line and not (said and said in line)][-2:]
        if not lines:
            return ""
        # Quoted and escaped: the instance wrote it, and it is shown outside any output block.
        return "; instance log ends: " + json.dumps(visible(self.service.redact(" | ".join(lines))[-400:]))

    async def _destroy(self, run: Run, current: _Try) -> None:
        assert current.instance_id is not None
        run.touch("destroying", f"destroying instance {current.instance_id}")
        try:
            await self.service.destroy(current.instance_id)
        except VastMCPError as exc:
            note = f"destroy not confirmed yet ({exc}); it stays tracked and is destroyed at the session's end"
            current.reason = f"{current.reason}; {note}" if current.reason else note
            return
        current.destroyed = True

    async def _job(self, run: Run, current: _Try) -> None:
        """Start the job, follow it to its end, fetch the results, then destroy (or keep on failure). A machine
        lost mid-job is replaced within the approval when the run recovers (`RunSpec.recovers`): the next one
        gets the uploads and the last checkpoint, and the job starts again told to resume."""
        service, spec = self.service, run.spec
        if run.resumed:
            # Taken over from the ledger: follow the job its gone session started, instead of starting it again.
            problem = await self._attempt(run, current, resume=False, follow=run.job_id)
        else:
            problem = await self._attempt(run, current, resume=await self._restore(run, current))
        while run.machine_lost and spec.recovers:
            current.outcome, current.reason = "lost", problem
            await self._destroy(run, current)  # a stopped bid instance still bills its disk
            if len(run.tries) >= spec.max_tries:
                used = f"The run has used all {spec.max_tries} machine(s) its approval allows."
                raise _RunFailed(f"{problem} {used}{run.resume_hint()}")
            if run.first_ends_at is not None and time.time() >= run.first_ends_at:
                spent = "The run's approved max runtime is used up, so it stops here."
                raise _RunFailed(f"{problem} {spent}{run.resume_hint()}")
            run.recoveries += 1
            run.recovering = True
            run.touch("renting", f"machine lost ({problem}); renting another to resume on")
            current = await self._rent(run)
            resume = await self._restore(run, current)
            run.recovering = False
            problem = await self._attempt(run, current, resume=resume)
        assert current.instance_id is not None
        iid = current.instance_id
        if problem is None and run.exit_code not in (0, None):
            problem = f"The job exited with code {run.exit_code}; the end of its log is in the receipt."
        missing: list[str] = []
        refused: list[str] = []
        files = 0
        results_dir: Path | None = None
        if spec.results and run.job_id is not None:
            run.touch("downloading", "downloading the results")
            results_dir = self._results_dir(run)
            try:
                with anyio.fail_after(TRANSFER_BOUND_S):
                    got = await service.download(iid, spec.remote_results(), str(results_dir))
                files, missing, refused = got.files, got.missing, got.refused
                await self._mark_instance(iid, FETCHED_COMMAND)
            except (VastMCPError, TimeoutError) as exc:
                note = f"The results could not be downloaded: {exc or 'no progress within the bound'}"
                problem = f"{problem} {note}" if problem else note
                if run.fetch:
                    # That disk is the only copy of the results: stopped again, they wait for another fetch.
                    with anyio.move_on_after(60):
                        try:
                            await service.client.stop_instance(iid)
                        except VastMCPError as stop_exc:
                            log.warning("run %s: stopping instance %s again failed: %s", run.id, iid, stop_exc)
                    await self._wait_for_user(run, current)
                    run.touch(detail=f"{note}; instance {iid} was stopped again with the results on its disk")
                    return
        failed = problem is not None
        if failed and spec.keep_on_failure:
            await service.keep(iid, True)  # the user's approval of the run said so (RunPlan.question)
            current.kept = True
            run.touch(detail=f"instance {iid} kept for debugging")
        else:
            await self._destroy(run, current)
        await self._finish(
            run,
            "failed" if failed else "succeeded",
            problem,
            results_dir=results_dir,
            files=files,
            missing=missing,
            refused=refused,
        )

    async def _restore(self, run: Run, current: _Try) -> bool:
        """Put the run's last checkpoint on the machine (one an earlier run left in the same results folder, on the
        first); whether there was one to resume from."""
        mirror = run.mirror
        assert current.instance_id is not None
        if mirror is None or not await anyio.to_thread.run_sync(mirror.has_checkpoint):
            return False
        run.touch("uploading", f"putting the last checkpoint ({mirror.local}) on the machine")
        try:
            with anyio.fail_after(TRANSFER_BOUND_S):
                return await mirror.restore(self.service, current.instance_id) > 0
        except (VastMCPError, TimeoutError) as exc:
            raise _RunFailed(f"The checkpoint could not be put on the machine: {exc or 'no progress'}") from None

    async def _attempt(self, run: Run, current: _Try, *, resume: bool, follow: str | None = None) -> str | None:
        """Start the job on `current` (or, given `follow`, go on following that job already running there) and
        follow it to its end, fetching its checkpoints meanwhile. Why it did not end by itself, or None when it did
        (see `run.exit_code`); `run.machine_lost` says whether the machine was the cause."""
        service, spec = self.service, run.spec
        assert current.instance_id is not None
        iid = current.instance_id
        run.machine_lost = False
        if follow is not None:
            run.touch("running", f"job {follow}: following it again")
            job_id = follow
        else:
            run.touch("running", "resuming the job from its checkpoint" if resume else "starting the job")
            try:
                job = await service.start_job(
                    iid, spec.script(resume=resume), workdir=None, env=spec.env, secrets=spec.secrets
                )
            except VastMCPError as exc:
                stopped = await self._stopped(iid)
                run.machine_lost = stopped is not None
                return f"The job could not be started: {exc}" + (f" (the instance is {stopped})" if stopped else "")
            job_id = run.job_id = job.job_id
            if run.job_started is None:
                run.job_started = time.monotonic()
            run.touch(detail=f"job {job_id} running" + (" (resumed)" if resume else ""))
            await self._mark_instance(iid, run_marker_command(job_id, results=bool(spec.results)))
        async with anyio.create_task_group() as tg:
            if run.mirror is not None:
                tg.start_soon(keep_synced, run.mirror, service, iid, spec.checkpoint_every_s, run.note)
            problem = await self._watch(run, iid, job_id)
            tg.cancel_scope.cancel()
        run.job_ended = time.monotonic()
        if problem is None and run.mirror is not None:
            # One last round, so the kept copy is the job's final checkpoint (a failure here fails nothing).
            with anyio.move_on_after(TRANSFER_BOUND_S):
                try:
                    await run.mirror.sync(service, iid)
                except (VastMCPError, OSError) as exc:
                    run.note(f"the last checkpoint fetch failed ({exc})")
        return problem

    async def _watch(self, run: Run, iid: int, job_id: str) -> str | None:
        """Follow the job's log until it ends. None when it ended by itself (see `run.exit_code`), else why not.

        The job is stopped at the machine's approved end (its max runtime counted from the rental), leaving the
        session's limit enforcer a grace period for the results download before it destroys the machine."""
        row = await self.service.own(iid)
        ends_at = row.created_at + run.spec.max_runtime_h * 3600 if row is not None else time.time()
        if run.first_ends_at is None:
            run.first_ends_at = ends_at
        # A machine that replaces a lost one runs only what is left of the approved max runtime: the approval
        # covers one job of that length, one machine at a time.
        ends_at = min(ends_at, run.first_ends_at)
        deadline = time.monotonic() + max(0.0, ends_at - time.time())
        cursor, failures = 0, 0
        hold = RECOVERING_TAIL_WAIT_S if run.spec.recovers else TAIL_WAIT_S
        while True:
            asked = time.monotonic()
            left = deadline - asked
            if left <= 0:
                with anyio.move_on_after(30):
                    await self.service.cancel(iid, job_id)
                return f"The job ran past its maximum runtime of {run.spec.max_runtime_h:g} h and was stopped."
            try:
                chunk = await self.service.tail(
                    iid, job_id, cursor=cursor, wait=min(hold, left), max_bytes=LOG_KEEP_BYTES, budget=None
                )
            except (RemoteError, VastAPIError) as exc:
                failures += 1
                stopped = await self._stopped(iid)
                if stopped is not None:
                    run.machine_lost = True
                    return f"The instance stopped while the job ran ({stopped})."
                if failures >= WATCH_FAILURES:
                    run.machine_lost = True
                    return f"The instance stopped answering over SSH while the job ran ({exc})."
                await anyio.sleep(min(2.0**failures, 15.0))
                continue
            failures = 0
            run.append_output(chunk.text)
            cursor = chunk.next_cursor
            if chunk.state != "running" and not chunk.more:
                run.exit_code = chunk.exit_code
                if chunk.state == "exited":
                    return None
                run.machine_lost = chunk.state == "lost"  # no exit code: the container restarted under the job
                return f"The job ended as {chunk.state} (it was killed, or the instance restarted under it)."
            if not chunk.more:
                await anyio.sleep(max(0.0, TAIL_SPACING_S - (time.monotonic() - asked)))

    async def _stopped(self, iid: int) -> str | None:
        """Why the instance can no longer run the job, or None when it still can (or Vast cannot say now)."""
        try:
            inst = await self.service.client.show_instance(iid)
        except VastAPIError:
            return None
        if inst is None:
            return "it no longer exists on Vast"
        if inst.is_dead:
            return f"{inst.actual_status}: {inst.status_msg or 'no message'}"
        return None

    def _results_dir(self, run: Run) -> Path:
        """The local results folder: checked against the allowed folders when the run was approved, so a process
        that takes the run over (from another working directory) writes where the user agreed."""
        if run.results_path is None:
            raw = run.spec.results_dir or f"{RESULTS_FOLDER}/{run.id}"
            run.results_path = self.service.local_path(raw, must_exist=False)
        return run.results_path

    async def _finish(
        self,
        run: Run,
        outcome: str,
        error: str | None,
        *,
        results_dir: Path | None = None,
        files: int = 0,
        missing: list[str] | None = None,
        refused: list[str] | None = None,
    ) -> None:
        """Make sure nothing of the run is left billing (unless kept), then write the receipt."""
        for t in run.tries:
            if t.instance_id is not None and not t.destroyed and not t.kept:
                await self._destroy(run, t)
        used = next((t for t in run.tries if t.outcome == "used"), None)
        kept = next((t.instance_id for t in run.tries if t.kept), None)
        run.finished_at = time.monotonic()
        job_runtime = None
        if run.job_started is not None:
            job_runtime = round((run.job_ended or run.finished_at) - run.job_started, 2)
        machines = await self._machines(run)
        on_demand = None
        if run.spec.interruptible:
            # The same machine time at each machine's on-demand price: what bidding saved (or cost).
            on_demand = round(
                sum(
                    (m.seconds or 0.0) / 3600 * (t.on_demand_dph if t.on_demand_dph is not None else t.dph)
                    for m, t in zip(machines, run.tries, strict=True)
                ),
                6,
            )
        mirror = run.mirror
        run.receipt = RunReceipt(
            outcome="succeeded" if outcome == "succeeded" else "cancelled" if outcome == "cancelled" else "failed",
            gpu=used.gpu if used else None,
            dph=used.dph if used else None,
            runtime_s=round(run.elapsed(), 2),
            job_runtime_s=job_runtime,
            total_cost_usd=round(await self._cost(run), 6),
            exit_code=run.exit_code,
            results_dir=str(results_dir) if results_dir is not None else None,
            result_files=files,
            missing_results=missing or [],
            refused_results=refused or [],
            destroyed=all(t.destroyed for t in run.tries if t.instance_id is not None),
            kept_instance_id=kept,
            error=error,
            machines=machines,
            recoveries=run.recoveries,
            on_demand_cost_usd=on_demand,
            checkpoint_dir=str(mirror.local) if mirror is not None and mirror.has_checkpoint() else None,
        ).with_log_tail(run.log_tail())
        run.status = run.receipt.outcome
        run.touch("done", error or "finished")
