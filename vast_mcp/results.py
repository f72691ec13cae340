"""What the tools return: typed results (the structured content) and the short text the model reads.

Results carry the fields a person decides on, never Vast's hundred-field rows. Every `summary()` is a few lines
of plain text that ends, where it helps, with the next step.

Output from an instance (logs, command output) travels once: in the text, escaped and framed (see `framing.py`),
never again in the structured content, which carries the cursors, sizes and state a program follows it with.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr

from .framing import Frame, name_list


class OfferRow(BaseModel):
    rank: int
    offer_id: int = Field(description="Pass this to create_instance.")
    gpu: str = Field(description="GPU count × model and VRAM per GPU.")
    dph: float = Field(description="$/hour with the requested disk priced in.")
    reliability: float | None = Field(description="Host reliability, 0 to 1.")
    location: str | None
    cuda: float | None = Field(description="Highest CUDA version the host driver supports.")
    inet_down_mbps: float | None
    disk_gb: float = Field(description="Free disk on the machine, GB.")
    machine_id: int | None
    verified: bool | None


class OffersResult(BaseModel):
    disk_gb: float = Field(description="The disk size the prices include.")
    offers: list[OfferRow]

    def summary(self) -> str:
        if not self.offers:
            return (
                "No offer matches. Loosen the filters (GPU model, VRAM, price, reliability, countries) and search "
                "again."
            )
        # Numbers first, free text (GPU, location) last: one space between columns is enough to read them.
        lines = [f"offer_id, $/hr with {self.disk_gb:g} GB disk, reliability, cuda, gpu, country:"]
        for o in self.offers:
            rel = f"{o.reliability:.3f}" if o.reliability is not None else "-"
            cuda = f"{o.cuda:g}" if o.cuda is not None else "-"
            country = (o.location or "-").rsplit(",", 1)[-1].strip()[:20]  # the structured row has the place
            lines.append(f"{o.offer_id} {o.dph:.3f} {rel} {cuda} {o.gpu[:40]} {country}")
        lines.append("Rent one with create_instance.")
        return "\n".join(lines)


class QuoteView(BaseModel):
    quote_id: str | None = Field(description="Set only when you may come back with it after the user agreed.")
    offer_id: int
    gpu: str
    dph: float = Field(description="$/hour, disk included.")
    disk_gb: float
    max_runtime_hours: float
    projected_usd: float = Field(description="Cost if the instance runs its whole maximum runtime.")
    reliability: float | None
    location: str | None
    expires_at: float = Field(description="Unix time after which the quote cannot be used.")
    text: str = Field(description="The quote in words, to show the user.")


class CreateResult(BaseModel):
    status: Literal["created", "approval_required", "declined"]
    quote: QuoteView
    instance_id: int | None = None
    label: str | None = None
    approved_by: Literal["user", "auto_approve", "agent"] | None = None
    ends_at: float | None = Field(default=None, description="Unix time the instance is destroyed (max runtime).")
    message: str | None = None
    ready: ReadyResult | None = Field(default=None, description="How waiting for it went; None when not waited.")

    def summary(self) -> str:
        q = self.quote
        if self.status == "approval_required":
            return (
                f"Not created yet: the user must approve this price first.\n{q.text}\n"
                f"Show this quote to the user. Only if they approve, call create_instance again with the same "
                f"arguments plus quote_id='{q.quote_id}'. Do not approve it yourself."
            )
        if self.status == "declined":
            return self.message or "Declined; nothing was created and nothing is billed."
        rented = (
            f"Rented instance {self.instance_id} ({q.gpu}, ${q.dph:.3f}/hr, approved by {self.approved_by}); "
            f"destroyed after {q.max_runtime_hours:g} h at the latest."
        )
        if self.ready is not None:
            return f"{rented}\n{self.ready.summary()}"
        return f"{rented} {self.message or 'Next: wait_ready.'}"


class ReadyResult(BaseModel):
    instance_id: int
    ready: bool
    status: str | None = Field(description="Vast's actual_status.")
    status_msg: str | None = None
    ssh: str | None = Field(default=None, description="user@host:port the server connects to.")
    waited_s: float
    gpus: list[str] = Field(default_factory=list)
    nvidia_smi: bool | None = None
    disk_free_gb: float | None = None
    python: str | None = None
    failed: bool = Field(default=False, description="True when the instance cannot become ready (destroy it).")
    tools: list[str] = Field(default_factory=list, description="Optional tools found on the instance.")
    watchdog: str | None = Field(
        default=None,
        description="'ok' when the dead-man's switch can destroy this instance if the server goes away; otherwise "
        "why it cannot (the instance then bills until destroyed by hand). None when not checked.",
    )
    ssh_stage: str | None = Field(default=None, description="Not ready: the SSH step that failed last.")
    ssh_detail: str | None = Field(default=None, description="Not ready: what that step said.")
    ssh_repeats: int = Field(default=0, description="Not ready: how many attempts in a row failed that same way.")
    diagnosis: str | None = Field(default=None, description="Not ready: what the repeated failure probably means.")

    def summary(self) -> str:
        if self.ready:
            gpus = ", ".join(self.gpus) if self.gpus else "no GPU visible (nvidia-smi absent)"
            disk = f", {self.disk_free_gb:.0f} GB free" if self.disk_free_gb is not None else ""
            py = f", Python {self.python}" if self.python else ", no Python"
            text = f"Ready after {self.waited_s:.1f} s: {gpus}{disk}{py}. Next: upload, exec_background."
            if self.watchdog not in (None, "ok"):
                text += f"\nWARNING: {watchdog_warning(self.watchdog or '')}"
            return text
        if self.failed:
            return (
                f"Instance {self.instance_id} failed to start (status {self.status}: "
                f"{self.status_msg or 'no message'}). Call destroy on it, then try another offer."
            )
        msg = f": {self.status_msg}" if self.status_msg else ""
        text = (
            f"Instance {self.instance_id} is not ready yet (status {self.status or 'scheduling'}{msg}; waited "
            f"{self.waited_s:.0f} s this call)."
        )
        if self.ssh_stage:
            times = f", {self.ssh_repeats} times in a row" if self.ssh_repeats > 1 else ""
            text += f" Last SSH failure at the {self.ssh_stage} step{times}: {self.ssh_detail or 'no detail'}."
        if self.diagnosis:
            return f"{text} {self.diagnosis}"
        return f"{text} Call wait_ready again to keep waiting."


CreateResult.model_rebuild()  # its `ready` field names ReadyResult, defined after it


def watchdog_warning(problem: str) -> str:
    """The plain warning for an instance whose dead-man's switch cannot work."""
    return (
        f"the dead-man's switch cannot work on this instance: {problem}. If this server stops for good, the "
        "instance keeps billing until someone destroys it: keep this session running until it is destroyed, or "
        "use an image with curl or Python."
    )


