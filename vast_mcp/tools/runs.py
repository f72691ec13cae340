"""`run_job` and `run_status`: the whole workflow as one server-side run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.elicitation import ElicitationResult
from mcp.server.mcpserver import Context, Elicit, Resolve
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult
from pydantic import Field

from ..approval import Pending, Refusal, YesNo, read_answer
from ..image_ref import check_image
from ..multinode import MAX_NODES
from ..results import (
    RunView,
)
from ..runcodec import recent_view, stored_view
from ..supervisor import cancel_run, fetch_run
from ..sweep import MAX_SWEEP, start_sweep
from ..vast.query import OfferFilters
from ..workflow import RunPlan, RunSpec, plan_run
from .common import (
    AppState,
    EnvVars,
    MaxRuntimeHours,
    QuoteId,
    SecretVars,
    WaitS,
    agent_errors,
    answered,
    ask,
    can_elicit,
    progress_of,
    runs_of,
    service_of,
    tool,
    tool_result,
)
from .run_args import RunOffer, RunOptions

DEFAULT_RUN_IMAGE = "pytorch/pytorch"
STORED_POLL_S = 2.0  # how often run_status re-reads a run another process follows


@dataclass(frozen=True)
class _RunPlanning:
    """What run_job's arguments come to before anyone is asked: the spec, and the priced plan (or why not)."""

    spec: RunSpec | None = None
    plan: RunPlan | None = None
    error: str | None = None


async def _plan_run_job(
    command: str,
    max_runtime_hours: float,
    image: str | None,
    max_dph: float | None,
    upload: list[str] | None,
    setup: list[str] | None,
    results: list[str] | None,
    env: dict[str, str] | None,
    secrets: dict[str, str] | None,
    offer: RunOffer | None,
    options: RunOptions | None,
    quote_id: str | None,
    ctx: Context[AppState, Any],
    nodes: int = 1,
    sweep: list[str] | None = None,
) -> _RunPlanning:
    """Price the run (search, quote, ceiling) once per call round, for both the question and the tool body.

    A resolver receives the tool's arguments by name only, hence the signature that repeats `run_job`'s.
    Never raises: a problem is carried to the tool body, which reports it as a `ToolError`.
    """
    try:
        with agent_errors():
            machine = offer or RunOffer()
            opts = options or RunOptions()
            template_hash = opts.template_hash
            if image is not None and template_hash is not None:
                raise ToolError("Give at most one of image or options.template_hash.")
            if image is not None:
                check_image(image)
            if nodes > 1 and opts.keep_on_failure:
                raise ToolError("keep_on_failure is for one machine; a multi-node run always destroys its nodes.")
            if nodes > 1 and machine.interruptible:
                raise ToolError(
                    "A multi-node run rents on demand: outbidding any one machine would stop the whole group. Give "
                    "nodes without offer.interruptible (options.checkpoint_dir still lets it recover a lost machine)."
                )
            if sweep and (nodes > 1 or opts.keep_on_failure):
                raise ToolError("A sweep runs each entry on one machine: give it without nodes or keep_on_failure.")
            filters = OfferFilters(
                gpu_name=machine.gpu_name,
                num_gpus=machine.num_gpus,
                min_gpu_ram_gb=machine.min_gpu_ram_gb,
                max_dph=max_dph,
                min_reliability=machine.min_reliability,
                countries=machine.countries,
            )
            service = await service_of(ctx)
            spec = RunSpec(
                command=command,
                image=image if image is not None or template_hash is not None else DEFAULT_RUN_IMAGE,
                template_hash=template_hash,
                filters=filters,
                query=machine.query,
                disk_gb=machine.disk_gb,
                max_runtime_h=max_runtime_hours,
                budget_dph=max_dph,
                uploads=tuple(upload or ()),
                remote_dir=opts.remote_dir,
                exclude=tuple(opts.exclude or ()),
                setup=tuple(setup or ()),
                env=dict(env or {}),
                secrets=dict(secrets or {}),
                results=tuple(results or ()),
                results_dir=opts.local_results_dir,
                keep_on_failure=opts.keep_on_failure,
                ready_timeout_s=opts.ready_timeout_s,
                max_tries=opts.max_tries,
                checkpoint_dir=opts.checkpoint_dir,
                checkpoint_every_s=service.settings.checkpoint_every_s,
                interruptible=machine.interruptible,
                bid_margin=service.settings.bid_margin,
                nodes=nodes,
                sweep=tuple(sweep or ()),
            )
            if quote_id is not None:
                return _RunPlanning(spec=spec)  # the honour system: the plan shown earlier is redeemed
            plan = await plan_run(service, spec, allow_cap_raise=can_elicit(ctx))
            return _RunPlanning(spec=spec, plan=plan)
    except ToolError as exc:
        return _RunPlanning(error=str(exc))


