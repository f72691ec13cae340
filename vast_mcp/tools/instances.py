"""Tools that find, rent, wait for, list, keep and destroy instances."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from mcp.server import MCPServer
from mcp.server.elicitation import ElicitationResult
from mcp.server.mcpserver import Context, Elicit, Resolve
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult
from pydantic import Field

from ..errors import VastMCPError
from ..results import (
    CreateResult,
    DestroyResult,
    InstancesResult,
    OffersResult,
    ReadyResult,
)
from ..service import ApprovedBy, CreateRequest, quote_view
from ..vast.query import OfferFilters
from .common import (
    MAX_CALL_S,
    Approval,
    AppState,
    Countries,
    DiskGb,
    EnvVars,
    GpuName,
    InstanceId,
    MinGpuRamGb,
    MinReliability,
    NumGpus,
    OfferQuery,
    QuoteId,
    TemplateHash,
    agent_errors,
    can_elicit,
    progress_of,
    service_of,
    tool,
    tool_result,
    users_answer,
)


def _request(
    offer_id: int,
    disk_gb: float,
    max_runtime_hours: float,
    image: str | None,
    template_hash: str | None,
    onstart: str | None,
    env: dict[str, str] | None,
) -> CreateRequest:
    if (image is None) == (template_hash is None):
        raise ToolError("Give exactly one of image (a Docker image such as pytorch/pytorch) or template_hash.")
    return CreateRequest(
        offer_id=offer_id,
        disk_gb=disk_gb,
        max_runtime_h=max_runtime_hours,
        image=image,
        template_hash=template_hash,
        onstart=onstart,
        env=env or {},
    )


async def _ask_user(
    offer_id: int,
    disk_gb: float,
    max_runtime_hours: float,
    image: str | None,
    template_hash: str | None,
    onstart: str | None,
    env: dict[str, str] | None,
    quote_id: str | None,
    ctx: Context[AppState, Any],
) -> Elicit[Approval] | None:
    """Ask the user to approve the quote, when the client can show a form and no other approval applies.

    Never raises: when anything is off, nothing is asked and the tool body reports the problem properly.
    Asking again for the same request shows the same quote (the quote book hands back the open one).
    """
    if quote_id is not None or not can_elicit(ctx):
        return None
    try:
        service = service_of(ctx)
        quote = await service.quote(_request(offer_id, disk_gb, max_runtime_hours, image, template_hash, onstart, env))
    except (VastMCPError, ToolError, ValueError):
        return None
    if not service.needs_approval(quote):
        return None
    return Elicit(quote.describe() + " Approve this rental?", Approval)


def register(mcp: MCPServer) -> None:
    @tool(mcp, "Search GPU offers", read_only=True, destructive=False, idempotent=True, open_world=True)
    async def search_offers(
        ctx: Context[AppState, Any],
        gpu_name: GpuName = None,
        num_gpus: NumGpus = None,
        min_gpu_ram_gb: MinGpuRamGb = None,
        max_dph: Annotated[
            float | None, Field(gt=0, le=1000, description="Highest price in $/hour (disk included).")
        ] = None,
        min_reliability: MinReliability = 0.95,
        countries: Countries = None,
        query: OfferQuery = "",
        disk_gb: DiskGb = 32.0,
        order: Annotated[
            str, Field(max_length=200, description="Sort fields, '-' for descending: 'dph' (cheapest first).")
        ] = "dph",
        limit: Annotated[int, Field(ge=1, le=50, description="How many offers to return (best first).")] = 5,
    ) -> Annotated[CallToolResult, OffersResult]:
        """Find rentable GPU machines on Vast.ai and their prices. Read-only and free: nothing is rented.

        Returns a ranked table: offer_id, GPU, $/hour with the requested disk priced in, reliability, location.
        Verified machines only unless the query says `verified=any`. Pass an offer_id to create_instance.
        """
        with agent_errors():
            filters = OfferFilters(
                gpu_name=gpu_name,
                num_gpus=num_gpus,
                min_gpu_ram_gb=min_gpu_ram_gb,
                max_dph=max_dph,
                min_reliability=min_reliability,
                countries=countries,
            )
            service = service_of(ctx)
            result = await service.search(query=query, filters=filters, disk_gb=disk_gb, order=order, limit=limit)
        return tool_result(result, result.summary())

    @tool(mcp, "Rent a GPU instance", read_only=False, destructive=False, idempotent=False, open_world=True)
    async def create_instance(
        ctx: Context[AppState, Any],
        approval: Annotated[ElicitationResult[Approval], Resolve(_ask_user)],
        offer_id: Annotated[int, Field(ge=1, description="offer_id from search_offers.")],
        max_runtime_hours: Annotated[
            float,
            Field(gt=0, le=720, description="Longest the job may run; the projected cost the user approves uses it."),
        ],
        image: Annotated[
            str | None, Field(max_length=300, description="Docker image, e.g. 'pytorch/pytorch:latest'.")
        ] = None,
        template_hash: TemplateHash = None,
        disk_gb: DiskGb = 32.0,
        onstart: Annotated[
            str | None, Field(max_length=4000, description="Shell commands run once at boot (setup, not the job).")
        ] = None,
        env: EnvVars = None,
        quote_id: QuoteId = None,
    ) -> Annotated[CallToolResult, CreateResult]:
        """Rent a GPU instance from an offer. COSTS MONEY from creation until destroy (about $/hour × hours).

        The user must approve the price: the client shows them a quote (GPU, $/hour with disk, projected cost for
        max_runtime_hours, reliability, location) when it can; otherwise this returns status 'approval_required'
        with a quote_id, and you must show the quote to the user and call again with quote_id only if they agree.
        Server-side caps on $/hour, session spend and instance count always apply. The instance is destroyed when
        this session ends unless keep_instance was used. Next step: wait_ready.
        """
        with agent_errors():
            service = service_of(ctx)
            request = _request(offer_id, disk_gb, max_runtime_hours, image, template_hash, onstart, env)
            approved_by: ApprovedBy
            if quote_id is not None:
                quote = service.quotes.redeem(
                    quote_id, offer_id, request.params(), disk_gb=disk_gb, max_runtime_h=max_runtime_hours
                )
                approved_by = "quote_id"
            else:
                quote = await service.quote(request)
                if not service.needs_approval(quote):
                    approved_by = "auto_approve"
                else:
                    answer = users_answer(ctx, approval)
                    if answer != "user":
                        result = CreateResult(status=answer, quote=quote_view(quote))
                        return tool_result(result, result.summary())
                    approved_by = "user"
                service.quotes.redeem(
                    quote.quote_id, offer_id, request.params(), disk_gb=disk_gb, max_runtime_h=max_runtime_hours
                )
            with anyio.fail_after(MAX_CALL_S):
                result = await service.create(request, quote, approved_by, progress_of(ctx))
        return tool_result(result, result.summary())

    @tool(mcp, "Wait until the instance is usable", read_only=True, destructive=False, idempotent=True, open_world=True)
    async def wait_ready(
        ctx: Context[AppState, Any],
        instance_id: InstanceId,
        timeout_s: Annotated[float, Field(ge=1, le=MAX_CALL_S, description="Longest this call waits.")] = 40.0,
    ) -> Annotated[CallToolResult, ReadyResult]:
        """Wait until an instance is really usable: Vast says running, SSH accepts our key and a command runs.

        Waits at most timeout_s (≤ 45) and reports progress; if it is not ready yet, call again (the instance keeps
        booting). Reports the GPUs (nvidia-smi), free disk and Python version, and warns when the image cannot run
        the dead-man's switch. Not ready: names the SSH step that failed and why, and what a repeated failure
        probably means. failed=true means the instance cannot recover (exited/offline): destroy it and pick
        another offer.
        """
        with agent_errors():
            result = await service_of(ctx).wait_ready(instance_id, timeout_s, progress_of(ctx))
        return tool_result(result, result.summary())

    @tool(mcp, "Destroy an instance", read_only=False, destructive=True, idempotent=True, open_world=True)
    async def destroy(
        ctx: Context[AppState, Any],
        instance_id: InstanceId,
        confirm_not_mine: Annotated[
            bool,
            Field(description="Needed only for an instance this session did not create, after the user agreed."),
        ] = False,
    ) -> Annotated[CallToolResult, DestroyResult]:
        """Destroy an instance: billing stops and its disk is deleted (download results first).

        Waits until Vast confirms it is gone. Safe to repeat. Instances of other sessions or created outside this
        server need confirm_not_mine=true, which you may pass only after the user explicitly agreed.
        """
        with agent_errors():
            result = await service_of(ctx).destroy(instance_id, foreign_ok=confirm_not_mine)
        return tool_result(result, result.summary())

    @tool(mcp, "List this session's instances", read_only=True, destructive=False, idempotent=True, open_world=True)
    async def list_instances(ctx: Context[AppState, Any]) -> Annotated[CallToolResult, InstancesResult]:
        """The instances this session created: status, $/hour, uptime and accrued cost, plus the session total."""
        with agent_errors():
            result = await service_of(ctx).list_session()
        return tool_result(result, result.summary())

    @tool(mcp, "Keep an instance", read_only=False, destructive=False, idempotent=True, open_world=True)
    async def keep_instance(
        ctx: Context[AppState, Any],
        instance_id: InstanceId,
        keep: Annotated[bool, Field(description="True: survive the session's end. False: destroyed at the end.")],
    ) -> Annotated[CallToolResult, InstancesResult]:
        """Mark an instance to survive the end of this session (it keeps billing!). Only when the user asks."""
        with agent_errors():
            service = service_of(ctx)
            await service.keep(instance_id, keep)
            result = await service.list_session()
        what = "kept after the session ends (it keeps billing)" if keep else "destroyed when the session ends"
        return tool_result(result, f"Instance {instance_id} will be {what}.\n" + result.summary())