class TransferResult(BaseModel):
    instance_id: int
    direction: Literal["upload", "download"]
    files: int
    bytes: int
    sent_bytes: int = Field(description="Bytes that crossed the network (after skipping and compression).")
    skipped_files: int = Field(default=0, description="Unchanged files not sent again.")
    seconds: float
    destination: str
    refused: list[str] = Field(
        default_factory=list, description="Downloaded members not written (unsafe, name too long, no room), why."
    )
    missing: list[str] = Field(default_factory=list, description="Requested remote paths that matched nothing.")
    skipped_special: list[str] = Field(
        default_factory=list, description="Local FIFOs, sockets and devices an upload left out (never read)."
    )

    def summary(self) -> str:
        mb = self.bytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else 0.0
        skipped = f", {self.skipped_files} unchanged file(s) skipped" if self.skipped_files else ""
        refused = f"\nNot written ({len(self.refused)}): {name_list(self.refused)}" if self.refused else ""
        if self.skipped_special:
            refused += f"\nSkipped, not regular files: {name_list(self.skipped_special)}"
        if self.missing:
            refused += f"\nMatched nothing on the instance: {name_list(self.missing)}"
        verb = "Uploaded" if self.direction == "upload" else "Downloaded"
        return (
            f"{verb} {self.files} file(s), {mb:.1f} MB in {self.seconds:.1f} s ({rate:.1f} MB/s){skipped} to "
            f"{self.destination}.{refused}"
        )


