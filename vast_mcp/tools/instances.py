"""Tools that find, rent, wait for, list, keep and destroy instances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from mcp.server import MCPServer
from mcp.server.elicitation import ElicitationResult
from mcp.server.mcpserver import Context, Elicit, Resolve
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult
from pydantic import Field

from ..approval import Pending, Refusal, YesNo, read_answer
from ..consent import Quote
from ..errors import VastMCPError
from ..image_ref import check_image
from ..results import (
    CreateResult,
    DestroyResult,
    InstancesResult,
    OffersResult,
    ReadyResult,
)
from ..service import CreateRequest, Service, quote_view
from ..vast.query import OfferFilters
from .common import (
    MAX_CALL_S,
    AppState,
    Countries,
    DiskGb,
    EnvVars,
    GpuName,
    InstanceId,
    MaxRuntimeHours,
    MinGpuRamGb,
    MinReliability,
    NumGpus,
    OfferQuery,
    QuoteId,
    TemplateHash,
    agent_errors,
    answered,
    ask,
    can_elicit,
    progress_of,
    service_of,
    tool,
    tool_result,
)

MIN_READY_WAIT_S = 1.0  # less room than this left after renting: the answer says to call wait_ready instead


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
    if image is not None:
        check_image(image)
    return CreateRequest(
        offer_id=offer_id,
        disk_gb=disk_gb,
        max_runtime_h=max_runtime_hours,
        image=image,
        template_hash=template_hash,
        onstart=onstart,
        env=env or {},
    )


@dataclass(frozen=True)
class _Pricing:
    """create_instance's request and its quote, priced once per call for both the question and the tool body."""

    request: CreateRequest | None = None
    quote: Quote | None = None
    error: str | None = None
    raise_cap_to: float | None = None  # the session spend cap this rental needs, asked of the user


async def _price(
    offer_id: int,
    disk_gb: float,
    max_runtime_hours: float,
    image: str | None,
    template_hash: str | None,
    onstart: str | None,
    env: dict[str, str] | None,
    quote_id: str | None,
    ctx: Context[AppState, Any],
) -> _Pricing:
    """Never raises: a problem is carried to the tool body, which reports it as a `ToolError`."""
    try:
        with agent_errors():
            request = _request(offer_id, disk_gb, max_runtime_hours, image, template_hash, onstart, env)
            if quote_id is not None:
                return _Pricing(request=request)  # the honour system: the quote shown earlier is redeemed
            service = await service_of(ctx)
            can_ask = can_elicit(ctx)
            quote = await service.quote(request, allow_cap_raise=can_ask)
            return _Pricing(request, quote, raise_cap_to=await service.cap_needed(quote) if can_ask else None)
    except ToolError as exc:
        return _Pricing(error=str(exc))


async def _ask_rent(pricing: Annotated[_Pricing, Resolve(_price)], ctx: Context[AppState, Any]) -> Elicit[YesNo] | None:
    """Put the price to the user when the client can show a form and no configured pre-approval covers it."""
    quote = pricing.quote
    if quote is None:
        return None
    service = await service_of(ctx)
    if not service.approvals.should_ask(quote, can_ask=can_elicit(ctx), raises_cap=pricing.raise_cap_to is not None):
        return None
    return ask(quote.describe() + service.cap_raise_words(pricing.raise_cap_to) + " Approve this rental?")


async def _ask_keep(instance_id: int, keep: bool, ctx: Context[AppState, Any]) -> Elicit[YesNo] | None:
    if not keep or not can_elicit(ctx):
        return None
    row = await (await service_of(ctx)).own(instance_id)
    if row is None or not row.is_live:
        return None
    return ask(
        f"Keep instance {instance_id} ({row.gpu}) after this session ends? It keeps billing ${row.dph:.3f}/hr "
        f"(${row.dph * 24:.2f} a day) with no end date until someone destroys it: this server stops watching it, "
        "its max runtime no longer applies, and its self-destruct watchdog is disarmed."
    )