async def _ask_run_approval(
    planning: Annotated[_RunPlanning, Resolve(_plan_run_job)],
    ctx: Context[AppState, Any],
) -> Elicit[YesNo] | None:
    """Ask the user to approve the run's price ceiling, when the client can show a form and it is needed."""
    plan = planning.plan
    if plan is None:
        return None
    service = await service_of(ctx)
    raises_cap = plan.raise_cap_to is not None
    if not service.approvals.should_ask(
        plan.quote, can_ask=can_elicit(ctx), keeps=plan.spec.keep_on_failure, raises_cap=raises_cap
    ):
        return None
    return ask(plan.question(service.cap_raise_words(plan.raise_cap_to)) + " Approve this run?")


def register(mcp: MCPServer) -> None:
    @tool(mcp, "Run a job on a rented GPU", read_only=False, destructive=False, idempotent=False, open_world=True)
    async def run_job(
        ctx: Context[AppState, Any],
        planning: Annotated[_RunPlanning, Resolve(_plan_run_job)],
        approval: Annotated[ElicitationResult[YesNo], Resolve(_ask_run_approval)],
        command: Annotated[str, Field(min_length=1, max_length=20_000, description="The job: bash command or script.")],
        max_runtime_hours: MaxRuntimeHours,
        image: Annotated[
            str | None, Field(max_length=300, description="Docker image; default pytorch/pytorch.")
        ] = None,
        max_dph: Annotated[
            float | None, Field(gt=0, le=1000, description="Budget, $/hour with disk; failovers too.")
        ] = None,
        upload: Annotated[
            list[str] | None, Field(max_length=100, description="Local files/folders to upload first.")
        ] = None,
        setup: Annotated[
            list[str] | None, Field(max_length=50, description="Commands run before the job (pip install ...).")
        ] = None,
        results: Annotated[
            list[str] | None, Field(max_length=100, description="Instance paths to download at the end.")
        ] = None,
        env: EnvVars = None,
        secrets: SecretVars = None,
        offer: Annotated[RunOffer | None, Field(description="Which machines (search_offers' filters).")] = None,
        options: Annotated[RunOptions | None, Field(description="Rarely needed.")] = None,
        quote_id: QuoteId = None,
        nodes: Annotated[
            int,
            Field(
                ge=1,
                le=MAX_NODES,
                description="Machines of one cluster for one torchrun job (command is its script); results from "
                "rank 0, 'all-ranks:PATH' from every node. With options.checkpoint_dir (rank 0 saves) a lost node is "
                "replaced.",
            ),
        ] = 1,
        sweep: Annotated[
            list[Annotated[str, Field(max_length=1000)]] | None,
            Field(
                min_length=1,
                max_length=MAX_SWEEP,
                description="One run per entry at once, each on its own machine with $SWEEP_ARG set; one approval.",
            ),
        ] = None,
    ) -> Annotated[CallToolResult, RunView]:
        """The whole job in one call: rent, upload, setup, run, download results, destroy. COSTS MONEY.

        The user approves a price ceiling (max_dph, else the dearest of the cheapest few matches) for
        max_runtime_hours on up to 3 machines; a machine that fails to start is destroyed and the next tried.
        Returns at once with run_id; follow with run_status. If the client goes away, a supervisor finishes the run.
        """
        answered()
        with agent_errors():
            if planning.error is not None:
                raise ToolError(planning.error)
            assert planning.spec is not None
            spec = planning.spec
            service = await service_of(ctx)
            can_ask = can_elicit(ctx)
            if quote_id is not None:
                grant = service.approvals.redeem(quote_id, digest=spec.digest(), can_ask=can_ask)
            else:
                plan = planning.plan
                assert plan is not None
                decision = service.approvals.rent(
                    plan.quote,
                    read_answer(approval),
                    can_ask=can_ask,
                    digest=spec.digest(),
                    ceiling_dph=plan.ceiling_dph,
                    ceiling_why=plan.ceiling_why,
                    keeps=spec.keep_on_failure,
                    raise_cap_to=plan.raise_cap_to,
                )
                if isinstance(decision, Refusal):
                    declined = RunView(status="declined", approval=plan.view(None), message=decision.message)
                    return tool_result(declined, declined.summary())
                if isinstance(decision, Pending):
                    pending = RunView(status="approval_required", approval=plan.view(None, with_id=True))
                    return tool_result(pending, pending.summary())
                grant = decision
            book = await runs_of(ctx)
            runs = await start_sweep(book, spec, grant) if spec.sweep else [book.start(spec, grant)]
            result = await book.view(runs[0], with_approval=True)
            if spec.sweep:
                result.sweep_runs = [r.id for r in runs]
        return tool_result(result, result.summary())

    @tool(mcp, "Follow a run", read_only=False, destructive=True, idempotent=False, open_world=True)
    async def run_status(
        ctx: Context[AppState, Any],
        run_id: Annotated[
            str | None, Field(min_length=1, max_length=64, description="Omit to list recent runs.")
        ] = None,
        cursor: Annotated[int, Field(ge=0, description="Log offset: 0, then next_cursor.")] = 0,
        wait_s: WaitS = 40.0,
        action: Annotated[
            Literal["fetch", "destroy"] | None,
            Field(description="fetch: download a waiting run's results, then destroy; destroy: end the run now."),
        ] = None,
    ) -> Annotated[CallToolResult, RunView]:
        """A run's phase, cost so far, machines tried (and why they failed) and new job log; the receipt at the
        end. Waits for the end, answering early when a page of log is waiting. Runs outlive sessions: any later
        session finds them here. waiting: the job ended while nobody was connected; its results wait on a stopped
        instance (billing its disk) until action fetch or destroy."""
        with agent_errors():
            book = await runs_of(ctx)
            service = book.service
            if run_id is None:
                listed = await recent_view(service, book.store)
                return tool_result(listed, listed.summary())
            run = book.find(run_id)
            if action == "destroy":
                if run is not None:  # stopped first, so it does not take its machines' end for a loss
                    book.cancel(run, "cancelled on request; its instances are destroyed")
                await cancel_run(service.client, service.ledger, book.store, run_id)
                if run is not None:
                    with anyio.move_on_after(10):
                        await run.done.wait()
            elif action == "fetch":
                run = await fetch_run(book, run_id)
            if run is None:
                rec = await book.store.get(run_id)
                if rec is None or rec.scope != service.scope:
                    book.get(run_id)  # raises, naming the runs of this session
                assert rec is not None
                with anyio.move_on_after(wait_s):  # another process follows it: watch the ledger for its end
                    while rec is not None and rec.state in ("running", "recovering"):
                        await anyio.sleep(STORED_POLL_S)
                        rec = await book.store.get(run_id)
                assert rec is not None
                stored = await stored_view(service, rec)
                return tool_result(stored, stored.summary())
            await book.wait(run, cursor, wait_s, progress_of(ctx))
            result = await book.view(run, cursor)
        return tool_result(result, result.summary())