class JobView(BaseModel):
    instance_id: int
    job_id: str
    state: str = Field(description="running, exited, killed or lost.")
    exit_code: int | None = None
    pid: int | None = None
    log_bytes: int = 0

    def summary(self) -> str:
        if self.state == "running":
            return f"Job {self.job_id} running (pid {self.pid})."
        code = f" with code {self.exit_code}" if self.exit_code is not None else ""
        return f"Job {self.job_id} on instance {self.instance_id} has {self.state}{code}."


class LogResult(BaseModel):
    instance_id: int
    job_id: str
    cursor: int = Field(description="Byte offset of the log this answer starts at.")
    next_cursor: int = Field(description="Pass this as cursor next time.")
    more: bool = Field(description="More output is already waiting beyond next_cursor.")
    state: str
    exit_code: int | None = None
    _text: str = PrivateAttr(default="")

    @classmethod
    def page(cls, text: str, **fields: Any) -> LogResult:
        """The result with its log text, which only the text content carries."""
        result = cls(**fields)
        result._text = text
        return result

    @property
    def text(self) -> str:
        """The log between cursor and next_cursor (secrets masked, not yet escaped)."""
        return self._text

    def summary(self) -> str:
        """The state, the new log, and a cursor only when there is more to read: nothing the call already had."""
        if self.state == "running":
            head = "Running"
        else:
            code = f" with code {self.exit_code}" if self.exit_code is not None else ""
            head = f"{self.state.capitalize()}{code}"
        more = f"\nMore is waiting: call again with cursor={self.next_cursor}." if self.more else ""
        if self.state == "running" and not self.more:
            more = f"\nNext cursor: {self.next_cursor}."
        if not self._text:
            return f"{head}. No new output.{more}"
        frame = Frame(self._text)
        return f"{head}. Log {self.cursor}-{self.next_cursor}:\n{frame.block('log', self._text)}{more}"


class InstanceRow(BaseModel):
    instance_id: int | None
    label: str
    gpu: str
    status: str = Field(description="Ledger state, with Vast's status when known.")
    dph: float
    uptime_h: float
    accrued_usd: float
    keep: bool
    ends_at: float | None = Field(default=None, description="Unix time it is destroyed (max runtime); none if kept.")
    watchdog: str | None = Field(
        default=None, description="'ok', or why its dead-man's switch cannot work; None when not checked yet."
    )


class InstancesResult(BaseModel):
    instances: list[InstanceRow]
    session_accrued_usd: float
    session_committed_usd: float = Field(description="Accrued plus what live instances may still cost.")
    session_cap_usd: float | None = Field(default=None, description="VAST_MCP_MAX_SESSION_USD; none if unset.")
    notices: list[str] = Field(default_factory=list, description="What the server's limits did on their own.")

    def summary(self) -> str:
        if not self.instances:
            return "\n".join(
                [f"No instances in this session. Spent so far: ${self.session_accrued_usd:.2f}.", *self.notices]
            )
        lines = ["instance  gpu                      status            $/hr    uptime   cost"]
        for r in self.instances:
            lines.append(
                f"{r.instance_id or '-'!s:<9} {r.gpu[:24]:<24} {r.status[:17]:<17} {r.dph:>6.3f}  "
                f"{r.uptime_h:>5.2f} h  ${r.accrued_usd:.3f}{'  (kept)' if r.keep else ''}"
            )
        for r in self.instances:
            if r.watchdog not in (None, "ok"):
                lines.append(f"WARNING for instance {r.instance_id}: {watchdog_warning(r.watchdog or '')}")
        cap = f" of the ${self.session_cap_usd:.2f} cap" if self.session_cap_usd is not None else ""
        lines.append(f"Session total so far: ${self.session_accrued_usd:.3f}{cap}.")
        lines += self.notices
        return "\n".join(lines)


class DestroyResult(BaseModel):
    instance_id: int
    confirmed: bool = Field(description="Vast reads the instance back as gone.")
    accrued_usd: float | None = None

    def summary(self) -> str:
        cost = f" It cost about ${self.accrued_usd:.3f}." if self.accrued_usd is not None else ""
        return f"Instance {self.instance_id} destroyed (confirmed); billing stopped.{cost}"