async def _ask_destroy(instance_id: int, ctx: Context[AppState, Any]) -> Elicit[YesNo] | None:
    if not can_elicit(ctx):
        return None
    service = await service_of(ctx)
    if await service.own(instance_id) is not None:
        return None
    try:
        inst = await service.client.show_instance(instance_id)
    except VastMCPError:
        return None
    if inst is None:
        return None
    what = f"{inst.num_gpus}× {inst.gpu_name}" if inst.gpu_name else "an instance"
    label = f", labelled {inst.label!r}" if inst.label else ""
    return ask(
        f"Destroy instance {instance_id} ({what}, {inst.actual_status or 'status unknown'}{label})? This session did "
        "not create it. Destroying deletes its disk and everything on it; its billing stops."
    )


def register(mcp: MCPServer) -> None:
    @tool(mcp, "Search GPU offers", read_only=True, destructive=False, idempotent=True, open_world=True)
    async def search_offers(
        ctx: Context[AppState, Any],
        gpu_name: GpuName = None,
        num_gpus: NumGpus = None,
        min_gpu_ram_gb: MinGpuRamGb = None,
        max_dph: Annotated[float | None, Field(gt=0, le=1000, description="Max $/hour with disk.")] = None,
        min_reliability: MinReliability = 0.95,
        countries: Countries = None,
        query: OfferQuery = "",
        disk_gb: DiskGb = 32.0,
        order: Annotated[str, Field(max_length=200, description="Sort fields, '-' for descending.")] = "dph",
        limit: Annotated[int, Field(ge=1, le=50)] = 3,
    ) -> Annotated[CallToolResult, OffersResult]:
        """Find rentable GPU machines, cheapest first; free, rents nothing. Rows: offer_id, GPU, $/hour with
        disk_gb priced in, reliability, location, CUDA. Verified hosts only unless query has verified=any."""
        with agent_errors():
            filters = OfferFilters(
                gpu_name=gpu_name,
                num_gpus=num_gpus,
                min_gpu_ram_gb=min_gpu_ram_gb,
                max_dph=max_dph,
                min_reliability=min_reliability,
                countries=countries,
            )
            service = await service_of(ctx)
            result = await service.search(query=query, filters=filters, disk_gb=disk_gb, order=order, limit=limit)
        return tool_result(result, result.summary())

    @tool(mcp, "Rent a GPU instance", read_only=False, destructive=False, idempotent=False, open_world=True)
    async def create_instance(
        ctx: Context[AppState, Any],
        pricing: Annotated[_Pricing, Resolve(_price)],
        approval: Annotated[ElicitationResult[YesNo], Resolve(_ask_rent)],
        offer_id: Annotated[int, Field(ge=1)],
        max_runtime_hours: MaxRuntimeHours,
        image: Annotated[str | None, Field(max_length=300, description="Docker image, e.g. 'pytorch/pytorch'.")] = None,
        template_hash: TemplateHash = None,
        disk_gb: DiskGb = 32.0,
        onstart: Annotated[
            str | None, Field(max_length=4000, description="Shell commands run once at boot (not the job).")
        ] = None,
        env: EnvVars = None,
        wait_s: Annotated[
            float, Field(ge=0, le=40, description="Then wait up to this long for it to be ready, as wait_ready.")
        ] = 40.0,
        quote_id: QuoteId = None,
    ) -> Annotated[CallToolResult, CreateResult]:
        """Rent an offer. COSTS MONEY until destroyed. The user approves the quote in a form; the instance is
        destroyed at max_runtime_hours and when this session ends unless kept. Not ready yet: call wait_ready."""
        answered()
        with agent_errors():
            if pricing.error is not None:
                raise ToolError(pricing.error)
            assert pricing.request is not None
            service = await service_of(ctx)
            can_ask = can_elicit(ctx)
            if quote_id is not None:
                grant = service.approvals.redeem(quote_id, digest=pricing.request.digest(), can_ask=can_ask)
            else:
                assert pricing.quote is not None
                decision = service.approvals.rent(
                    pricing.quote,
                    read_answer(approval),
                    can_ask=can_ask,
                    digest=pricing.request.digest(),
                    raise_cap_to=pricing.raise_cap_to,
                )
                if isinstance(decision, Refusal):
                    declined = CreateResult(
                        status="declined", quote=quote_view(pricing.quote), message=decision.message
                    )
                    return tool_result(declined, declined.summary())
                if isinstance(decision, Pending):
                    pending = CreateResult(status="approval_required", quote=quote_view(decision.quote, with_id=True))
                    return tool_result(pending, pending.summary())
                grant = decision
            started = anyio.current_time()
            with anyio.fail_after(MAX_CALL_S):
                result = await service.create(pricing.request, grant, progress_of(ctx))
            room = min(wait_s, MAX_CALL_S - (anyio.current_time() - started))
            if result.instance_id is not None and room >= MIN_READY_WAIT_S:
                result = await _then_wait(service, result, result.instance_id, room, ctx)
        return tool_result(result, result.summary())

    @tool(mcp, "Wait until the instance is usable", read_only=True, destructive=False, idempotent=True, open_world=True)
    async def wait_ready(
        ctx: Context[AppState, Any],
        instance_id: InstanceId,
        timeout_s: Annotated[float, Field(ge=1, le=MAX_CALL_S, description="Longest this call waits.")] = 40.0,
    ) -> Annotated[CallToolResult, ReadyResult]:
        """Wait until SSH logs in and a command runs; reports GPUs, free disk, Python. Not ready yet: call again
        (it keeps booting); the answer names the failing SSH step. failed=true: destroy it, pick another offer."""
        with agent_errors():
            result = await (await service_of(ctx)).wait_ready(instance_id, timeout_s, progress_of(ctx))
        return tool_result(result, result.summary())

    @tool(mcp, "Destroy an instance", read_only=False, destructive=True, idempotent=True, open_world=True)
    async def destroy(
        ctx: Context[AppState, Any],
        answer: Annotated[ElicitationResult[YesNo], Resolve(_ask_destroy)],
        instance_id: InstanceId,
    ) -> Annotated[CallToolResult, DestroyResult]:
        """Destroy an instance: billing stops, its disk is deleted (download first). Confirmed by reading it back.
        One this session did not create needs the user's yes in a form."""
        answered()
        with agent_errors():
            service = await service_of(ctx)
            if await service.own(instance_id) is None:
                if await service.client.show_instance(instance_id) is None:
                    raise ToolError(
                        f"Instance {instance_id} does not exist on this account, so there is nothing to destroy. "
                        "Call list_instances for this session's instances."
                    )
                service.approvals.destroy_foreign(instance_id, read_answer(answer), can_ask=can_elicit(ctx))
            result = await service.destroy(instance_id, foreign_ok=True)
        return tool_result(result, result.summary())

    @tool(mcp, "List this session's instances", read_only=True, destructive=False, idempotent=True, open_world=True)
    async def list_instances(ctx: Context[AppState, Any]) -> Annotated[CallToolResult, InstancesResult]:
        """This session's instances: status, $/hour, uptime, cost so far, end time; the session's spend and cap."""
        with agent_errors():
            result = await (await service_of(ctx)).list_session()
        return tool_result(result, result.summary())

    @tool(mcp, "Keep an instance", read_only=False, destructive=False, idempotent=True, open_world=True)
    async def keep_instance(
        ctx: Context[AppState, Any],
        answer: Annotated[ElicitationResult[YesNo], Resolve(_ask_keep)],
        instance_id: InstanceId,
        keep: Annotated[bool, Field(description="True: outlive the session. False: undo.")],
    ) -> Annotated[CallToolResult, InstancesResult]:
        """Only when the user asks: keep an instance after this session ends (it bills with no end date), after
        their yes in a form."""
        answered()
        with agent_errors():
            service = await service_of(ctx)
            if keep:
                await service.require_own(instance_id)
                service.approvals.keep(instance_id, read_answer(answer), can_ask=can_elicit(ctx))
            await service.keep(instance_id, keep)
            result = await service.list_session()
        what = "kept after the session ends (it keeps billing)" if keep else "destroyed when the session ends"
        return tool_result(result, f"Instance {instance_id} will be {what}.\n" + result.summary())


async def _then_wait(
    service: Service, created: CreateResult, instance_id: int, room: float, ctx: Context[AppState, Any]
) -> CreateResult:
    """The rental, with how waiting for it went: a wait that fails leaves the rental standing (and said)."""
    try:
        ready = await service.wait_ready(instance_id, room, progress_of(ctx))
    except VastMCPError as exc:
        return created.model_copy(update={"message": f"Not ready yet ({exc}). Call wait_ready."})
    return created.model_copy(update={"ready": ready})