class CommandResult(BaseModel):
    instance_id: int
    exit_code: int | None
    timed_out: bool
    stdout_bytes: int = Field(description="Bytes the command wrote to stdout (shown in the text, the middle cut).")
    stderr_bytes: int = Field(description="Bytes the command wrote to stderr (shown in the text, the middle cut).")
    notes: list[str] = Field(default_factory=list)
    _stdout: str = PrivateAttr(default="")
    _stderr: str = PrivateAttr(default="")

    @classmethod
    def output(cls, stdout: str, stderr: str, **fields: Any) -> CommandResult:
        """The result with the command's output, which only the text content carries."""
        result = cls(**fields)
        result._stdout, result._stderr = stdout, stderr
        return result

    @property
    def stdout(self) -> str:
        return self._stdout

    @property
    def stderr(self) -> str:
        return self._stderr

    def summary(self) -> str:
        status = "timed out" if self.timed_out else f"exit code {self.exit_code}"
        notes = "".join(f"\nnote: {n}" for n in self.notes)
        frame = Frame(self._stdout, self._stderr)
        return (
            f"Command on instance {self.instance_id}: {status}.\n"
            f"{frame.block('stdout', self._stdout)}\n{frame.block('stderr', self._stderr)}{notes}"
        )


RunStatus = Literal[
    "approval_required", "declined", "running", "recovering", "waiting", "succeeded", "failed", "cancelled", "listed"
]
TryOutcome = Literal["starting", "used", "failed", "lost"]  # lost: the machine went mid-job (recovery)
RunPhase = Literal["renting", "booting", "uploading", "running", "downloading", "destroying", "done"]


class RunTry(BaseModel):
    number: int = Field(description="1 for the first machine, then failovers and replacements of lost machines.")
    offer_id: int
    machine_id: int | None
    gpu: str
    dph: float = Field(description="$/hour quoted for this machine, disk included.")
    instance_id: int | None = None
    outcome: TryOutcome
    reason: str | None = Field(default=None, description="Why this machine was given up, in plain words.")
    destroyed: bool = Field(default=False, description="Vast confirmed the instance is gone.")
    kept: bool = Field(default=False, description="Kept for debugging at the caller's request (it keeps billing).")
    interruptible: bool = Field(default=False, description="Rented as a bid: it may be stopped when outbid.")
    seconds: float | None = Field(default=None, description="How long this machine was rented (the ledger).")
    cost_usd: float | None = Field(default=None, description="What this machine cost (the ledger).")


class RunApprovalView(BaseModel):
    approved_by: Literal["user", "auto_approve", "agent"] | None = None
    quote: QuoteView = Field(description="The first machine's price quote.")
    ceiling_dph: float = Field(description="Highest $/hour any machine of this run may cost (failovers included).")
    max_tries: int = Field(description="Most machines this run may rent one after the other.")
    max_runtime_hours: float
    text: str = Field(description="What the user approves, in words.")


class RunReceipt(BaseModel):
    outcome: Literal["succeeded", "failed", "cancelled"]
    gpu: str | None = None
    dph: float | None = Field(default=None, description="$/hour of the machine the job ran on.")
    runtime_s: float = Field(description="Whole run, from approval to the last destroy.")
    job_runtime_s: float | None = None
    total_cost_usd: float = Field(description="Every machine of the run, failed tries included, from the ledger.")
    exit_code: int | None = None
    results_dir: str | None = None
    result_files: int = 0
    missing_results: list[str] = Field(default_factory=list)
    refused_results: list[str] = Field(
        default_factory=list, description="Result files not written locally (unsafe, name too long, no room), why."
    )
    destroyed: bool = Field(description="Every instance of the run is confirmed gone.")
    kept_instance_id: int | None = None
    error: str | None = None
    machines: list[RunTry] = Field(default_factory=list, description="Every machine of the run, its time and cost.")
    recoveries: int = Field(default=0, description="Machines lost mid-job and replaced (the job resumed).")
    on_demand_cost_usd: float | None = Field(
        default=None, description="Interruptible runs: the same machine time at on-demand prices."
    )
    checkpoint_dir: str | None = Field(default=None, description="Local copy of the job's last checkpoint.")
    _log_tail: str = PrivateAttr(default="")

    @property
    def log_tail(self) -> str:
        """End of the job's log (secrets masked), shown in the text when the run did not succeed."""
        return self._log_tail

    def with_log_tail(self, text: str) -> RunReceipt:
        self._log_tail = text
        return self


class RunBrief(BaseModel):
    """One run of this or an earlier session, in a list."""

    run_id: str
    status: str = Field(description="running, recovering, waiting (results on a stopped instance), succeeded, ...")
    started_at: float = Field(description="Unix time.")
    detail: str = ""
    instance_id: int | None = None
    cost_usd: float = 0.0
    results_dir: str | None = Field(default=None, description="Where the results land (or landed) locally.")


class RunView(BaseModel):
    status: RunStatus
    run_id: str | None = None
    phase: RunPhase | None = None
    detail: str = Field(default="", description="What the run is doing right now.")
    elapsed_s: float = 0.0
    cost_usd: float = Field(default=0.0, description="Accrued so far over every machine of the run.")
    instance_id: int | None = None
    job_id: str | None = None
    tries: list[RunTry] = Field(default_factory=list)
    approval: RunApprovalView | None = None
    cursor: int = Field(default=0, description="Run log offset this answer's log starts at.")
    next_cursor: int = Field(default=0, description="Pass this as cursor to run_status next time.")
    log_more: bool = Field(default=False, description="More log is already waiting beyond next_cursor.")
    log_skipped_bytes: int = Field(default=0, description="Older log bytes no longer kept by the server.")
    receipt: RunReceipt | None = None
    message: str | None = None
    warnings: list[str] = Field(default_factory=list, description="Problems found before the job started.")
    sweep_runs: list[str] = Field(default_factory=list, description="Every run of a sweep; follow each one.")
    runs: list[RunBrief] | None = Field(default=None, description="Recent runs, when no run_id was given.")
    notices: list[str] = Field(default_factory=list, description="What happened while nobody was connected.")
    _log: str = PrivateAttr(default="")

    def with_log(self, text: str) -> RunView:
        """This view with the job log page, which only the text content carries."""
        self._log = text
        return self

    @property
    def log(self) -> str:
        return self._log

    def summary(self) -> str:
        if self.status == "approval_required":
            assert self.approval is not None
            return (
                f"Nothing rented yet: the user must approve this run first.\n{self.approval.text}\n"
                f"Show this to the user. Only if they approve, call run_job again with the same arguments plus "
                f"quote_id='{self.approval.quote.quote_id}'. Do not approve it yourself."
            )
        if self.status == "declined":
            return self.message or "Declined; nothing was rented and nothing is billed."
        if self.runs is not None:
            return "\n".join([*self.notices, *_run_lines(self.runs)])
        lines = [self._headline(), *self.notices]
        if self.message:
            lines.append(self.message)
        if self.sweep_runs:
            lines.append(f"Sweep of {len(self.sweep_runs)} runs, this is the first: {', '.join(self.sweep_runs)}.")
        lines += [f"WARNING: {w}" for w in self.warnings]
        if self.receipt is None or not self.receipt.machines:  # the receipt lists them itself
            lines += [f"  try {t.number}: {t.gpu} ${t.dph:.3f}/hr, {_try_words(t)}" for t in self.tries]
        tail = self.receipt.log_tail if self.receipt is not None and self.receipt.outcome != "succeeded" else ""
        frame = Frame(self._log, tail)
        if self._log or self.log_skipped_bytes:
            skipped = f" ({self.log_skipped_bytes} older bytes no longer kept)" if self.log_skipped_bytes else ""
            lines.append(f"Job log {self.cursor}-{self.next_cursor}{skipped}:")
            lines.append(frame.block("log", self._log))
        if self.receipt is not None:
            lines.append(_receipt_words(self.receipt, frame))
        elif self.run_id is not None:
            more = " More log is waiting: call at once." if self.log_more else ""
            lines.append(f"Next: run_status run_id='{self.run_id}' cursor={self.next_cursor}.{more}")
        return "\n".join(lines)

    def _headline(self) -> str:
        cost = f"${self.cost_usd:.4f} so far"
        where = f" on instance {self.instance_id}" if self.instance_id is not None else ""
        if self.status in ("running", "recovering"):
            detail = f": {self.detail}" if self.detail else ""
            return f"Run {self.run_id} {self.phase}{where}{detail} ({self.elapsed_s:.0f} s, {cost})."
        return f"Run {self.run_id} {self.status} after {self.elapsed_s:.0f} s."


def _run_lines(runs: list[RunBrief]) -> list[str]:
    if not runs:
        return ["No runs yet."]
    lines = ["Recent runs (newest first):"]
    for r in runs:
        where = (
            f", instance {r.instance_id}"
            if r.instance_id is not None and r.status in ("running", "recovering", "waiting")
            else ""
        )
        results = f", results in {r.results_dir}" if r.results_dir else ""
        lines.append(f"  {r.run_id}: {r.status}{where}, ${r.cost_usd:.4f}{results}")
    return lines


def _try_words(t: RunTry) -> str:
    where = f"instance {t.instance_id}" if t.instance_id is not None else f"offer {t.offer_id}"
    if t.outcome == "starting":
        return f"{where} starting"
    if t.outcome == "used":
        end = ", kept" if t.kept else ", destroyed" if t.destroyed else ""
        return f"{where} runs the job{end}" if not (t.kept or t.destroyed) else f"{where} ran the job{end}"
    end = ", kept" if t.kept else ", destroyed" if t.destroyed else ""
    if t.outcome == "lost":
        return f"{where} lost mid-job{end}: {t.reason}"
    return f"{where} failed{end}: {t.reason}"


def _machine_words(t: RunTry) -> str:
    bid = " (bid)" if t.interruptible else ""
    used = f", {t.seconds:.0f} s, ${t.cost_usd:.4f}" if t.seconds is not None and t.cost_usd is not None else ""
    return f"  machine {t.number}: {t.gpu} ${t.dph:.3f}/hr{bid}{used}; {_try_words(t)}"


def _receipt_words(r: RunReceipt, frame: Frame) -> str:
    lines = ["Receipt:"]
    if r.gpu is not None and r.dph is not None:
        lines.append(f"  GPU {r.gpu} at ${r.dph:.3f}/hr")
    job = f", job {r.job_runtime_s:.0f} s" if r.job_runtime_s is not None else ""
    lines.append(f"  runtime {r.runtime_s:.0f} s{job}; total cost ${r.total_cost_usd:.4f} (every try, from the ledger)")
    lines += [_machine_words(t) for t in r.machines]
    if r.recoveries:
        lines.append(f"  {r.recoveries} machine(s) lost mid-job; the job resumed on the next one")
    if r.on_demand_cost_usd is not None:
        saved = r.on_demand_cost_usd - r.total_cost_usd
        pct = f" ({saved / r.on_demand_cost_usd * 100:.0f}%)" if r.on_demand_cost_usd > 0 else ""
        lines.append(
            f"  interruptible: on demand the same machine time would have cost ${r.on_demand_cost_usd:.4f}; "
            f"{'saved' if saved >= 0 else 'extra'} ${abs(saved):.4f}{pct}"
        )
    if r.checkpoint_dir is not None:
        lines.append(f"  last checkpoint kept in {r.checkpoint_dir}")
    if r.exit_code is not None:
        lines.append(f"  job exit code {r.exit_code}")
    if r.results_dir is not None:
        missing = f"; not found on the instance: {name_list(r.missing_results)}" if r.missing_results else ""
        lines.append(f"  results: {r.result_files} file(s) in {r.results_dir}{missing}")
        if r.refused_results:
            lines.append(f"  not written ({len(r.refused_results)}): {'; '.join(r.refused_results[:10])}")
    if r.error:
        lines.append(f"  problem: {r.error}")
    if r.kept_instance_id is not None:
        lines.append(
            f"  instance {r.kept_instance_id} KEPT for debugging: it keeps billing until you call destroy on it"
        )
    elif r.destroyed:
        lines.append("  every instance of the run is destroyed (confirmed); nothing bills")
    else:
        lines.append("  an instance could NOT be confirmed destroyed: call list_instances and destroy it")
    if r.outcome != "succeeded" and r.log_tail:
        lines.append(f"  end of the job log:\n{frame.block('log-end', r.log_tail)}")
    return "\n".join(lines)
